"""Where `layermoe registry list` spends its time against a local sqlite store, and how it compares with another checkout.

Run from the repository root: `python -m bench.registry_list [--tracking-uri URI] [--before DIR [--before-tracking-uri URI]]
[--repeats 5]`.
Without `--tracking-uri` it registers a 5-version lineage (a hidden-64 Qwen2-style base and four rounds, as
`bench.registry` builds them) in a temporary sqlite store. A sqlite store is also served by a real `mlflow server`
for the whole run. Each repeat runs, interleaved, one fresh process per row: Python alone, `import mlflow`,
`MlflowClient(...).search_registered_models()` on the store (the floor any MLflow-based command pays),
`layermoe registry list` from this checkout on the store and through the server (registry/listing.py reads both
without MLflow) and, with `--before`, from another checkout (given `--model-name`, which older checkouts need).
It prints wall and CPU seconds (user + system of the child): median, and min-max as the spread.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from tests.services import running_mlflow_server

REPO_ROOT = Path(__file__).resolve().parents[1]


def build_store(root: Path) -> tuple[str, str]:
    """A sqlite store holding a base and four rounds; returns its URI and the registered model's name."""
    from bench.registry import build_chain, register_chain
    from registry import RegistrySettings

    settings = RegistrySettings(tracking_uri=f"sqlite:///{root}/mlflow.db", cache_dir=root / "cache", registered_model_name="bench")
    register_chain(settings, build_chain(root / "models", hidden=64))
    return settings.tracking_uri, settings.registered_model_name


def timed(command: list[str], cwd: Path) -> tuple[float, float]:
    """Wall and CPU seconds (user + system) of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(cwd), "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    subprocess.run(command, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", help="an existing store (default: build one in a temporary folder)")
    parser.add_argument("--model-name", help="its registered model (needed by --before checkouts)")
    parser.add_argument("--before", type=Path, help="another checkout of layermoe to time side by side, e.g. main")
    parser.add_argument("--before-tracking-uri", help="the store the other checkout lists (default: --tracking-uri), e.g. one it built")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.tracking_uri:
        uri, name = args.tracking_uri, args.model_name
    else:
        uri, name = build_store(Path(tempfile.mkdtemp(prefix="layermoe-registry-list-")))
    with ExitStack() as stack:
        served = None
        if uri.startswith("sqlite:///"):
            served = stack.enter_context(running_mlflow_server(uri, Path(tempfile.mkdtemp(prefix="layermoe-registry-list-server-"))))
        time_rows(args, parser, uri, name, served.tracking_uri if served else None)


def time_rows(args: argparse.Namespace, parser: argparse.ArgumentParser, uri: str, name: str | None, server_uri: str | None) -> None:
    python = sys.executable
    rows = {
        "python -c pass": ([python, "-c", "pass"], REPO_ROOT),
        "import mlflow": ([python, "-c", "import mlflow"], REPO_ROOT),
        "MlflowClient + search_registered_models": (
            [python, "-c", f"from mlflow import MlflowClient; MlflowClient({uri!r}).search_registered_models()"],
            REPO_ROOT,
        ),
        "layermoe registry list, sqlite file": ([python, "-m", "flows.cli", "registry", "list", "--tracking-uri", uri], REPO_ROOT),
    }
    if server_uri:
        command = [python, "-m", "flows.cli", "registry", "list", "--tracking-uri", server_uri]
        rows["layermoe registry list, mlflow server"] = (command, REPO_ROOT)
    if args.before:
        if not name:
            parser.error("--before needs --model-name with --tracking-uri")
        command = [python, "-m", "flows.cli", "registry", "list", "--tracking-uri", args.before_tracking_uri or uri, "--model-name", name]
        rows[f"layermoe registry list ({args.before})"] = (command, args.before.resolve())
    times: dict[str, list[tuple[float, float]]] = {label: [] for label in rows}
    load_before = os.getloadavg()[0]
    for _ in range(args.repeats):
        for label, (command, cwd) in rows.items():
            times[label].append(timed(command, cwd))
    print(f"{args.repeats} interleaved repeats; 1-minute load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"{'':42s} {'wall s: median (min-max)':>26s} {'CPU s: median (min-max)':>26s}")
    for label, samples in times.items():
        walls, cpus = [w for w, _ in samples], [c for _, c in samples]
        print(
            f"{label:42s} {statistics.median(walls):8.2f} ({min(walls):.2f}-{max(walls):.2f}) "
            f"{statistics.median(cpus):12.2f} ({min(cpus):.2f}-{max(cpus):.2f})"
        )


if __name__ == "__main__":
    main()
