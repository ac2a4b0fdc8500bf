"""Per-layer cross-lingual similarity: the signal that decides how many experts a layer gets.

For every decoder layer, the MLP input of each real token (the hidden state after attention
and the post-attention norm) is captured by a forward pre-hook on the layer's `mlp`; on a
LayerMoE model that is the `LayerMoEBlock`, which sees the same input. The similarity of
languages a and b at a layer is the mean cosine over all token pairs, which equals
dot(mean unit vector of a, mean unit vector of b): streamed in O(N*d) time and O(d) memory
per language and layer, never as an N x N matrix.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Literal, TypeAlias

import numpy as np
import pandas as pd
import torch
from torch import nn
from transformers import PreTrainedModel

from ..data.corpus import check_old_new
from ..errors import LayerMoEError
from ..model.inference import forward_pre_hooks, inference, input_device
from ..model.modeling_layermoe import causal_lm_of, decoder_layers

SimilarityScore = Literal["mean", "old_new", "new_new"]
# Either token ids (rows, seq_len) with every token real, or a mapping with "input_ids" and
# "attention_mask" (a tokenizer's padded output); padding is left out of every mean.
Tokens: TypeAlias = torch.Tensor | Mapping[str, torch.Tensor]


def check_sampled(sequences: Mapping[str, Tokens], languages: Sequence[str]) -> None:
    """Every language of the measurement has token sequences."""
    missing = [lang for lang in languages if lang not in sequences]
    if missing:
        raise LayerMoEError(f"no token sequences for languages {missing} (have {sorted(sequences)}); sample them first")


def ids_and_mask(tokens: Tokens) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(tokens, torch.Tensor):
        return tokens, torch.ones_like(tokens)
    return tokens["input_ids"], tokens["attention_mask"]


def mean_unit_vectors(model: PreTrainedModel, tokens: Tokens, batch_size: int = 8, device=None) -> torch.Tensor:
    """(num_layers, d) float64: per layer, the mean of the unit MLP-input vectors of all real tokens.

    Runs the decoder stack without the LM head (no logits are needed), in eval mode, batch by
    batch. The hooks and the model's train/eval mode are restored whatever happens.
    """
    input_ids, attention_mask = ids_and_mask(tokens)
    if batch_size < 1:
        raise LayerMoEError(f"batch_size={batch_size} must be at least 1")
    num_real = int(attention_mask.sum())
    if num_real == 0:
        raise LayerMoEError("no real tokens to measure (empty input or all padding); give at least one token")
    device = torch.device(device) if device is not None else input_device(model)
    layers = decoder_layers(model)
    hidden_size = model.config.get_text_config().hidden_size
    sums = torch.zeros(len(layers), hidden_size, dtype=torch.float64, device=device)  # (L, d)
    batch_mask = torch.empty(0)  # (B*T,) float32, 1 for real tokens: set per batch

    def accumulate(layer: int):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, hidden_size).float()  # (B*T, d), on the layer's device
            weights = batch_mask.to(x.device) / torch.linalg.vector_norm(x, dim=-1).clamp_min(1e-12)  # (B*T,): 1/|x|, 0 on padding
            sums[layer] += (weights @ x).double().to(device)  # sum of unit vectors, (d,)

        return hook

    backbone = causal_lm_of(model).model  # the decoder stack, without the LM head
    with inference(model), forward_pre_hooks((layer.mlp, accumulate(i)) for i, layer in enumerate(layers)):
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start : start + batch_size].to(device)  # (B, T)
            mask = attention_mask[start : start + batch_size].to(device)  # (B, T)
            batch_mask = mask.reshape(-1).float()
            backbone(input_ids=ids, attention_mask=mask, use_cache=False)
    return sums / num_real


def _check_languages(sequences: Mapping[str, Tokens], old: Sequence[str], new: Sequence[str], score: SimilarityScore) -> None:
    if score not in ("mean", "old_new", "new_new"):
        raise LayerMoEError(f"unknown score {score!r}; use 'mean', 'old_new' or 'new_new'")
    if not new:
        raise LayerMoEError("new_languages is empty; name at least one language to add")
    if not old and len(new) < 2:
        raise LayerMoEError(f"nothing to compare: one new language {list(new)} and no old ones; name the old languages")
    check_old_new(old, new)
    if len(set(old)) != len(old) or len(set(new)) != len(new):
        raise LayerMoEError(f"languages must be distinct: old={list(old)}, new={list(new)}")
    check_sampled(sequences, [*old, *new])
    if score == "new_new" and len(new) < 2:
        raise LayerMoEError(f"score='new_new' needs two new languages or more, got {list(new)}; use score='mean' or 'old_new'")
    if score == "old_new" and not old:
        raise LayerMoEError("score='old_new' needs old languages, got none; use score='mean' or 'new_new'")


def layer_similarity(
    model: PreTrainedModel,
    sequences: Mapping[str, Tokens],
    old_languages: Sequence[str],
    new_languages: Sequence[str],
    batch_size: int = 8,
    score: SimilarityScore = "mean",
    device=None,
) -> pd.DataFrame:
    """One row per decoder layer: every new-new and new-old pair's similarity, their means and the score.

    Columns: `layer`; "sim:<a>|<b>" for each new-new pair (a before b in new_languages) and
    each new-old pair (a new, b old); `sim_old_new` and `sim_new_new`, the means over those
    pairs (NaN when there are none); `score`, which drives allocation: "mean" (the
    reference) is the mean of the two means, or the one that exists; "old_new" and "new_new"
    take one of them.
    """
    _check_languages(sequences, old_languages, new_languages, score)
    means = {lang: mean_unit_vectors(model, sequences[lang], batch_size, device) for lang in [*old_languages, *new_languages]}
    new_new = list(itertools.combinations(new_languages, 2))
    old_new = [(new, old) for new in new_languages for old in old_languages]
    table: dict[str, np.ndarray] = {"layer": np.arange(len(decoder_layers(model)))}
    for a, b in new_new + old_new:
        table[f"sim:{a}|{b}"] = (means[a] * means[b]).sum(-1).cpu().numpy()  # (L,)

    def mean_of(pairs: list[tuple[str, str]]) -> np.ndarray:
        if not pairs:
            return np.full(len(table["layer"]), np.nan)
        return np.mean([table[f"sim:{a}|{b}"] for a, b in pairs], axis=0)

    table["sim_old_new"], table["sim_new_new"] = mean_of(old_new), mean_of(new_new)
    if score == "mean":
        table["score"] = np.nanmean([table["sim_old_new"], table["sim_new_new"]], axis=0)
    else:
        table["score"] = table[f"sim_{score}"]
    return pd.DataFrame(table)
