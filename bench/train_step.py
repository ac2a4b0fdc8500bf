"""Training throughput of an expanded model against its dense parent, on the same batch.

A step is forward, backward and AdamW, as the Trainer runs it: the dense parent trains all
its parameters (`train_causal_lm`), the expanded child its Stage-1 parameters (new experts
and routers). The expanded step does the dense step's work plus, in each MoE layer, k - 1
more expert MLPs per token (top-k of 1 + n experts), so the ideal throughput ratio is

    ideal = F_dense / (F_dense + (k - 1) * F_mlp * num_moe_layers),  F = forward FLOPs per token

with the same training multiplier (3x forward) for both. That overstates the expanded cost:
in Stage 1 the frozen weights (attention, embeddings, lm_head, expert 0) need no weight
gradients, so `ideal_frozen` counts forward + input gradients (2x) for everything and weight
gradients (1x) only for the trainable weights (the dense parent: all; the child: the new
experts, at their n/(1+n) share of the k slots under balanced routing).
Run from the repository root: `python -m bench.train_step [--sizes demo large] [--modes ...]`;
it uses CUDA when visible. Modes: `bf16-weights` (pure bf16 weights), `bf16-autocast` (bf16
autocast over fp32 weights: what Trainer's precision="bf16" runs), `fp32`; by default both bf16
modes on CUDA, fp32 on CPU. Steps of the two models alternate and each figure is a median.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
from dataclasses import dataclass

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from layermoe_core import expand


@dataclass(frozen=True)
class Size:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    new_per_layer: int = 2
    top_k: int = 2


SIZES = {
    "demo": Size(hidden=256, intermediate=688, layers=4, heads=4, kv_heads=2, vocab=8192),
    "large": Size(hidden=1024, intermediate=2816, layers=8, heads=16, kv_heads=8, vocab=32000),
}


def forward_flops_per_token(size: Size, seq_len: int) -> tuple[float, float]:
    """(dense forward FLOPs per token, one MLP's forward FLOPs per token), matmuls only."""
    head_dim = size.hidden // size.heads
    projections = 2 * size.hidden * (2 * size.hidden + 2 * size.kv_heads * head_dim)  # q, o and k, v
    attention = 2 * 2 * seq_len * size.hidden / 2  # QK^T and AV over the causal half
    mlp = 2 * 3 * size.hidden * size.intermediate
    dense = size.layers * (projections + attention + mlp) + 2 * size.hidden * size.vocab
    return dense, mlp


def build(size: Size) -> tuple[Qwen2ForCausalLM, torch.nn.Module]:
    torch.manual_seed(0)
    config = Qwen2Config(
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        vocab_size=size.vocab,
        max_position_embeddings=4096,
    )
    dense = Qwen2ForCausalLM(config)
    expanded = expand(copy.deepcopy(dense), [size.new_per_layer] * size.layers, ["en"], ["el"], top_k=size.top_k)
    with torch.no_grad():  # a trained-looking router: tokens spread over all experts, not ties
        for block in expanded.moe_blocks().values():
            block.router.gate.weight.normal_(std=size.hidden**-0.5)
    return dense, expanded


class Stepper:
    """One training step at a time (forward, backward, AdamW) of one model, timed."""

    def __init__(self, model: torch.nn.Module, batch: torch.Tensor, autocast: bool):
        self.model, self.batch = model.train(), batch
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-5, fused=batch.is_cuda)
        self.autocast = autocast

    def step(self) -> float:
        """Seconds for one step."""
        if self.batch.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        mixed = torch.autocast(self.batch.device.type, dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
        with mixed:
            loss = self.model(input_ids=self.batch, labels=self.batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.batch.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start


MODES = {  # name: (weight dtype, bf16 autocast)
    "bf16-weights": (torch.bfloat16, False),
    "bf16-autocast": (torch.float32, True),
    "fp32": (torch.float32, False),
}


def tokens_per_second(steppers: list[Stepper], steps: int, warmup: int) -> list[float]:
    """Median tokens/s of each stepper, their steps interleaved so drifts hit all alike."""
    times: list[list[float]] = [[] for _ in steppers]
    for step in range(warmup + steps):
        for stepper, seconds in zip(steppers, times):
            elapsed = stepper.step()
            if step >= warmup:
                seconds.append(elapsed)
    return [stepper.batch.numel() / statistics.median(seconds) for stepper, seconds in zip(steppers, times)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["demo", "large"])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=None, help="default: both bf16 modes on CUDA, fp32 on CPU")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=None, help="default: 8 on CUDA, 2 on CPU")
    parser.add_argument("--seq-len", type=int, default=None, help="default: 1024 on CUDA, 128 on CPU")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    batch_size = args.batch_size or (8 if cuda else 2)
    seq_len = args.seq_len or (1024 if cuda else 128)
    modes = args.modes or (["bf16-weights", "bf16-autocast"] if cuda else ["fp32"])
    print(f"device={torch.cuda.get_device_name() if cuda else 'cpu'} batch={batch_size}x{seq_len} steps={args.steps}")
    print(f"{'size':6} {'mode':14} {'dense tok/s':>12} {'expanded tok/s':>15} {'ratio':>6} {'ideal':>6} {'ideal_frozen':>13}")
    for name in args.sizes:
        size = SIZES[name]
        dense_flops, mlp_flops = forward_flops_per_token(size, seq_len)
        extra = (size.top_k - 1) * mlp_flops * size.layers  # k - 1 more expert MLPs per token and layer
        ideal = dense_flops / (dense_flops + extra)
        new_share = size.new_per_layer / (1 + size.new_per_layer)
        trained_expert_flops = new_share * size.top_k * mlp_flops * size.layers
        ideal_frozen = 3 * dense_flops / (2 * (dense_flops + extra) + trained_expert_flops)
        batch = torch.randint(0, size.vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
        for mode in modes:
            dtype, autocast = MODES[mode]
            dense, expanded = build(size)
            steppers = [Stepper(model.to(device=device, dtype=dtype), batch, autocast) for model in (dense, expanded)]
            rates = tokens_per_second(steppers, args.steps, args.warmup)
            ratio = rates[1] / rates[0]
            print(f"{name:6} {mode:14} {rates[0]:12,.0f} {rates[1]:15,.0f} {ratio:6.2f} {ideal:6.2f} {ideal_frozen:13.2f}")
            del dense, expanded, steppers
            if cuda:
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
