"""Can a demo-size model learn to translate within the demo's budget? An upper bound, measured.

Why: the demo's rounds lower the new languages' held-out loss clearly, but its few-shot chrF++ stays
at 0.5-6 for parent and child alike (the 1.8M-parameter base writes loops). This bench asks whether
any data setting could change that at the demo's size and budget, in the most favourable setting we
could build: the base trains on translation pairs written in the evaluation's own prompt format
(`evaluation.translation.prompt_line`, several pairs a document, one per line, as the shots are), and
the "round" fine-tunes the whole dense model (every weight, not only new experts and routers, so it
is an upper bound on what a LayerMoE round can learn) on Greek sentences and en-el pairs. Rows are the
demo's 128 tokens; a 3-shot prompt with its answer takes up to 210, so `--seq-len 256` trains on rows that hold
every prompt (with the same tokens, in half the optimizer steps).
Pairs come only from documents in the training split (`SplitRule`, the demo's seed and held-out
fraction), so no test pair or shot was trained on.

Run from the repository root (downloads the demo corpus's Debian packages unless --corpus has them):

    OMP_NUM_THREADS=1 python -m bench.demo_translation --out /tmp/demo-translation

It prints the base's chrF++ for es/zh/el, then el's and es's after each round budget, with a few
translations. docs/results.md records a run, with its time.
"""

import argparse
import random
import time
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerFast

from demo.base import demo_base_config, train_demo_tokenizer
from demo.offline_corpus import DEFAULT_PACKAGES, build_gettext_corpus
from layermoe_core.data.corpus import CorpusSpec, load_documents
from layermoe_core.data.token_store import SplitRule
from layermoe_core.evaluation.translation import (
    TranslationSettings,
    heldout_pairs,
    prompt_line,
    translate_pairs,
    translation_metrics,
)
from layermoe_core.model.checkpoints import init_model
from layermoe_core.training.trainer import TrainSettings, train_causal_lm

PIVOT, BASE, EXPOSED, NEW = "en", ["es", "zh"], ["hu", "tr", "bn", "hi", "ne"], "el"
LANGUAGES = [PIVOT, *BASE, NEW, *EXPOSED]
SEED, HELDOUT_FRACTION = 0, 0.1
# Short sentences and 3 shots: a prompt and its 32 new tokens take at most ~210 tokens (the demo's 8 shots of up to
# 120 characters take about 380).
TRANSLATION = TranslationSettings(num_shots=3, num_sentences=40, max_chars=60, max_new_tokens=32, batch_size=16)


class Data:
    """Training rows of a language from its training-split documents: its sentences, or pairs with the pivot in the prompt format."""

    def __init__(self, documents: dict[str, Dataset], tokenizer: PreTrainedTokenizerFast, seq_len: int):
        self.seq_len = seq_len
        self.tokenizer, self.rng = tokenizer, random.Random(SEED)
        rule = SplitRule(SEED, HELDOUT_FRACTION)
        self.texts = {
            lang: {key: text for key, text in zip(docs["id"], docs["text"]) if rule.split_of(key) == "train"}
            for lang, docs in documents.items()
        }

    def sentences(self, lang: str) -> list[str]:
        texts = list(self.texts[lang].values())
        self.rng.shuffle(texts)
        return texts

    def pairs(self, lang: str, per_document: int = 4) -> list[str]:
        """Documents of `per_document` pairs, one per line, each document in one direction (chosen at random)."""
        keys = [k for k in self.texts[lang] if k in self.texts[PIVOT] and max(len(self.texts[x][k]) for x in (lang, PIVOT)) <= 120]
        self.rng.shuffle(keys)
        documents = []
        for start in range(0, len(keys) - per_document + 1, per_document):
            source, target = (PIVOT, lang) if self.rng.random() < 0.5 else (lang, PIVOT)
            lines = [
                prompt_line(TRANSLATION, source, target, self.texts[source][k], self.texts[target][k])
                for k in keys[start : start + per_document]
            ]
            documents.append("\n".join(lines))
        return documents

    def rows(self, documents: Iterable[str], num_tokens: int) -> torch.Tensor:
        flat: list[int] = []
        for text in documents:
            flat += self.tokenizer.encode(text) + [self.tokenizer.eos_token_id]
            if len(flat) >= num_tokens:
                break
        count = len(flat) // self.seq_len
        return torch.tensor(flat[: count * self.seq_len]).view(count, self.seq_len)

    def mix(self, lang: str, num_tokens: int, pair_share: float) -> torch.Tensor:
        parts = [self.rows(self.sentences(lang), int(num_tokens * (1 - pair_share)))]
        if pair_share:
            parts.append(self.rows(self.pairs(lang), int(num_tokens * pair_share)))
        return torch.cat(parts)


def chrf(model, tokenizer, corpora: dict[str, CorpusSpec], languages: list[str], label: str, show: int = 3) -> pd.DataFrame:
    pairs = heldout_pairs(corpora, languages, TRANSLATION, SEED, HELDOUT_FRACTION)
    model.eval()
    translations = translate_pairs(model, tokenizer, pairs, TRANSLATION)
    table = translation_metrics(translations)
    table.insert(0, "model", label)
    print(f"\n{label}:\n{table.to_string(index=False)}")
    sample = translations[translations["language"] == languages[-1]].groupby("direction").head(show)
    print(sample[["direction", "reference", "hypothesis"]].to_string(index=False), flush=True)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="working folder (corpus, tokenizer, checkpoints)")
    parser.add_argument("--corpus", type=Path, help="an existing demo corpus folder; default: build one under --out")
    parser.add_argument("--base-tokens", type=int, default=250_000, help="per base language (the demo's)")
    parser.add_argument("--seq-len", type=int, default=128, help="training row length (the demo's)")
    parser.add_argument("--pair-share", type=float, default=0.5, help="share of es/zh/el training tokens that are pairs")
    parser.add_argument(
        "--rounds", nargs="+", default=["40000x1", "150000x2"], help="round budgets TOKENSxEPOCHS of el (the demo's: 40000x1)"
    )
    args = parser.parse_args()
    torch.manual_seed(SEED)
    corpus_dir = args.corpus or build_gettext_corpus(args.out / "corpus", LANGUAGES, DEFAULT_PACKAGES)
    corpora = {lang: CorpusSpec(path=corpus_dir / f"{lang}.jsonl") for lang in LANGUAGES}
    documents = {lang: load_documents(spec) for lang, spec in corpora.items()}
    tokenizer = train_demo_tokenizer([text for docs in documents.values() for text in docs["text"]], 8000, args.out / "tokenizer")
    data = Data(documents, tokenizer, args.seq_len)

    base_rows = {PIVOT: data.mix(PIVOT, args.base_tokens, 0.0)}
    base_rows |= {lang: data.mix(lang, args.base_tokens, args.pair_share) for lang in BASE}
    base_rows |= {lang: data.mix(lang, 20_000, 0.0) for lang in [NEW, *EXPOSED]}  # the demo's exposure
    model = init_model(demo_base_config(len(tokenizer), "demo"), SEED)
    train = TrainSettings(learning_rate=2e-3, num_epochs=1, per_device_batch_size=16, warmup_ratio=0.05, logging_steps=100)
    start = time.perf_counter()
    train_causal_lm(model, base_rows, train, args.out / "base")
    print(f"base: {sum(r.numel() for r in base_rows.values()):,} tokens in {time.perf_counter() - start:.0f} s")
    tables = [chrf(model, tokenizer, corpora, [*BASE, NEW], "base")]
    base_state = {k: v.clone() for k, v in model.state_dict().items()}

    for budget in args.rounds:
        tokens, epochs = (int(x) for x in budget.split("x"))
        model.load_state_dict(base_state)
        model.train()
        rows = {NEW: data.mix(NEW, tokens, args.pair_share)}
        settings = TrainSettings(learning_rate=1e-3, num_epochs=epochs, per_device_batch_size=16, warmup_ratio=0.05, logging_steps=50)
        start = time.perf_counter()
        train_causal_lm(model, rows, settings, args.out / f"round-{budget}")
        print(f"round {budget}: {rows[NEW].numel():,} el tokens x {epochs} epochs in {time.perf_counter() - start:.0f} s")
        tables.append(chrf(model, tokenizer, corpora, [BASE[0], NEW], f"round {budget}"))

    summary = pd.concat(tables).pivot_table(index="metric", columns="model", values="value", sort=False)
    print("\nchrF++ (0-100), 3-shot, 40 held-out pairs a direction:\n" + summary.round(1).to_string())


if __name__ == "__main__":
    main()
