"""Per-layer allocation signals of the other papers, measured on the parent (similarity.py has LayerMoE's).

- `neuron_signal` (NeuronMoE, after Kojima et al. 2024): a neuron is one intermediate unit of
  a layer's MLP, act(gate(x)) * up(x), the input of down_proj. Its response to a sequence is
  its mean over the sequence's real tokens. For each language, every neuron's average
  precision (AP) at telling that language's sequences from the other languages' ranks the
  neurons of all layers together; the top `neurons_per_language` are that language's
  neurons. A layer's signal is the mean count over the old languages plus the mean count
  over the new ones (the reference: the base language's count plus the new languages' mean).
- `param_delta_signal` (DMoE): for each new language, a copy of the model fine-tunes only its
  MLPs for a few steps; a layer's change is ||W_after - W_before|| / ||W_before|| over its
  gate, up and down weights (the reference takes the absolute norm; relative keeps layers of
  different scale comparable). The signal is the mean over the new languages.
On a LayerMoE parent the MLP is expert 0, the parent's original dense MLP, applied to every token.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from transformers import PreTrainedModel

from ..errors import LayerMoEError
from ..model.inference import forward_pre_hooks, inference, input_device
from ..model.modeling_layermoe import causal_lm_of, decoder_layers
from ..model.moe_block import LayerMoEBlock
from .similarity import Tokens, check_sampled, ids_and_mask


def dense_mlp(layer: nn.Module) -> nn.Module:
    """The layer's dense MLP: the MLP itself, or expert 0 of a LayerMoE block."""
    return layer.mlp.original_mlp if isinstance(layer.mlp, LayerMoEBlock) else layer.mlp


def neuron_responses(model: PreTrainedModel, tokens: Tokens, batch_size: int = 8, device=None) -> torch.Tensor:
    """(rows, num_layers, intermediate) float32: each MLP neuron's mean activation over each row's real tokens."""
    input_ids, attention_mask = ids_and_mask(tokens)
    if batch_size < 1:
        raise LayerMoEError(f"batch_size={batch_size} must be at least 1")
    device = torch.device(device) if device is not None else input_device(model)
    layers = decoder_layers(model)
    per_layer: list[torch.Tensor | None] = [None] * len(layers)  # (B, I) of the current batch, on `device`
    weights = torch.empty(0)  # (B, T, 1): 1/real tokens of the row on real tokens, 0 on padding; set per batch

    def capture(index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            mlp = dense_mlp(layers[index])
            x = args[0]  # (B, T, d), on the layer's device
            activation = (mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)).float()  # (B, T, I)
            per_layer[index] = (activation * weights.to(x.device)).sum(1).to(device)  # (B, I)

        return hook

    rows = []
    backbone = causal_lm_of(model).model
    with inference(model), forward_pre_hooks((layer.mlp, capture(i)) for i, layer in enumerate(layers)):
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start : start + batch_size].to(device)  # (B, T)
            mask = attention_mask[start : start + batch_size].to(device)  # (B, T)
            real = mask.sum(1, keepdim=True).clamp_min(1)  # (B, 1)
            weights = (mask / real).unsqueeze(-1).float()  # (B, T, 1)
            backbone(input_ids=ids, attention_mask=mask, use_cache=False)
            rows.append(torch.stack(per_layer, dim=1).cpu())  # (B, L, I)
    return torch.cat(rows)


def average_precision(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """(M,) AP of each column of `scores` (N, M) at ranking the rows where `positive` (N,) is True first.

    Tied scores form one threshold, as in scikit-learn's average_precision_score:
    AP = sum over thresholds of precision * (recall gained at that threshold).
    """
    order = torch.argsort(scores, dim=0, descending=True, stable=True)  # (N, M)
    ranked = torch.gather(scores, 0, order)  # (N, M)
    hits = positive[order].double()  # (N, M)
    found = hits.cumsum(0)  # (N, M): positives at or above each rank
    rank = torch.arange(1, scores.shape[0] + 1, dtype=torch.float64).unsqueeze(1)  # (N, 1)
    last_of_tie = torch.ones_like(hits, dtype=torch.bool)  # (N, M)
    last_of_tie[:-1] = ranked[:-1] != ranked[1:]
    found_at_threshold = torch.where(last_of_tie, found, torch.zeros_like(found))  # (N, M)
    before = torch.cummax(torch.cat([torch.zeros_like(found[:1]), found_at_threshold[:-1]]), dim=0).values  # (N, M)
    gained = torch.where(last_of_tie, found - before, torch.zeros_like(found))  # (N, M)
    return ((found / rank) * gained).sum(0) / positive.sum()


def neuron_signal(
    model: PreTrainedModel,
    sequences: Mapping[str, Tokens],
    old_languages: Sequence[str],
    new_languages: Sequence[str],
    neurons_per_language: int = 1000,
    batch_size: int = 8,
    device=None,
) -> pd.DataFrame:
    """One row per layer: `neurons:<lang>` (that language's top neurons in the layer) and `signal`."""
    languages = [*old_languages, *new_languages]
    if not new_languages:
        raise LayerMoEError("new_languages is empty; name at least one language to add")
    if len(languages) < 2:
        raise LayerMoEError(f"language-specific neurons need two languages or more to tell apart, got {languages}")
    check_sampled(sequences, languages)
    responses = {lang: neuron_responses(model, sequences[lang], batch_size, device) for lang in languages}  # (rows, L, I)
    num_layers, intermediate = next(iter(responses.values())).shape[1:]
    if neurons_per_language > num_layers * intermediate:
        raise LayerMoEError(
            f"neurons_per_language={neurons_per_language} but the model has {num_layers * intermediate} MLP neurons; "
            "pick fewer (NeuronMoE took 1000 of Llama-3.2-3B's 229k, about 0.4%)"
        )
    scores = torch.cat([responses[lang] for lang in languages]).flatten(1).double()  # (N, L*I)
    owner = torch.cat([torch.full((len(responses[lang]),), i) for i, lang in enumerate(languages)])  # (N,)
    table: dict[str, np.ndarray] = {"layer": np.arange(num_layers)}
    for i, lang in enumerate(languages):
        ap = average_precision(scores, owner == i)  # (L*I,)
        top = torch.argsort(ap, descending=True, stable=True)[:neurons_per_language]
        table[f"neurons:{lang}"] = torch.bincount(top // intermediate, minlength=num_layers).numpy()
    new_mean = np.mean([table[f"neurons:{lang}"] for lang in new_languages], axis=0)
    old_mean = np.mean([table[f"neurons:{lang}"] for lang in old_languages], axis=0) if old_languages else 0.0
    table["signal"] = old_mean + new_mean
    return pd.DataFrame(table)


def _mlp_weights(model: PreTrainedModel) -> list[list[nn.Parameter]]:
    return [[mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight] for mlp in map(dense_mlp, decoder_layers(model))]


def _flat(weights: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([w.detach().reshape(-1).double() for w in weights])


def finetune_mlps(
    model: PreTrainedModel, tokens: Tokens, steps: int, learning_rate: float, batch_size: int, seed: int = 0
) -> PreTrainedModel:
    """A float32 copy of `model` whose MLP weights took `steps` AdamW steps of LM loss on `tokens` (the rest frozen)."""
    input_ids, attention_mask = ids_and_mask(tokens)
    devices = {p.device for p in model.parameters()}
    if len(devices) > 1 or torch.device("meta") in devices:
        raise LayerMoEError(
            f"param_delta fine-tunes a copy of the model, which needs it whole on one device; this one is dispatched over "
            f"{sorted(map(str, devices))}. Drop placement.device_map, or pick an allocation method that only reads the model"
        )
    probe = copy.deepcopy(model).float().train()
    probe.requires_grad_(False)
    weights = [w for layer in _mlp_weights(probe) for w in layer]
    for w in weights:
        w.requires_grad_(True)
    optimizer = torch.optim.AdamW(weights, lr=learning_rate, weight_decay=0.0)
    device = next(probe.parameters()).device
    order = torch.randperm(input_ids.shape[0], generator=torch.Generator().manual_seed(seed))
    for step in range(steps):
        rows = order[torch.arange(step * batch_size, (step + 1) * batch_size) % len(order)]  # cycle through the rows
        ids, mask = input_ids[rows].to(device), attention_mask[rows].to(device)  # (B, T)
        out = probe(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        loss = out.lm_loss if getattr(out, "lm_loss", None) is not None else out.loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return probe


def param_delta_signal(
    model: PreTrainedModel,
    new_sequences: Mapping[str, Tokens],
    steps: int = 10,
    learning_rate: float = 1e-4,
    batch_size: int = 4,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per layer: `delta:<lang>` (relative MLP change after fine-tuning on that language) and `signal`."""
    if not new_sequences:
        raise LayerMoEError("no new-language sequences to fine-tune on; sample the new languages first")
    before = [_flat(layer) for layer in _mlp_weights(model)]
    table: dict[str, np.ndarray] = {"layer": np.arange(len(before))}
    for lang, tokens in new_sequences.items():
        probe = finetune_mlps(model, tokens, steps, learning_rate, batch_size, seed)
        after = [_flat(layer).to(b.device) for layer, b in zip(_mlp_weights(probe), before)]
        table[f"delta:{lang}"] = np.array([float((a - b).norm() / b.norm()) for a, b in zip(after, before)])
        del probe
    table["signal"] = np.mean([table[f"delta:{lang}"] for lang in new_sequences], axis=0)
    return pd.DataFrame(table)
