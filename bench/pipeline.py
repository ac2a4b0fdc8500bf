"""Where a demo-size round's time goes: model compute against pipeline overhead (Prefect + MLflow).

Run from the repository root: `python -m bench.pipeline [--scale 0.25]`. Offline and local:
a seeded synthetic corpus (tests/synthetic_corpus.py), an ephemeral Prefect server and a
sqlite MLflow registry, all in a temporary folder. It trains a demo-size base (briefly:
its quality does not matter here) with `bootstrap-base`, then times one `add-languages`
round (el, hu, tr over en, es, zh) with the demo's settings, its token budgets times `--scale`
(1.0: the demo's own round).

The round's time is split by wrapping, in this process, the functions its tasks call:
  compute   similarity, stage 1, stage 2, evaluation (routing statistics + parent/child metrics)
  data      token sampling and token files (neither compute nor pipeline; shown, not counted)
  overhead  checkpoint loading, registry download of the parent and upload of the child,
            report plots, and the rest of the round's wall time: Prefect orchestration and glue
The target is overhead < 5% of compute. Then the child's model folder is copied, uploaded
(`register_base`) and downloaded (`download_version`) `--repeats` times, interleaved: the
registry's throughput against a plain `shutil.copytree` of the same folder.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

from layermoe_core.environment import use_local_stack

# Prefect and MLflow stay local and inside a temporary folder; set before they are imported.
_WORKDIR = tempfile.mkdtemp(prefix="layermoe-pipeline-bench-")
atexit.register(shutil.rmtree, _WORKDIR, ignore_errors=True)  # registered first, so it runs after Prefect's shutdown
use_local_stack(os.path.join(_WORKDIR, "prefect"), ephemeral=True)  # an ephemeral server, never a configured one

import argparse  # noqa: E402
import functools  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import ExitStack, contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402
from types import ModuleType  # noqa: E402
from unittest import mock  # noqa: E402

import tasks.analysis  # noqa: E402
import tasks.common  # noqa: E402
import tasks.evaluation  # noqa: E402
import tasks.parent  # noqa: E402
import tasks.registration  # noqa: E402
from demo.base import DEMO_SIZES  # noqa: E402
from flows.add_languages import add_languages  # noqa: E402
from flows.bootstrap_base import bootstrap_base  # noqa: E402
from flows.demo import BASE_LANGUAGES, ROUNDS, demo_plans  # noqa: E402
from flows.plan import ExpansionPlan, ParentRef  # noqa: E402
from layermoe_core import plots  # noqa: E402
from layermoe_core.data import corpus  # noqa: E402
from layermoe_core.model import checkpoints  # noqa: E402
from layermoe_core.training import trainer  # noqa: E402
from layermoe_core.training.trainer import TrainSettings  # noqa: E402
from registry.download import download_version  # noqa: E402
from registry.register import register_base  # noqa: E402
from registry.settings import RegistrySettings  # noqa: E402
from tests.synthetic_corpus import write_synthetic_corpus  # noqa: E402

# The steps' own imports, and (for the training jobs of layermoe_core.training.launch, which import what they call
# when they run) the modules that define them.
_STEP_MODULES = (tasks.analysis, tasks.evaluation)
# part: {category: the (module, function) places the round's tasks call}
TIMED: dict[str, dict[str, list[tuple[ModuleType, str]]]] = {
    "compute": {
        "similarity": [(tasks.analysis, "layer_similarity")],
        "stage 1": [(trainer, "train_stage1")],
        "stage 2": [(trainer, "train_stage2")],
        "evaluation": [(tasks.evaluation, "routing_statistics"), (tasks.evaluation, "evaluate_model")],
    },
    "data": {
        "token sampling and token files": [(tasks.analysis, "sample_token_rows")]
        + [(module, name) for module in (*_STEP_MODULES, corpus) for name in ("load_sequences", "open_sequences") if hasattr(module, name)],
    },
    "overhead": {
        "checkpoint loading": [(tasks.common, "load_model"), (checkpoints, "load_model"), (checkpoints, "load_tokenizer")]
        + [(module, "load_tokenizer") for module in _STEP_MODULES],
        "registry: parent download + verify": [(tasks.parent, "cached_version")],
        "registry: child upload": [(tasks.registration, "register_child")],
        "report plots": [
            (plots, name) for name in ("plot_similarity", "plot_allocation", "plot_routing_heatmap", "plot_language_comparison")
        ],
    },
}
REST = "Prefect orchestration and the rest"
TARGET_OVERHEAD = 0.05


class Stopwatch:
    """Seconds spent inside wrapped functions, summed per category (thread-safe: tasks may run in threads)."""

    def __init__(self) -> None:
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    def timed(self, category: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                with self._lock:
                    self.seconds[category] += time.perf_counter() - start

        return run

    @contextmanager
    def wrapping(self, places: dict[str, list[tuple[ModuleType, str]]]) -> Iterator[None]:
        """Time every place of each category while inside; a renamed function fails here, loudly."""
        with ExitStack() as stack:
            for category, targets in places.items():
                for module, name in targets:
                    stack.enter_context(mock.patch.object(module, name, self.timed(category, getattr(module, name))))
            yield


def folder_megabytes(folder: Path) -> float:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) / 1e6


def prepare(workdir: Path, scale: float, base_steps: int) -> tuple[RegistrySettings, ExpansionPlan]:
    """A registry holding a briefly trained demo-size base (the `champion`), and the round's plan."""
    languages = BASE_LANGUAGES + [lang for group in ROUNDS for lang in group]  # the demo's plans name them all
    documents = max(4_000, int(16_000 * scale))  # enough text for every token budget, held-out split included
    corpora = write_synthetic_corpus(workdir / "corpus", languages, documents=documents)
    base_plan, lifelong = demo_plans(workdir, corpora)
    train = TrainSettings(learning_rate=2e-3, max_steps=base_steps, per_device_batch_size=16, logging_steps=20, save_steps=10_000)
    rows_per_language = base_steps * train.per_device_batch_size // len(BASE_LANGUAGES) + 1
    base_plan = base_plan.model_copy(update={"train": train, "train_tokens": rows_per_language * base_plan.tokens.seq_len})
    bootstrap_base(base_plan)

    tokens = lifelong.tokens
    budgets = ("analysis_tokens", "stage1_tokens", "stage2_tokens", "eval_tokens")
    scaled = tokens.model_copy(update={name: max(tokens.seq_len, int(getattr(tokens, name) * scale)) for name in budgets})
    # A briefly trained base can show negative similarity in a layer: floor it, as the quick demo does.
    allocation = lifelong.allocation.model_copy(update={"clamp_similarity": 1e-2})
    lifelong = lifelong.model_copy(update={"tokens": scaled, "allocation": allocation})
    return lifelong.registry, lifelong.round_plan(0, [], ParentRef(alias=lifelong.promote_alias))


def registry_throughput(
    registry: RegistrySettings, version: int, languages: list[str], workdir: Path, repeats: int
) -> tuple[float, dict[str, float]]:
    """(megabytes, median seconds of copy / upload / download) for the model folder of `version`."""
    source = download_version(registry, version, workdir / "source").path
    scratch = registry.model_copy(update={"registered_model_name": "pipeline-bench"})  # leaves the round's versions alone
    seconds: defaultdict[str, list[float]] = defaultdict(list)
    for repeat in range(repeats):
        start = time.perf_counter()
        shutil.copytree(source, workdir / f"copy-{repeat}")
        seconds["plain copy (shutil.copytree)"].append(time.perf_counter() - start)
        start = time.perf_counter()
        uploaded = register_base(scratch, source, languages).version
        seconds["registry upload (register_base)"].append(time.perf_counter() - start)
        start = time.perf_counter()
        download_version(scratch, uploaded, workdir / f"download-{repeat}")
        seconds["registry download (download_version)"].append(time.perf_counter() - start)
    return folder_megabytes(source), {what: statistics.median(s) for what, s in seconds.items()}


def report(stopwatch: Stopwatch, wall: float, megabytes: float, transfers: dict[str, float], repeats: int) -> str:
    parts = {part: {category: stopwatch.seconds[category] for category in places} for part, places in TIMED.items()}
    parts["overhead"][REST] = wall - sum(stopwatch.seconds.values())
    compute = sum(parts["compute"].values())
    lines = [f"round wall time {wall:.1f} s", f"{'':40} {'seconds':>8} {'of compute':>11}"]
    for part, categories in parts.items():
        lines.append(part + (" (not counted)" if part == "data" else ""))
        for category, seconds in categories.items():
            lines.append(f"  {category:38} {seconds:8.2f} {seconds / compute:10.1%}")
        total = sum(categories.values())
        lines.append(f"  {'total':38} {total:8.2f} {total / compute:10.1%}")
    overhead = sum(parts["overhead"].values()) / compute
    verdict = "met" if overhead < TARGET_OVERHEAD else "missed"
    lines.append(f"pipeline overhead / compute = {overhead:.1%} (target < {TARGET_OVERHEAD:.0%}: {verdict})")
    lines.append(f"\nregistry throughput, the child's model folder ({megabytes:.1f} MB), median of {repeats}:")
    copy_seconds = next(iter(transfers.values()))
    for what, seconds in transfers.items():
        lines.append(f"  {what:38} {megabytes / seconds:8.1f} MB/s  {copy_seconds / seconds:6.2f}x plain copy  ({seconds * 1e3:.0f} ms)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.25, help="the demo round's token budgets times this (1.0: the demo's)")
    parser.add_argument("--base-steps", type=int, default=40, help="training steps of the throwaway base")
    parser.add_argument("--repeats", type=int, default=3, help="copy/upload/download repeats for the throughput")
    args = parser.parse_args()
    workdir = Path(_WORKDIR)
    registry, plan = prepare(workdir, args.scale, args.base_steps)

    stopwatch = Stopwatch()
    with stopwatch.wrapping({category: targets for part in TIMED.values() for category, targets in part.items()}):
        start = time.perf_counter()
        summary = add_languages(plan)
        wall = time.perf_counter() - start
    languages = summary.old_languages + summary.new_languages
    megabytes, transfers = registry_throughput(registry, summary.version, languages, workdir / "throughput", args.repeats)

    size = DEMO_SIZES["demo"]
    tokens = plan.tokens
    print(
        f"\nadd-languages round {summary.new_languages} over {summary.old_languages}: demo-size base (hidden "
        f"{size['hidden_size']}, {size['num_hidden_layers']} layers), allocation {summary.allocation}; tokens per "
        f"language: analysis {tokens.analysis_tokens}, stage 1 {tokens.stage1_tokens}, stage 2 {tokens.stage2_tokens}, "
        f"eval {tokens.eval_tokens} (scale {args.scale})"
    )
    print(report(stopwatch, wall, megabytes, transfers, args.repeats))


if __name__ == "__main__":
    main()
