"""Forward+backward throughput of one MoE layer: dense parent MLP vs LayerMoEBlock vs transformers.

Run from the repository root: `python -m bench.moe_layer [--device cuda] [--dtype bf16]`.

For each size it times:
  (a) dense   the parent Qwen2MLP, all trainable (the cost unit);
  (b) ours    LayerMoEBlock in Stage-1 mode: expert 0 frozen, new experts and router trainable, with
              the measured kernel choice (`--kernels` adds each expert kernel forced: loop, torch
              grouped_mm, transformers' grouped_mm through its experts interface);
  (c) hf      transformers' MixtralSparseMoeBlock, same shapes and expert count, all trainable,
              once per experts implementation: eager, grouped_mm, batched_mm (batched_mm gathers a
              weight copy per (token, slot) and is skipped where that exceeds --batched-mm-limit-gb).
The input requires grad, as for a layer in the middle of a network. The ideal MoE cost is the
dense cost times top-k (each token runs k expert MLPs), so `ours / ideal` near 1 means the
dispatch (routing, sorting, gathering, combining) is nearly free.

Robust to a loaded machine: every repetition times each variant once, in an order that rotates
from one repetition to the next; ratios are taken within a repetition (so a load that drifts
hits both sides alike) and reported as the median with the min-max over repetitions; each step is
timed by wall clock and by the process's CPU time (which leaves out the waits for a core).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from transformers import MixtralConfig, Qwen2Config
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

from layermoe_core.model.experts import check_kernel
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
    wall_s: list[float] = field(default_factory=list)  # per repetition
    cpu_s: list[float] = field(default_factory=list)
    error: str | None = None


def dense_mlp(hidden: int, intermediate: int) -> nn.Module:
    return Qwen2MLP(Qwen2Config(hidden_size=hidden, intermediate_size=intermediate, hidden_act="silu"))


def ours_stage1(parent: nn.Module, hidden: int, intermediate: int, num_new: int, kernel: str | None = None) -> LayerMoEBlock:
    block = LayerMoEBlock(copy.deepcopy(parent), hidden, intermediate, "silu", TOP_K)
    block.add_expert_group(num_new)
    block.new_experts[-1].kernel = check_kernel(kernel)
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


def time_variants(variants: dict[str, nn.Module], x: torch.Tensor, warmup: int, reps: int) -> dict[str, Result | str]:
    """(wall, cpu) seconds per step of each variant, one step each per repetition, in a rotating order."""
    upstream = torch.randn_like(x)
    runnable, failed = [], {}
    for name, module in variants.items():
        try:
            for _ in range(warmup):
                step(module, x, upstream)
            runnable.append(name)
        except RuntimeError as error:  # a variant this torch cannot run
            failed[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:90]}"
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in runnable}
    for rep in range(reps):
        for name in runnable[rep % len(runnable) :] + runnable[: rep % len(runnable)]:
            synchronize(x.device)
            wall, cpu = time.perf_counter(), time.process_time()
            step(variants[name], x, upstream)
            synchronize(x.device)
            times[name][0].append(time.perf_counter() - wall)
            times[name][1].append(time.process_time() - cpu)
    return {**times, **failed}


def bench_size(size: str, device: torch.device, dtype: torch.dtype, args: argparse.Namespace) -> list[Result]:
    hidden, intermediate, num_new, num_tokens = SIZES[size]
    torch.manual_seed(0)
    parent = dense_mlp(hidden, intermediate)
    variants: dict[str, nn.Module] = {"dense": parent, "ours": ours_stage1(parent, hidden, intermediate, num_new)}
    for kernel in args.kernels:
        variants[f"ours[{kernel}]"] = ours_stage1(parent, hidden, intermediate, num_new, kernel)
    gathered_gb = num_tokens * TOP_K * 3 * hidden * intermediate * torch.finfo(dtype).bits / 8 / 1e9
    skipped = {}
    for implementation in ("eager", "grouped_mm", "batched_mm"):
        if implementation == "batched_mm" and gathered_gb > args.batched_mm_limit_gb:
            skipped[f"hf-{implementation}"] = f"skipped: would gather {gathered_gb:,.0f} GB of expert weight copies"
            continue
        variants[f"hf-{implementation}"] = transformers_block(hidden, intermediate, 1 + num_new, implementation)
    for module in variants.values():
        module.to(device=device, dtype=dtype).train()
    x = torch.randn(1, num_tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    results = []
    for name, times in {**time_variants(variants, x, args.warmup, args.reps), **skipped}.items():
        if isinstance(times, str):
            results.append(Result(size, name, error=times))
        else:
            results.append(Result(size, name, *times))
    return results


def spread(values: list[float], scale: float = 1.0) -> str:
    return f"{scale * statistics.median(values):.2f} ({scale * min(values):.2f}-{scale * max(values):.2f})"


def report(results: list[Result]) -> str:
    lines = []
    for size in dict.fromkeys(r.size for r in results):
        rows = {r.variant: r for r in results if r.size == size}
        hidden, intermediate, num_new, num_tokens = SIZES[size]
        lines.append(
            f"\n{size}: hidden {hidden}, intermediate {intermediate}, 1 old + {num_new} new experts, top-{TOP_K}, {num_tokens} tokens"
        )
        lines.append(f"  {'variant':28s} {'wall ms, median (min-max)':>32s} {'cpu ms, median (min-max)':>32s}")
        for r in rows.values():
            if r.error is None:
                lines.append(f"  {r.variant:28s} {spread(r.wall_s, 1e3):>32s} {spread(r.cpu_s, 1e3):>32s}")
            else:
                lines.append(f"  {r.variant:28s} {r.error}")
        timed = {name: r for name, r in rows.items() if r.error is None}
        dense = timed["dense"]
        for clock, attr in (("wall", "wall_s"), ("cpu", "cpu_s")):
            lines.append(f"  by {clock} time, per repetition, median (min-max):")
            hf = {name: getattr(r, attr) for name, r in timed.items() if name.startswith("hf-")}
            best_hf = min(hf, key=lambda name: statistics.median(hf[name])) if hf else None
            for name in (n for n in timed if n.startswith("ours")):
                ours = getattr(timed[name], attr)
                to_ideal = [o / (TOP_K * d) for o, d in zip(ours, getattr(dense, attr))]
                line = f"    {name:26s} time / ideal (top-{TOP_K} x dense) {spread(to_ideal)}"
                if best_hf:
                    speedup = [h / o for h, o in zip(hf[best_hf], ours)]
                    line += f"; speed / {best_hf} (transformers' best) {spread(speedup)}x"
                lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=list(SIZES))
    parser.add_argument("--kernels", nargs="*", default=[], help="also time ours with each of these expert kernels forced")
    parser.add_argument("--batched-mm-limit-gb", type=float, default=4.0)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: every core this process may use)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {name}, {args.dtype}, warmup {args.warmup}, {args.reps} interleaved repetitions")
    results = []
    for size in args.sizes:
        results += bench_size(size, device, DTYPES[args.dtype], args)
        print(report([r for r in results if r.size == size]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "dtype": args.dtype, "results": [asdict(r) for r in results]}, f, indent=1)


if __name__ == "__main__":
    main()
