"""Step 7 of a round: routing statistics and parent-vs-child evaluation per language."""

from pathlib import Path

import pandas as pd

from layermoe_core.analysis.routing_stats import routing_statistics
from layermoe_core.data.corpus import CorpusSpec, load_sequences
from layermoe_core.evaluation.heldout_text import continuation_prompts
from layermoe_core.evaluation.metrics import EvalSettings, compare_models, continue_prompts, evaluate_model
from layermoe_core.evaluation.translation import heldout_pairs
from layermoe_core.model.checkpoints import PlacementSettings, load_tokenizer

from .common import PLACED_STEP_CACHE, cached_task, load_placed, publish_markdown, publish_table, step


@cached_task(PLACED_STEP_CACHE, name="routing statistics")
def measure_routing(
    model_dir: Path,
    tokens_path: Path,
    old_languages: list[str],
    fertility: pd.DataFrame,
    *,
    batch_size: int,
    placement: PlacementSettings,
) -> pd.DataFrame:
    """Routing per layer and language, beside each language's tokens per character and word (`measure_fertility`'s)."""
    table = routing_statistics(load_placed(model_dir, placement), load_sequences(tokens_path), old_languages, batch_size=batch_size)
    table = table.merge(fertility[["language", "tokens_per_char", "tokens_per_word"]], on="language", how="left")
    publish_table("routing", table.drop(columns=["expert_load"], errors="ignore").round(4), "Routing per layer and language")
    return table


@step(lambda a: a["out_dir"], name="sample held-out text")
def sample_heldout_text(
    corpora: dict[str, CorpusSpec], languages: list[str], settings: EvalSettings, *, seed: int, heldout_fraction: float, out_dir: Path
) -> Path:
    """Translation pairs and continuation prompts from held-out documents, as jsonl files in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts = continuation_prompts(corpora, languages, settings.continuation_prompts, seed, heldout_fraction)
    prompts.to_json(out_dir / "prompts.jsonl", orient="records", lines=True, force_ascii=False)
    if settings.translation is not None:
        pairs = heldout_pairs(corpora, languages, settings.translation, seed, heldout_fraction)
        pairs.to_json(out_dir / "pairs.jsonl", orient="records", lines=True, force_ascii=False)
    return out_dir


def read_jsonl(path: Path) -> pd.DataFrame | None:
    return pd.read_json(path, orient="records", lines=True, dtype=False) if path.is_file() else None


def samples_markdown(samples: pd.DataFrame) -> str:
    lines = ["Greedy continuations of held-out sentence openings (never trained on).", ""]
    for lang, group in samples.groupby("language", sort=False):
        lines.append(f"### {lang}")
        for row in group.itertuples():
            lines += [
                f"- **prompt**: {row.prompt}",
                f"  - parent: {row.parent}",
                f"  - child: {row.child}",
                f"  - reference: {row.reference}",
            ]
    return "\n".join(lines)


@cached_task(PLACED_STEP_CACHE, name="evaluate parent and child")
def evaluate_round(
    parent_dir: Path,
    child_dir: Path,
    tokens_path: Path,
    old_languages: list[str],
    new_languages: list[str],
    settings: EvalSettings,
    *,
    text_dir: Path | None = None,
    placement: PlacementSettings,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Held-out metrics of both models on the same tokens and text: the tidy comparison and the readable samples.

    Each old language is measured twice: classifier-routed (`loss`, the plain drift) and pinned to it (`pinned_loss`).

    `text_dir` is `sample_heldout_text`'s folder; without it there is no translation and no samples.
    """
    sequences = load_sequences(tokens_path)
    pairs = read_jsonl(text_dir / "pairs.jsonl") if text_dir else None
    samples = read_jsonl(text_dir / "prompts.jsonl") if text_dir else None
    if samples is None or samples.columns.empty:  # no text, or no prompts asked for (continuation_prompts: 0): an empty file
        samples = pd.DataFrame(columns=["language", "id", "prompt", "reference"])
    tables = {}
    for side, model_dir in (("parent", parent_dir), ("child", child_dir)):
        model, tokenizer = load_placed(model_dir, placement), load_tokenizer(model_dir)
        tables[side] = evaluate_model(model, tokenizer, sequences, settings, pairs, pinned_languages=old_languages)
        samples[side] = continue_prompts(model, tokenizer, samples, settings) if len(samples) else []
    comparison = compare_models(tables["parent"], tables["child"], old_languages, new_languages)
    samples = samples[["language", "id", "prompt", "parent", "child", "reference"]]
    publish_table("evaluation", comparison.round(4), "Held-out metrics per language: parent vs child")
    if len(samples):
        publish_markdown("samples", samples_markdown(samples), "Parent vs child continuations of held-out text")
    return comparison, samples
