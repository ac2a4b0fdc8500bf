"""The demo base: a multilingual byte-level BPE and a small Qwen2 built from its config."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from demo.base import demo_base_config, train_demo_tokenizer
from layermoe_core import LayerMoEError
from layermoe_core.model.checkpoints import init_model

TEXTS = {
    "el": ["Τύπωσε έναν φιλικό χαιρετισμό στον χρήστη", "Αδυναμία ανοίγματος του αρχείου για ανάγνωση"],
    "zh": ["打印友好的问候", "无法打开文件进行读取，请检查权限"],
    "en": ["Print a friendly greeting to the user", "Could not open the file for reading"],
}
UNSEEN = ["Το αρχείο ανοίγει τώρα.", "问候文件已打开。", "The greeting file opens now.", "Ünïcödé façade — ok , fine !\n\tnext  line"]


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("corpus")
    files = {}
    for lang, texts in TEXTS.items():
        files[lang] = directory / f"{lang}.jsonl"
        files[lang].write_text(
            "".join(json.dumps({"id": str(i), "text": t}, ensure_ascii=False) + "\n" for i, t in enumerate(texts * 5)), encoding="utf-8"
        )
    return files


def test_tokenizer_round_trips_greek_chinese_and_latin_text(corpus_files, tmp_path):
    tokenizer = train_demo_tokenizer(corpus_files, vocab_size=320, output_dir=tmp_path)
    for text in UNSEEN + [t for texts in TEXTS.values() for t in texts]:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text
    assert len(tokenizer(TEXTS["el"][0])["input_ids"]) < len(TEXTS["el"][0].encode("utf-8"))  # merges were learned


def test_saved_tokenizer_reloads_with_its_special_tokens(corpus_files, tmp_path):
    trained = train_demo_tokenizer(corpus_files, vocab_size=320, output_dir=tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert (reloaded.pad_token_id, reloaded.bos_token_id, reloaded.eos_token_id) == (0, 1, 2)
    assert reloaded(UNSEEN)["input_ids"] == trained(UNSEEN)["input_ids"]
    assert reloaded("<|endoftext|>")["input_ids"] == [2]  # nothing is added to encoded text


def test_the_same_texts_give_the_same_tokenizer(tmp_path):
    texts = [t for texts in TEXTS.values() for t in texts] * 3
    train_demo_tokenizer(texts, vocab_size=300, output_dir=tmp_path / "a")
    train_demo_tokenizer(list(texts), vocab_size=300, output_dir=tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


def test_vocab_too_small_for_the_byte_alphabet_is_rejected(tmp_path):
    with pytest.raises(LayerMoEError, match="vocab_size=100"):
        train_demo_tokenizer(["some text"], vocab_size=100, output_dir=tmp_path)


def test_base_model_builds_from_config_and_predicts_every_token():
    config = demo_base_config(vocab_size=320, size="tiny")
    model = init_model(config, seed=0).eval()
    ids = torch.randint(0, 320, (2, 7), generator=torch.Generator().manual_seed(0))
    output = model(input_ids=ids, labels=ids)
    assert output.logits.shape == (2, 7, 320)
    assert torch.isfinite(output.loss)
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 1, 2)


def test_the_seed_fixes_the_weights_without_touching_global_randomness():
    config = demo_base_config(vocab_size=64, size="tiny", num_hidden_layers=3)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first, second, other = (init_model(config, seed) for seed in (7, 7, 8))
    assert torch.equal(torch.rand(1), expected_next)
    assert len(first.model.layers) == 3
    weights = [m.model.layers[0].mlp.up_proj.weight for m in (first, second, other)]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


def test_unknown_size_is_rejected_with_the_choices():
    with pytest.raises(LayerMoEError, match=r"size='huge'.*\['demo', 'tiny'\]"):
        demo_base_config(vocab_size=64, size="huge")
