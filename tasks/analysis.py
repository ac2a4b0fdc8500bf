"""Steps 1-3 of a round: sample tokens, measure layer similarity (and the allocation method's own signal), allocate experts."""

from pathlib import Path

import pandas as pd
from prefect import get_run_logger, task

from layermoe_core import plots
from layermoe_core.analysis.allocation import AllocationSettings, allocate_experts, choose_classifier_layers
from layermoe_core.analysis.signals import neuron_signal, param_delta_signal
from layermoe_core.analysis.similarity import SimilarityScore, layer_similarity
from layermoe_core.data.corpus import CorpusSpec, Split, load_sequences, open_sequences, sample_token_rows
from layermoe_core.model.checkpoints import load_model, load_tokenizer

from .common import STEP_CACHE, publish_markdown, publish_table

TOKEN_STORE_DIR = "token-store"  # under the plan's workdir: every round of every plan there shares the tokenized corpora


@task(name="sample tokens", cache_policy=STEP_CACHE, persist_result=True)
def sample_tokens(
    corpora: dict[str, CorpusSpec],
    tokenizer_dir: Path,
    languages: list[str],
    num_tokens: int,
    seq_len: int,
    seed: int,
    split: Split,
    heldout_fraction: float,
    out_path: Path,
    store_dir: Path,
    parallel: bool | str = False,
) -> Path:
    """Seeded token rows per language, read from the token store in store_dir; out_path names them for the next steps."""
    path = sample_token_rows(
        {lang: corpora[lang] for lang in languages},
        load_tokenizer(tokenizer_dir),
        num_tokens=num_tokens,
        seq_len=seq_len,
        seed=seed,
        store_dir=store_dir,
        out_path=out_path,
        split=split,
        heldout_fraction=heldout_fraction,
        parallel=parallel,
    )
    get_run_logger().info("sampled %s: %s", split, {lang: rows.shape for lang, rows in open_sequences(path).items()})
    return path


@task(name="measure layer similarity", cache_policy=STEP_CACHE, persist_result=True)
def measure_similarity(
    model_dir: Path, tokens_path: Path, old_languages: list[str], new_languages: list[str], score: SimilarityScore, batch_size: int
) -> pd.DataFrame:
    model = load_model(model_dir)
    table = layer_similarity(model, load_sequences(tokens_path), old_languages, new_languages, batch_size=batch_size, score=score)
    publish_table("similarity", table.round(4), "Per-layer cross-lingual similarity of the parent (MLP inputs)")
    return table


@task(name="measure allocation signal", cache_policy=STEP_CACHE, persist_result=True)
def measure_allocation_signal(
    model_dir: Path, tokens_path: Path, old_languages: list[str], new_languages: list[str], settings: AllocationSettings, batch_size: int
) -> pd.DataFrame | None:
    """The per-layer signal of "neuron" and "param_delta" (None for the methods that read the similarity or nothing)."""
    if settings.method not in ("neuron", "param_delta"):
        return None
    model, sequences = load_model(model_dir), load_sequences(tokens_path)
    if settings.method == "neuron":
        table = neuron_signal(model, sequences, old_languages, new_languages, settings.neurons_per_language, batch_size)
    else:
        table = param_delta_signal(model, {lang: sequences[lang] for lang in new_languages}, settings.finetune_steps,
                                   settings.finetune_learning_rate, settings.finetune_batch_size)
    publish_table("allocation-signal", table.round(6), f"Per-layer {settings.method} signal of the parent")
    return table


@task(name="allocate experts")
def plan_allocation(
    similarity: pd.DataFrame, signal: pd.DataFrame | None, settings: AllocationSettings, num_classifier_layers: int, plots_dir: Path
) -> tuple[list[int], list[int], dict[str, pd.DataFrame], dict[str, Path]]:
    """New experts per layer from the method's signal, and the K most similar layers for classifiers.

    Returns the allocation, the classifier layers, the tables to register (`allocation` per layer,
    `allocation_total` with the requested and realised totals and any note, and `signal`) and the signal plot.
    """
    scores = similarity["score"].tolist()
    values = signal["signal"].tolist() if signal is not None else scores
    result = allocate_experts(values, settings)
    classifier_layers = choose_classifier_layers(scores, num_classifier_layers, result.counts)
    if len(classifier_layers) < num_classifier_layers:
        get_run_logger().warning("only %d layers get new experts, so only they get classifiers: %s",
                                 sum(n > 0 for n in result.counts), classifier_layers)
    table = pd.DataFrame({"layer": range(len(scores)), "score": scores, "signal": values, "new_experts": result.counts,
                          "classifier": [i in classifier_layers for i in range(len(scores))]})
    total = pd.DataFrame([{"method": settings.method, "mapping": settings.effective_mapping, "rounding": settings.rounding,
                           "requested": result.requested, "total": result.total, "note": result.note}])
    if result.note:
        get_run_logger().warning("allocation: %s", result.note)
    publish_markdown(
        "allocation",
        "| layer | similarity | signal | new experts | classifier |\n|---|---|---|---|---|\n"
        + "\n".join(f"| {r.layer} | {r.score:.4f} | {r.signal:.4g} | {r.new_experts} | {'yes' if r.classifier else ''} |"
                    for r in table.itertuples())
        + f"\n\nmethod `{settings.method}`, total new experts {result.total}"
        + (f" (requested {result.requested})" if result.requested is not None else "")
        + (f"\n\n**{result.note}**" if result.note else ""),
        "Expert allocation of this round",
    )
    tables = {"allocation": table, "allocation_total": total, **({"signal": signal} if signal is not None else {})}
    plot = plots.plot_signal(table, settings.method, plots_dir / "signal.png") if signal is not None else None
    return result.counts, classifier_layers, tables, ({"signal": plot} if plot else {})
