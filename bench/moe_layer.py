"""Forward+backward throughput of one MoE layer: dense parent MLP vs LayerMoEBlock vs transformers.

Run from the repository root: `python -m bench.moe_layer [--device cuda] [--dtype bf16]`.

For each size it times, interleaved rep by rep and reported as the median:
  (a) dense   the parent Qwen2MLP, all trainable (the cost unit);
  (b) ours    LayerMoEBlock in Stage-1 mode: expert 0 frozen, new experts and router trainable;
  (c) hf      transformers' MixtralSparseMoeBlock, same shapes and expert count, all trainable,
              once per experts implementation ("eager" loop and "grouped_mm").
The input requires grad, as for a layer in the middle of a network. The ideal MoE cost is the
dense cost times top-k (each token runs k expert MLPs), so `ours / ideal` near 1 means the
dispatch (routing, sorting, gathering, combining) is nearly free.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import MixtralConfig, Qwen2Config
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

from layermoe_core.model.moe_block import LayerMoEBlock

TOP_K = 2
SIZES = {  # name: (hidden, intermediate, new experts, tokens)
    "demo": (256, 688, 3, 4096),
    "large": (1024, 2816, 7, 8192),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Result:
    size: str
    variant: str
    tokens_per_s: float | None
    median_ms: float | None
    error: str | None = None


def dense_mlp(hidden: int, intermediate: int) -> nn.Module:
    return Qwen2MLP(Qwen2Config(hidden_size=hidden, intermediate_size=intermediate, hidden_act="silu"))


def ours_stage1(parent: nn.Module, hidden: int, intermediate: int, num_new: int) -> LayerMoEBlock:
    block = LayerMoEBlock(copy.deepcopy(parent), hidden, intermediate, "silu", TOP_K)
    block.add_expert_group(num_new)
    with torch.no_grad():
        block.router.gate.weight.normal_(std=0.5 / hidden**0.5)  # a trained-looking router: balanced, not uniform
        for experts in block.new_experts:
            experts.gate_up_proj.add_(0.01 * torch.randn_like(experts.gate_up_proj))
    block.original_mlp.requires_grad_(False)  # Stage 1: expert 0 frozen
    return block


def transformers_block(hidden: int, intermediate: int, num_experts: int, implementation: str) -> nn.Module:
    config = MixtralConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_local_experts=num_experts,
        num_experts_per_tok=TOP_K,
        router_jitter_noise=0.0,
        hidden_act="silu",
    )
    config._experts_implementation = implementation
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        block.gate.weight.normal_(std=0.5 / hidden**0.5)
        block.experts.gate_up_proj.normal_(std=0.02)
        block.experts.down_proj.normal_(std=0.02)
    return block


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(module: nn.Module, x: torch.Tensor, upstream: torch.Tensor) -> None:
    """One training step's layer work: forward, then backward of a fixed upstream gradient."""
    module.zero_grad(set_to_none=True)
    x.grad = None
    module(x).backward(upstream)


def time_variants(variants: dict[str, nn.Module], x: torch.Tensor, warmup: int, reps: int) -> dict[str, list[float] | str]:
    """Seconds per step for each variant, reps interleaved so load drift hits all alike."""
    upstream = torch.randn_like(x)
    times: dict[str, list[float] | str] = {}
    for name, module in variants.items():
        try:
            for _ in range(warmup):
                step(module, x, upstream)
            times[name] = []
        except RuntimeError as error:  # a variant this torch cannot run (grouped_mm needs torch >= 2.9 on CPU)
            times[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:90]}"
    for _ in range(reps):
        for name, module in variants.items():
            if isinstance(times[name], str):
                continue
            synchronize(x.device)
            start = time.perf_counter()
            step(module, x, upstream)
            synchronize(x.device)
            times[name].append(time.perf_counter() - start)
    return times


def bench_size(size: str, device: torch.device, dtype: torch.dtype, warmup: int, reps: int) -> list[Result]:
    hidden, intermediate, num_new, num_tokens = SIZES[size]
    torch.manual_seed(0)
    parent = dense_mlp(hidden, intermediate)
    variants: dict[str, nn.Module] = {"dense": parent, "ours": ours_stage1(parent, hidden, intermediate, num_new)}
    for implementation in ("eager", "grouped_mm"):
        variants[f"hf-{implementation}"] = transformers_block(hidden, intermediate, 1 + num_new, implementation)
    for module in variants.values():
        module.to(device=device, dtype=dtype).train()
    x = torch.randn(1, num_tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    results = []
    for name, times in time_variants(variants, x, warmup, reps).items():
        if isinstance(times, str):
            results.append(Result(size, name, None, None, times))
        else:
            median = statistics.median(times)
            results.append(Result(size, name, num_tokens / median, 1e3 * median))
    return results


def report(results: list[Result]) -> str:
    lines = []
    for size in dict.fromkeys(r.size for r in results):
        rows = {r.variant: r for r in results if r.size == size}
        hidden, intermediate, num_new, num_tokens = SIZES[size]
        lines.append(
            f"\n{size}: hidden {hidden}, intermediate {intermediate}, 1 old + {num_new} new experts, top-{TOP_K}, {num_tokens} tokens"
        )
        for r in rows.values():
            figures = f"{r.tokens_per_s:12,.0f} tok/s  {r.median_ms:9.2f} ms" if r.error is None else f"failed: {r.error}"
            lines.append(f"  {r.variant:14s} {figures}")
        ours, dense = rows["ours"].median_ms, rows["dense"].median_ms
        lines.append(f"  ours time / ideal (top-{TOP_K} x dense) = {ours / (TOP_K * dense):.2f}")
        for name, r in rows.items():
            if name.startswith("hf-") and r.error is None:
                lines.append(f"  ours speed / {name} = {r.median_ms / ours:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=list(SIZES))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {name}, {args.dtype}, warmup {args.warmup}, median of {args.reps}")
    results = [r for size in args.sizes for r in bench_size(size, device, DTYPES[args.dtype], args.warmup, args.reps)]
    print(report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "dtype": args.dtype, "results": [asdict(r) for r in results]}, f, indent=1)


if __name__ == "__main__":
    main()
