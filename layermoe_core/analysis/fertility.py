"""Tokenizer fertility: how many tokens the parent's tokenizer spends on each language's text.

Why: a new script that an English-centred BPE barely covers costs several byte tokens per
character, and training, decoding and the context all pay that factor. Each round reports it
per language, on held-out text, and warns when a new language costs far more than the old ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

FERTILITY_COLUMNS = ["language", "group", "documents", "characters", "words", "tokens", "tokens_per_char", "tokens_per_word"]
COSTLY_FACTOR = 2.0  # a new language at this many times the old languages' mean tokens per character is warned about


def fertility_table(
    tokenizer: Any, texts: Mapping[str, Sequence[str]], new_languages: Sequence[str], child_tokenizer: Any = None
) -> pd.DataFrame:
    """One row per language: its texts' characters, whitespace words and tokens (no special tokens), and the ratios.

    With `child_tokenizer` (a round's extended vocabulary), also `child_tokens_per_char` and `child_tokens_per_word` under it.
    """
    rows = []
    for language, documents in texts.items():
        characters = sum(len(text) for text in documents)
        words = sum(len(text.split()) for text in documents)
        tokens = sum(len(ids) for ids in tokenizer(list(documents), add_special_tokens=False)["input_ids"]) if documents else 0
        rows.append(
            {
                "language": language,
                "group": "new" if language in new_languages else "old",
                "documents": len(documents),
                "characters": characters,
                "words": words,
                "tokens": tokens,
                "tokens_per_char": tokens / characters if characters else float("nan"),
                "tokens_per_word": tokens / words if words else float("nan"),
            }
        )
    table = pd.DataFrame(rows, columns=FERTILITY_COLUMNS)
    if child_tokenizer is not None:
        child = fertility_table(child_tokenizer, texts, new_languages)
        table["child_tokens_per_char"], table["child_tokens_per_word"] = child["tokens_per_char"], child["tokens_per_word"]
    return table


def costly_languages(table: pd.DataFrame, factor: float = COSTLY_FACTOR) -> list[str]:
    """One line per new language whose tokens per character are at least `factor` x the old languages' mean."""
    old = table.loc[table["group"] == "old", "tokens_per_char"].dropna()
    if old.empty:
        return []
    baseline = float(old.mean())
    return [
        f"new language {row.language} costs {row.tokens_per_char:.2f} tokens per character, {row.tokens_per_char / baseline:.1f}x "
        f"the old languages' mean ({baseline:.2f}): the parent's tokenizer barely covers its script, so training and "
        "decoding pay that factor; `vocabulary: {extend: N}` in the plan adds tokens for it (docs/vocabulary.md)"
        for row in table[table["group"] == "new"].itertuples()
        if row.tokens_per_char >= factor * baseline
    ]
