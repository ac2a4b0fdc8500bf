"""The new experts of one expansion round, stored as stacked 3D weights.

Stacking (as transformers' own MoE experts do) lets a group of experts run as one grouped
matmul over tokens sorted by expert, and makes freezing a finished round a matter of one
`requires_grad` flag per tensor.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from transformers.activations import ACT2FN


def autocast_operands(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors in autocast's dtype where autocast is on for their device, else unchanged.

    Autocast casts the operands of `F.linear`, but never reaches our expert matmuls (they write
    into preallocated outputs, or are private ops), so without this cast bf16 mixed precision
    over fp32 weights would run the experts in fp32. The cast is differentiable: the weight
    gradient reaches an fp32 master weight as fp32.
    """
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(tensor.to(dtype) for tensor in tensors)


def grouped_mm_runs(tokens: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM kernel serves this call, forward and backward.

    It is CUDA's fast path for bf16 on SM80+, with rows 16-byte aligned; ask with the operands as
    the matmul gets them (after `autocast_operands`). Elsewhere the per-expert loop is as fast, as
    measured: on CPU torch's grouped_mm was no faster; on an H100 in fp32 it took 11.0 ms against
    the loop's 10.8 ms (fwd+bwd of the large bench size's gate_up).
    """
    return (
        tokens.is_cuda
        and tokens.dtype == weight.dtype == torch.bfloat16
        and hasattr(torch, "_grouped_mm")
        and torch.cuda.get_device_capability(tokens.device) >= (8, 0)
        and all(size * tokens.element_size() % 16 == 0 for size in weight.shape[1:])
    )


class _PerExpertLinear(torch.autograd.Function):
    """Grouped linear as one matmul per expert, each written into its slice of the output.

    Writing slices (instead of concatenating per-expert results, and instead of indexing
    `weight[e]`, whose backward allocates a full-size zero gradient per expert) keeps forward
    and backward free of copies. The output comes as `chunks` separate column blocks (gate and
    up of a fused gate_up weight), so their gradients need no concatenation either. The weight
    gradient is computed only when the weight trains.
    """

    @staticmethod
    def forward(ctx, tokens: torch.Tensor, weight: torch.Tensor, counts: list[int], chunks: int) -> tuple[torch.Tensor, ...]:
        ctx.save_for_backward(tokens, weight)
        ctx.counts, ctx.chunks = counts, chunks
        outs = [tokens.new_empty(tokens.shape[0], weight.shape[1] // chunks) for _ in range(chunks)]  # (A, d_out/chunks)
        for w, rows, *out_rows in zip(weight, tokens.split(counts), *(out.split(counts) for out in outs)):
            if len(rows):
                for w_chunk, out in zip(w.chunk(chunks), out_rows):
                    torch.mm(rows, w_chunk.t(), out=out)
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outs: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        tokens, weight = ctx.saved_tensors
        counts, chunks = ctx.counts, ctx.chunks
        grads_per_expert = list(zip(*(grad.split(counts) for grad in grad_outs)))  # [expert][chunk]
        grad_tokens = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_tokens = torch.empty_like(tokens)  # every row is some expert's
            for w, grads, rows in zip(weight, grads_per_expert, grad_tokens.split(counts)):
                if len(rows):
                    w_chunks = w.chunk(chunks)
                    torch.mm(grads[0], w_chunks[0], out=rows)
                    for w_chunk, grad in zip(w_chunks[1:], grads[1:]):
                        rows.addmm_(grad, w_chunk)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.empty_like(weight)
            for grad_w, grads, rows in zip(grad_weight, grads_per_expert, tokens.split(counts)):
                if not len(rows):  # an expert without tokens
                    grad_w.zero_()
                    continue
                for grad_w_chunk, grad in zip(grad_w.chunk(chunks), grads):
                    torch.mm(grad.t(), rows, out=grad_w_chunk)
        return grad_tokens, grad_weight, None, None


def expert_offsets(counts: list[int], device: torch.device) -> torch.Tensor:
    """The running sum of `counts` as int32 on `device`: where each expert's rows end, as grouped_mm wants."""
    return torch.tensor(list(itertools.accumulate(counts)), dtype=torch.int32, device=device)


def grouped_linear(
    tokens: torch.Tensor, weight: torch.Tensor, counts: list[int], offsets: torch.Tensor | None = None, chunks: int = 1
) -> tuple[torch.Tensor, ...]:
    """y[rows of expert e] = tokens[rows of expert e] @ weight[e].T, for tokens sorted by expert.

    tokens: (A, d_in), weight: (E, d_out, d_in), counts: E ints summing to A -> `chunks` column
    blocks of y, (A, d_out / chunks) each. offsets: `expert_offsets(counts, tokens.device)`, to
    share one copy to the device between calls. Under autocast, y comes in autocast's dtype.
    """
    tokens, weight = autocast_operands(tokens, weight)
    if not grouped_mm_runs(tokens, weight):
        return _PerExpertLinear.apply(tokens, weight, counts, chunks)
    if offsets is None:
        offsets = expert_offsets(counts, tokens.device)
    out = torch._grouped_mm(tokens, weight.transpose(-2, -1), offs=offsets)
    if out.requires_grad:  # its backward, like the CPU one, rejects a broadcast (zero-stride) gradient
        out.register_hook(torch.Tensor.contiguous)
    return out.chunk(chunks, dim=-1)


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
        """tokens: (A, d) sorted by expert, counts[e] rows each -> (A, d), in autocast's dtype under autocast.

        Outside autocast the tokens take the weights' dtype: trainable experts keep fp32 master
        weights beside a bf16 parent (see training.fp32_master_weights).
        """
        tokens, gate_up_proj, down_proj = autocast_operands(tokens.to(self.gate_up_proj.dtype), self.gate_up_proj, self.down_proj)
        offsets = expert_offsets(counts, tokens.device) if grouped_mm_runs(tokens, gate_up_proj) else None
        gate, up = grouped_linear(tokens, gate_up_proj, counts, offsets, chunks=2)  # (A, ff) each
        (out,) = grouped_linear(self.act_fn(gate) * up, down_proj, counts, offsets)
        return out
