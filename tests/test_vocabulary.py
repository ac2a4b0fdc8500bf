"""Tokenizer fertility in every round's card, and the optional vocabulary extension with the lifelong invariant kept."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from demo.base import train_demo_tokenizer
from layermoe_core import expand, insert_classifiers
from layermoe_core.analysis.fertility import fertility_table
from registry import RegistrySettings, register_base, register_child, show_version

from .conftest import tiny_model
from .synthetic_corpus import write_synthetic_corpus

OLD, NEW = ["en", "es"], ["bn", "hi"]  # the base tokenizer never saw Bengali or Devanagari
BASE_VOCAB = 320  # the tokenizer's 256 bytes, 3 specials and its merges fit in the tiny models' rows


def documents(corpora, language: str, split: slice) -> list[str]:
    lines = corpora[language].path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines][split]


TRAIN, HELDOUT = slice(0, 150), slice(150, None)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    return write_synthetic_corpus(tmp_path_factory.mktemp("corpus"), OLD + NEW)


@pytest.fixture(scope="module")
def base_tokenizer(corpora, tmp_path_factory):
    """A byte-level BPE (the demo's) trained on the old languages' training text only."""
    texts = [text for language in OLD for text in documents(corpora, language, TRAIN)]
    return train_demo_tokenizer(texts, BASE_VOCAB, tmp_path_factory.mktemp("tokenizer"))


def test_the_card_and_the_run_carry_each_languages_fertility_and_the_costly_new_script(corpora, base_tokenizer, tmp_path):
    settings = RegistrySettings(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    model = tiny_model("qwen2", vocab_size=BASE_VOCAB)
    model.save_pretrained(tmp_path / "base")
    base_tokenizer.save_pretrained(tmp_path / "base")
    round_1 = {"round": 1, "old_languages": OLD, "new_languages": NEW, "allocation": [2, 0, 1], "classifier_layers": [0]}
    child = expand(model, round_1["allocation"], OLD, NEW)
    insert_classifiers(child, round_1["classifier_layers"])
    child.save_pretrained(tmp_path / "child")
    base_tokenizer.save_pretrained(tmp_path / "child")
    fertility = fertility_table(base_tokenizer, {lang: documents(corpora, lang, HELDOUT) for lang in OLD + NEW}, NEW)

    base = register_base(settings, tmp_path / "base", OLD)
    kid = register_child(settings, tmp_path / "child", base.version, round_1, {"fertility": fertility}, {}, {}, {})

    card = show_version(settings, kid.version)["description"]
    assert "### Tokenizer fertility" in card
    for row in fertility.itertuples():
        assert f"| {row.language} | {row.group} | {row.tokens_per_char:.4f} | {row.tokens_per_word:.4f} |" in card
    # three UTF-8 bytes, so three byte tokens, per Bengali or Devanagari letter: warned
    for lang in NEW:
        assert f"new language {lang} costs {fertility.set_index('language').loc[lang, 'tokens_per_char']:.2f} tokens per character" in card
    metrics = MlflowClient(settings.tracking_uri).get_run(kid.run_id).data.metrics
    by_language = fertility.set_index("language")
    for lang in OLD + NEW:
        assert metrics[f"tokens_per_char.{lang}"] == pytest.approx(by_language.loc[lang, "tokens_per_char"])
        assert metrics[f"tokens_per_word.{lang}"] == pytest.approx(by_language.loc[lang, "tokens_per_word"])
