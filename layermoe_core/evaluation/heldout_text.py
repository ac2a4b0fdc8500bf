"""Held-out sentences as text: the source of translation pairs and of the prompts a person reads.

Why: tokens are enough for perplexity, but translation and readable continuations need whole
sentences. They are taken only from documents in the held-out split of `data.sample_sequences`
(its `SplitRule`: the same seeded hash of the document id, or of the row number without ids), so no prompt or
reference was ever trained on, as long as the lineage keeps one seed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd

from ..data.corpus import CorpusSpec, load_documents, validate_language_code
from ..data.token_store import Split, SplitRule
from ..errors import LayerMoEError

PROMPT_COLUMNS = ["language", "id", "prompt", "reference"]
MAX_PROMPT_CHARS = 200  # continuation prompts come from sentences no longer than this, so they fit small contexts


def heldout_texts(
    spec: CorpusSpec,
    seed: int,
    heldout_fraction: float,
    max_chars: int | None = None,
    require_ids: bool = False,
    split: Split = "heldout",
) -> dict[str, str]:
    """id -> text of the held-out one-line documents (at most max_chars characters), in seeded order (`split="train"`: of the rest).

    Keys are the corpus ids, or the row numbers of a corpus without ids (as the sampler keys them);
    require_ids=True (parallel text) refuses a corpus without ids.
    """
    documents = load_documents(spec)
    has_ids = "id" in documents.column_names
    if require_ids and not has_ids:
        where = spec.path or spec.hub_name
        raise LayerMoEError(
            f"corpus {str(where)!r} has no id column {spec.id_field!r}, so its translations cannot be matched; "
            "set `id_field` to the column the languages share"
        )
    keys = [str(k) for k in documents["id"]] if has_ids else [str(r) for r in range(len(documents))]
    rule = SplitRule(seed, heldout_fraction)
    texts = {}
    for key, text in zip(keys, documents["text"]):
        text = (text or "").strip()
        if text and "\n" not in text and (max_chars is None or len(text) <= max_chars) and rule.split_of(key) == split:
            texts[key] = text
    return dict(sorted(texts.items(), key=lambda item: rule.order_of(item[0])))


def opening(text: str) -> str | None:
    """The first half of a sentence (by words, or by characters for scripts without spaces); None if too short."""
    words = text.split()
    if len(words) >= 4:
        return " ".join(words[: len(words) // 2])
    if len(words) == 1 and len(text) >= 8:
        return text[: len(text) // 2]
    return None


def continuation_prompts(
    corpora: Mapping[str, CorpusSpec], languages: Sequence[str], per_language: int, seed: int, heldout_fraction: float
) -> pd.DataFrame:
    """`per_language` held-out sentences per language, cut in half: the model writes the rest.

    Columns: language, id, prompt (the opening), reference (the whole sentence).
    """
    rows = []
    for lang in languages if per_language > 0 else []:
        validate_language_code(lang)
        if lang not in corpora:
            raise LayerMoEError(f"no corpus for {lang!r} to take continuation prompts from; corpora exist for {sorted(corpora)}")
        found = 0
        for key, text in heldout_texts(corpora[lang], seed, heldout_fraction, MAX_PROMPT_CHARS).items():
            prompt = opening(text)
            if prompt is None:
                continue
            rows.append({"language": lang, "id": key, "prompt": prompt, "reference": text})
            found += 1
            if found == per_language:
                break
        if found < per_language:
            raise LayerMoEError(
                f"language {lang!r} has {found} held-out one-line sentences of 4 words or more, but {per_language} prompts "
                "were asked for; lower the number of continuation prompts or raise heldout_fraction"
            )
    return pd.DataFrame(rows, columns=PROMPT_COLUMNS)
