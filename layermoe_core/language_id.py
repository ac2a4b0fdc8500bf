"""`language: auto`: which pin a request takes, from its text, offline (docs/pinned-serving.md).

py3langid ships its naive-Bayes model in the wheel (an npz array file, no pickle) and names languages
by ISO 639 code, the codes the plans use. A text whose most probable language the model was
not taught, or whose probability is below `MIN_PROBABILITY`, gets None: it takes the plain
(classifier-routed) path.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

MIN_PROBABILITY = 0.5  # below it the identification is a guess, and a wrong pin serves another version


@cache
def _identifier() -> Any:
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)  # probabilities over every language it knows


def identify_language(text: str, languages: Sequence[str]) -> str | None:
    """The language of `text` if it is one of `languages` and identified with probability >= MIN_PROBABILITY; else None."""
    if not text.strip():
        return None
    language, probability = _identifier().classify(text)
    return language if language in languages and probability >= MIN_PROBABILITY else None


__all__ = ["MIN_PROBABILITY", "identify_language"]
