"""Step 7 of a round: routing statistics and parent-vs-child evaluation per language."""

from pathlib import Path

import pandas as pd

from layermoe_core.analysis.routing_stats import routing_statistics
from layermoe_core.data.corpus import CorpusSpec, load_sequences
from layermoe_core.errors import LayerMoEError
from layermoe_core.evaluation.heldout_text import continuation_prompts, heldout_texts
from layermoe_core.evaluation.metrics import EvalSettings, bits_per_byte, compare_models, continue_prompts, evaluate_model
from layermoe_core.evaluation.translation import heldout_pairs
from layermoe_core.model.checkpoints import PlacementSettings, load_tokenizer

from .common import PLACED_STEP_CACHE, cached_task, file_step, load_placed, publish_markdown, publish_table

BITS_PER_BYTE_DOCUMENTS = 200  # held-out documents per language measured in bits per byte, where a round extends the vocabulary


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


@file_step(lambda a: a["out_dir"], name="sample held-out text")
def sample_heldout_text(
    corpora: dict[str, CorpusSpec], languages: list[str], settings: EvalSettings, *, seed: int, heldout_fraction: float, out_dir: Path
) -> Path:
    """Translation pairs, continuation prompts and held-out documents (for bits per byte), as jsonl files in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    documents = [
        {"language": lang, "text": text}
        for lang in languages
        for text in list(heldout_texts(corpora[lang], seed, heldout_fraction).values())[:BITS_PER_BYTE_DOCUMENTS]
    ]
    pd.DataFrame(documents, columns=["language", "text"]).to_json(out_dir / "texts.jsonl", orient="records", lines=True, force_ascii=False)
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
    parent_tokens_path: Path | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Held-out metrics of both models on the same tokens and text: the tidy comparison and the readable samples.

    Each old language is measured twice: classifier-routed (`loss`, the plain drift) and pinned to it (`pinned_loss`).

    `text_dir` is `sample_heldout_text`'s folder; without it there is no translation and no samples.
    `parent_tokens_path`, where it differs from `tokens_path`, holds the same held-out text under the parent's tokenizer
    (the round extended the vocabulary): each model reads its own tokens, and both are also measured in bits per byte.
    """
    sequences = load_sequences(tokens_path)
    tokens_of = {"child": sequences, "parent": sequences}
    documents = None
    if parent_tokens_path is not None and parent_tokens_path != tokens_path:
        tokens_of["parent"] = load_sequences(parent_tokens_path)
        if text_dir is None:
            raise LayerMoEError("the child tokenizes differently from its parent; give text_dir, whose texts both are measured on")
        texts = read_jsonl(text_dir / "texts.jsonl")
        documents = {lang: texts.loc[texts["language"] == lang, "text"].tolist() for lang in old_languages + new_languages}
    pairs = read_jsonl(text_dir / "pairs.jsonl") if text_dir else None
    samples = read_jsonl(text_dir / "prompts.jsonl") if text_dir else None
    if samples is None or samples.columns.empty:  # no text, or no prompts asked for (continuation_prompts: 0): an empty file
        samples = pd.DataFrame(columns=["language", "id", "prompt", "reference"])
    tables = {}
    for side, model_dir in (("parent", parent_dir), ("child", child_dir)):
        model, tokenizer = load_placed(model_dir, placement), load_tokenizer(model_dir)
        tables[side] = evaluate_model(model, tokenizer, tokens_of[side], settings, pairs, pinned_languages=old_languages)
        if documents is not None:
            width = next(iter(sequences.values())).shape[1]  # the held-out rows' length: the context both are measured in
            bits = bits_per_byte(model, tokenizer, documents, seq_len=width - 1, batch_size=settings.batch_size)
            tables[side] = pd.concat([tables[side], bits], ignore_index=True)
        samples[side] = continue_prompts(model, tokenizer, samples, settings) if len(samples) else []
    comparison = compare_models(tables["parent"], tables["child"], old_languages, new_languages)
    samples = samples[["language", "id", "prompt", "parent", "child", "reference"]]
    publish_table("evaluation", comparison.round(4), "Held-out metrics per language: parent vs child")
    if len(samples):
        publish_markdown("samples", samples_markdown(samples), "Parent vs child continuations of held-out text")
    return comparison, samples
