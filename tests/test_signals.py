"""The other papers' allocation signals (layermoe_core.analysis.signals), each against a hand computation on a tiny model."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import average_precision_score

from layermoe_core import LayerMoEError, expand
from layermoe_core.analysis.signals import average_precision, neuron_responses, neuron_signal, param_delta_signal
from layermoe_core.model.modeling_layermoe import decoder_layers

from .conftest import TINY, tiny_model


def random_tokens(rows: int, seq_len: int, seed: int) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (rows, seq_len), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def languages():
    return {lang: random_tokens(4, 8, seed) for seed, lang in enumerate(["en", "zh", "el", "hu"])}


def hand_responses(model, tokens: torch.Tensor) -> torch.Tensor:
    """(rows, L, I): act(gate(x)) * up(x) of every token, from the post-attention norm's output, averaged per row."""
    layers, captured = decoder_layers(model), {}
    handles = [
        layer.post_attention_layernorm.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out))
        for i, layer in enumerate(layers)
    ]
    with torch.no_grad():
        model(tokens)
    for handle in handles:
        handle.remove()
    with torch.no_grad():
        per_layer = [
            (layer.mlp.act_fn(layer.mlp.gate_proj(captured[i])) * layer.mlp.up_proj(captured[i])).mean(1) for i, layer in enumerate(layers)
        ]
    return torch.stack(per_layer, dim=1)


def test_neuron_responses_are_the_mean_mlp_activation_of_each_row(base_model, languages):
    torch.testing.assert_close(
        neuron_responses(base_model, languages["el"], batch_size=3), hand_responses(base_model, languages["el"]), atol=1e-5, rtol=1e-4
    )


def test_padding_is_left_out_of_the_responses():
    model = tiny_model()
    rows = [random_tokens(1, n, seed)[0] for seed, n in enumerate([5, 8])]
    ids, mask = random_tokens(2, 8, seed=9), torch.zeros(2, 8, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    padded = neuron_responses(model, {"input_ids": ids, "attention_mask": mask})
    for i, row in enumerate(rows):
        torch.testing.assert_close(padded[i], neuron_responses(model, row[None])[0], atol=1e-5, rtol=1e-4)


def test_average_precision_equals_scikit_learn_with_and_without_ties():
    generator = torch.Generator().manual_seed(0)
    positive = torch.rand(40, generator=generator) > 0.6
    for scores in (torch.randn(40, 6, generator=generator), torch.randint(0, 3, (40, 6), generator=generator).double()):
        expected = [average_precision_score(positive.numpy(), scores[:, j].numpy()) for j in range(6)]
        np.testing.assert_allclose(average_precision(scores.double(), positive).numpy(), expected, atol=1e-12)


def test_neuron_signal_counts_each_languages_top_neurons_by_ap_per_layer(base_model, languages):
    old, new, top = ["en", "zh"], ["el", "hu"], 20
    table = neuron_signal(base_model, languages, old, new, neurons_per_language=top, batch_size=2)
    responses = {lang: hand_responses(base_model, languages[lang]).flatten(1).numpy() for lang in old + new}  # (rows, L*I)
    scores = np.concatenate([responses[lang] for lang in old + new])
    intermediate = TINY["intermediate_size"]
    expected = {}
    for lang in old + new:
        is_lang = np.concatenate([np.full(len(responses[other]), other == lang) for other in old + new])
        ap = np.array([average_precision_score(is_lang, scores[:, j]) for j in range(scores.shape[1])])
        best = np.argsort(-ap, kind="stable")[:top]
        expected[lang] = np.bincount(best // intermediate, minlength=TINY["num_hidden_layers"])
        np.testing.assert_array_equal(table[f"neurons:{lang}"], expected[lang])
        assert table[f"neurons:{lang}"].sum() == top
    signal = table[["neurons:en", "neurons:zh"]].mean(axis=1) + table[["neurons:el", "neurons:hu"]].mean(axis=1)
    np.testing.assert_allclose(table["signal"], signal)
    assert list(table.columns) == ["layer", "neurons:en", "neurons:zh", "neurons:el", "neurons:hu", "signal"]


def test_expanded_parent_measures_neurons_of_expert_zero_like_its_dense_parent(languages):
    parent = tiny_model("llama")
    child = expand(copy.deepcopy(parent), [2, 0, 1], ["en"], ["el"]).eval()
    pd.testing.assert_frame_equal(neuron_signal(child, languages, ["en"], ["el"], 10), neuron_signal(parent, languages, ["en"], ["el"], 10))


def test_neuron_signal_refuses_more_neurons_than_the_model_has(languages):
    with pytest.raises(LayerMoEError, match="neurons_per_language=1000 but the model has 192 MLP neurons"):
        neuron_signal(tiny_model(), languages, ["en"], ["el"], neurons_per_language=1000)


def hand_param_delta(model, tokens: torch.Tensor, steps: int, lr: float, batch_size: int, seed: int) -> list[float]:
    probe = copy.deepcopy(model).float().train()
    probe.requires_grad_(False)
    mlps = [layer.mlp for layer in decoder_layers(probe)]
    weights = [w for mlp in mlps for w in (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)]
    before = [torch.cat([w.detach().double().flatten() for w in weights[3 * i : 3 * i + 3]]) for i in range(len(mlps))]
    for w in weights:
        w.requires_grad_(True)
    optimizer = torch.optim.AdamW(weights, lr=lr, weight_decay=0.0)
    order = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(seed)).tolist()
    for step in range(steps):
        batch = tokens[[order[(step * batch_size + k) % len(order)] for k in range(batch_size)]]
        optimizer.zero_grad()
        probe(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
    after = [torch.cat([w.detach().double().flatten() for w in weights[3 * i : 3 * i + 3]]) for i in range(len(mlps))]
    return [float((a - b).norm() / b.norm()) for a, b in zip(after, before)]


def test_param_delta_is_the_relative_mlp_change_after_a_brief_finetune_per_language(base_model, languages):
    before = {name: p.clone() for name, p in base_model.named_parameters()}
    new = {"el": languages["el"], "hu": languages["hu"]}
    table = param_delta_signal(base_model, new, steps=3, learning_rate=1e-3, batch_size=3, seed=1)
    for lang, tokens in new.items():
        np.testing.assert_allclose(table[f"delta:{lang}"], hand_param_delta(base_model, tokens, 3, 1e-3, 3, 1), rtol=1e-5)
    np.testing.assert_allclose(table["signal"], (table["delta:el"] + table["delta:hu"]) / 2)
    assert (table["signal"] > 0).all()
    for name, p in base_model.named_parameters():  # the parent itself never trains
        assert torch.equal(p, before[name]), name


def test_param_delta_of_a_bf16_parent_trains_a_float32_copy():
    model = tiny_model().to(torch.bfloat16)
    table = param_delta_signal(model, {"el": random_tokens(4, 8, 0)}, steps=2, learning_rate=1e-4, batch_size=2)
    # 1e-4 steps are below bf16's resolution for most weights; a float32 probe sees them all
    assert (table["signal"] > 1e-5).all() and next(model.parameters()).dtype == torch.bfloat16
