"""Stages launched by the flow as `accelerate launch` jobs: 2 CPU processes under torchrun, gloo, as DDP and FSDP2.

A tiny base (itself trained by a 2-process launch) gets "el" added, by the add-languages flow
in this process; only the stages run in the launched ranks, both stages in one launch. Faults are injected into rank 1
through a `sitecustomize` module on the ranks' PYTHONPATH (Python imports it at start-up):
it wraps `layermoe_core.training.trainer._train` to add one TrainerCallback to one stage (Stage 1, or
LAYERMOE_TEST_FAULT_STAGE), and touches nothing else.
"""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from flows.add_languages import add_languages, round_dir
from flows.plan import ExpansionPlan, ParentRef
from layermoe_core.analysis.allocation import AllocationSettings
from layermoe_core.errors import LayerMoEError
from layermoe_core.evaluation.gates import GateSettings
from layermoe_core.evaluation.metrics import EvalSettings
from layermoe_core.model.checkpoints import load_model, load_tokenizer, save_model
from layermoe_core.model.surgery import expand, insert_classifiers
from layermoe_core.training.launch import RESULT_NAME, LaunchError, LauncherSettings
from layermoe_core.training.stopping import TrainingStopped
from layermoe_core.training.trainer import Stage1Settings, Stage2Settings, TrainSettings, latest_checkpoint
from registry.download import download_version
from registry.listing import list_versions
from registry.register import register_base
from registry.settings import RegistrySettings
from registry.versions import promote

from .test_flows import TOKENS, bootstrap_tiny_base

pytestmark = pytest.mark.usefixtures("prefect_backend")  # one ephemeral Prefect server per module (conftest)

BASE_LANGUAGES = ["en", "zh"]
GLOBAL_BATCH = 8
TWO_PROCESSES = LauncherSettings(num_processes=2)
# Stage settings of every round here; per_device_batch_size is GLOBAL_BATCH / processes.
STAGE = {"learning_rate": 3e-3, "max_steps": 6, "logging_steps": 2, "save_steps": 3}
# Every loss here is a mean over the same number of tokens on each rank, so DDP's mean of the
# ranks' gradients is the single process's gradient: packed rows of one length, and no balance
# (Stage 1) or LPR and new-expert prior (Stage 2) term, whose per-rank values are not the global batch's
# (the balance loss is a product of per-batch means, LPR a mean over a rank's old tokens, the prior over
# its new ones; in Stage 1 every token is new, so the prior is a plain token mean there). Measured with them on
# (balance 0.01, Stage 1 alone): the update differed by up to 5% (relative L2) in one router.
STAGE1 = dict(**STAGE, balance_loss_coef=0.0)
STAGE2 = dict(**STAGE, lpr_coef=0.0, new_prior_coef=0.0)
# Relative L2 difference of each trained tensor's update (child - start), 2 processes vs 1.
# Measured on Stage 1 alone: <= 2.5e-6 (float summation order); untrained tensors are bit-identical.
MATCH_TOLERANCE = 1e-4
# An accelerate config as `accelerate config` writes it for FSDP2 (docs/multi-gpu.md); on these CPUs
# accelerate alone would run it as DDP, so the ranks turn FSDP2 on (trainer.LayerMoETrainer).
FSDP2_CONFIG = {
    "compute_environment": "LOCAL_MACHINE",
    "distributed_type": "FSDP",
    "num_machines": 1,
    "num_processes": 2,
    "mixed_precision": "no",
    "fsdp_config": {
        "fsdp_version": 2,
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_reshard_after_forward": True,
        "fsdp_state_dict_type": "SHARDED_STATE_DICT",
        "fsdp_cpu_ram_efficient_loading": False,
    },
}
# Not anchored at a line's start: rank 0's progress bar leaves its line open on the shared stream.
JOB_LINE = re.compile(r"layermoe-job (\{[^{}]*\})")
RANK_LINE = re.compile(r"layermoe rank (\d+)/(\d+): (.+); trainable parameters held by this rank: ([\d,]+) of ([\d,]+) bytes$", re.M)
REPO_ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 600.0  # a guard against a hung launch, not a timing: far above what a healthy launch needs

FAULTS = textwrap.dedent(
    """
    # Test-only fault injection into rank 1 of a launched stage (see tests/test_distributed.py).
    import os
    fault = os.environ.get("LAYERMOE_TEST_FAULT")
    stage = os.environ.get("LAYERMOE_TEST_FAULT_STAGE", "stage1")
    if fault and os.environ.get("RANK") == "1":
        import signal
        import torch
        from transformers import TrainerCallback
        import layermoe_core.training.trainer as training

        kind, *where = fault.split(":")

        class Fault(TrainerCallback):
            def __init__(self, model):
                self.model, self.starving = model, False
                if kind == "idle":  # at step `step`, layer `layer`'s router sends every token to expert 0 alone
                    layer, self.step = map(int, where)
                    router = model.moe_block(layer).router
                    route = router.forward

                    def starve(tokens):
                        logits, weights, ids = route(tokens)
                        if self.starving:  # weight 1 on expert 0; zero-weight slots are never computed
                            ids, weights = ids.zero_(), torch.zeros_like(weights).index_fill_(1, torch.tensor([0]), 1.0)
                        return logits, weights, ids
                    router.forward = starve

            def on_step_begin(self, args, state, control, **kwargs):
                self.starving = kind == "idle" and state.global_step == self.step

            def on_step_end(self, args, state, control, **kwargs):
                if kind == "kill" and state.global_step == int(where[0]):
                    os.kill(os.getpid(), signal.SIGKILL)

            def on_save(self, args, state, control, **kwargs):  # "hold:STEP:FILE": wait at STEP's checkpoint for FILE
                if kind == "hold" and state.global_step == int(where[0]):
                    import time
                    while not os.path.exists(where[1]):
                        time.sleep(0.05)

        _train = training._train
        def _train_with_fault(model, rows, objective, settings, output_dir, callbacks, tokenizer=None):
            if not str(output_dir).endswith(stage):  # faults strike one stage only
                return _train(model, rows, objective, settings, output_dir, callbacks, tokenizer)
            return _train(model, rows, objective, settings, output_dir, [*callbacks, Fault(model)], tokenizer)
        training._train = _train_with_fault
    """
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny base trained by a 2-process launch, and the corpora."""
    root = tmp_path_factory.mktemp("distributed")
    corpora = bootstrap_tiny_base(root, BASE_LANGUAGES, TrainSettings(**STAGE, per_device_batch_size=4), launcher=TWO_PROCESSES).corpora
    base_dir = root / "work" / "base" / "train" / "final"
    checkpoint = root / "work" / "base" / "train" / "checkpoint-3"
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in checkpoint.iterdir()}  # two ranks trained it
    return root, corpora, base_dir


@pytest.fixture
def faults(tmp_path, monkeypatch):
    """Put the fault-injecting sitecustomize on the ranks' path; set LAYERMOE_TEST_FAULT to arm it."""
    folder = tmp_path / "faults"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(FAULTS)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])))
    return monkeypatch


def fresh_registry(world, folder: Path) -> RegistrySettings:
    _, _, base_dir = world
    registry = RegistrySettings(tracking_uri=f"sqlite:///{folder}/mlflow.db", registered_model_name="tiny")
    promote(registry, register_base(registry, base_dir, BASE_LANGUAGES).version)
    return registry


def round_plan(world, registry, workdir: Path, launcher: LauncherSettings | None, **stage) -> ExpansionPlan:
    _, corpora, _ = world
    batch = {"per_device_batch_size": GLOBAL_BATCH // (launcher.processes if launcher else 1)}
    return ExpansionPlan(
        name="distributed",
        registry=registry,
        corpora=corpora,
        tokens=TOKENS,
        allocation=AllocationSettings(method="fixed", fixed=[2, 1]),
        classifier_layer_count=1,
        stage1=Stage1Settings(**{**STAGE1, **batch, **stage}),
        stage2=Stage2Settings(**{**STAGE2, **batch, **stage}),
        evaluation=EvalSettings(batch_size=8, gates=GateSettings(max_old_loss_increase=10.0, require_new_improvement=False)),
        parent=ParentRef(version=1),
        new_languages=["el"],
        launcher=launcher,
        workdir=workdir,
    )


def child_weights(registry, version: int, dest: Path) -> dict[str, torch.Tensor]:
    return load_file(download_version(registry, version, dest).path / "model.safetensors")


@pytest.fixture(scope="module")
def two_process_round(world, tmp_path_factory):
    folder = tmp_path_factory.mktemp("two-processes")
    registry = fresh_registry(world, folder)
    plan = round_plan(world, registry, folder / "work", TWO_PROCESSES)
    summary = add_languages(plan)
    return registry, summary, child_weights(registry, summary.version, folder / "child"), round_dir(plan, 1)


def test_two_process_round_registers_one_version_whose_child_matches_the_single_process_child(world, two_process_round, tmp_path):
    registry, summary, launched_child, work = two_process_round
    assert list_versions(registry)["version"].tolist() == [1, 2] and summary.version == 2  # only the flow registered
    for stage in ("stage1", "stage2"):
        assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in (work / stage / "checkpoint-3").iterdir()}
        assert json.loads((work / stage / RESULT_NAME).read_text())["global_step"] == STAGE["max_steps"]

    single = fresh_registry(world, tmp_path)
    single_summary = add_languages(round_plan(world, single, tmp_path / "work", None))
    single_child = child_weights(single, single_summary.version, tmp_path / "child")
    # The starting point both trained from: the seeded expansion and classifiers.
    stage1 = Stage1Settings(**STAGE1)
    start = expand(load_model(world[2], device="cpu"), [2, 1], BASE_LANGUAGES, ["el"], seed=stage1.seed, router_init=stage1.router_init)
    insert_classifiers(start, single_summary.classifier_layers, seed=Stage2Settings(**STAGE2).seed)
    start = start.state_dict()

    assert launched_child.keys() == single_child.keys()
    trained = [name for name in single_child if "routers" in name or "new_experts" in name]
    assert trained and all(name in start for name in trained)
    for name, tensor in single_child.items():
        if name not in trained:
            assert torch.equal(launched_child[name], tensor), name
            continue
        update, launched_update = tensor.float() - start[name].float(), launched_child[name].float() - start[name].float()
        assert update.norm() > 0, name
        assert ((launched_update - update).norm() / update.norm()).item() <= MATCH_TOLERANCE, name


def job_starts(log: Path) -> list[dict]:
    """Each rank's line as it starts a job, in a launch log: index, stage, trained (so skipped), rank, pid."""
    return [json.loads(record) for record in JOB_LINE.findall(log.read_text())]


def test_a_launched_round_trains_both_stages_in_one_launch_of_the_same_rank_processes(two_process_round):
    *_, work = two_process_round
    logs = {stage: work / stage / "launch.log" for stage in ("stage1", "stage2")}
    headers = {stage: [line for line in log.read_text().splitlines() if line.startswith("$ ")] for stage, log in logs.items()}
    assert len(headers["stage1"]) == 1 and headers["stage2"] == headers["stage1"], headers  # one launch, its command in both logs
    assert headers["stage1"][0].endswith(f" {work / 'stage1' / 'stage1-job.json'} {work / 'stage2' / 'stage2-job.json'}")
    pids = {}
    for index, (stage, log) in enumerate(logs.items()):
        starts = job_starts(log)
        assert sorted((s["index"], s["stage"], s["trained"], s["rank"]) for s in starts) == [
            (index, stage, False, 0),
            (index, stage, False, 1),
        ]
        pids[stage] = {s["rank"]: s["pid"] for s in starts}
    assert pids["stage2"] == pids["stage1"] and len(set(pids["stage1"].values())) == 2  # Stage 2 ran in Stage 1's two processes


def test_a_rank_killed_in_stage2_fails_the_round_and_the_rerun_resumes_stage2_without_retraining_stage1(
    world, two_process_round, faults, tmp_path
):
    registry = fresh_registry(world, tmp_path)
    plan = round_plan(world, registry, tmp_path / "work", TWO_PROCESSES)
    stage1, stage2 = round_dir(plan, 1) / "stage1", round_dir(plan, 1) / "stage2"

    faults.setenv("LAYERMOE_TEST_FAULT", "kill:4")  # rank 1 dies after Stage-2 step 4; checkpoint-3 is complete
    faults.setenv("LAYERMOE_TEST_FAULT_STAGE", "stage2")
    with pytest.raises(LaunchError) as failure:
        add_languages(plan)
    assert "stage2 launch (2 processes) exited with code" in str(failure.value) and str(stage2 / "launch.log") in str(failure.value)
    assert (stage1 / "final").is_dir() and (stage2 / "checkpoint-3" / "trainer_state.json").is_file() and not (stage2 / "final").exists()
    assert list_versions(registry)["version"].tolist() == [1]
    stage1_saved = (stage1 / "final" / "model.safetensors").stat().st_mtime_ns

    faults.delenv("LAYERMOE_TEST_FAULT")
    summary = add_languages(plan)
    assert sorted((s["trained"], s["rank"]) for s in job_starts(stage1 / "launch.log")) == [(False, 0), (False, 1), (True, 0), (True, 1)]
    assert len(rank_lines(stage1 / "launch.log")) == 2  # Stage 1's Trainer started in the first launch only
    assert (stage1 / "final" / "model.safetensors").stat().st_mtime_ns == stage1_saved
    assert json.loads((stage2 / RESULT_NAME).read_text())["resumed_from"] == str(stage2 / "checkpoint-3")
    assert_the_uninterrupted_child(registry, summary, two_process_round, tmp_path / "child")


@pytest.fixture
def hang_guard():
    """Kill this test's launched ranks if they outlive DEADLINE_S (a hung collective), so the launch fails, not the CI."""

    def kill_ranks():
        for process in psutil.Process().children(recursive=True):
            if "layermoe_core.training.launch" in " ".join(process.cmdline()):
                process.kill()

    timer = threading.Timer(DEADLINE_S, kill_ranks)
    timer.start()
    yield
    timer.cancel()


def test_a_step_where_an_expert_group_gets_no_tokens_on_one_rank_neither_hangs_nor_crashes(world, faults, hang_guard, tmp_path):
    """Layer 0's new experts get no tokens on rank 1 at step 2, and tokens on rank 0."""
    faults.setenv("LAYERMOE_TEST_FAULT", "idle:0:2")
    registry = fresh_registry(world, tmp_path)
    for gradient_checkpointing in (False, True):  # transformers would turn find_unused_parameters off with checkpointing
        plan = round_plan(
            world,
            registry,
            tmp_path / f"work-{gradient_checkpointing}",
            TWO_PROCESSES,
            gradient_checkpointing=gradient_checkpointing,
            max_steps=3,
            save_steps=10,
        )
        summary = add_languages(plan)
        result = json.loads((round_dir(plan, 1) / "stage1" / RESULT_NAME).read_text())
        assert result["global_step"] == 3
    versions = list_versions(registry)  # the second round's child is a new version, or the first's where its files are the same
    assert versions["parent"].tolist()[1:] == [1] * (len(versions) - 1) and summary.version == versions["version"].max()


def test_a_rank_killed_mid_stage_fails_the_round_clearly_and_the_rerun_resumes(world, two_process_round, faults, tmp_path):
    registry = fresh_registry(world, tmp_path)
    plan = round_plan(world, registry, tmp_path / "work", TWO_PROCESSES)
    stage1 = round_dir(plan, 1) / "stage1"

    faults.setenv("LAYERMOE_TEST_FAULT", "kill:4")  # rank 1 dies after step 4; checkpoint-3 is complete
    with pytest.raises(LaunchError) as failure:
        add_languages(plan)
    message, tail = str(failure.value), "\n".join(failure.value.tail)
    assert "stage1 launch (2 processes) exited with code" in message and str(stage1 / "launch.log") in message
    assert "Signal 9" in tail or "SIGKILL" in tail  # torchrun's report of the killed rank, from the log's tail
    assert list_versions(registry)["version"].tolist() == [1]
    assert (stage1 / "checkpoint-3" / "trainer_state.json").is_file() and not (stage1 / "final").exists()

    faults.delenv("LAYERMOE_TEST_FAULT")
    summary = add_languages(plan)
    assert json.loads((stage1 / RESULT_NAME).read_text())["resumed_from"] == str(stage1 / "checkpoint-3")
    assert_the_uninterrupted_child(registry, summary, two_process_round, tmp_path / "child")


def test_a_sigterm_to_the_flow_stops_both_ranks_at_one_checkpoint_and_the_rerun_resumes_to_the_uninterrupted_child(
    world, two_process_round, faults, tmp_path
):
    """What a stopping Prefect worker sends the flow run's process, while a launched stage trains."""
    registry = fresh_registry(world, tmp_path)
    plan = round_plan(world, registry, tmp_path / "work", TWO_PROCESSES)
    stage1 = round_dir(plan, 1) / "stage1"
    go = tmp_path / "go"
    faults.setenv("LAYERMOE_TEST_FAULT", f"hold:3:{go}")  # rank 1 waits at checkpoint-3 until `go` exists

    def stop_the_flow() -> None:
        """SIGTERM to this (the flow's) process once checkpoint-3 is complete; rank 1 goes on once it was passed on."""
        wait_for(lambda: (stage1 / "checkpoint-3" / "trainer_state.json").is_file())
        os.kill(os.getpid(), signal.SIGTERM)
        wait_for(lambda: "SIGTERM passed on to the ranks" in (stage1 / "launch.log").read_text())
        go.touch()

    stopper = threading.Thread(target=stop_the_flow, daemon=True)
    stopper.start()
    with pytest.raises(TrainingStopped) as stopped:
        add_languages(plan)
    stopper.join()
    assert str(stopped.value) == f"training stopped by SIGTERM at {stage1 / 'checkpoint-4'}; rerun to resume from it"
    assert latest_checkpoint(stage1) == stage1 / "checkpoint-4" and not (stage1 / "final").exists()
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in (stage1 / "checkpoint-4").iterdir()}  # both ranks stopped there
    assert list_versions(registry)["version"].tolist() == [1]

    faults.delenv("LAYERMOE_TEST_FAULT")
    summary = add_languages(plan)
    assert json.loads((stage1 / RESULT_NAME).read_text())["resumed_from"] == str(stage1 / "checkpoint-4")
    assert_the_uninterrupted_child(registry, summary, two_process_round, tmp_path / "child")


def assert_the_uninterrupted_child(registry, summary, two_process_round, dest: Path) -> None:
    """The rerun registered one child, version 2, bit for bit the uninterrupted two-process round's."""
    assert list_versions(registry)["version"].tolist() == [1, 2] and summary.version == 2
    resumed = child_weights(registry, 2, dest)
    _, _, uninterrupted, _ = two_process_round
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), name


def wait_for(condition) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, "a launched stage never got there"
        time.sleep(0.1)


def test_a_rank_lost_under_the_cli_shows_the_launch_logs_tail_once_and_one_error_line(world, faults, tmp_path):
    """`layermoe add-languages` in its own process, as a user runs it: the tail is the task's log, once; the
    task's and the flow's reports of the failure, and the error line, only name the launch log."""
    registry = fresh_registry(world, tmp_path)
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(round_plan(world, registry, tmp_path / "work", TWO_PROCESSES).model_dump(mode="json")))
    env = {
        **os.environ,
        "LAYERMOE_TEST_FAULT": "kill:4",
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "LAYERMOE_LOG_DIR": str(tmp_path / "logs"),
    }
    env.pop("PREFECT_API_URL", None)
    argv = [sys.executable, "-m", "flows.cli", "add-languages", "--plan", str(plan_file)]
    cli = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=DEADLINE_S)

    (tmp_path / "stderr.txt").write_text(cli.stderr)
    errors = [line for line in cli.stderr.splitlines() if line.startswith("layermoe: error: ")]
    ours = [line for line in cli.stderr.splitlines() if not line.startswith("  | ")]  # outside the quoted launch log
    assert cli.returncode == 2 and len(errors) == 1 and not [line for line in ours if "Traceback" in line], cli.stderr[-4000:]
    assert re.match(r"layermoe: error: the stage1 launch \(2 processes\) exited with code -?\d+; its log is \S+launch\.log\.", errors[0])
    quoted = [line for line in cli.stderr.splitlines() if line.startswith("  | ")]
    killed = next((line for line in quoted if "Signal 9" in line or "SIGKILL" in line), None)  # torchrun's report of the killed rank
    assert killed is not None and cli.stderr.count(killed) == 1, cli.stderr[-4000:]
    assert len(re.findall(r"the last \d+ lines of its log:", cli.stderr)) == 1
    assert list_versions(registry)["version"].tolist() == [1]


# -- FSDP2 -------------------------------------------------------------------------------------
def rank_lines(log: Path) -> list[tuple[int, int, str, int, int]]:
    """(rank, world size, strategy, held bytes, total bytes) of each rank's start-up line in a launch log."""
    return [
        (int(r), int(w), name, int(held.replace(",", "")), int(total.replace(",", "")))
        for r, w, name, held, total in RANK_LINE.findall(log.read_text())
    ]


@pytest.fixture(scope="module")
def bf16_rounds(world, tmp_path_factory):
    """A bf16 copy of the base, and one round from it launched as DDP and one as FSDP2 (frozen bf16, trainable fp32)."""
    root = tmp_path_factory.mktemp("bf16")
    _, _, base_dir = world
    save_model(load_model(base_dir, device="cpu").to(torch.bfloat16), load_tokenizer(base_dir), root / "base")
    (root / "fsdp2.yaml").write_text(yaml.safe_dump(FSDP2_CONFIG))
    fsdp = LauncherSettings(config_file=root / "fsdp2.yaml")
    rounds = {}
    for name, launcher in [("ddp", TWO_PROCESSES), ("fsdp", fsdp)]:
        registry = RegistrySettings(tracking_uri=f"sqlite:///{root}/{name}.db", registered_model_name="tiny")
        promote(registry, register_base(registry, root / "base", BASE_LANGUAGES).version)
        plan = round_plan(world, registry, root / name, launcher)
        summary = add_languages(plan)
        rounds[name] = (plan, summary, child_weights(registry, summary.version, root / f"{name}-child"))
    return root, fsdp, rounds


def test_fsdp2_shards_each_stage_over_two_cpu_ranks_and_its_child_matches_the_ddp_child(world, bf16_rounds):
    root, fsdp, rounds = bf16_rounds
    assert fsdp.strategy().name == "FSDP2 full shard"
    for name, expected in [("ddp", "DDP (replicated)"), ("fsdp", "FSDP2 full shard")]:
        plan, _, _ = rounds[name]
        for stage in ("stage1", "stage2"):
            lines = rank_lines(round_dir(plan, 1) / stage / "launch.log")
            assert sorted(line[:3] for line in lines) == [(0, 2, expected), (1, 2, expected)], (name, stage, lines)  # once per rank
            total = lines[0][4]
            for _, _, _, held, line_total in lines:
                assert line_total == total
                # DDP: each rank holds all; FSDP2: each rank about half (dimension sizes need not split evenly).
                assert held == total if name == "ddp" else abs(held - total / 2) <= 0.05 * total, (name, stage, held, total)
            checkpoint = round_dir(plan, 1) / stage / "checkpoint-3"
            # FSDP2 checkpoints are sharded (torch.distributed.checkpoint folders), DDP's are one model file.
            assert (checkpoint / "pytorch_model_fsdp_0").is_dir() == (name == "fsdp"), (name, stage)

    ddp_child, fsdp_child = rounds["ddp"][2], rounds["fsdp"][2]
    assert fsdp_child.keys() == ddp_child.keys()
    assert {t.dtype for t in fsdp_child.values()} == {torch.bfloat16}  # gathered and saved in the parent's dtype
    stage1 = Stage1Settings(**STAGE1)
    start = expand(
        load_model(root / "base", device="cpu"), [2, 1], BASE_LANGUAGES, ["el"], seed=stage1.seed, router_init=stage1.router_init
    )
    insert_classifiers(start, rounds["ddp"][1].classifier_layers, seed=Stage2Settings(**STAGE2).seed)
    start = start.state_dict()
    for name, tensor in ddp_child.items():
        if "routers" not in name and "new_experts" not in name:
            assert torch.equal(fsdp_child[name], tensor), name  # frozen: untouched by either
            continue
        update, fsdp_update = tensor.float() - start[name].float(), fsdp_child[name].float() - start[name].float()
        assert update.norm() > 0, name
        # bf16 saving rounds each update to the weight's bf16 grid; both children round the same fp32 masters.
        assert ((fsdp_update - update).norm() / update.norm()).item() <= MATCH_TOLERANCE, name


def test_a_rank_killed_mid_fsdp2_stage_fails_clearly_and_the_rerun_resumes_from_the_sharded_checkpoint(
    world, bf16_rounds, faults, tmp_path
):
    root, fsdp, rounds = bf16_rounds
    registry = RegistrySettings(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", registered_model_name="tiny")
    promote(registry, register_base(registry, root / "base", BASE_LANGUAGES).version)
    plan = round_plan(world, registry, tmp_path / "work", fsdp)
    stage1 = round_dir(plan, 1) / "stage1"

    faults.setenv("LAYERMOE_TEST_FAULT", "kill:4")
    with pytest.raises(LaunchError):
        add_languages(plan)
    assert (stage1 / "checkpoint-3" / "pytorch_model_fsdp_0").is_dir() and not (stage1 / "final").exists()
    assert list_versions(registry)["version"].tolist() == [1]

    faults.delenv("LAYERMOE_TEST_FAULT")
    summary = add_languages(plan)
    assert json.loads((stage1 / RESULT_NAME).read_text())["resumed_from"] == str(stage1 / "checkpoint-3")
    resumed = child_weights(registry, summary.version, tmp_path / "child")
    for name, tensor in rounds["fsdp"][2].items():
        assert torch.equal(resumed[name], tensor), name


def test_a_launch_that_cannot_run_as_configured_fails_before_training(tmp_path):
    config = tmp_path / "accelerate.yaml"
    config.write_text(yaml.safe_dump({**FSDP2_CONFIG, "fsdp_config": {"fsdp_version": 1}}))
    with pytest.raises(ValueError, match="layermoe runs FSDP2 only"):  # pydantic's wrapping of the LayerMoEError
        LauncherSettings(config_file=config)
    config.write_text(yaml.safe_dump({"distributed_type": "DEEPSPEED", "deepspeed_config": {"zero_stage": 2}, "num_processes": 2}))
    launcher = LauncherSettings(config_file=config)
    assert launcher.strategy().name == "DeepSpeed ZeRO-2"
    with pytest.raises(LayerMoEError, match="deepspeed is not installed|needs CUDA GPUs"):
        launcher.check_runnable()
