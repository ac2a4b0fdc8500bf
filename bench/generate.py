"""Serving cost of a child: prefill and decoding tokens/s of an expanded model against its dense parent.

Run from the repository root: `python -m bench.generate [--sizes demo large] [--batches 1 16]`; it uses
CUDA when visible. The parent is a Qwen2 model; the child is `expand`ed from it (new experts in every
layer, top-2) with a classifier in every layer, in two settings:
  new  the classifiers send every token down the new path: each token runs k = 2 expert MLPs;
  old  the classifiers send every token to the parent's path, here expert 0 alone (old-language text
       that the classifiers recognise): the child should cost what the parent costs.
and the `new` child served pinned to a language (`pinned_language`, docs/pinned-serving.md), the pin set
once per request as serving sets it:
  pinned-el  pinned to the round's own language: the same function as `new`, so pinned-el/new is the
             pin's own cost, ideally 1;
  pinned-en  pinned to the base's language: the dense base, so pinned-en/parent is ideally 1.
Phases: prefill (one forward over a `--prompt`-token prompt per row, filling the KV cache) and decode
(`--new-tokens` greedy steps of one token per row, each reusing the cache), both as `generate` runs them.

The ideal for `new` is not 1: a token that uses k experts runs (at batch 1: reads) k MLPs, so
    ideal = parent time / (parent time + (k - 1) * MLP time),
with MLP time the parent's own dense MLPs' time, all layers, measured inside the parent's run
(`parent-timed`: clocks around each MLP call; measured alone, with its weights hot in the cache,
a decoding MLP runs much faster than inside the model). For `old` the ideal is 1.
That k-MLPs ideal cannot be reached by a batch whose tokens take different experts: a decoding step
reads every expert that any token of the batch takes. The bytes ideal counts what a step must read:
    bytes ideal = parent bytes a step / child bytes a step,
the weights of attention, norms and lm_head (embeddings: a row a token, left out) plus each layer's
MLP for the parent; for the child, each layer's routers and classifiers plus one MLP's bytes for every
distinct expert the batch's tokens take in that step (weight > 0), counted in an untimed decoding run
of the same prompt. At batch 1 with k = 2 both ideals count the same two MLPs a layer. Every variant is timed
in turn within each repetition (rotating the order),
and the ratios are taken per repetition, so a load that drifts hits them alike; each figure is the
median with the min-max over repetitions. Each is given by wall time and by the process's CPU time:
on a machine shared with other jobs the CPU time leaves out the waits for a core. On the CPU it runs
one thread by default (`--threads`): with two threads on a loaded machine each small op waits for
the other thread's turn (docs/performance.md).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
from dataclasses import replace

import torch
from transformers import DynamicCache, Qwen2ForCausalLM

from bench.train_step import SIZES as TRAIN_STEP_SIZES
from bench.train_step import Size
from bench.train_step import build as expanded_pair
from layermoe_core import insert_classifiers, pinned_language
from layermoe_core.model.losses import NEW, OLD

# bench.train_step's model shapes, with 3 new experts a layer (top-2 of 4 experts).
SIZES = {name: replace(size, new_per_layer=3) for name, size in TRAIN_STEP_SIZES.items()}


def build(size: Size, device: torch.device) -> tuple[Qwen2ForCausalLM, dict[str, torch.nn.Module]]:
    """The parent and its child (bench.train_step's, router spread) with every classifier set to `new` or to `old`."""
    parent, expanded = expanded_pair(size)
    insert_classifiers(expanded, list(range(size.layers)))
    children = {}
    for setting, label in (("new", NEW), ("old", OLD)):
        child = copy.deepcopy(expanded)
        with torch.no_grad():
            for block in child.moe_blocks().values():
                block.router.classifier.bias.copy_(torch.tensor([-10.0, -10.0]))
                block.router.classifier.bias[label] = 10.0  # a confident classifier: every token `label`
        children[setting] = child.to(device).eval()
    return parent.to(device).eval(), children


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Wall and process CPU seconds since construction (after a device sync)."""

    def __init__(self, device: torch.device):
        self.device = device
        synchronize(device)
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        synchronize(self.device)
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


@torch.inference_mode()
def prefill(model: torch.nn.Module, prompt: torch.Tensor) -> tuple[tuple[float, float], DynamicCache, torch.Tensor]:
    """(wall, cpu) seconds for the prompt's forward; the filled cache; the greedy next token (batch, 1)."""
    cache = DynamicCache()
    clock = Clock(prompt.device)
    out = model(input_ids=prompt, cache=cache, use_cache=True)
    next_token = out.logits[:, -1:].argmax(-1)
    return clock.read(), cache, next_token


@torch.inference_mode()
def decode(model: torch.nn.Module, cache: DynamicCache, token: torch.Tensor, steps: int) -> tuple[float, float]:
    """(wall, cpu) seconds for `steps` greedy steps of one token per row, each over the cache."""
    clock = Clock(token.device)
    for _ in range(steps):
        out = model(input_ids=token, cache=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    return clock.read()


@torch.inference_mode()
def generate_steps(
    model: torch.nn.Module, cache: DynamicCache, prompt: torch.Tensor, token: torch.Tensor, steps: int
) -> tuple[float, float]:
    """(wall, cpu) seconds for `model.generate` to decode `steps` greedy tokens per row after the prompt held in
    `cache` and its next `token`: `decode`'s steps through the serving path, with generate's own work per step."""
    ids = torch.cat([prompt, token], dim=1)
    clock = Clock(token.device)
    model.generate(
        ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0
    )
    return clock.read()


class MLPClocks:
    """Wall and CPU seconds spent inside a model's MLP modules, from hooks around each call."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.device, self.wall, self.cpu = device, 0.0, 0.0
        for layer in model.model.layers:
            layer.mlp.register_forward_pre_hook(self.start)
            layer.mlp.register_forward_hook(self.stop)

    def start(self, module, args) -> None:
        self.clock = Clock(self.device)

    def stop(self, module, args, output) -> None:
        wall, cpu = self.clock.read()
        self.wall, self.cpu = self.wall + wall, self.cpu + cpu

    def take(self) -> tuple[float, float]:
        """The seconds since the last take."""
        seconds, self.wall, self.cpu = (self.wall, self.cpu), 0.0, 0.0
        return seconds


class ExpertReads:
    """Distinct experts each forward of an expanded model reads, summed over its MoE layers: the experts any
    token takes with a weight > 0 (a layer every token leaves dense reads expert 0 alone). Wraps each
    block's routing; used in untimed runs only (it reads the routing back to the host)."""

    def __init__(self, model: torch.nn.Module):
        self.reads, self.forwards = 0, 0
        model.register_forward_pre_hook(self.count_forward)
        for block in model.moe_blocks().values():
            block._route = self.recording(block._route)

    def count_forward(self, module, args) -> None:
        self.forwards += 1

    def recording(self, route):
        def routed_and_counted(tokens: torch.Tensor, inference: bool):
            routed = route(tokens, inference)
            self.reads += 1 if routed is None else int(routed[0][routed[1] > 0].unique().numel())
            return routed

        return routed_and_counted

    def take(self) -> float:
        """Experts read per forward since the last take."""
        per_forward, self.reads, self.forwards = self.reads / max(self.forwards, 1), 0, 0
        return per_forward


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def step_bytes(parent: torch.nn.Module, child: torch.nn.Module, experts_read: float) -> tuple[float, float]:
    """(parent, child) weight bytes one decoding step reads: everything but the embeddings and the MLPs, then
    the parent's MLPs, or the child's routers and classifiers and `experts_read` MLPs (all layers together)."""
    layers = parent.model.layers
    mlp = weight_bytes(layers[0].mlp)
    shared = weight_bytes(parent) - weight_bytes(parent.model.embed_tokens) - len(layers) * mlp
    if parent.lm_head.weight is parent.model.embed_tokens.weight:  # tied: lm_head is read in full
        shared += weight_bytes(parent.lm_head)
    routers = sum(weight_bytes(block.routers) for block in child.moe_blocks().values())
    dense_layers = len(layers) - len(child.moe_blocks())
    return shared + len(layers) * mlp, shared + routers + (experts_read + dense_layers) * mlp


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def bench(size_name: str, batch: int, args: argparse.Namespace, device: torch.device) -> list[str]:
    size = SIZES[size_name]
    parent, children = build(size, device)
    timed_parent = copy.deepcopy(parent)
    mlp_clocks = MLPClocks(timed_parent, device)
    pins = {"pinned-el": (children["new"], "el"), "pinned-en": (children["new"], "en")}  # variant: (model, language)
    models = {
        "parent": parent,
        "parent-timed": timed_parent,
        **{f"child-{name}": child for name, child in children.items()},
        **{name: model for name, (model, _) in pins.items()},
    }
    prompt = torch.randint(0, size.vocab, (batch, args.prompt), generator=torch.Generator().manual_seed(1)).to(device)
    bytes_ideal = {}  # setting -> parent bytes / child bytes a decoding step
    for setting, child in children.items():
        counted = copy.deepcopy(child)
        reads = ExpertReads(counted)
        _, cache, token = prefill(counted, prompt)
        reads.take()
        decode(counted, cache, token, args.new_tokens)
        parent_bytes, child_bytes = step_bytes(parent, counted, reads.take())
        bytes_ideal[setting] = parent_bytes / child_bytes
        del counted
    times: dict[tuple[str, str, int], list[float]] = {}  # (variant, phase, 0 wall / 1 cpu) -> seconds per rep
    for rep in range(args.warmup + args.reps):
        names = list(models)
        names = names[rep % len(names) :] + names[: rep % len(names)]  # rotate who goes first
        for name in names:
            with pinned_language(*pins[name]) if name in pins else contextlib.nullcontext():
                prefill_s, cache, token = prefill(models[name], prompt)
                measured = {("prefill", name): prefill_s}
                if name == "parent-timed":
                    measured[("prefill", "mlp")] = mlp_clocks.take()
                measured[("decode", name)] = decode(models[name], cache, token, args.new_tokens)
            if name == "parent-timed":
                measured[("decode", "mlp")] = mlp_clocks.take()
            if rep >= args.warmup:
                for (phase, variant), seconds in measured.items():
                    for clock, value in enumerate(seconds):
                        times.setdefault((variant, phase, clock), []).append(value)
    lines = []
    for phase, tokens in (("prefill", batch * args.prompt), ("decode", batch * args.new_tokens)):
        rates = {name: statistics.median([tokens / s for s in times[(name, phase, 0)]]) for name in models}
        lines.append(
            f"{size_name:6} batch {batch:3d} {phase:8} tok/s (wall) parent {rates['parent']:9,.0f}"
            f"  child-new {rates['child-new']:9,.0f}  child-old {rates['child-old']:9,.0f}"
            f"  pinned-el {rates['pinned-el']:9,.0f}  pinned-en {rates['pinned-en']:9,.0f}"
        )
        for clock, clock_name in enumerate(("wall", "cpu")):
            parent_s, mlp_s = times[("parent", phase, clock)], times[("mlp", phase, clock)]
            ideal = [p / (p + (size.top_k - 1) * m) for p, m in zip(parent_s, mlp_s)]  # every layer is an MoE layer
            new_ratio = [p / c for p, c in zip(parent_s, times[("child-new", phase, clock)])]
            old_ratio = [p / c for p, c in zip(parent_s, times[("child-old", phase, clock)])]
            of_ideal = [r / i for r, i in zip(new_ratio, ideal)]
            share = [m / p for p, m in zip(times[("parent-timed", phase, clock)], mlp_s)]
            pinned_el = [n / c for n, c in zip(times[("child-new", phase, clock)], times[("pinned-el", phase, clock)])]
            pinned_en = [p / c for p, c in zip(parent_s, times[("pinned-en", phase, clock)])]
            lines.append(
                f"    {clock_name:4}: MLP share {spread(share)}, ideal {spread(ideal)}; "
                f"new/parent {spread(new_ratio)} = {spread(of_ideal)} of ideal;"
                f" old/parent {spread(old_ratio)}; pinned-el/new {spread(pinned_el)}; pinned-en/parent {spread(pinned_en)}"
            )
            if phase == "decode":
                of_bytes = [r / bytes_ideal["new"] for r in new_ratio]
                lines.append(
                    f"    {clock_name:4}: bytes ideal new {bytes_ideal['new']:.2f} (old {bytes_ideal['old']:.2f}) x the parent; "
                    f"new/parent {spread(new_ratio)} = {spread(of_bytes)} of the bytes ideal"
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
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1, see above)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {name}, fp32, prompt {args.prompt}, {args.new_tokens} new tokens, median (min-max) of {args.reps}")
    for size in args.sizes:
        for batch in args.batches:
            print("\n".join(bench(size, batch, args, device)))


if __name__ == "__main__":
    main()
