"""The new experts of one expansion round, stored as stacked 3D weights.

Stacking (as transformers' own MoE experts do) lets a group of experts run as one grouped
matmul over tokens sorted by expert, and makes freezing a finished round a matter of one
`requires_grad` flag per tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN


def _grouped_mm_supported(tokens: torch.Tensor) -> bool:
    # torch._grouped_mm runs forward and backward on CUDA in bf16; its CPU backward rejects
    # transposed weights, so CPU takes the per-expert loop (which is what CPUs are fast at).
    return tokens.is_cuda and tokens.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")


def grouped_linear(tokens: torch.Tensor, weight: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """y[rows of expert e] = tokens[rows of expert e] @ weight[e].T, for tokens sorted by expert.

    tokens: (A, d_in), weight: (E, d_out, d_in), counts: E ints summing to A -> (A, d_out).
    """
    if _grouped_mm_supported(tokens):
        offsets = torch.tensor(counts, device=tokens.device).cumsum(0).to(torch.int32)
        return torch._grouped_mm(tokens, weight.transpose(-2, -1), offs=offsets)
    segments = tokens.split(counts)
    return torch.cat([F.linear(segment, weight[e]) for e, segment in enumerate(segments) if len(segment)])


class StackedExperts(nn.Module):
    """`num_experts` gated MLPs, down(act(gate(x)) * up(x)), initialised as copies of `mlp`."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.act_fn = ACT2FN[hidden_act]

    @torch.no_grad()
    def copy_from_mlp(self, mlp: nn.Module) -> None:
        """Each new expert starts as an exact copy of the dense MLP (expert 0)."""
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0)  # (2*ff, d)
        self.gate_up_proj.copy_(gate_up.expand_as(self.gate_up_proj))
        self.down_proj.copy_(mlp.down_proj.weight.expand_as(self.down_proj))

    def forward(self, tokens: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """tokens: (A, d) sorted by expert, counts[e] rows each -> (A, d)."""
        gate, up = grouped_linear(tokens, self.gate_up_proj, counts).chunk(2, dim=-1)  # (A, ff) each
        return grouped_linear(self.act_fn(gate) * up, self.down_proj, counts)
