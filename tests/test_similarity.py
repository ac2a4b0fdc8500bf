"""Per-layer similarity (docs/design.md, 'Similarity'): the streaming mean of cosines over token pairs."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from layermoe_core import LayerMoEError, expand
from layermoe_core.analysis.similarity import layer_similarity, mean_unit_vectors
from layermoe_core.model.modeling_layermoe import decoder_layers

from .conftest import TINY, tiny_model


def random_tokens(rows: int, seq_len: int, seed: int) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (rows, seq_len), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def languages():
    return {lang: random_tokens(3, 8, seed) for seed, lang in enumerate(["en", "zh", "el", "hu"])}


def mlp_inputs(model, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, every token's MLP input (N, d), read independently at the post-attention norm's output."""
    layers = decoder_layers(model)
    captured: list[torch.Tensor] = [None] * len(layers)

    def keep(i):
        def hook(module, args, out):
            captured[i] = out.reshape(-1, out.shape[-1])

        return hook

    handles = [layer.post_attention_layernorm.register_forward_hook(keep(i)) for i, layer in enumerate(layers)]
    with torch.no_grad():
        model(tokens)
    for handle in handles:
        handle.remove()
    return captured


def test_table_has_one_row_per_layer_with_every_pair_and_the_score(languages):
    df = layer_similarity(tiny_model(), languages, ["en", "zh"], ["el", "hu"])
    pairs = ["sim:el|hu", "sim:el|en", "sim:el|zh", "sim:hu|en", "sim:hu|zh"]
    assert list(df.columns) == ["layer", *pairs, "sim_old_new", "sim_new_new", "score"]
    assert df["layer"].tolist() == [0, 1, 2] and pd.api.types.is_integer_dtype(df["layer"])
    np.testing.assert_allclose(df["sim_new_new"], df["sim:el|hu"])
    np.testing.assert_allclose(df["sim_old_new"], df[pairs[1:]].mean(axis=1))
    np.testing.assert_allclose(df["score"], (df["sim_old_new"] + df["sim_new_new"]) / 2)


def test_single_new_language_scores_by_old_new_pairs_only(languages):
    df = layer_similarity(tiny_model(), languages, ["en", "zh"], ["el"])
    assert df["sim_new_new"].isna().all()
    np.testing.assert_allclose(df["score"], df["sim_old_new"])


def test_score_rule_is_selectable(languages):
    model = tiny_model()
    by_new_new = layer_similarity(model, languages, ["en"], ["el", "hu"], score="new_new")
    by_old_new = layer_similarity(model, languages, ["en"], ["el", "hu"], score="old_new")
    np.testing.assert_allclose(by_new_new["score"], by_new_new["sim_new_new"])
    np.testing.assert_allclose(by_old_new["score"], by_old_new["sim_old_new"])


def test_streaming_formula_equals_explicit_mean_of_all_pair_cosines(languages):
    model = tiny_model()
    df = layer_similarity(model, languages, ["en"], ["el"], batch_size=2)
    for layer, (el, en) in enumerate(zip(mlp_inputs(model, languages["el"]), mlp_inputs(model, languages["en"]))):
        cosines = torch.nn.functional.normalize(el, dim=-1) @ torch.nn.functional.normalize(en, dim=-1).T  # (24, 24)
        assert df.loc[layer, "sim:el|en"] == pytest.approx(cosines.double().mean().item(), abs=1e-6)


def test_language_whose_tokens_share_one_direction_has_self_similarity_one():
    # Every position sees the same token, so every MLP input is the same vector: all pair cosines are 1.
    # (For ordinary text, self-similarity is the mean pairwise cosine within the language, below 1.)
    repeated = torch.full((2, 6), 7)
    df = layer_similarity(tiny_model(), {"en": repeated, "el": repeated}, ["en"], ["el"])
    np.testing.assert_allclose(df["sim:el|en"], 1.0, atol=1e-6)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_is_left_out_of_the_means(side):
    model = tiny_model()
    lengths = [5, 9, 7]
    rows = [random_tokens(1, n, seed)[0] for seed, n in enumerate(lengths)]
    ids = random_tokens(3, 9, seed=99)  # garbage under the padding
    mask = torch.zeros(3, 9, dtype=torch.long)
    for i, row in enumerate(rows):
        cols = slice(0, len(row)) if side == "right" else slice(9 - len(row), 9)
        ids[i, cols], mask[i, cols] = row, 1
    padded = mean_unit_vectors(model, {"input_ids": ids, "attention_mask": mask}, batch_size=3)
    unpadded = sum(n * mean_unit_vectors(model, row[None]) for n, row in zip(lengths, rows)) / sum(lengths)
    torch.testing.assert_close(padded, unpadded, atol=1e-6, rtol=0)


def test_batch_size_does_not_change_the_result():
    model, tokens = tiny_model(), random_tokens(6, 8, seed=3)
    torch.testing.assert_close(mean_unit_vectors(model, tokens, 1), mean_unit_vectors(model, tokens, 4), atol=1e-6, rtol=0)


def test_hooks_are_removed_and_the_model_is_unchanged(languages):
    model = tiny_model().train()
    before = model(languages["en"]).logits
    layer_similarity(model, languages, ["en"], ["el"])
    assert model.training
    assert not any(module._forward_pre_hooks or module._forward_hooks for module in model.modules())
    torch.testing.assert_close(model(languages["en"]).logits, before, atol=0, rtol=0)


def test_hooks_are_removed_when_the_pass_fails():
    model = tiny_model()
    with pytest.raises(IndexError):
        mean_unit_vectors(model, torch.full((1, 4), TINY["vocab_size"] + 5))  # ids outside the vocabulary
    assert not any(module._forward_pre_hooks for module in model.modules())


def test_expanded_model_with_fresh_experts_measures_like_its_parent(languages):
    parent = tiny_model("llama")
    child = expand(copy.deepcopy(parent), [2, 0, 1], ["en"], ["el"]).eval()
    parent_df = layer_similarity(parent, languages, ["en", "zh"], ["el", "hu"])
    child_df = layer_similarity(child, languages, ["en", "zh"], ["el", "hu"])
    assert not any(module._forward_pre_hooks for module in child.modules())
    pd.testing.assert_frame_equal(child_df, parent_df, atol=1e-6, rtol=0)


def test_perturbed_experts_change_only_the_layers_after_them(languages):
    child = expand(tiny_model(), [0, 1, 0], ["en"], ["el"]).eval()
    before = layer_similarity(child, languages, ["en"], ["el"])
    with torch.no_grad():
        child.moe_block(1).new_experts[0].down_proj.mul_(5.0)
        child.moe_block(1).router.gate.weight.normal_()
    after = layer_similarity(child, languages, ["en"], ["el"])
    np.testing.assert_allclose(after.loc[:1, "score"], before.loc[:1, "score"], atol=1e-6)
    assert abs(after.loc[2, "score"] - before.loc[2, "score"]) > 1e-4


@pytest.mark.parametrize(
    "old, new, score, message",
    [
        (["en"], ["ko"], "mean", r"no token sequences for languages \['ko'\]"),
        (["en"], ["el"], "new_new", "needs two new languages"),
        ([], ["el"], "mean", "nothing to compare"),
        (["en"], ["en", "el"], "mean", r"\['en'\] are both old and new"),
        (["en"], ["el"], "median", "unknown score"),
    ],
)
def test_bad_language_sets_are_rejected(languages, old, new, score, message):
    with pytest.raises(LayerMoEError, match=message):
        layer_similarity(tiny_model(), languages, old, new, score=score)
