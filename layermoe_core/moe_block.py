"""`LayerMoEBlock`: the MLP of one decoder layer turned into a mixture of experts.

Expert 0 is the parent's original MLP (frozen). Each expansion round appends a group of
new experts (`StackedExperts`). A linear router (`gate`) scores all experts; routing takes
the fp32 softmax, then top-k, and renormalises the k weights. An optional per-token
`classifier` predicts old (0) or new (1) language; an old-predicted token is routed among
the experts that existed before the newest round only: in round 1 that is expert 0 alone,
with weight 1.
"""

from __future__ import annotations

import torch
from torch import nn

from .experts import StackedExperts


class LayerMoEBlock(nn.Module):
    def __init__(self, original_mlp: nn.Module, hidden_size: int, intermediate_size: int, hidden_act: str, top_k: int):
        super().__init__()
        self.original_mlp = original_mlp  # expert 0
        self.new_experts = nn.ModuleList()  # one StackedExperts per round (None-free: empty rounds are skipped)
        self.group_sizes: list[int] = [1]  # experts per round, zeros included, expert 0 first
        self.gate = nn.Linear(hidden_size, 1, bias=False)
        self.classifier: nn.Linear | None = None
        self.top_k = top_k
        self.route_all_to_old = False  # set by `forced_old_routing`, for parent comparisons
        self._shape = (hidden_size, intermediate_size, hidden_act)
        # Filled by each forward, read by the model to build losses and routing statistics.
        self.router_logits: torch.Tensor | None = None
        self.classifier_logits: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return sum(self.group_sizes)

    @property
    def num_old_experts(self) -> int:
        """Experts that existed before the newest round: the target of old-language tokens."""
        return sum(self.group_sizes[:-1]) if len(self.group_sizes) > 1 else 1

    def add_expert_group(self, num_new: int) -> None:
        """Append one round's experts (copies of expert 0) and widen the router to match.

        The router rows of existing experts are kept, so earlier rounds' routing survives;
        the rows of the new experts start at zero (uniform among them).
        """
        self.group_sizes.append(num_new)
        if num_new == 0:
            return
        hidden_size, intermediate_size, hidden_act = self._shape
        experts = StackedExperts(num_new, hidden_size, intermediate_size, hidden_act)
        experts.to(device=self.gate.weight.device, dtype=self.gate.weight.dtype)
        experts.copy_from_mlp(self.original_mlp)
        self.new_experts.append(experts)
        gate = nn.Linear(hidden_size, self.num_experts, bias=False).to(self.gate.weight)
        with torch.no_grad():
            gate.weight.zero_()
            gate.weight[: self.gate.out_features] = self.gate.weight
        self.gate = gate

    def add_classifier(self) -> None:
        hidden_size = self._shape[0]
        self.classifier = nn.Linear(hidden_size, 2, bias=True).to(self.gate.weight)
        with torch.no_grad():
            self.classifier.weight.normal_(std=0.02)
            self.classifier.bias.zero_()

    def route(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens: (N, d) -> top-k expert ids (N, k) and their renormalised fp32 weights (N, k)."""
        self.router_logits = self.gate(tokens)  # (N, E)
        probs = torch.softmax(self.router_logits.float(), dim=-1)  # (N, E), fp32 as in the reference
        is_old = None
        if self.classifier is not None:
            self.classifier_logits = self.classifier(tokens)  # (N, 2)
            is_old = self.classifier_logits.argmax(dim=-1) == 0  # (N,)
        if self.route_all_to_old:
            is_old = torch.ones(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        if is_old is not None:
            old_probs = probs.clone()
            old_probs[:, self.num_old_experts :] = 0  # only pre-round experts stay eligible
            probs = torch.where(is_old[:, None], old_probs / old_probs.sum(-1, keepdim=True), probs)
        weights, experts = probs.topk(self.top_k, dim=-1)  # (N, k)
        return experts, weights / weights.sum(dim=-1, keepdim=True)

    def expert_groups(self) -> list[tuple[nn.Module, int, int]]:
        """(module, first expert id, number of experts) for expert 0 and each non-empty round."""
        groups, first = [(self.original_mlp, 0, 1)], 1
        rounds = iter(self.new_experts)
        for size in self.group_sizes[1:]:
            if size:
                groups.append((next(rounds), first, size))
            first += size
        return groups

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = hidden_states.shape
        tokens = hidden_states.reshape(-1, hidden)  # (N, d)
        experts, weights = self.route(tokens)  # (N, k) each
        num_tokens, k = experts.shape

        # Sort the (token, slot) assignments by expert, so each expert sees one contiguous slice.
        # Only routing to old experts makes zero-weight slots (an old-routed token's spare slots):
        # they get the extra id E, sort last and are never computed.
        keys = experts.reshape(-1)  # (N*k,)
        if self.classifier is not None or self.route_all_to_old:
            keys = keys.masked_fill(weights.reshape(-1) == 0, self.num_experts)
        sorted_keys, order = torch.sort(keys, stable=True)  # (N*k,) each
        expert_ids = torch.arange(self.num_experts, device=keys.device)
        ends = torch.searchsorted(sorted_keys, expert_ids, right=True).tolist()  # the one host sync
        counts = [end - start for start, end in zip([0, *ends[:-1]], ends)]  # (E,) assignments per expert
        order = order[: ends[-1]]  # (A,) the weighted assignments
        sorted_tokens = tokens[order // k]  # (A, d)

        groups = self.expert_groups()
        segments = sorted_tokens.split([sum(counts[first : first + size]) for _, first, size in groups])
        outputs = [self.original_mlp(segments[0])]
        for (experts_of_round, first, size), segment in zip(groups[1:], segments[1:]):
            outputs.append(experts_of_round(segment, counts[first : first + size]) if len(segment) else segment)

        # Put each output back in its (token, slot) place, then sum the k slots weighted, in fp32
        # and in slot order: deterministic (no atomics).
        expert_outputs = torch.cat(outputs)  # (A, d), in autocast's dtype under autocast
        slots = expert_outputs.new_zeros(num_tokens * k, hidden).index_copy(0, order, expert_outputs)  # (N*k, d)
        combined = (slots.view(num_tokens, k, hidden) * weights[..., None]).sum(dim=1)  # (N, d)
        return combined.to(hidden_states.dtype).view(batch, seq, hidden)
