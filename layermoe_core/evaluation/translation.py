"""Few-shot translation on held-out parallel sentences, scored with chrF++ (sacrebleu).

Why: held-out perplexity tells a person little; translation quality into and out of each
language does. The pairs come from a parallel corpus (records with the same id are
translations, as in the demo's gettext corpus) and only from documents in the held-out
split of `data.sample_sequences` (its SplitRule on the id), so no test sentence or shot
was ever trained on. The prompt is the reference's FLORES format,
"Translation: <Source>: <source text> <Target>: <target text>", one shot per line; the model's
answer is its greedy continuation up to the first newline (the reference uses beam search).

COMET is not offered: its models are pickled Lightning checkpoints, which layermoe refuses to load.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..data.corpus import CorpusSpec, validate_language_code
from ..errors import LayerMoEError
from .generation import context_length, greedy_generate
from .heldout_text import heldout_texts

PAIR_COLUMNS = ["language", "role", "id", "pivot_text", "text"]
CHRF_METRIC = "chrfpp"  # metric rows are translation.<source>-<target>.chrfpp (MLflow allows no "+")
TRANSLATION_COLUMNS = ["language", "direction", "id", "source", "reference", "hypothesis"]

LANGUAGE_NAMES = {
    "en": "English", "es": "Spanish", "zh": "Chinese", "el": "Greek", "hu": "Hungarian", "tr": "Turkish",
    "bn": "Bengali", "hi": "Hindi", "ne": "Nepali", "de": "German", "fr": "French", "ru": "Russian",
    "ar": "Arabic", "ja": "Japanese", "ko": "Korean", "pt": "Portuguese", "it": "Italian", "vi": "Vietnamese",
}  # fmt: skip


class TranslationSettings(BaseModel):
    """Few-shot translation between a pivot language (English by default) and every other evaluated language."""

    model_config = ConfigDict(extra="forbid", title="Translation")

    pivot: str = Field("en", title="Pivot language", description="Every language is translated from and into this one.")
    directions: Literal["both", "from_pivot", "to_pivot"] = Field("both", title="Directions", description="pivot->xx, xx->pivot, or both.")
    num_shots: int = Field(8, ge=0, title="Shots", description="Held-out example pairs before each test sentence (the reference: 8).")
    num_sentences: int = Field(50, ge=1, title="Test sentences", description="Held-out test sentences per language.")
    max_chars: int = Field(
        200, ge=1, title="Max characters", description="Longer sentences are left out, so that the shots fit a small context."
    )
    max_new_tokens: int = Field(64, ge=1, title="Max new tokens", description="Tokens generated per translation at most.")
    batch_size: int = Field(8, ge=1, title="Batch size", description="Prompts per generate call.")
    language_names: dict[str, str] = Field(
        default_factory=dict, title="Language names", description="Names the prompt uses, e.g. {'ne': 'Nepali'}."
    )

    def name(self, language: str) -> str:
        return self.language_names.get(language) or LANGUAGE_NAMES.get(language) or language


def heldout_pairs(
    corpora: Mapping[str, CorpusSpec],
    languages: Sequence[str],
    settings: TranslationSettings,
    seed: int,
    heldout_fraction: float,
) -> pd.DataFrame:
    """Per language: num_shots "shot" and num_sentences "test" pairs with the pivot, from held-out documents only.

    Columns: language, role, id, pivot_text, text. Pairs are ids the language shares with the
    pivot, in a seeded order; the same corpora and seed give the same pairs.
    """
    pivot = settings.pivot
    others = [validate_language_code(lang) for lang in languages if lang != pivot]
    missing = [lang for lang in [pivot, *others] if lang not in corpora]
    if missing:
        raise LayerMoEError(f"translation needs corpora for {missing} (the pivot {pivot!r} included); corpora exist for {sorted(corpora)}")
    if not others:
        raise LayerMoEError(f"translation needs a language besides the pivot {pivot!r}; evaluate at least one other language")
    pivot_sentences = heldout_texts(corpora[pivot], seed, heldout_fraction, settings.max_chars, require_ids=True)
    rows = []
    for lang in others:
        sentences = heldout_texts(corpora[lang], seed, heldout_fraction, settings.max_chars, require_ids=True)
        shared = [key for key in sentences if key in pivot_sentences]  # in the seeded order
        needed = settings.num_shots + settings.num_sentences
        if len(shared) < needed:
            raise LayerMoEError(
                f"language {lang!r} shares {len(shared)} held-out one-line sentences of <= {settings.max_chars} characters "
                f"with {pivot!r}, but {settings.num_shots} shots + {settings.num_sentences} test sentences need {needed}; "
                "lower num_sentences or num_shots, raise max_chars or heldout_fraction, or add parallel text"
            )
        for position, key in enumerate(shared[:needed]):
            role = "shot" if position < settings.num_shots else "test"
            rows.append({"language": lang, "role": role, "id": key, "pivot_text": pivot_sentences[key], "text": sentences[key]})
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def directions(language: str, settings: TranslationSettings) -> list[tuple[str, str]]:
    pivot = settings.pivot
    return {"both": [(pivot, language), (language, pivot)], "from_pivot": [(pivot, language)], "to_pivot": [(language, pivot)]}[
        settings.directions
    ]


def prompt_line(settings: TranslationSettings, source_language: str, target_language: str, source: str, target: str = "") -> str:
    """The reference's FLORES line; with an empty target it ends after "<Target>:" (the model writes the rest)."""
    line = f"Translation: {settings.name(source_language)}: {source} {settings.name(target_language)}:"
    return f"{line} {target}" if target else line


def fitted_prompt(shots: list[str], query: str, tokenizer: Any, budget: int | None) -> str | None:
    """Shots (one per line) then the query; the earliest shots are dropped until the prompt fits `budget` tokens.

    None when the query alone does not fit.
    """
    for first in range(len(shots) + 1):
        prompt = "".join(f"{shot}\n" for shot in shots[first:]) + query
        if budget is None or len(tokenizer.encode(prompt, add_special_tokens=True)) <= budget:
            return prompt
    return None


def translate_pairs(model: nn.Module, tokenizer: Any, pairs: pd.DataFrame, settings: TranslationSettings) -> pd.DataFrame:
    """Greedy few-shot translations of every test pair in each direction: TRANSLATION_COLUMNS.

    A test sentence whose prompt does not fit the model's context even without shots is left out
    (the same ones for every model of a lineage, which shares tokenizer and context); `n` counts the rest.
    """
    limit = context_length(model)
    budget = None if limit is None else limit - settings.max_new_tokens
    items, prompts = [], []
    for lang, group in pairs.groupby("language", sort=False):
        shots, tests = group[group["role"] == "shot"], group[group["role"] == "test"]
        for source_lang, target_lang in directions(lang, settings):
            text_of = {settings.pivot: "pivot_text", lang: "text"}
            shot_lines = [
                prompt_line(settings, source_lang, target_lang, row[text_of[source_lang]], row[text_of[target_lang]])
                for _, row in shots.iterrows()
            ]
            for _, row in tests.iterrows():
                source, reference = row[text_of[source_lang]], row[text_of[target_lang]]
                prompt = fitted_prompt(shot_lines, prompt_line(settings, source_lang, target_lang, source), tokenizer, budget)
                if prompt is None:
                    continue
                prompts.append(prompt)
                items.append(
                    {
                        "language": lang,
                        "direction": f"{source_lang}-{target_lang}",
                        "id": row["id"],
                        "source": source,
                        "reference": reference,
                    }
                )
    hypotheses = greedy_generate(model, tokenizer, prompts, settings.max_new_tokens, settings.batch_size, first_line=True)
    table = pd.DataFrame(items, columns=TRANSLATION_COLUMNS[:-1])
    table["hypothesis"] = hypotheses
    return table


def chrf_plus_plus(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF++ (character 6-grams and word 2-grams, beta 2), 0-100, as sacrebleu computes it."""
    from sacrebleu.metrics import CHRF

    return CHRF(word_order=2).corpus_score(list(hypotheses), [list(references)]).score


def translation_metrics(translations: pd.DataFrame) -> pd.DataFrame:
    """A metrics table: `translation.<src>-<tgt>.chrfpp` per language and direction, n = sentences."""
    rows = []
    for (lang, direction), group in translations.groupby(["language", "direction"], sort=False):
        rows.append(
            {
                "language": lang,
                "metric": f"translation.{direction}.{CHRF_METRIC}",
                "value": chrf_plus_plus(group["hypothesis"], group["reference"]),
                "n": len(group),
            }
        )
    return pd.DataFrame(rows, columns=["language", "metric", "value", "n"])
