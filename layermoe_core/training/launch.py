"""Training stages as jobs: `train_in_order` trains jobs one after another in the calling process, `launch` runs
them under one `accelerate launch`, one process per device.

The flow process alone samples, measures, evaluates and registers; the launched ranks only
train. A job is a JSON file (`Stage1Job`, `Stage2Job` or `BaseJob`); every rank reads the round's
job files and runs `train_in_order` on them, the code the flow process runs without a launcher: for
each job it builds the same seeded model, reads the same token files and trains with HF `Trainer`,
which DDP, FSDP2 or DeepSpeed ZeRO distribute as accelerate's config says (`LauncherSettings.strategy`;
on a CPU, where accelerate itself would fall back to DDP, the ranks turn FSDP2 on:
`trainer.LayerMoETrainer`; docs/multi-gpu.md). So a round's Stage 1 and Stage 2 share one launch and
pay the launcher's and the ranks' imports once; Stage 2 still loads Stage 1's final folder from disk,
as a rerun does. Each rank logs its rank, the world size and the strategy once per job. Rank 0 writes
each job's `TrainResult` to `<output_dir>/train_result.json` when the job is done; a rerun skips a
job with a final folder and a result, and resumes any other from its newest complete checkpoint.
A killed or failed launch raises `LaunchError`, carrying the tail of its log. A SIGTERM to the flow's
process is passed on to the ranks, which stop together at a checkpoint (`stopping`); the launch then
raises `TrainingStopped`.

    python -m layermoe_core.training.launch JOB.json [JOB.json ...]   # what each rank runs (under accelerate launch)
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib.util
import json
import os
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

import layermoe_core

from ..atomic_file import write_atomically
from ..errors import LayerMoEError
from .stopping import TrainingStopped, caught_sigterm
from .trainer import FINAL_DIR_NAME, MetricsCallback, Stage1Settings, Stage2Settings, TrainResult, TrainSettings, latest_checkpoint

RESULT_NAME = "train_result.json"  # in the job's output_dir, written by rank 0
LOG_NAME = "launch.log"  # in the job's output_dir: every rank's output while it runs that job, appended per launch
JOB_PREFIX = "layermoe-job "  # a rank's stdout line as it starts a job: this prefix, then {"index": .., "stage": .., ...}
METRICS_PREFIX = "layermoe-metrics "  # a rank-0 stdout line: this prefix, then {"stage": .., "step": .., "max_steps": .., "metrics": {..}}
REPO_ROOT = Path(layermoe_core.__file__).resolve().parents[1]


class LaunchError(LayerMoEError):
    """A launched stage exited non-zero (or was killed). The message names its log; `tail` holds the log's last lines,
    which the caller shows once (the message is repeated by every layer that reports the failure)."""

    tail: tuple[str, ...] = ()


@dataclass(frozen=True)
class Strategy:
    """How a launch distributes training: its name, and which of {weights, grads, optimizer} it splits over the ranks."""

    name: str
    sharded: frozenset[str]


_REPLICATED = frozenset[str]()
_ALL = frozenset({"weights", "grads", "optimizer"})
_DDP_TYPES = ("NO", "MULTI_GPU", "MULTI_CPU")  # accelerate's distributed types that run DDP (or one process)


class LauncherSettings(BaseModel):
    """How the flow starts a training stage: `accelerate launch` with this many processes, or an accelerate config.

    Without a config file, N > 1 processes run under torchrun as DDP (NCCL on GPUs, gloo on a
    CPU-only machine), 1 process runs alone. With `config_file` (from `accelerate config`: DDP,
    FSDP2 or DeepSpeed ZeRO), the file decides the strategy; `num_processes` overrides its count.
    A config that layermoe cannot run as written (FSDP1, another distributed type) fails here.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, title="Launcher")

    num_processes: int | None = Field(
        None, ge=1, title="Processes", description="processes (devices) per stage; empty: the config file's, or 1"
    )
    config_file: Path | None = Field(
        None,
        title="Accelerate config",
        description="an accelerate config YAML (DDP, FSDP or DeepSpeed ZeRO); empty: plain DDP with num_processes",
    )
    log_tail_lines: int = Field(60, ge=1, title="Log lines quoted", description="lines of the launch log quoted when a launch fails")

    @model_validator(mode="after")
    def _config_exists(self) -> LauncherSettings:
        if self.config_file is not None and not Path(self.config_file).is_file():
            raise LayerMoEError(
                f"launcher.config_file {self.config_file} does not exist; write one with `accelerate config --config_file PATH` "
                "or drop config_file to launch plain DDP with num_processes"
            )
        self.strategy()  # a config that cannot run fails when the plan loads, not after sampling
        return self

    def accelerate_config(self) -> dict:
        """The config file's settings, or {} without one."""
        if self.config_file is None:
            return {}
        return yaml.safe_load(Path(self.config_file).read_text(encoding="utf-8")) or {}

    @property
    def processes(self) -> int:
        return self.num_processes or int(self.accelerate_config().get("num_processes") or 1)

    def strategy(self) -> Strategy:
        """The strategy the launched ranks run, on GPUs and CPUs alike (the ranks check they got it).

        FSDP must be FSDP2 (`fully_shard`): FSDP1 flattens each wrapped module's parameters into one
        tensor, which cannot mix our frozen bf16 parameters with trainable fp32 master weights.
        """
        config = self.accelerate_config()
        where = f"launcher.config_file {self.config_file}"
        kind = str(config.get("distributed_type", "MULTI_GPU")).upper()
        if kind == "FSDP":
            fsdp = config.get("fsdp_config") or {}
            if str(fsdp.get("fsdp_version", 1)) != "2":
                raise LayerMoEError(
                    f"{where} asks for FSDP version {fsdp.get('fsdp_version', 1)}; layermoe runs FSDP2 only "
                    "(FSDP1 cannot hold frozen bf16 and trainable fp32 parameters in one module): set fsdp_config.fsdp_version: 2"
                )
            if str(fsdp.get("fsdp_reshard_after_forward", True)).lower() in ("true", "full_shard"):
                return Strategy("FSDP2 full shard", _ALL)
            # Weights stay gathered from forward to backward: a peak holds all of them.
            return Strategy("FSDP2, no reshard after forward", frozenset({"grads", "optimizer"}))
        if kind == "DEEPSPEED":
            stage = _zero_stage(config.get("deepspeed_config") or {})
            return Strategy(
                f"DeepSpeed ZeRO-{stage}", [_REPLICATED, frozenset({"optimizer"}), frozenset({"grads", "optimizer"}), _ALL][stage]
            )
        if kind not in _DDP_TYPES:
            raise LayerMoEError(
                f"{where} has distributed_type {kind}; layermoe launches {', '.join(_DDP_TYPES)} (DDP), FSDP (fsdp_version: 2) "
                "or DEEPSPEED: write one with `accelerate config --config_file PATH`"
            )
        return Strategy("DDP (replicated)" if self.processes > 1 else "single process", _REPLICATED)

    def check_runnable(self) -> None:
        """Fail before launching what this machine cannot run, instead of letting accelerate fall back to DDP."""
        name = self.strategy().name
        if name.startswith("DeepSpeed"):
            if importlib.util.find_spec("deepspeed") is None:
                raise LayerMoEError(
                    f"launcher.config_file {self.config_file} asks for {name}, but deepspeed is not installed; "
                    "`pip install deepspeed` (CUDA GPUs only), or use an FSDP2 config (distributed_type: FSDP, fsdp_version: 2)"
                )
            if not _cuda():
                raise LayerMoEError(
                    f"launcher.config_file {self.config_file} asks for {name}, which needs CUDA GPUs, and none is visible; "
                    "use an FSDP2 config (distributed_type: FSDP, fsdp_version: 2), which also runs on CPUs"
                )

    def command(self, job_paths: Sequence[Path]) -> list[str]:
        """The `accelerate launch` command line that runs the jobs in `job_paths`, in order, on every rank."""
        command = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", "0"]
        if self.config_file is not None:
            command += ["--config_file", str(Path(self.config_file).resolve())]
            if self.num_processes is not None:
                command += ["--num_processes", str(self.num_processes)]
        else:
            # Explicit flags, so a user's default accelerate config cannot change the strategy.
            command += [
                "--num_processes",
                str(self.processes),
                "--num_machines",
                "1",
                "--mixed_precision",
                "no",
                "--dynamo_backend",
                "no",
            ]  # precision is the Trainer's
            # torchrun starts the ranks; on a CPU-only machine accelerate picks gloo (MULTI_CPU).
            command += ["--multi_gpu"] if self.processes > 1 else ["--cpu"] if not _cuda() else []
        return [*command, "-m", "layermoe_core.training.launch", *map(str, job_paths)]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _zero_stage(deepspeed: dict) -> int:
    if deepspeed.get("deepspeed_config_file"):
        file = Path(deepspeed["deepspeed_config_file"])
        if not file.is_file():
            raise LayerMoEError(f"deepspeed_config_file {file} does not exist; fix the path in the accelerate config")
        return int(json.loads(file.read_text(encoding="utf-8")).get("zero_optimization", {}).get("stage", 0))
    return int(deepspeed.get("zero_stage", 0))


# -- jobs ------------------------------------------------------------------------------
class _Job(BaseModel):
    model_config = ConfigDict(extra="forbid")

    output_dir: Path
    tokenizer_dir: Path  # its tokenizer is saved beside the final model

    @property
    def final_dir(self) -> Path:
        """Where the trained model is saved: the Trainer's `output_dir/final`."""
        return self.output_dir / FINAL_DIR_NAME

    def is_trained(self) -> bool:
        """Trained by an earlier run: its final model is saved and rank 0 wrote its result after it."""
        return self.final_dir.is_dir() and (self.output_dir / RESULT_NAME).is_file()

    def saved_result(self) -> TrainResult:
        return TrainResult.model_validate_json((self.output_dir / RESULT_NAME).read_text(encoding="utf-8"))


class Stage1Job(_Job):
    """Expand the parent with `allocation` (seeded) and train this round's experts and routers."""

    kind: Literal["stage1"] = "stage1"
    parent_dir: Path
    allocation: list[int]
    old_languages: list[str]
    new_languages: list[str]
    top_k: int
    tokens_path: Path
    settings: Stage1Settings
    extend_vocabulary: bool = False  # the tokenizer in tokenizer_dir adds tokens: give the child their rows

    def expanded_parent(self):
        """The parent on the CPU (the Trainer moves it to this process's device), expanded with `allocation`; the
        routers start from `settings.seed`, so every process and rerun builds the same child."""
        from ..model.checkpoints import load_model, load_tokenizer
        from ..model.surgery import expand, extend_vocabulary
        from ..model.vocabulary import added_token_pieces, vocabulary_size

        child = expand(
            load_model(self.parent_dir, device="cpu"),
            self.allocation,
            self.old_languages,
            self.new_languages,
            top_k=self.top_k,
            router_aux_loss_coef=self.settings.balance_loss_coef,
            seed=self.settings.seed,
            router_init=self.settings.router_init,
        )
        if self.extend_vocabulary:
            extend_vocabulary(child, added_token_pieces(load_tokenizer(self.tokenizer_dir), vocabulary_size(child.config)))
        return child

    def run(self, callbacks) -> TrainResult:
        from ..data.corpus import open_sequences
        from ..model.checkpoints import load_tokenizer
        from .trainer import train_stage1

        return train_stage1(
            self.expanded_parent(),
            open_sequences(self.tokens_path),
            self.settings,
            self.output_dir,
            callbacks,
            tokenizer=load_tokenizer(self.tokenizer_dir),
        )


class Stage2Job(_Job):
    """Insert the routing classifiers (seeded) into the Stage-1 model, then review on the replay mix."""

    kind: Literal["stage2"] = "stage2"
    stage1_dir: Path
    classifier_layers: list[int]
    old_tokens_path: Path
    new_tokens_path: Path
    settings: Stage2Settings
    heldout_tokens_path: Path | None = None  # held-out text of every language: the classifiers are trained to their target on it

    def classified_stage1(self):
        """The Stage-1 model on the CPU (the Trainer moves it), with its routing classifiers initialised from `settings.seed`."""
        from ..model.checkpoints import load_model
        from ..model.surgery import insert_classifiers

        model = load_model(self.stage1_dir, device="cpu")
        insert_classifiers(model, self.classifier_layers, seed=self.settings.seed)
        return model

    def run(self, callbacks) -> TrainResult:
        from ..data.corpus import load_sequences, open_sequences
        from ..model.checkpoints import load_tokenizer
        from .trainer import train_stage2

        return train_stage2(
            self.classified_stage1(),
            open_sequences(self.old_tokens_path),
            open_sequences(self.new_tokens_path),
            self.settings,
            self.output_dir,
            callbacks,
            tokenizer=load_tokenizer(self.tokenizer_dir),
            heldout_sequences=load_sequences(self.heldout_tokens_path) if self.heldout_tokens_path else None,
        )


class BaseJob(_Job):
    """A dense base, initialised from `base_config` (a config's to_dict()) with `seed`, trained on the old languages."""

    kind: Literal["base"] = "base"
    base_config: dict[str, Any]
    seed: int
    tokens_path: Path
    settings: TrainSettings

    def run(self, callbacks) -> TrainResult:
        from transformers import AutoConfig

        from ..data.corpus import open_sequences
        from ..model.checkpoints import init_model, load_tokenizer
        from .trainer import train_causal_lm

        model = init_model(AutoConfig.for_model(**self.base_config), self.seed)
        return train_causal_lm(
            model, open_sequences(self.tokens_path), self.settings, self.output_dir, callbacks, tokenizer=load_tokenizer(self.tokenizer_dir)
        )


TrainJob = Annotated[Stage1Job | Stage2Job | BaseJob, Field(discriminator="kind")]
_JOB = TypeAdapter(TrainJob)


# -- jobs in order: the flow process without a launcher, and every launched rank ------------------------
class JobReporter:
    """What a caller hears while jobs train: each job's start, and rank 0's logged metrics. The default hears nothing.

    The flow's task implements it once; a launch forwards its ranks' lines to it, so a launched
    round reports what an in-process round reports.
    """

    def job_starts(self, index: int, job: TrainJob, trained: bool) -> None:
        """Job `index` of the run starts; `trained`: an earlier run trained it, so it is skipped."""

    def metrics(self, stage: str, metrics: dict[str, float], step: int, max_steps: int) -> None:
        """A Trainer log of the job of kind `stage`, at optimizer `step` of `max_steps`."""


def train_in_order(jobs: Sequence[TrainJob], reporter: JobReporter) -> list[TrainResult]:
    """Train `jobs` one after another in this process and return their results.

    A job trained by an earlier run is skipped (its saved result is returned); any other resumes
    from its newest complete checkpoint. Rank 0 writes each job's result as soon as the job is done,
    so after a failure in a later job, the rerun skips the earlier ones.
    """
    from accelerate import PartialState

    results = []
    for index, job in enumerate(jobs):
        trained = job.is_trained()
        reporter.job_starts(index, job, trained)
        if trained:
            results.append(job.saved_result())
            continue
        gc.collect()  # the previous job's Trainer and model sit in reference cycles: free them before this job builds its model
        result = job.run([MetricsCallback(functools.partial(reporter.metrics, job.kind))])
        if PartialState().is_main_process:
            write_atomically(job.output_dir / RESULT_NAME, result.model_dump_json())
        results.append(result)
    return results


# -- the flow's side -------------------------------------------------------------------------
def launch(jobs: Sequence[TrainJob], launcher: LauncherSettings, reporter: JobReporter | None = None) -> list[TrainResult]:
    """Run `jobs`, in order, in one `accelerate launch` and return rank 0's TrainResults.

    Every rank's output is appended to the `launch.log` of the job it is running (each job's log
    starts with the launch's command line); the ranks' job starts and rank 0's metrics reach
    `reporter` as they come. A non-zero exit (a crash, or a killed rank, which torchrun turns into
    the end of every rank) raises `LaunchError`, naming the job that was running, with the log's tail; one
    after a SIGTERM was passed on to the ranks raises `TrainingStopped`, naming their checkpoint.
    """
    launcher.check_runnable()
    reporter = reporter or JobReporter()
    job_paths = []
    for job in jobs:
        job.output_dir.mkdir(parents=True, exist_ok=True)
        job_paths.append(job.output_dir / f"{job.kind}-job.json")
        job_paths[-1].write_text(job.model_dump_json(indent=2), encoding="utf-8")
        if not job.is_trained():
            (job.output_dir / RESULT_NAME).unlink(missing_ok=True)
    command = launcher.command(job_paths)
    # The ranks import this very tree, whatever is installed in the environment.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1",
    }
    tail: deque[str] = deque(maxlen=launcher.log_tail_lines)
    running, started = 0, set()  # the job whose log gets the output: the newest one a rank has started
    with ExitStack() as stack:
        # line-buffered: the SIGTERM note lands in order
        logs = [stack.enter_context((job.output_dir / LOG_NAME).open("a", encoding="utf-8", buffering=1)) for job in jobs]
        for log in logs:
            log.write(f"$ {' '.join(command)}\n")
            log.flush()
        process = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        sigterm: list[list[int]] = []  # the ranks a SIGTERM was passed on to, once one came
        with caught_sigterm(lambda: sigterm.append(_stop_ranks(process, logs[running]))):
            try:
                assert process.stdout is not None  # stdout=PIPE
                for line in process.stdout:
                    start = _record(line, JOB_PREFIX)
                    if start is not None:
                        running = max(running, start["index"])
                        if start["index"] not in started:
                            started.add(start["index"])
                            reporter.job_starts(start["index"], jobs[start["index"]], start["trained"])
                    logs[running if start is None else start["index"]].write(line)  # a skipped job's start can come late
                    tail.append(line.rstrip("\n"))
                    record = _record(line, METRICS_PREFIX)
                    if record is not None:
                        reporter.metrics(record["stage"], record["metrics"], record["step"], record["max_steps"])
                returncode = process.wait()
            finally:
                if process.poll() is None:  # the flow itself was interrupted: take the ranks down with it
                    process.terminate()  # torchrun's agent passes SIGTERM on to the ranks (in sessions of their own)
                    try:
                        process.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        os.killpg(process.pid, signal.SIGKILL)
                        process.wait()
            unfinished = [job for job in jobs if not (job.output_dir / RESULT_NAME).is_file()]
            if sigterm and (returncode != 0 or unfinished):  # raised within: a SIGTERM that stopped nothing is raised again
                raise TrainingStopped(latest_checkpoint(jobs[running].output_dir))
    if returncode != 0 or unfinished:
        failed = jobs[running] if returncode else unfinished[0]
        error = LaunchError(
            f"the {failed.kind} launch ({launcher.processes} processes) exited with code {returncode}"
            f"{'' if returncode else ' without a result'}; its log is {failed.output_dir / LOG_NAME}. Fix the cause and rerun "
            f"the flow: training resumes from the newest checkpoint in {failed.output_dir}"
        )
        error.tail = tuple(tail)
        raise error
    return [job.saved_result() for job in jobs]


def _record(line: str, prefix: str) -> dict | None:
    """The JSON record after `prefix` in `line`, or None. Searched, not matched at the start: another rank's
    progress bar can leave its line open on the shared stream."""
    at = line.find(prefix)
    return None if at < 0 else json.JSONDecoder().raw_decode(line, at + len(prefix))[0]


def _stop_ranks(launcher: subprocess.Popen, log: IO[str]) -> list[int]:
    """Pass SIGTERM on to the ranks, the launcher's children, not to the launcher: torchrun's agent would kill them
    after its own short grace. Noted in the log; returns the ranks' pids."""
    import psutil

    ranks = psutil.Process(launcher.pid).children()
    for rank in ranks:
        with contextlib.suppress(psutil.NoSuchProcess):
            rank.send_signal(signal.SIGTERM)
    pids = [rank.pid for rank in ranks]
    note = f"layermoe: SIGTERM passed on to the ranks (pids {', '.join(map(str, pids))}): they stop together at the next step's end"
    # os.write, not log.write: the signal can come while the loop above is inside log.write.
    os.write(log.fileno(), f"{note}, with a checkpoint there\n".encode())
    return pids


# -- the ranks' side -------------------------------------------------------------------------
class _RankLines(JobReporter):
    """A rank's reports as stdout lines, which `launch` reads back: every rank's job starts, rank 0's metrics."""

    def job_starts(self, index: int, job: TrainJob, trained: bool) -> None:
        record = {"index": index, "stage": job.kind, "trained": trained, "rank": int(os.environ.get("RANK", 0)), "pid": os.getpid()}
        _write_line(JOB_PREFIX + json.dumps(record))

    def metrics(self, stage: str, metrics: dict[str, float], step: int, max_steps: int) -> None:
        _write_line(METRICS_PREFIX + json.dumps({"stage": stage, "step": step, "max_steps": max_steps, "metrics": metrics}))


def _write_line(text: str) -> None:
    """One write with its newline: print's separate write of the newline lets another rank's output in between."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def run_rank(job_paths: Sequence[Path]) -> None:
    """One rank of a launch: train the jobs in order (rank 0 saves each model and tokenizer, and writes each result)."""
    train_in_order([_JOB.validate_json(Path(path).read_text(encoding="utf-8")) for path in job_paths], _RankLines())


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(
            "usage: python -m layermoe_core.training.launch JOB.json [JOB.json ...]  (run by `accelerate launch`; "
            "see layermoe_core.training.launch)"
        )
    run_rank([Path(path) for path in sys.argv[1:]])
