"""Per-layer, per-language routing statistics of an expanded model.

They answer whether each language goes where LayerMoE wants it: old-language tokens to the
old experts (the experts that existed before this round), new-language tokens to the new
ones, and how well each classifier tells the two apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch

from ..data.token_store import check_token_rows
from ..errors import LayerMoEError
from ..model.inference import forward_pre_hooks, inference, input_device
from ..model.losses import NEW, OLD
from ..model.modeling_layermoe import LayerMoEForCausalLM
from ..model.moe_block import LayerMoEBlock


@dataclass
class _Counts:
    """Running sums for one (layer, language)."""

    num_experts: int
    tokens: int = 0
    old_top1: int = 0
    new_weight: float = 0.0
    old_mass: float = 0.0
    classified: int = 0
    correct: int = 0
    slots: torch.Tensor = field(init=False)  # (E,) top-k slots that carry weight, per expert

    def __post_init__(self):
        self.slots = torch.zeros(self.num_experts, dtype=torch.long)


def _record(block: LayerMoEBlock, hidden_states: torch.Tensor, label: int, counts: _Counts) -> None:
    """Route the block's input exactly as its forward does, and add up where the tokens went."""
    tokens = hidden_states.reshape(-1, hidden_states.shape[-1])  # (N, d)
    experts, weights = block.route(tokens)  # (N, k) each, down the routing tree
    old = block.num_old_experts
    counts.tokens += tokens.shape[0]
    counts.old_top1 += int((experts[:, 0] < old).sum())  # top-k is sorted: slot 0 carries the largest weight
    counts.new_weight += float(weights[(experts >= old) & (experts < block.num_experts)].sum())
    counts.slots += torch.bincount(experts[weights > 0].cpu(), minlength=block.num_experts)
    router = block.router
    if router is not None:
        router_logits, _, _ = router(tokens)
        counts.old_mass += float(torch.softmax(router_logits.float(), dim=-1)[:, :old].sum())
        if router.classifier is not None:
            counts.classified += tokens.shape[0]
            counts.correct += int((router.predicts_new(tokens).long() == label).sum())


@torch.no_grad()
def routing_statistics(
    model: LayerMoEForCausalLM,
    sequences: Mapping[str, torch.Tensor],
    old_languages: Sequence[str],
    batch_size: int = 8,
) -> pd.DataFrame:
    """One row per (MoE layer, language); `sequences` maps a language to (num_sequences, seq_len) token ids.

    Columns:
    - `old_expert_fraction`: share of tokens whose top-1 expert (the largest routed weight,
      after the classifier's decision, so what the model computes) is an old expert;
    - `new_expert_weight`: mean routed weight on this round's experts (what the round added);
    - `router_old_mass`: mean softmax mass of this round's router on the old experts, before any
      classifier: the quantity the LPR loss raises for old languages (NaN where the round left
      the layer unchanged);
    - `expert_load`: list, per expert, of its share of the top-k slots that carry weight;
    - `classifier_accuracy`: share of this language's tokens that the layer's classifier (this
      round's) labels correctly, old or new by `old_languages`; NaN where it has none.
    """
    blocks = model.moe_blocks()
    if not blocks:
        raise LayerMoEError("the model has no MoE layers; expand it (surgery.expand) before measuring its routing")
    if batch_size < 1:
        raise LayerMoEError(f"batch_size={batch_size}; give at least 1")
    for language, tokens in sequences.items():
        check_token_rows(tokens, f"sequences of {language!r}", min_length=1)

    counts = {(layer, language): _Counts(block.num_experts) for layer, block in blocks.items() for language in sequences}
    current: dict[str, str] = {}

    def hook_for(layer: int):
        def hook(block: LayerMoEBlock, args: tuple) -> None:
            language = current["language"]
            _record(block, args[0], OLD if language in old_languages else NEW, counts[layer, language])

        return hook

    device = input_device(model)
    with inference(model), forward_pre_hooks((block, hook_for(layer)) for layer, block in blocks.items()):
        for language, tokens in sequences.items():
            current["language"] = language
            for batch in tokens.split(batch_size):
                model(input_ids=batch.to(device), use_cache=False)

    rows = []
    for (layer, language), c in counts.items():
        block = blocks[layer]
        rows.append(
            {
                "layer": layer,
                "language": language,
                "is_old": language in old_languages,
                "num_tokens": c.tokens,
                "num_experts": block.num_experts,
                "num_old_experts": block.num_old_experts,
                "old_expert_fraction": c.old_top1 / max(c.tokens, 1),
                "new_expert_weight": c.new_weight / max(c.tokens, 1),
                "router_old_mass": c.old_mass / max(c.tokens, 1) if block.router is not None else float("nan"),
                "expert_load": (c.slots / max(int(c.slots.sum()), 1)).tolist(),
                "classifier_accuracy": c.correct / c.classified if c.classified else float("nan"),
            }
        )
    return pd.DataFrame(rows)


__all__ = ["routing_statistics"]
