"""Seeded synthetic "languages" for flow tests: each has its own alphabet and word list.

Real text needs packages and minutes; the flows only need languages that differ, share
document ids (a parallel corpus) and tokenize into enough tokens.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from layermoe_core.data.corpus import CorpusSpec

ALPHABETS = {
    "en": "abcdefghijklmnopqrstuvwxyz",
    "es": "abcdefghijlmnopqrstuvzáéíóúñ",
    "zh": "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年",
    "el": "αβγδεζηθικλμνξοπρστυφχψω",
    "tr": "abcçdefgğhıijklmnoöprsştuüvyz",
    "hu": "aábcdeéfghiíjklmnoóöőprstuúüűvz",
    "it": "abcdefghilmnopqrstuvz",
    "bn": "অআইঈউঊএঐওঔকখগঘঙচছজঝঞটঠডঢণতথদধনপফবভমযরলশষসহ",
    "hi": "अआइईउऊएऐओऔकखगघङचछजझञटठडढणतथदधनपफबभमयरलवशषसह",
    "ne": "अआइईउऊएओकखगघङचछजझञटठडढणतथदधनपफबभमयरलवशसह",
}


def _lexicon(alphabet: str, rng: random.Random, size: int = 60) -> list[str]:
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(2, 6))) for _ in range(size)]


def write_synthetic_corpus(directory: Path, languages: list[str], documents: int = 200, seed: int = 0) -> dict[str, CorpusSpec]:
    """One jsonl per language; document i has id "doc-i" in every language."""
    directory.mkdir(parents=True, exist_ok=True)
    specs = {}
    for lang in languages:
        rng = random.Random(f"{seed}-{lang}")
        words = _lexicon(ALPHABETS[lang], rng)
        weights = [1 / (rank + 1) for rank in range(len(words))]  # Zipf-like, as in natural text
        path = directory / f"{lang}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for i in range(documents):
                text = " ".join(rng.choices(words, weights, k=rng.randint(8, 20)))
                f.write(json.dumps({"id": f"doc-{i}", "text": text}, ensure_ascii=False) + "\n")
        specs[lang] = CorpusSpec(path=path)
    return specs
