"""Steps 1-3 of a round: sample tokens, measure layer similarity (and the allocation method's own signal), allocate experts."""

from pathlib import Path

import pandas as pd
from prefect import get_run_logger, task
from pydantic import BaseModel, ConfigDict

from layermoe_core.analysis.allocation import AllocationSettings, allocate_experts, choose_classifier_layers
from layermoe_core.analysis.fertility import costly_languages, fertility_table
from layermoe_core.analysis.signals import neuron_signal, param_delta_signal
from layermoe_core.analysis.similarity import SimilarityScore, layer_similarity
from layermoe_core.data.corpus import CorpusSpec, Split, load_sequences, open_sequences, sample_token_rows
from layermoe_core.evaluation.heldout_text import heldout_texts
from layermoe_core.model.checkpoints import PlacementSettings, load_tokenizer, read_config
from layermoe_core.model.vocabulary import check_old_text_unchanged, extend_tokenizer, learn_merges, vocabulary_size

from .common import PLACED_STEP_CACHE, cached_task, file_step, load_placed, publish_markdown, publish_table

TOKEN_STORE_DIR = "token-store"  # under the plan's workdir: every round of every plan there shares the tokenized corpora


class Sampling(BaseModel):
    """Where a round's token samples come from and go; each sample is then named, sized and split by the step."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    corpora: dict[str, CorpusSpec]
    tokenizer_dir: Path
    seq_len: int
    seed: int
    heldout_fraction: float
    store_dir: Path  # the token store, shared by every step and round of a workdir (TOKEN_STORE_DIR)
    out_dir: Path  # the samples: <out_dir>/<name>.json

    def path(self, name: str) -> Path:
        return self.out_dir / f"{name}.json"


@file_step(lambda a: a["sampling"].path(a["name"]), name="sample tokens")
def sample_tokens(
    sampling: Sampling, name: str, languages: list[str], num_tokens: int, split: Split = "train", parallel: bool | str = False
) -> Path:
    """Seeded token rows per language, read from the token store; the sample file `name` points the next steps at them."""
    path = sample_token_rows(
        {lang: sampling.corpora[lang] for lang in languages},
        load_tokenizer(sampling.tokenizer_dir),
        num_tokens=num_tokens,
        seq_len=sampling.seq_len,
        seed=sampling.seed,
        store_dir=sampling.store_dir,
        out_path=sampling.path(name),
        split=split,
        heldout_fraction=sampling.heldout_fraction,
        parallel=parallel,
    )
    get_run_logger().info("sampled %s: %s", split, {lang: rows.shape for lang, rows in open_sequences(path).items()})
    return path


@cached_task(PLACED_STEP_CACHE, name="measure layer similarity")
def measure_similarity(
    model_dir: Path,
    tokens_path: Path,
    old_languages: list[str],
    new_languages: list[str],
    *,
    score: SimilarityScore,
    batch_size: int,
    placement: PlacementSettings,
) -> pd.DataFrame:
    model = load_placed(model_dir, placement)
    table = layer_similarity(model, load_sequences(tokens_path), old_languages, new_languages, batch_size=batch_size, score=score)
    publish_table("similarity", table.round(4), "Per-layer cross-lingual similarity of the parent (MLP inputs)")
    return table


@cached_task(PLACED_STEP_CACHE, name="measure allocation signal")
def measure_allocation_signal(
    model_dir: Path,
    tokens_path: Path,
    old_languages: list[str],
    new_languages: list[str],
    settings: AllocationSettings,
    *,
    batch_size: int,
    placement: PlacementSettings,
) -> pd.DataFrame | None:
    """The per-layer signal of "neuron" and "param_delta" (None for the methods that read the similarity or nothing)."""
    if settings.method not in ("neuron", "param_delta"):
        return None
    model, sequences = load_placed(model_dir, placement), load_sequences(tokens_path)
    if settings.method == "neuron":
        table = neuron_signal(model, sequences, old_languages, new_languages, settings.neurons_per_language, batch_size)
    else:
        table = param_delta_signal(
            model,
            {lang: sequences[lang] for lang in new_languages},
            settings.finetune_steps,
            settings.finetune_learning_rate,
            settings.finetune_batch_size,
        )
    publish_table("allocation-signal", table.round(6), f"Per-layer {settings.method} signal of the parent")
    return table


@task(name="allocate experts")
def plan_allocation(
    similarity: pd.DataFrame, signal: pd.DataFrame | None, settings: AllocationSettings, *, classifier_layer_count: int
) -> pd.DataFrame:
    """New experts per layer from the method's signal, and the K most similar of those layers for classifiers.

    The allocation table: one row per layer (`layer`, similarity `score`, the method's `signal`,
    `new_experts`, `classifier`); its `attrs["total"]` holds the method and the requested and realised
    totals, with any note (`allocation_total` gives it as the one-row table that is registered).
    """
    scores = similarity["score"].tolist()
    values = signal["signal"].tolist() if signal is not None else scores
    result = allocate_experts(values, settings)
    chosen = choose_classifier_layers(scores, classifier_layer_count, result.counts)
    if len(chosen) < classifier_layer_count:
        get_run_logger().warning(
            "only %d layers get new experts, so only they get classifiers: %s", sum(n > 0 for n in result.counts), chosen
        )
    table = pd.DataFrame(
        {
            "layer": range(len(scores)),
            "score": scores,
            "signal": values,
            "new_experts": result.counts,
            "classifier": [i in chosen for i in range(len(scores))],
        }
    )
    table.attrs["total"] = {
        "method": settings.method,
        "mapping": settings.effective_mapping,
        "rounding": settings.rounding,
        "requested": result.requested,
        "total": result.total,
        "note": result.note,
    }
    if result.note:
        get_run_logger().warning("allocation: %s", result.note)
    publish_markdown(
        "allocation",
        "| layer | similarity | signal | new experts | classifier |\n|---|---|---|---|---|\n"
        + "\n".join(
            f"| {r.layer} | {r.score:.4f} | {r.signal:.4g} | {r.new_experts} | {'yes' if r.classifier else ''} |"
            for r in table.itertuples()
        )
        + f"\n\nmethod `{settings.method}`, total new experts {result.total}"
        + (f" (requested {result.requested})" if result.requested is not None else "")
        + (f"\n\n**{result.note}**" if result.note else ""),
        "Expert allocation of this round",
    )
    return table


def new_experts(allocation: pd.DataFrame) -> list[int]:
    """The allocation vector of an allocation table (`plan_allocation`'s)."""
    return [int(n) for n in allocation["new_experts"]]


def classifier_layers(allocation: pd.DataFrame) -> list[int]:
    """The classifier layers of an allocation table, ascending."""
    return [int(layer) for layer in allocation.loc[allocation["classifier"], "layer"]]


def allocation_total(allocation: pd.DataFrame) -> pd.DataFrame:
    """The one-row table of the method and its requested and realised totals (and any note)."""
    return pd.DataFrame([allocation.attrs["total"]])


FERTILITY_DOCUMENTS = 2_000  # held-out documents per language: enough for a ratio stable to two decimals


@cached_task(PLACED_STEP_CACHE, name="measure tokenizer fertility")
def measure_fertility(
    tokenizer_dir: Path,
    corpora: dict[str, CorpusSpec],
    old: list[str],
    new: list[str],
    *,
    seed: int,
    heldout_fraction: float,
    child_tokenizer_dir: Path | None = None,
) -> pd.DataFrame:
    """Tokens per character and per word of every language's held-out text, under the parent's tokenizer (and under
    the round's extended one, `child_tokenizer_dir`, where it has one)."""
    tokenizer = load_tokenizer(tokenizer_dir)
    child = load_tokenizer(child_tokenizer_dir) if child_tokenizer_dir is not None else None
    texts = {lang: list(heldout_texts(corpora[lang], seed, heldout_fraction).values())[:FERTILITY_DOCUMENTS] for lang in old + new}
    table = fertility_table(tokenizer, texts, new, child)
    publish_table("fertility", table, "Tokens per character and per word of each language's held-out text (the parent's tokenizer)")
    for warning in costly_languages(table):
        get_run_logger().warning(warning)
    return table


VOCABULARY_DOCUMENTS = 20_000  # training documents per language that new merges (and the old pairs they avoid) are read from


@file_step(lambda a: a["out_dir"], name="extend the vocabulary")
def extend_vocabulary(
    parent_dir: Path,
    corpora: dict[str, CorpusSpec],
    old: list[str],
    new: list[str],
    count: int,
    *,
    seed: int,
    heldout_fraction: float,
    out_dir: Path,
) -> Path:
    """The parent's tokenizer plus up to `count` merges learned on the new languages' training text, saved to `out_dir`.

    Every old language's held-out text is checked to tokenize exactly as under the parent's tokenizer.
    """
    parent = load_tokenizer(parent_dir)

    def texts(languages: list[str], split: Split) -> list[str]:
        return [
            text
            for lang in languages
            for text in list(heldout_texts(corpora[lang], seed, heldout_fraction, split=split).values())[:VOCABULARY_DOCUMENTS]
        ]

    merges = learn_merges(parent, texts(new, "train"), texts(old, "train"), count)
    extended = extend_tokenizer(parent, merges, first_id=vocabulary_size(read_config(parent_dir)))
    check_old_text_unchanged(parent, extended, {lang: texts([lang], "heldout") for lang in old})
    extended.save_pretrained(out_dir)
    get_run_logger().info("vocabulary: %d new tokens (up to %d asked) for %s; old text tokenizes as before", len(merges), count, new)
    return out_dir
