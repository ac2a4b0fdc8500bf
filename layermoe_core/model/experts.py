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
    """Whether torch's grouped GEMM is CUDA's fast kernel for this call, forward and backward.

    It is, for bf16 on SM80+ with rows 16-byte aligned; ask with the operands as the matmul gets
    them (after `autocast_operands`). In fp32 it is no faster than the loop, so fp32 on CUDA keeps the
    loop (docs/performance.md, "Expert kernels on CUDA").
    """
    return (
        tokens.is_cuda
        and tokens.dtype == weight.dtype == torch.bfloat16
        and hasattr(torch, "_grouped_mm")
        and torch.cuda.get_device_capability(tokens.device) >= (8, 0)
        and all(size * tokens.element_size() % 16 == 0 for size in weight.shape[1:])
    )


# The expert kernels a `StackedExperts` can run (its `kernel` attribute; None chooses by `choose_kernel`):
#   "loop"        one matmul per expert into slices of one output (`_PerExpertLinear`), weight gradient
#                 only when the weight trains;
#   "grouped_mm"  torch's grouped GEMM (`torch._grouped_mm`), one call per projection;
#   "transformers:NAME"  transformers' experts interface (`ALL_EXPERTS_FUNCTIONS[NAME]`: grouped_mm,
#                 batched_mm, or a registered hub kernel) runs the whole group, so its backends serve ours.
LOOP, GROUPED_MM, TRANSFORMERS = "loop", "grouped_mm", "transformers:"

# Measured with `python -m bench.moe_layer --kernels` (docs/performance.md), per (device type, dtype):
# the kernel that won at the demo and large sizes. CPU: "loop" and "grouped_mm" run the same MKL
# matmuls (torch's CPU grouped_mm is a loop of mm) and were within the load's spread of each other;
# the loop skips grouped_mm's extra chunk copy of the fused gate_up output, and transformers'
# grouped_mm adds a second sort and an unpermute. CUDA bf16 takes the grouped GEMM (see `grouped_mm_runs`).
MEASURED_KERNELS: dict[tuple[str, torch.dtype], str] = {
    ("cpu", torch.float32): LOOP,
    ("cpu", torch.bfloat16): LOOP,
    ("cuda", torch.float32): LOOP,
}


def choose_kernel(tokens: torch.Tensor, weight: torch.Tensor) -> str:
    """The kernel for tokens and weight as the matmuls get them (after `autocast_operands`).

    A fixed table, not a timing at run time, so the choice (and so every output bit) is the same on
    every run of a machine; `StackedExperts.kernel` overrides it.
    """
    if grouped_mm_runs(tokens, weight):
        return GROUPED_MM
    return MEASURED_KERNELS.get((tokens.device.type, tokens.dtype), LOOP)


def check_kernel(kernel: str | None) -> str | None:
    """`kernel` if this install can run it; else a ValueError that names the choices."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if kernel in (None, LOOP, GROUPED_MM) or (kernel.startswith(TRANSFORMERS) and kernel[len(TRANSFORMERS) :] in ALL_EXPERTS_FUNCTIONS):
        return kernel
    names = ", ".join(repr(TRANSFORMERS + name) for name in ALL_EXPERTS_FUNCTIONS)
    raise ValueError(f"unknown expert kernel {kernel!r}; use None (the measured choice), {LOOP!r}, {GROUPED_MM!r} or one of {names}")


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
    tokens: torch.Tensor,
    weight: torch.Tensor,
    counts: list[int],
    offsets: torch.Tensor | None = None,
    chunks: int = 1,
    kernel: str | None = None,
) -> tuple[torch.Tensor, ...]:
    """y[rows of expert e] = tokens[rows of expert e] @ weight[e].T, for tokens sorted by expert.

    tokens: (A, d_in), weight: (E, d_out, d_in), counts: E ints summing to A -> `chunks` column
    blocks of y, (A, d_out / chunks) each. offsets: `expert_offsets(counts, tokens.device)`, to
    share one copy to the device between calls. kernel: "loop" or "grouped_mm" (None: `choose_kernel`).
    Under autocast, y comes in autocast's dtype.
    """
    tokens, weight = autocast_operands(tokens, weight)
    if (kernel or choose_kernel(tokens, weight)) == LOOP:
        return _PerExpertLinear.apply(tokens, weight, counts, chunks)
    if offsets is None:
        offsets = expert_offsets(counts, tokens.device)
    out = torch._grouped_mm(tokens, weight.transpose(-2, -1), offs=offsets)
    if out.requires_grad:  # its backward, like the CPU one, rejects a broadcast (zero-stride) gradient
        out.register_hook(torch.Tensor.contiguous)
    return out.chunk(chunks, dim=-1)


class StackedExperts(nn.Module):
    """`num_experts` gated MLPs, down(act(gate(x)) * up(x)), initialised as copies of `mlp`.

    The weights have transformers' layout (concatenated [gate; up], not transposed, no bias), and
    the attributes its experts interface reads, so `kernel = "transformers:grouped_mm"` (or any
    registered name) runs this group through transformers' own implementation.
    """

    has_gate, has_bias, is_transposed, is_concatenated, has_post_expert_norm = True, False, False, True, False
    _is_expert_parallel = False

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.act_fn = ACT2FN[hidden_act]
        self.kernel: str | None = None  # None: `choose_kernel`, from the measured table

    @torch.no_grad()
    def copy_from_mlp(self, mlp: nn.Module) -> None:
        """Each new expert starts as an exact copy of the dense MLP (expert 0)."""
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0)  # (2*ff, d)
        self.gate_up_proj.copy_(gate_up.expand_as(self.gate_up_proj))
        self.down_proj.copy_(mlp.down_proj.weight.expand_as(self.down_proj))

    def one_expert(self, index: int, tokens: torch.Tensor) -> torch.Tensor:
        """Expert `index` alone on a few tokens (n, d) -> (n, d), in few ops (decoding): one matmul for the fused
        gate_up, one for down. The loop kernel's products, up to float rounding; no autograd function."""
        tokens, gate_up_proj, down_proj = autocast_operands(
            tokens.to(self.gate_up_proj.dtype), self.gate_up_proj[index], self.down_proj[index]
        )
        gate, up = torch.mm(tokens, gate_up_proj.t()).chunk(2, dim=-1)  # (n, ff) each
        return torch.mm(self.act_fn(gate) * up, down_proj.t())

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        """(A, 2*ff) -> (A, ff): transformers' experts interface calls this between its two matmuls."""
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def forward(self, tokens: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """tokens: (A, d) sorted by expert, counts[e] rows each -> (A, d), in autocast's dtype under autocast.

        Outside autocast the tokens take the weights' dtype: trainable experts keep fp32 master
        weights beside a bf16 parent (see training.fp32_master_weights).
        """
        tokens, gate_up_proj, down_proj = autocast_operands(tokens.to(self.gate_up_proj.dtype), self.gate_up_proj, self.down_proj)
        kernel = self.kernel or choose_kernel(tokens, gate_up_proj)
        if kernel.startswith(TRANSFORMERS):
            return self._transformers_forward(kernel[len(TRANSFORMERS) :], tokens, counts)
        offsets = expert_offsets(counts, tokens.device) if kernel == GROUPED_MM else None
        gate, up = grouped_linear(tokens, gate_up_proj, counts, offsets, chunks=2, kernel=kernel)  # (A, ff) each
        (out,) = grouped_linear(self.act_fn(gate) * up, down_proj, counts, offsets, kernel=kernel)
        return out

    def _transformers_forward(self, name: str, tokens: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """The group through transformers' `ALL_EXPERTS_FUNCTIONS[name]`: each row to its own expert, weight 1.

        Its functions read the weights from the module (no autocast cast: they run in the weights' dtype).
        """
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        expert_ids = torch.repeat_interleave(
            torch.arange(self.num_experts, device=tokens.device), torch.tensor(counts, device=tokens.device)
        )
        ones = torch.ones(len(tokens), 1, dtype=torch.float32, device=tokens.device)  # x * 1.0 is exact
        return ALL_EXPERTS_FUNCTIONS[name](self, tokens.to(self.gate_up_proj.dtype), expert_ids[:, None], ones)


# The host dispatch: a CPU fast path for the MoE block's sorted dispatch (moe_block.LayerMoEBlock.forward).
# A block's expert groups are (module, first expert id, number of experts): expert 0, the dense MLP, first,
# then each round's `StackedExperts`.
ExpertGroups = list[tuple[nn.Module, int, int]]

# Inference with at most this many (token, slot) assignments, on the CPU, groups them on the host
# instead of sorting on the device: decoding a token per row at batch <= 32 (top-2).
FEW_ASSIGNMENTS = 64


def host_dispatch_applies(tokens: torch.Tensor, expert_ids: torch.Tensor, groups: ExpertGroups) -> bool:
    """Whether `host_dispatch` runs this call: a few assignments on the CPU, without autograd, with every expert
    resident. Offloaded to disk (a dispatched model), a group's weights sit on the meta device except inside its own
    `forward`, where accelerate's hook loads them, so `one_expert` cannot read them."""
    return (
        tokens.device.type == "cpu"
        and not torch.is_grad_enabled()
        and expert_ids.numel() <= FEW_ASSIGNMENTS
        and not any(group.gate_up_proj.is_meta for group, _, _ in groups[1:])
    )


def host_dispatch(tokens: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, groups: ExpertGroups) -> torch.Tensor:
    """The block's dispatch for a few tokens on the CPU (decoding), grouped on the host: no sort, no gather where an
    expert takes every token, a fixed handful of ops besides the experts' own.

    tokens (N, d), expert_ids and fp32 weights (N, k) -> (N, d) fp32, the weighted sum of each token's experts.
    Each expert gets the same rows in the same order as in the sorted dispatch; the output equals it up to float
    rounding (the fused gate_up matmul of `one_expert`, and for k > 2 the order of the k-term sum, may change the
    last bit).
    """
    num_tokens = expert_ids.shape[0]
    if num_tokens == 1:  # batch-1 decoding: the same sum as the index_add below, without the grouping
        return _host_dispatch_one(tokens, expert_ids, weights, groups)
    assigned: dict[int, tuple[list[int], list[float]]] = {}  # expert -> its weighted tokens and their weights, in order
    for token, (slot_experts, slot_weights) in enumerate(zip(expert_ids.tolist(), weights.tolist())):  # (k,) each
        for expert, weight in zip(slot_experts, slot_weights):
            if weight != 0.0:
                expert_tokens, expert_weights = assigned.setdefault(expert, ([], []))
                expert_tokens.append(token)
                expert_weights.append(weight)
    outputs, token_ids, token_weights = [], [], []  # in expert order
    for expert in sorted(assigned):
        expert_tokens, expert_weights = assigned[expert]
        every_token = len(expert_tokens) == num_tokens  # each token at most once per expert, in order
        rows = tokens if every_token else tokens[expert_tokens]  # (n, d)
        outputs.append(_expert_output(expert, rows, groups))
        token_ids += expert_tokens
        token_weights += expert_weights
    combined = tokens.new_zeros(tokens.shape, dtype=torch.float32)  # (N, d); stays zero where every weight underflowed
    if outputs:
        weighted = torch.cat(outputs) * torch.tensor(token_weights, device=tokens.device)[:, None]  # (A, d) fp32
        combined.index_add_(0, torch.tensor(token_ids, device=tokens.device), weighted)  # in expert order, no atomics
    return combined


def _host_dispatch_one(token: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, groups: ExpertGroups) -> torch.Tensor:
    """`host_dispatch` for one token (1, d): its weighted expert outputs summed in expert order, the order in which
    that index_add adds them to zero, so the values are the same. -> (1, d) fp32."""
    combined = None
    for expert, weight in sorted(zip(expert_ids[0].tolist(), weights[0].tolist())):
        if weight != 0.0:
            weighted = _expert_output(expert, token, groups).float() * weight
            combined = weighted if combined is None else combined + weighted
    return combined if combined is not None else token.new_zeros(token.shape, dtype=torch.float32)


def _expert_output(expert: int, rows: torch.Tensor, groups: ExpertGroups) -> torch.Tensor:
    """Expert `expert` (0: the dense MLP) on rows (n, d)."""
    group, first, _ = next(group for group in reversed(groups) if group[1] <= expert)
    return group(rows) if first == 0 else group.one_expert(expert - first, rows)
