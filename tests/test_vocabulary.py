"""Tokenizer fertility in every round's card, and the optional vocabulary extension with the lifelong invariant kept."""

from __future__ import annotations

import json
import math
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from demo.base import train_demo_tokenizer
from layermoe_core import LayerMoEError, expand, forced_old_routing, insert_classifiers, pinned_language
from layermoe_core.analysis.fertility import fertility_table
from layermoe_core.evaluation.gates import BITS_PER_BYTE, GateSettings, evaluate_gates
from layermoe_core.evaluation.metrics import bits_per_byte, compare_models, evaluate_model
from layermoe_core.model.checkpoints import load_tokenizer
from layermoe_core.model.surgery import extend_vocabulary
from layermoe_core.model.vocabulary import (
    added_token_pieces,
    check_old_text_unchanged,
    extend_tokenizer,
    learn_merges,
    vocabulary_size,
)
from layermoe_core.training.trainer import Stage1Settings, Stage2Settings, train_stage1, train_stage2
from registry import RegistrySettings, RoundInfo, download_version, get_version, register_base, register_child, show_version

from .conftest import tiny_model
from .synthetic_corpus import write_synthetic_corpus
from .test_registry_delta import stored_tensor_names
from .test_training import QUICK, WIDE

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
    round_1 = RoundInfo(round=1, old_languages=OLD, new_languages=NEW, allocation=[2, 0, 1], classifier_layers=[0])
    child = expand(model, round_1.allocation, OLD, NEW)
    insert_classifiers(child, round_1.classifier_layers)
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
    assert "`vocabulary: {extend: N}` in the plan adds tokens for it" in card  # the way out
    metrics = MlflowClient(settings.tracking_uri).get_run(kid.run_id).data.metrics
    by_language = fertility.set_index("language")
    for lang in OLD + NEW:
        assert metrics[f"tokens_per_char.{lang}"] == pytest.approx(by_language.loc[lang, "tokens_per_char"])
        assert metrics[f"tokens_per_word.{lang}"] == pytest.approx(by_language.loc[lang, "tokens_per_word"])


# -- the extension, through two rounds with save, registry download and reload between them ------------
ROUNDS = [(["en", "es"], "bn", [1, 0, 2]), (["en", "es", "bn"], "hi", [2, 1, 0])]  # (old, new, allocation) per round
EXTEND = 24  # new tokens per round


def token_rows(tokenizer, texts: list[str], seq_len: int = 16) -> torch.Tensor:
    """The texts' ids, documents joined by eos, cut into (N, seq_len) rows."""
    ids = [i for text in texts for i in tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    usable = len(ids) // seq_len * seq_len
    return torch.tensor(ids[:usable]).reshape(-1, seq_len)


def run_extended_round(parent_dir: Path, old: list[str], new: str, allocation: list[int], corpora, out_dir: Path) -> Path:
    """One round as the flow runs it, with `vocabulary: {extend: EXTEND}`: the child's final folder, with its tokenizer."""
    parent, tokenizer = AutoModelForCausalLM.from_pretrained(parent_dir), load_tokenizer(parent_dir)
    old_text = [text for lang in old for text in documents(corpora, lang, TRAIN)]
    merges = learn_merges(tokenizer, documents(corpora, new, TRAIN), old_text, EXTEND)
    rows = vocabulary_size(parent.config)  # the new ids follow every row the parent has
    extended = extend_tokenizer(tokenizer, merges, first_id=rows)
    check_old_text_unchanged(tokenizer, extended, {lang: documents(corpora, lang, HELDOUT) for lang in old})
    child = expand(parent, allocation, old, [new], seed=len(old))
    extend_vocabulary(child, added_token_pieces(extended, rows))
    new_rows = {new: token_rows(extended, documents(corpora, new, TRAIN))}
    train_stage1(child, new_rows, Stage1Settings(learning_rate=3e-2, max_steps=20, **QUICK), out_dir / "stage1", tokenizer=extended)
    insert_classifiers(child, [0], seed=len(old))
    old_rows = {lang: token_rows(extended, documents(corpora, lang, TRAIN))[:24] for lang in old}
    stage2 = Stage2Settings(learning_rate=3e-2, max_steps=10, **QUICK)
    return train_stage2(child, old_rows, new_rows, stage2, out_dir / "stage2", tokenizer=extended).model_dir


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def extended_lineage(request, corpora, base_tokenizer, tmp_path_factory):
    """(registry, [base, round 1, round 2] as downloaded from the registry): each round's parent is the previous download."""
    root = tmp_path_factory.mktemp(f"lineage-{request.param}")
    registry = RegistrySettings(tracking_uri=f"sqlite:///{root}/mlflow.db", cache_dir=root / "cache")
    tiny_model(request.param, vocab_size=BASE_VOCAB, **WIDE).save_pretrained(root / "base")  # Qwen2's tiny config ties embeddings
    base_tokenizer.save_pretrained(root / "base")
    register_base(registry, root / "base", OLD)
    dirs = [download_version(registry, 1, root / "v1").path]
    for number, (old, new, allocation) in enumerate(ROUNDS, start=1):
        final = run_extended_round(dirs[-1], old, new, allocation, corpora, root / f"round{number}")
        info = RoundInfo(round=number, old_languages=old, new_languages=[new], allocation=allocation, classifier_layers=[0])
        register_child(registry, final, number, info, {}, {}, {}, {})
        dirs.append(download_version(registry, number + 1, root / f"v{number + 1}").path)
    return registry, dirs


def model_rows(model_dir: Path) -> int:
    return AutoModelForCausalLM.from_pretrained(model_dir).get_output_embeddings().out_features


@pytest.mark.parametrize("round_number", [1, 2])
def test_every_old_languages_heldout_text_tokenizes_byte_for_byte_as_before(extended_lineage, corpora, round_number):
    _, dirs = extended_lineage
    parent, child = load_tokenizer(dirs[round_number - 1]), load_tokenizer(dirs[round_number])
    old, new, _ = ROUNDS[round_number - 1]
    assert len(child) == len(parent) + EXTEND
    for lang in old:
        texts = documents(corpora, lang, HELDOUT)
        assert child(texts)["input_ids"] == parent(texts)["input_ids"], lang
    new_text = documents(corpora, new, HELDOUT)
    fertility = fertility_table(parent, {lang: documents(corpora, lang, HELDOUT) for lang in [*old, new]}, [new], child)
    fertility = fertility.set_index("language")
    assert fertility.loc[new, "child_tokens_per_char"] < 0.8 * fertility.loc[new, "tokens_per_char"]  # the new script got cheaper
    assert (fertility.loc[old, "child_tokens_per_char"] == fertility.loc[old, "tokens_per_char"]).all()
    assert child.batch_decode(child(new_text)["input_ids"]) == new_text


@torch.no_grad()
def logits_over(model_dir: Path, ids: torch.Tensor, language: str | None = None, forced_old: bool = False) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if forced_old:
        with forced_old_routing(model):
            return model(ids).logits
    if language is not None:
        with pinned_language(model, language):
            return model(ids).logits
    return model(ids).logits


def mixed_ids(corpora, tokenizer) -> torch.Tensor:
    """(4, 16) held-out ids of every language, tokenized by `tokenizer`."""
    return torch.cat([token_rows(tokenizer, documents(corpora, lang, HELDOUT))[:1] for lang in OLD + NEW])


@pytest.mark.parametrize("round_number", [1, 2])
def test_forced_old_routing_gives_the_parents_logits_over_its_vocabulary_and_masks_the_new_rows(extended_lineage, corpora, round_number):
    _, dirs = extended_lineage
    ids = mixed_ids(corpora, load_tokenizer(dirs[round_number - 1]))  # ids the parent knows
    parent = logits_over(dirs[round_number - 1], ids)
    size = parent.shape[-1]
    forced, plain = logits_over(dirs[round_number], ids, forced_old=True), logits_over(dirs[round_number], ids)
    assert forced.shape[-1] == plain.shape[-1] == size + EXTEND
    assert (plain[..., :size] - parent).abs().max() > 1e-3, "training changed nothing, so the check below would be empty"
    torch.testing.assert_close(forced[..., :size], parent, atol=1e-5, rtol=0)
    assert torch.isneginf(forced[..., size:]).all()
    torch.testing.assert_close(forced.softmax(-1)[..., :size], parent.softmax(-1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("language", ["en", "es", "bn"])
def test_the_pinned_route_of_an_older_language_gives_the_version_that_learned_it_over_its_vocabulary(extended_lineage, corpora, language):
    _, dirs = extended_lineage
    learned = 0 if language in OLD else 1  # the version whose function the pinned round-2 child must compute
    ids = mixed_ids(corpora, load_tokenizer(dirs[learned]))
    reference = logits_over(dirs[learned], ids)
    size = reference.shape[-1]
    pinned = logits_over(dirs[2], ids, language=language)
    torch.testing.assert_close(pinned[..., :size], reference, atol=1e-5, rtol=0)
    assert torch.isneginf(pinned[..., size:]).all() and pinned.shape[-1] == BASE_VOCAB + 2 * EXTEND


def safetensors_of(model_dir: Path) -> dict[str, torch.Tensor]:
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def test_stage1_trains_only_the_new_rows_and_the_parents_rows_stay_bitwise(extended_lineage):
    _, dirs = extended_lineage
    base, first, second = (safetensors_of(d) for d in dirs)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in base:  # a tied base stores its LM head once
            assert torch.equal(first[f"causal_lm.{name}"], base[name]) and torch.equal(second[f"causal_lm.{name}"], base[name])
    for name in ("vocabulary.embeddings.0", "vocabulary.heads.0"):
        assert first[name].shape == (EXTEND, WIDE["hidden_size"])
        assert torch.equal(second[name], first[name]), "round 2 changed round 1's rows"
    assert {"vocabulary.embeddings.1", "vocabulary.heads.1"} <= set(second)
    config = AutoModelForCausalLM.from_pretrained(dirs[2]).config
    assert [expansion["added_tokens"] for expansion in config.expansion_rounds] == [EXTEND, EXTEND]


def test_the_registry_stores_the_tokenizer_and_only_the_new_rows(extended_lineage):
    registry, _ = extended_lineage
    delta = stored_tensor_names(registry, 3)
    assert {"vocabulary.embeddings.1", "vocabulary.heads.1"} <= delta
    assert not {"vocabulary.embeddings.0", "vocabulary.heads.0", "causal_lm.model.embed_tokens.weight"} & delta
    run_id = get_version(registry, 3).run_id
    stored = Path(urlparse(MlflowClient(registry.tracking_uri).get_run(run_id).info.artifact_uri).path) / "model"
    assert (stored / "tokenizer.json").is_file(), "the round's tokenizer changed, so the version stores it"


def test_each_new_row_starts_at_the_mean_of_its_pieces_parent_rows(base_tokenizer, corpora):
    parent = tiny_model("llama", vocab_size=BASE_VOCAB)
    old_text = [text for lang in OLD for text in documents(corpora, lang, TRAIN)]
    extended = extend_tokenizer(base_tokenizer, learn_merges(base_tokenizer, documents(corpora, "bn", TRAIN), old_text, 8), BASE_VOCAB)
    pieces = added_token_pieces(extended, BASE_VOCAB)
    child = expand(parent, [1, 1, 1], OLD, ["bn"])
    extend_vocabulary(child, pieces)
    embedding, head = child.get_input_embeddings().weight, child.get_output_embeddings().weight
    for k, ids in enumerate(pieces):
        assert extended.decode(ids) == extended.decode([BASE_VOCAB + k]) and len(ids) >= 2
        torch.testing.assert_close(child.vocabulary.embeddings[0][k], embedding[ids].mean(0))
        torch.testing.assert_close(child.vocabulary.heads[0][k], head[ids].mean(0))
    with pytest.raises(LayerMoEError, match="already extended the vocabulary"):
        extend_vocabulary(child, pieces)


def test_a_tokenizer_that_is_not_bpe_is_refused_with_the_fix():
    from .tiny_tokenizer import tiny_tokenizer

    with pytest.raises(LayerMoEError, match="continues BPE merges, but this tokenizer's model is 'WordLevel'.*drop `vocabulary.extend`"):
        learn_merges(tiny_tokenizer(), ["abc"], [], 4)


# -- comparable evaluation: bits per byte ---------------------------------------------------------
def test_bits_per_byte_is_every_tokens_nll_in_bits_over_the_texts_bytes(base_tokenizer, corpora):
    model = tiny_model("qwen2", vocab_size=BASE_VOCAB)
    texts = documents(corpora, "es", HELDOUT)[:3]
    table = bits_per_byte(model, base_tokenizer, {"es": texts}, seq_len=512)
    nats = 0.0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([[base_tokenizer.eos_token_id, *base_tokenizer(text, add_special_tokens=False)["input_ids"]]])
            nats += torch.nn.functional.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:], reduction="sum").item()
    size = sum(len(text.encode("utf-8")) for text in texts)
    assert table.loc[0, "n"] == size
    assert table.loc[0, "value"] == pytest.approx(nats / math.log(2) / size, rel=1e-5)


def test_the_gate_judges_new_languages_in_bits_per_byte_where_the_child_tokenizes_them_differently(extended_lineage, corpora):
    _, dirs = extended_lineage
    tables = {}
    for side, model_dir in (("parent", dirs[0]), ("child", dirs[1])):
        model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir).eval(), load_tokenizer(model_dir)
        sequences = {lang: token_rows(tokenizer, documents(corpora, lang, HELDOUT))[:8] for lang in ["en", "es", "bn"]}
        texts = {lang: documents(corpora, lang, HELDOUT)[:8] for lang in ["en", "es", "bn"]}
        tables[side] = pd.concat([evaluate_model(model, tokenizer, sequences), bits_per_byte(model, tokenizer, texts, seq_len=16)])
    comparison = compare_models(tables["parent"], tables["child"], ["en", "es"], ["bn"])
    bits = comparison[comparison["metric"] == BITS_PER_BYTE].set_index("language")
    assert bits.loc["bn", "child"] < bits.loc["bn", "parent"]  # Stage 1 taught bn, in its new tokens
    decision = evaluate_gates(comparison, GateSettings(max_old_loss_increase=10.0))
    (reason,) = [r for r in decision.reasons if r.startswith("new language bn")]
    assert reason.startswith(f"new language bn: bits_per_byte {bits.loc['bn', 'parent']:.4f} -> {bits.loc['bn', 'child']:.4f}")
    assert "bits per byte) improved" in reason


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_bf16_parent_keeps_its_logits_over_its_vocabulary_after_an_extended_round(family, base_tokenizer, corpora, tmp_path):
    tiny_model(family, vocab_size=BASE_VOCAB, **WIDE).to(torch.bfloat16).save_pretrained(tmp_path / "parent")
    base_tokenizer.save_pretrained(tmp_path / "parent")
    parent = AutoModelForCausalLM.from_pretrained(tmp_path / "parent", dtype="auto")
    ids = mixed_ids(corpora, base_tokenizer)
    with torch.no_grad():
        parent_logits = parent(ids).logits
    final = run_extended_round(tmp_path / "parent", OLD, "bn", [1, 1, 1], corpora, tmp_path / "round")
    child = AutoModelForCausalLM.from_pretrained(final, dtype="auto").eval()
    assert child.vocabulary.embeddings[0].dtype == torch.bfloat16
    with torch.no_grad(), forced_old_routing(child):
        forced = child(ids).logits
    assert torch.equal(forced[..., :BASE_VOCAB], parent_logits)  # bf16: the same kernels on the same weights, exactly
    assert torch.isneginf(forced[..., BASE_VOCAB:]).all()
