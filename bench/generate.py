"""Serving cost of a child: prefill and decoding tokens/s of an expanded model against its dense parent.

Run from the repository root: `python -m bench.generate [--sizes demo large] [--batches 1 16]`; it uses
CUDA when visible. The parent is a Qwen2 model; the child is `expand`ed from it (new experts in every
layer, top-2) with a classifier in every layer, in two settings:
  new  the classifiers send every token down the new path: each token runs k = 2 expert MLPs;
  old  the classifiers send every token to the parent's path, here expert 0 alone (old-language text
       that the classifiers recognise): the child should cost what the parent costs.
Phases: prefill (one forward over a `--prompt`-token prompt per row, filling the KV cache) and decode
(`--new-tokens` greedy steps of one token per row, each reusing the cache), both as `generate` runs them.

The ideal for `new` is not 1: a token that uses k experts runs (at batch 1: reads) k MLPs, so
    ideal = parent time / (parent time + (k - 1) * MLP time * MoE layers),
with the dense MLP's time measured at the same input shape (batch, tokens per step, hidden). For
`old` the ideal is 1. Every variant is timed in turn within each repetition (rotating the order),
and the ratios are taken per repetition, so a load that drifts hits them alike; each figure is the
median with the min-max over repetitions.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from layermoe_core import expand, insert_classifiers
from layermoe_core.losses import NEW, OLD


@dataclass(frozen=True)
class Size:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    new_per_layer: int = 3
    top_k: int = 2


SIZES = {
    "demo": Size(hidden=256, intermediate=688, layers=4, heads=4, kv_heads=2, vocab=8192),
    "large": Size(hidden=1024, intermediate=2816, layers=8, heads=16, kv_heads=8, vocab=32000),
}


def build(size: Size, device: torch.device) -> tuple[Qwen2ForCausalLM, dict[str, torch.nn.Module]]:
    """The parent and its child with every classifier set to `new` or to `old`."""
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
    parent = Qwen2ForCausalLM(config).to(device).eval()
    children = {}
    for setting, label in (("new", NEW), ("old", OLD)):
        child = expand(copy.deepcopy(parent), [size.new_per_layer] * size.layers, ["en"], ["el"], top_k=size.top_k)
        insert_classifiers(child, list(range(size.layers)))
        with torch.no_grad():
            for block in child.moe_blocks().values():
                block.router.gate.weight.normal_(std=size.hidden**-0.5)  # a trained-looking router: tokens spread
                block.router.classifier.bias.copy_(torch.tensor([-10.0, -10.0]))
                block.router.classifier.bias[label] = 10.0  # a confident classifier: every token `label`
        children[setting] = child.to(device).eval()
    return parent, children


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def prefill(model: torch.nn.Module, prompt: torch.Tensor) -> tuple[float, DynamicCache, torch.Tensor]:
    """Seconds for the prompt's forward; the filled cache; the greedy next token (batch, 1)."""
    synchronize(prompt.device)
    start = time.perf_counter()
    out = model(input_ids=prompt, past_key_values=DynamicCache(), use_cache=True)
    next_token = out.logits[:, -1:].argmax(-1)
    synchronize(prompt.device)
    return time.perf_counter() - start, out.past_key_values, next_token


@torch.inference_mode()
def decode(model: torch.nn.Module, cache: DynamicCache, token: torch.Tensor, steps: int) -> float:
    """Seconds for `steps` greedy steps of one token per row, each over the cache."""
    synchronize(token.device)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    synchronize(token.device)
    return time.perf_counter() - start


@torch.inference_mode()
def mlp_seconds(mlp: torch.nn.Module, shape: tuple[int, ...], device: torch.device, calls: int) -> float:
    """Seconds per call of the dense MLP on an input of `shape`."""
    x = torch.randn(*shape, device=device)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        mlp(x)
    synchronize(device)
    return (time.perf_counter() - start) / calls


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def bench(size_name: str, batch: int, args: argparse.Namespace, device: torch.device) -> list[str]:
    size = SIZES[size_name]
    parent, children = build(size, device)
    models = {"parent": parent, **{f"child-{name}": child for name, child in children.items()}}
    prompt = torch.randint(0, size.vocab, (batch, args.prompt), generator=torch.Generator().manual_seed(1)).to(device)
    mlp = parent.model.layers[0].mlp
    times: dict[tuple[str, str], list[float]] = {}
    for rep in range(args.warmup + args.reps):
        names = list(models) + ["mlp"]
        names = names[rep % len(names) :] + names[: rep % len(names)]  # rotate who goes first
        for name in names:
            if name == "mlp":
                measured = {
                    "prefill": mlp_seconds(mlp, (batch, args.prompt, size.hidden), device, calls=3),
                    "decode": mlp_seconds(mlp, (batch, 1, size.hidden), device, calls=args.new_tokens) * args.new_tokens,
                }
            else:
                prefill_s, cache, token = prefill(models[name], prompt)
                measured = {"prefill": prefill_s, "decode": decode(models[name], cache, token, args.new_tokens)}
            if rep >= args.warmup:
                for phase, seconds in measured.items():
                    times.setdefault((name, phase), []).append(seconds)
    lines = []
    moe_layers = len(children["new"].moe_blocks())
    for phase, tokens in (("prefill", batch * args.prompt), ("decode", batch * args.new_tokens)):
        parent_s = times[("parent", phase)]
        rates = {name: [tokens / s for s in times[(name, phase)]] for name in models}
        ideal = [p / (p + (size.top_k - 1) * moe_layers * m) for p, m in zip(parent_s, times[("mlp", phase)])]
        new_ratio = [p / c for p, c in zip(parent_s, times[("child-new", phase)])]
        old_ratio = [p / c for p, c in zip(parent_s, times[("child-old", phase)])]
        of_ideal = [r / i for r, i in zip(new_ratio, ideal)]
        mlp_share = [moe_layers * m / p for p, m in zip(parent_s, times[("mlp", phase)])]
        lines.append(
            f"{size_name:6} batch {batch:3d} {phase:8} tok/s parent {statistics.median(rates['parent']):10,.0f}"
            f"  child-new {statistics.median(rates['child-new']):10,.0f}  child-old {statistics.median(rates['child-old']):10,.0f}"
        )
        lines.append(
            f"{'':6} {'':9} {'':8} MLP share of parent {spread(mlp_share)}; ideal {spread(ideal)}; "
            f"new/parent {spread(new_ratio)} = {spread(of_ideal)} of ideal; old/parent {spread(old_ratio)}"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["demo"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens per row")
    parser.add_argument("--new-tokens", type=int, default=32, help="decoded tokens per row")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {name}, fp32, prompt {args.prompt}, {args.new_tokens} new tokens, median (min-max) of {args.reps}")
    for size in args.sizes:
        for batch in args.batches:
            print("\n".join(bench(size, batch, args, device)))


if __name__ == "__main__":
    main()
