"""Steps 1-3 of a round: sample tokens, measure layer similarity, allocate experts."""

from pathlib import Path

import pandas as pd
from prefect import get_run_logger, task

from layermoe_core.allocation import AllocationSettings, allocate_experts, choose_classifier_layers
from layermoe_core.checkpoints import load_model, load_tokenizer
from layermoe_core.data import CorpusSpec, Split, load_sequences, sample_sequences, save_sequences
from layermoe_core.similarity import SimilarityScore, layer_similarity

from .common import STEP_CACHE, publish_markdown, publish_table


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
    parallel: bool | str = False,
) -> Path:
    """Seeded token rows per language, written to a safetensors file for the next steps."""
    sequences = sample_sequences(
        {lang: corpora[lang] for lang in languages},
        load_tokenizer(tokenizer_dir),
        num_tokens=num_tokens,
        seq_len=seq_len,
        seed=seed,
        split=split,
        heldout_fraction=heldout_fraction,
        parallel=parallel,
    )
    get_run_logger().info("sampled %s: %s", split, {lang: tuple(t.shape) for lang, t in sequences.items()})
    return save_sequences(sequences, out_path)


@task(name="measure layer similarity", cache_policy=STEP_CACHE, persist_result=True)
def measure_similarity(
    model_dir: Path, tokens_path: Path, old_languages: list[str], new_languages: list[str], score: SimilarityScore, batch_size: int
) -> pd.DataFrame:
    model = load_model(model_dir)
    table = layer_similarity(model, load_sequences(tokens_path), old_languages, new_languages, batch_size=batch_size, score=score)
    publish_table("similarity", table.round(4), "Per-layer cross-lingual similarity of the parent (MLP inputs)")
    return table


@task(name="allocate experts")
def plan_allocation(similarity: pd.DataFrame, settings: AllocationSettings, num_classifier_layers: int) -> tuple[list[int], list[int]]:
    """New experts per layer (low similarity, more experts) and the K most similar layers for classifiers."""
    scores = similarity["score"].tolist()
    allocation = allocate_experts(scores, settings)
    classifier_layers = choose_classifier_layers(scores, num_classifier_layers)
    publish_markdown(
        "allocation",
        "| layer | similarity | new experts | classifier |\n|---|---|---|---|\n"
        + "\n".join(
            f"| {i} | {s:.4f} | {n} | {'yes' if i in classifier_layers else ''} |" for i, (s, n) in enumerate(zip(scores, allocation))
        )
        + f"\n\nmethod `{settings.method}`, total new experts {sum(allocation)}",
        "Expert allocation of this round",
    )
    return allocation, classifier_layers
