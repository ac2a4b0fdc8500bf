"""What a lifelong model costs as it grows: a child after 1, 2, 4 and 8 rounds against its dense parent.

Run from the repository root: `python -m bench.rounds [--sizes demo large] [--rounds 1 2 4 8]`; it uses
CUDA when visible for decoding. The parent is bench.train_step's Qwen2 (demo or large shape, random
init: costs do not depend on training). Each round grows the model as a demo round does: `expand` with
`--delta` new experts (the demo plan's 6) spread over the layers, one layer more where the previous
round gave one less, and `insert_classifiers` in every layer that received experts; the round's new
parameters are then perturbed (a trained-looking round, so no two experts are equal). Every round is
saved and registered (`registry.register_base` / `register_child`) on a local sqlite store, as a
delta version. At each of `--rounds` the bench prints, one line per quantity:

  decoding tokens/s (greedy, over a KV cache, as bench.generate), batch 1 and 16, interleaved with
  the parent in every repetition (rotating who goes first), ratios taken per repetition; by default
  through `generate`, the serving path (the prompt's prefill untimed), with `--decode-with forward`
  as a loop of forwards, one token each (the model's own step, without generate's work per step):
    old text, routed by the classifiers  every classifier calls the tokens old (old-language text the
                                          classifiers recognise): each MoE layer asks every round's
                                          classifier (one matmul), then expert 0 alone; x the parent
    old text, pinned                      `layermoe_core.pinned_language(model, "en")`
    new text                              every classifier calls the tokens new: top-k of every expert
                                          in every MoE layer; against bench.generate's ideal
                                          parent / (parent + (k - 1) x MLP time x MoE layers / layers)
  peak memory of the loaded model         in a fresh process, the rise of the peak RSS (VmHWM, reset
                                          after the imports) while `AutoModelForCausalLM.from_pretrained`
                                          loads the saved folder and every weight is read once;
                                                                                       x the parent
  registry bytes of the round             `stored_bytes` of its version against the bytes of the
                                          parameters it added (its ideal)
  load from the registry                  `download_version` into a new folder with a cold cache (the
                                          version rebuilt from its delta and its ancestors') and
                                          `from_pretrained`, against two ideals: the same model registered
                                          whole (one full file, in a registry of its own) and loaded the
                                          same way, with the same checks; and `from_pretrained` of the
                                          saved folder, with no download and no check. Interleaved, each
                                          followed by reading every weight once (a file-mapped weight is
                                          read on first use); by wall time and by CPU time
Each figure is the median with the min-max over repetitions; decoding is given by wall time and by the
process's CPU time (one thread: on a machine shared with other jobs the CPU time leaves out the waits
for a core, so the goals are judged on it there). Goals (issue 31): at 8 rounds old text
>= 0.95x the parent pinned and >= 0.9x routed; registry bytes within 1% of the added parameters;
loading from deltas <= 1.5x one full file, judged against the same model registered whole: the cost of
storing deltas. Against the folder on disk the figure adds the download and the sha256 of every byte.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.generate import SIZES, MLPClocks, decode, generate_steps, prefill, spread
from bench.train_step import Size
from layermoe_core.environment import use_local_stack

WORK = Path(tempfile.mkdtemp(prefix="layermoe-bench-rounds-"))
use_local_stack(WORK / "prefect")

from layermoe_core import expand, insert_classifiers, pinned_language  # noqa: E402
from layermoe_core.model.moe_block import NEW_LABEL  # noqa: E402
from layermoe_core.model.surgery import count_parameters  # noqa: E402
from registry import RegistrySettings, RoundInfo, download_version, register_base, register_child  # noqa: E402
from tests.tiny_tokenizer import tiny_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# one new language a round; "en" is the base's
LANGUAGES = "el hu tr bn hi ne es zh fi ko ja ar fa he ru uk pl cs ro bg sv da nb nl de fr it pt vi th id sw".split()
LOAD_PROBE = """
import sys
from pathlib import Path
from transformers import AutoModelForCausalLM
import layermoe_core.model.modeling_layermoe  # registers the LayerMoE Auto classes
from tests.memory_probe import peak_rss_mb, reset_peak_rss
reset_peak_rss()
before = peak_rss_mb()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
sum(float(p.sum()) for p in model.parameters())  # every weight read once, as serving does: resident even if file-mapped
print(peak_rss_mb() - before)
"""


def parent_model(size: Size) -> torch.nn.Module:
    from bench.train_step import build

    parent, _ = build(size)
    return parent


def allocation(size: Size, round_number: int, delta: int) -> list[int]:
    """`delta` experts over the layers, as evenly as they go, the remainder moving one layer on each round."""
    counts = [delta // size.layers] * size.layers
    for i in range(delta % size.layers):
        counts[(round_number * (delta % size.layers) + i) % size.layers] += 1
    return counts


def grow(model: torch.nn.Module, size: Size, round_number: int, delta: int) -> tuple[torch.nn.Module, RoundInfo]:
    """One round: new experts, a classifier in every layer that got some, the new parameters perturbed."""
    old = ["en", *LANGUAGES[: round_number - 1]]
    new = [LANGUAGES[round_number - 1]]
    counts = allocation(size, round_number, delta)
    child = expand(model, counts, old, new, top_k=None if round_number > 1 else size.top_k, seed=round_number)
    layers = [layer for layer, n in enumerate(counts) if n]
    insert_classifiers(child, layers, seed=round_number)
    generator = torch.Generator().manual_seed(round_number)
    with torch.no_grad():
        for param in child.parameters():
            if param.requires_grad:
                param.add_(0.02 * torch.randn(param.shape, generator=generator))
    info = RoundInfo(round=round_number, old_languages=old, new_languages=new, allocation=counts, classifier_layers=layers)
    return child.eval(), info


def set_classifiers(model: torch.nn.Module, label: int) -> None:
    """Every classifier of every round calls every token `label` (a confident classifier)."""
    with torch.no_grad():
        for block in model.moe_blocks().values():
            for router in block.routers:
                if router.classifier is not None:
                    router.classifier.bias.fill_(-10.0)
                    router.classifier.bias[label] = 10.0


def decoding(parent, child, size: Size, batch: int, args, device: torch.device) -> dict[str, dict[str, list[float]]]:
    """{clock: per repetition child / parent decoding tokens/s for old text (routed, and pinned where it exists),
    new text's share of ideal, and the ideal}, by wall time and by the process's CPU time."""
    parent_clocked = copy.deepcopy(parent)
    mlp_clocks = MLPClocks(parent_clocked, device)
    moe_share = len(child.moe_blocks()) / size.layers
    # "pinned": old text served pinned to its language (the dense base's route: every round's router skipped).
    variants = ["parent", "parent-timed", "old", "new", "pinned"]
    prompt = torch.randint(0, size.vocab, (batch, args.prompt), generator=torch.Generator().manual_seed(1)).to(device)
    seconds: dict[tuple[str, int], list[float]] = {(name, clock): [] for name in [*variants, "mlp"] for clock in (0, 1)}
    for rep in range(args.warmup + args.reps):
        order = variants[rep % len(variants) :] + variants[: rep % len(variants)]
        for name in order:
            model = {"parent": parent, "parent-timed": parent_clocked}.get(name, child)
            if name in ("old", "pinned"):
                set_classifiers(child, 1 - NEW_LABEL)
            elif name == "new":
                set_classifiers(child, NEW_LABEL)
            with pinned_language(child, "en") if name == "pinned" else contextlib.nullcontext():
                _, cache, token = prefill(model, prompt)
                mlp_clocks.take()
                if args.decode_with == "generate":
                    measured = generate_steps(model, cache, prompt, token, args.new_tokens)  # (wall, cpu)
                else:
                    measured = decode(model, cache, token, args.new_tokens)
            mlp_measured = mlp_clocks.take()
            for clock in (0, 1):
                if rep >= args.warmup:
                    seconds[name, clock].append(measured[clock])
                    if name == "parent-timed":
                        seconds["mlp", clock].append(mlp_measured[clock])
    by_clock = {}
    for clock, clock_name in enumerate(("wall", "CPU time")):
        parent_s = seconds["parent", clock]
        ideal = [p / (p + (size.top_k - 1) * m * moe_share) for p, m in zip(parent_s, seconds["mlp", clock])]
        ratios = {name: [p / c for p, c in zip(parent_s, seconds[name, clock])] for name in variants if not name.startswith("parent")}
        ratios["new of ideal"] = [r / i for r, i in zip(ratios.pop("new"), ideal)]
        ratios["ideal"] = ideal
        by_clock[clock_name] = ratios
    return by_clock


def peak_load_mb(folder: Path) -> float:
    """How far the peak RSS (MB) of a fresh process rises while it loads `folder`, its imports done."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-c", LOAD_PROBE, str(folder)]
    return float(subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()[-1])


def read_every_weight(model: torch.nn.Module) -> None:
    """Read each weight once: `from_pretrained` may leave them mapped from the file, read only when first used."""
    sum(float(p.sum()) for p in model.parameters())


def load_times(
    settings: RegistrySettings, version: int, whole: RegistrySettings, whole_version: int, folder: Path, reps: int
) -> dict[str, dict[str, list[float]]]:
    """{clock: {how: seconds}} to load the model three ways, interleaved, by wall time and by the process's CPU time:
    "deltas", `version` from the registry (cold cache, rebuilt from deltas); "whole", the same model registered whole
    (`whole_version` of `whole`); "file", its saved folder. A first, untimed round of the three pays the process's
    one-time costs (imports, the first open of each store)."""
    from transformers import AutoModelForCausalLM

    hows = ["deltas", "whole", "file"]
    seconds: dict[tuple[str, int], list[float]] = {(how, clock): [] for how in hows for clock in (0, 1)}
    for rep in range(-1, reps):
        for how in hows[rep % 3 :] + hows[: rep % 3]:
            scratch = WORK / f"load-{version}-{rep}-{how}"
            start = time.perf_counter(), time.process_time()
            if how == "file":
                local = folder
            else:
                store, number = (settings, version) if how == "deltas" else (whole, whole_version)
                cold = store.model_copy(update={"cache_dir": scratch / "cache"})
                local = download_version(cold, number, scratch / "model").path
            read_every_weight(AutoModelForCausalLM.from_pretrained(local))
            if rep >= 0:
                seconds[how, 0].append(time.perf_counter() - start[0])
                seconds[how, 1].append(time.process_time() - start[1])
            shutil.rmtree(scratch, ignore_errors=True)
    return {name: {how: seconds[how, clock] for how in hows} for clock, name in enumerate(("wall", "CPU time"))}


def both(by_clock: dict[str, dict[str, list[float]]], key: str, unit: str) -> str:
    """One quantity by wall time and by CPU time."""
    return ", ".join(f"{clock} {spread(ratios[key])} {unit}" for clock, ratios in by_clock.items())


def goal(met: bool) -> str:
    return "met" if met else "NOT met"


def bench(size_name: str, args, device: torch.device) -> None:
    size = SIZES[size_name]
    work = WORK / size_name
    settings = RegistrySettings(tracking_uri=f"sqlite:///{work}/store/mlflow.db", cache_dir=work / "cache")
    parent = parent_model(size).eval()
    folders = {0: work / "v0"}
    parent.save_pretrained(folders[0])
    tiny_tokenizer().save_pretrained(folders[0])
    register_base(settings, folders[0], ["en"])
    parent_peak = [peak_load_mb(folders[0]) for _ in range(args.memory_reps)]
    model, params = copy.deepcopy(parent), count_parameters(parent)
    itemsize = next(parent.parameters()).element_size()
    parent = parent.to(device)
    for round_number in range(1, max(args.rounds) + 1):
        model, info = grow(model, size, round_number, args.delta)
        folders[round_number] = work / f"v{round_number}"
        model.save_pretrained(folders[round_number])
        tiny_tokenizer().save_pretrained(folders[round_number])
        version = register_child(settings, folders[round_number], round_number, info, {}, {}, {}, {})
        added, params = count_parameters(model) - params, count_parameters(model)
        prefix = f"{size_name:5} {round_number} round{'s' if round_number > 1 else ' '}"
        if round_number in args.rounds:
            stored = version.stored_bytes or 0
            of_ideal = stored / (added * itemsize)
            print(
                f"{prefix} registry bytes of the round: {stored / 2**20:,.2f} MB = {of_ideal:.4f} of ideal "
                f"(the {added:,} parameters it added, {added * itemsize / 2**20:,.2f} MB) "
                f"[goal within 1%: {goal(abs(of_ideal - 1) <= 0.01)}]",
                flush=True,
            )
            child = model.to(device)
            for batch in args.batches:
                by_clock = decoding(parent, child, size, batch, args, device)
                cpu = by_clock["CPU time"]
                routed = both(by_clock, "old", "x the parent")
                if round_number == 8:
                    routed += f" [goal >= 0.9 at 8 rounds, CPU time: {goal(statistics.median(cpu['old']) >= 0.9)}]"
                print(f"{prefix} batch {batch:2d} decoding, old text routed by the classifiers: {routed}")
                pinned = both(by_clock, "pinned", "x the parent")
                if round_number == 8:
                    pinned += f" [goal >= 0.95 at 8 rounds, CPU time: {goal(statistics.median(cpu['pinned']) >= 0.95)}]"
                print(f"{prefix} batch {batch:2d} decoding, old text pinned to its language: {pinned}")
                print(
                    f"{prefix} batch {batch:2d} decoding, new text: {both(by_clock, 'new of ideal', 'of ideal')} "
                    f"(ideal, CPU time: {spread(cpu['ideal'])} x the parent)",
                    flush=True,
                )
            model = model.cpu()
            peaks = [peak_load_mb(folders[round_number]) for _ in range(args.memory_reps)]
            memory = [c / p for c in peaks for p in parent_peak]
            weights = params / count_parameters(parent)
            print(
                f"{prefix} peak memory of the loaded model: {spread(memory)} x the parent "
                f"({min(peaks):,.0f}-{max(peaks):,.0f} MB against {min(parent_peak):,.0f}-{max(parent_peak):,.0f}; "
                f"parameters {weights:.2f}x the parent's)",
                flush=True,
            )
            whole_store = work / f"whole-{round_number}"
            whole = RegistrySettings(tracking_uri=f"sqlite:///{whole_store}/mlflow.db", cache_dir=whole_store / "cache")
            whole_version = register_base(whole, folders[round_number], ["en"]).version
            times = load_times(settings, version.version, whole, whole_version, folders[round_number], args.load_reps)
            shutil.rmtree(whole_store)  # a full copy of the model: gone before the next, larger round
            for clock, seconds in times.items():
                for ideal, named in (("whole", "the same model registered whole"), ("file", "its folder on disk, unchecked")):
                    slower = [d / i for d, i in zip(seconds["deltas"], seconds[ideal])]
                    judged = round_number == 8 and ideal == "whole"
                    print(
                        f"{prefix} load from the registry, rebuilt from {round_number + 1} versions, {clock}: "
                        f"{spread([1 / s for s in slower])} of ideal = {spread(slower)}x {named} "
                        f"({spread(seconds['deltas'])} s against {spread(seconds[ideal])} s)"
                        f"{f' [goal <= 1.5x at 8 rounds: {goal(statistics.median(slower) <= 1.5)}]' if judged else ''}",
                        flush=True,
                    )
        if round_number - 1 in folders and round_number - 1 > 0:
            shutil.rmtree(folders.pop(round_number - 1))  # the registry holds it; only the newest folder is loaded


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["demo", "large"])
    parser.add_argument("--rounds", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--delta", type=int, default=6, help="new experts a round (the demo plan's delta)")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens per row")
    parser.add_argument("--new-tokens", type=int, default=32, help="decoded tokens per row")
    parser.add_argument("--decode-with", choices=["generate", "forward"], default="generate", help="how decoding is timed")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=11, help="fewer give spreads wider than the goals' margins")
    parser.add_argument("--load-reps", type=int, default=3)
    parser.add_argument("--memory-reps", type=int, default=1, help="fresh processes that load each model")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (bench.generate's default, and why)")
    args = parser.parse_args(argv)
    if max(args.rounds) > len(LANGUAGES):
        parser.error(f"--rounds goes up to {len(LANGUAGES)}, one new language a round")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"torch {torch.__version__}, {name}, fp32, decoding through {args.decode_with}, "
        f"load average {os.getloadavg()[0]:.1f}, median (min-max) of {args.reps} reps"
    )
    try:
        for size in args.sizes:
            bench(size, args, device)
    finally:
        shutil.rmtree(WORK, ignore_errors=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
