"""Where the seconds of a launched training stage go, on this machine, and what one launch per round saves.

A one-step Stage-1 job on a tiny Llama is launched as the flow launches it (`training.launch.launch`,
2 processes, DDP over gloo on a CPU) and, for comparison, run in this process. The pieces:

  interpreter        `python -c pass`
  accelerate CLI     `python -c "import accelerate.commands.launch"` (what `accelerate launch` imports)
  rank imports       what each rank imports before it builds the model (torch, transformers' Trainer, layermoe)
  in-process job     the job's own work after imports: build and expand the model, Trainer set-up, one step, save
  launched job       `launch()` wall clock, start to result
  round, 2 launches  a one-step Stage 1, then a one-step Stage 2 in a launch of its own (one launch per stage)
  round, 1 launch    the same two jobs in one launch, as the flow runs a round

Each figure is the median of --repeats runs, interleaved; the spread (min-max) is printed beside it.
Run from the repository root: `python -m bench.launch_overhead [--repeats 3]`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RANK_IMPORTS = (
    "import layermoe_core.training.launch, layermoe_core.training.trainer, layermoe_core.model.checkpoints, "
    "layermoe_core.model.surgery, layermoe_core.data.corpus, accelerate"
)


def timed_python(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    return time.perf_counter() - start


def make_job(root: Path):
    """A one-step Stage-1 job, and a round's one-step Stage-1 and Stage-2 jobs, each in a folder of the caller's."""
    import torch
    from safetensors.torch import save_file

    from layermoe_core.training.launch import Stage1Job, Stage2Job
    from layermoe_core.training.trainer import Stage1Settings, Stage2Settings
    from tests.conftest import tiny_model
    from tests.tiny_tokenizer import tiny_tokenizer

    tiny_model("llama").save_pretrained(root / "parent")
    tiny_tokenizer().save_pretrained(root / "tokenizer")

    def token_file(language: str, seed: int) -> Path:  # what training reads: {language: (rows, seq_len)} in safetensors
        path = root / f"{language}.safetensors"
        save_file({language: torch.randint(0, 97, (16, 32), generator=torch.Generator().manual_seed(seed))}, str(path))
        return path

    tokens, old_tokens = token_file("el", 0), token_file("en", 1)
    quick = {"max_steps": 1, "per_device_batch_size": 4, "save_steps": 100, "logging_steps": 1}

    def stage1(out: Path) -> Stage1Job:
        return Stage1Job(
            output_dir=out,
            tokenizer_dir=root / "tokenizer",
            parent_dir=root / "parent",
            allocation=[1, 1, 1],
            old_languages=["en"],
            new_languages=["el"],
            top_k=2,
            tokens_path=tokens,
            settings=Stage1Settings(**quick),
        )

    def round_jobs(out: Path) -> tuple[Stage1Job, Stage2Job]:
        first = stage1(out / "stage1")
        second = Stage2Job(
            output_dir=out / "stage2",
            tokenizer_dir=first.final_dir,
            stage1_dir=first.final_dir,
            classifier_layers=[1],
            old_tokens_path=old_tokens,
            new_tokens_path=tokens,
            settings=Stage2Settings(**quick),
        )
        return first, second

    return stage1, round_jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from layermoe_core.training.launch import LauncherSettings, launch

    root = Path(tempfile.mkdtemp(prefix="launch-overhead-"))
    job, round_jobs = make_job(root)
    launcher = LauncherSettings(num_processes=2)
    figures: dict[str, list[float]] = {}
    for repeat in range(args.repeats):
        figures.setdefault("interpreter", []).append(timed_python("pass"))
        figures.setdefault("accelerate CLI imports", []).append(timed_python("import accelerate.commands.launch"))
        figures.setdefault("rank imports", []).append(timed_python(RANK_IMPORTS))
        start = time.perf_counter()
        job(root / f"in-process-{repeat}").run([])
        figures.setdefault("in-process job (after imports)", []).append(time.perf_counter() - start)
        start = time.perf_counter()
        launch([job(root / f"launched-{repeat}")], launcher)
        figures.setdefault("launched job (2 processes)", []).append(time.perf_counter() - start)
        # The two ways of running a round alternate which goes first, so neither always meets a warmer cache.
        ways = {
            "round, 2 launches (one a stage)": lambda jobs: [launch([job], launcher) for job in jobs],
            "round, 1 launch (both stages)": lambda jobs: launch(jobs, launcher),
        }
        for way, (name, run) in enumerate(sorted(ways.items(), reverse=bool(repeat % 2))):
            jobs = round_jobs(root / f"round-{repeat}-{way}")
            start = time.perf_counter()
            run(list(jobs))
            figures.setdefault(name, []).append(time.perf_counter() - start)
    for name, values in figures.items():
        print(f"{name:34s} median {statistics.median(values):6.2f} s  (min {min(values):.2f}, max {max(values):.2f}, n={len(values)})")


if __name__ == "__main__":
    main()
