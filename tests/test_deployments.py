"""The deployments users run from the Prefect UI, against a real `prefect server start` on loopback.

`layermoe serve` serves its deployments from one process (Flow.serve hands each run to a new
process, which is where string annotations would break every scheduled run); `prefect.yaml`
is deployed with `prefect deploy --all` and run by the compose worker's command (`python -m flows.worker`,
which runs `prefect worker start --type process`).
Each run is triggered through the API, as the UI's "Run" button does, on a tiny round.
"""

import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from prefect import get_client
from prefect.client.schemas.actions import DeploymentUpdate
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    FlowRunFilterName,
    FlowRunFilterParentFlowRunId,
)
from prefect.client.schemas.objects import FlowRun, State
from prefect.client.schemas.responses import DeploymentResponse
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.flow_runs import resume_flow_run
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.cli import main
from flows.plan import LifelongPlan, ParentRef, RoundSpec
from layermoe_core.analysis.allocation import AllocationSettings
from layermoe_core.evaluation.gates import GateSettings, evaluate_gates
from layermoe_core.evaluation.metrics import EvalSettings
from layermoe_core.training.trainer import Stage1Settings, Stage2Settings, latest_checkpoint
from registry.listing import list_versions
from registry.register import register_base
from registry.settings import RegistrySettings
from registry.versions import promote, schedule_pause_note, show_version

from .conftest import save_with_tiny_tokenizer, tiny_model
from .synthetic_corpus import write_synthetic_corpus
from .test_flows import FAST, TOKENS

REPO_ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")
BASE_LANGUAGES = ["en", "es"]
DEADLINE_S = 600.0  # guards against a hung server or run, not a timing
# Long enough that a worker killed at Stage 1's first checkpoint is still training, however fast the machine
# (about 30 steps a second on an idle 2-core box); a rerun resumes and trains the rest.
KILLED_STAGE1_STEPS = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(home: Path, api_url: str | None = None) -> dict[str, str]:
    """A child process's environment: its own PREFECT_HOME, this repository importable, the test server's API."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    env.update(PREFECT_HOME=str(home), PYTHONPATH=str(REPO_ROOT), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


@contextmanager
def running(command: list[str], env: dict[str, str], log: Path, cwd: Path = REPO_ROOT) -> Iterator[subprocess.Popen]:
    """A background process in its own process group, stopped (and its children with it) on exit."""
    with log.open("w") as out:
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield process
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()


def wait_until(condition, what: str, process: subprocess.Popen, log: Path):
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{what}: the process exited with {process.returncode}:\n{log.read_text()[-5000:]}")
        result = condition()
        if result:
            return result
        time.sleep(1)
    pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-5000:]}")


@contextmanager
def prefect_server(home: Path) -> Iterator[str]:
    """A real Prefect server (API only, sqlite) on a free loopback port; its API URL is the current setting inside."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    # The scheduler looks for due schedules every 2 s (60 by default), so a short-interval schedule ticks on time.
    env = {**process_env(home), "PREFECT_UI_ENABLED": "false", "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2"}
    command = [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with running(command, env, home / "server.log") as server:

        def healthy() -> bool:
            try:
                return urllib.request.urlopen(f"{url}/health", timeout=5).status == 200
            except OSError:
                return False

        wait_until(healthy, "the Prefect server", server, home / "server.log")
        with temporary_settings({PREFECT_API_URL: url}):
            yield url


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory) -> Iterator[str]:
    """One Prefect server for this module's tests."""
    with prefect_server(tmp_path_factory.mktemp("prefect-server")) as url:
        yield url


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory) -> tuple[Path, dict]:
    """A tiny Qwen2 base (a local HF directory, registered by the first round) and five synthetic corpora."""
    root = tmp_path_factory.mktemp("deployments")
    base = save_with_tiny_tokenizer(tiny_model("qwen2"), root / "base")
    return base, write_synthetic_corpus(root / "corpus", [*BASE_LANGUAGES, "tr", "hu"], documents=400)


def tiny_plan(world: tuple[Path, dict], folder: Path, name: str, rounds: list[list[str]], **changes) -> LifelongPlan:
    """Rounds from the tiny base with gates that pass: the child's quality is not the point here."""
    base, corpora = world
    settings = dict(
        name=name,
        registry=RegistrySettings(tracking_uri=f"sqlite:///{folder}/mlflow.db", registered_model_name="tiny"),
        corpora=corpora,
        tokens=TOKENS,
        allocation=AllocationSettings(delta=2, clamp_similarity=1e-3),
        classifier_layer_count=1,
        stage1=Stage1Settings(**FAST),
        stage2=Stage2Settings(**{**FAST, "max_steps": None, "num_epochs": 1}),  # by epochs, as shipped plans
        evaluation=EvalSettings(batch_size=8, gates=GateSettings(max_old_loss_increase=10.0, require_new_improvement=False)),
        parent=ParentRef(hf_path=base, languages=BASE_LANGUAGES),
        rounds=[RoundSpec(new_languages=r) for r in rounds],
        workdir=folder / "work",
    )
    return LifelongPlan(**{**settings, **changes})


def read_deployment(name: str) -> DeploymentResponse | None:
    with get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(name)
        except ObjectNotFound:
            return None


def subflow_runs(run: FlowRun) -> list[FlowRun]:
    """The flow runs started inside `run`: a lifelong run's rounds."""
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])))


def read_flow_run(run_id) -> FlowRun:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id)


def wait_for_each(runs: dict[str, FlowRun], reached: Callable[[State], bool], what: str, server: subprocess.Popen, log: Path):
    """Each of `runs` ({language: flow run}) read again once its state has `reached` what the test waits for."""
    return {
        lang: wait_until(lambda run=run: reached((now := read_flow_run(run.id)).state) and now, f"round {lang} to {what}", server, log)
        for lang, run in runs.items()
    }


def artifacts_of(run: FlowRun) -> dict[str, object]:
    """The run's artifacts by key: what the Artifacts page lists for it."""
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    return {a.key: a.data for a in found if a.key}


def assert_round_registered(plan: LifelongPlan) -> None:
    versions = list_versions(plan.registry)
    assert versions["version"].tolist() == [1, 2] and versions["parent"].tolist()[1] == 1
    child = show_version(plan.registry, "champion")
    assert child["version"] == 2 and child["new_languages"] == plan.rounds[0].new_languages


def test_layermoe_serve_serves_every_story_and_a_triggered_lifelong_run_completes(prefect_api, tiny_world, tmp_path):
    plan = tiny_plan(tiny_world, tmp_path, "served", [["hu"]])
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(plan.model_dump(mode="json")))
    serve = [sys.executable, "-m", "flows.cli", "serve", "--plan", str(plan_file), "--cron", "0 3 * * 0"]
    stories = ["add-languages/served", "compare/served", "lifelong-expansion/served"]
    with running(serve, process_env(tmp_path / "serve-home", prefect_api), tmp_path / "serve.log") as server:
        wait_until(lambda: all(read_deployment(name) for name in stories), "the served deployments", server, tmp_path / "serve.log")
        add, comparison, lifelong = (read_deployment(name) for name in stories)
        assert [s.schedule.cron for s in lifelong.schedules] == ["0 3 * * 0"] and add.schedules == comparison.schedules == []
        assert add.parameters["plan"]["new_languages"] == comparison.parameters["plan"]["new_languages"] == ["hu"]
        assert lifelong.parameters == {"plan": str(plan_file.resolve())}  # each tick reads the file anew
        # corpora are a JSON editor in the form: each lists what the plan sets, not every default
        assert add.parameters["plan"]["corpora"]["hu"] == {"path": str(plan.corpora["hu"].path)}

        flow_run = run_deployment("lifelong-expansion/served", timeout=DEADLINE_S)
    log = (tmp_path / "serve.log").read_text()
    assert flow_run.state.is_completed(), f"{flow_run.state}\n{log[-8000:]}"
    assert_round_registered(plan)

    # A run a person can follow: named by round and languages, artifacts keyed by round, progress to the end.
    assert re.fullmatch(r"served-r1-hu-\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d", flow_run.name)
    (round_run,) = subflow_runs(flow_run)
    assert round_run.name == "round-1-hu"
    artifacts = artifacts_of(round_run)
    expected = {"round-1-hu-similarity", "round-1-hu-allocation", "round-1-hu-routing", "round-1-hu-evaluation", "round-1-hu-gate"}
    assert expected <= set(artifacts)
    assert float(artifacts["round-1-hu-stage1-progress"]) == 100.0
    assert float(artifacts["round-1-hu-stage2-progress"]) == 100.0  # Stage 2 trains by epochs: no max_steps


def compose_service(name: str) -> dict:
    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"][name]


def compose_worker_command() -> list[str]:
    """The compose worker's command (`python -m flows.worker ...`), with this interpreter."""
    return [sys.executable if word == "python" else word for word in compose_service("worker")["command"]]


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL to a process and every process under it at once, as a container stop past its grace period does."""
    import psutil

    tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    for member in tree:
        member.kill()
    process.wait()


@pytest.fixture
def own_prefect_api(tmp_path) -> Iterator[str]:
    """A Prefect server of the test's own: the compose set-up's crash automation stays out of the module's server."""
    with prefect_server(tmp_path / "prefect-server") as url:
        yield url


def test_prefect_yaml_deploys_on_the_default_stack_and_a_killed_workers_run_ends_crashed_and_resumes(own_prefect_api, tiny_world, tmp_path):
    prefect_api = own_prefect_api
    # A Stage 1 long enough to kill mid-way, with a checkpoint every 5 steps.
    plan = tiny_plan(
        tiny_world, tmp_path, "on-worker", [["tr"]], stage1=Stage1Settings(**{**FAST, "max_steps": KILLED_STAGE1_STEPS, "save_steps": 5})
    )
    plan_file = write_plan(plan, tmp_path / "on-worker.yaml")
    env = process_env(tmp_path / "deploy-home", prefect_api)
    # What `docker compose up -d` runs before anyone deploys: prefect-setup's pools and crash automation.
    setup = compose_service("prefect-setup")["command"]
    assert setup[1] == "/opt/layermoe/setup_server.py"
    silence_s = 45  # the automation's window; the compose stack keeps its default of 90 s
    deploy_prefect_yaml({**env, "LAYERMOE_CRASH_AFTER_SILENT_S": str(silence_s)})
    for flow_name in ("add-languages", "compare", "lifelong-expansion"):
        assert read_deployment(f"{flow_name}/cpu") and read_deployment(f"{flow_name}/gpu")
    assert read_deployment("lifelong-expansion/cpu").parameters == {"plan": "/inputs/lifelong.yaml"}

    # The compose worker's own command and environment, started from an unrelated folder.
    worker_command = compose_worker_command()
    worker_env = {
        **process_env(tmp_path / "worker-home", prefect_api),
        **{key: value for key, value in compose_service("worker")["environment"].items() if key.startswith(("LAYERMOE_", "PREFECT_FLOWS"))},
        "LAYERMOE_WORKDIR": str(tmp_path / "data-work"),
    }
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    log = tmp_path / "worker.log"
    with running(worker_command, worker_env, log, cwd=elsewhere) as worker:
        started = run_deployment("lifelong-expansion/cpu", parameters={"plan": str(plan_file)}, timeout=0)
        checkpoints = plan.workdir / "on-worker-round-1-parent-v1-*" / "stage1" / "checkpoint-*" / "trainer_state.json"
        wait_until(lambda: glob.glob(str(checkpoints)), "a complete Stage-1 checkpoint", worker, log)
        kill_tree(worker)
    killed_at = time.monotonic()
    crashed = wait_until_state(started.id, "Crashed", deadline_s=silence_s * 4)
    assert "no heartbeat" in crashed.state.message
    seconds_to_crashed = time.monotonic() - killed_at
    assert list_versions(plan.registry)["version"].tolist() == [1], "the killed run registered nothing"

    # A re-trigger on a new worker resumes Stage 1 from its checkpoint and registers the round once.
    with running(worker_command, worker_env, tmp_path / "worker-2.log", cwd=elsewhere):
        again = run_deployment("lifelong-expansion/cpu", parameters={"plan": str(plan_file)}, timeout=DEADLINE_S)
    second_log = (tmp_path / "worker-2.log").read_text()
    assert again.state.is_completed(), f"{again.state}\n{second_log[-8000:]}"
    assert "stage1 resumed from" in second_log and "/stage1/checkpoint-" in second_log
    assert_round_registered(plan)
    (tmp_path / "crash.json").write_text(json.dumps({"seconds_to_crashed": seconds_to_crashed}))


def deploy_prefect_yaml(env: dict[str, str]) -> None:
    """What `docker compose up -d` sets up (prefect-setup's pools), then `prefect deploy --all` from the repository root."""
    subprocess.run([sys.executable, str(REPO_ROOT / "docker/prefect/setup_server.py")], env=env, check=True, capture_output=True)
    deploy = subprocess.run(
        [PREFECT, "--no-prompt", "deploy", "--all"], check=False, env=env, cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr


def test_a_schedule_made_on_a_deployed_add_languages_runs_its_plan_file_once_then_has_nothing_to_do(own_prefect_api, tiny_world, tmp_path):
    """A schedule created with `prefect deployment schedule create`, whose runs carry no parameters of their own."""
    base, corpora = tiny_world
    registry = RegistrySettings(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", registered_model_name="tiny")
    promote(registry, register_base(registry, base, BASE_LANGUAGES).version)
    lifelong = tiny_plan(tiny_world, tmp_path, "scheduled", [["tr"]])
    one_round = lifelong.round_plan(0, [], ParentRef(alias="champion")).model_dump(mode="json", exclude={"old_languages"})
    plan_file = tmp_path / "add-languages.yaml"
    plan_file.write_text(yaml.safe_dump(one_round, sort_keys=False))
    env = process_env(tmp_path / "deploy-home", own_prefect_api)
    deploy_prefect_yaml(env)
    for name in ("add-languages/cpu", "add-languages/gpu", "compare/cpu", "compare/gpu"):
        assert read_deployment(name).parameters == {"plan": "/inputs/add-languages.yaml"}, name
    # The UI's Run button draws `plan` from the deployment's schema: the plan's fields, or a plan file's path,
    # which holds the default; the server holds the parameters to that schema.
    deployed = read_deployment("add-languages/cpu")
    plan_variants = deployed.parameter_openapi_schema["properties"]["plan"]["anyOf"]
    assert [variant.get("$ref") or variant["type"] for variant in plan_variants] == ["#/definitions/ExpansionPlan", "string"]
    assert plan_variants[1]["title"] == "Plan file" and deployed.enforce_parameter_schema
    # The default names the plan file inside the worker (/inputs); here the file is elsewhere, so the default
    # is set to it, as a person edits a deployment's default parameters in the UI.
    deployment = read_deployment("add-languages/cpu")
    with get_client(sync_client=True) as client:
        client.update_deployment(deployment.id, DeploymentUpdate(parameters={"plan": str(plan_file)}))
    schedule = [PREFECT, "deployment", "schedule", "create", "add-languages/cpu", "--interval", str(SCHEDULE_INTERVAL_S)]
    subprocess.run(schedule, env=env, check=True, capture_output=True)

    worker_command = compose_worker_command()
    worker_env = {**process_env(tmp_path / "worker-home", own_prefect_api), "PREFECT_WORKER_QUERY_SECONDS": "2"}
    log = tmp_path / "worker.log"

    def finished_runs() -> list[FlowRun]:
        return [run for run in deployment_runs("add-languages/cpu") if run.state.is_final()]

    with running(worker_command, worker_env, log, cwd=tmp_path) as worker:
        wait_until(lambda: any("nothing to do" in (run.state.message or "") for run in finished_runs()), "an idle run", worker, log)
        done = finished_runs()
    (made,) = read_deployment("add-languages/cpu").schedules
    assert made.parameters == {}, "the schedule adds no parameters: its runs take the deployment's default plan"
    assert {json.dumps(run.parameters) for run in deployment_runs("add-languages/cpu")} == {json.dumps({"plan": str(plan_file)})}
    assert [run.state.name for run in done] == ["Completed"] * len(done), [(run.name, run.state.message) for run in done]
    assert done[0].name == "round-1-tr" and done[-1].state.message == "nothing to do: version 2 already has tr"
    versions = list_versions(registry)
    assert versions["version"].tolist() == [1, 2] and show_version(registry, "champion")["new_languages"] == ["tr"]


def test_a_sigterm_to_the_worker_stops_training_at_a_fresh_checkpoint_the_run_fails_and_a_retrigger_resumes_from_it(
    own_prefect_api, tiny_world, tmp_path
):
    """What `docker compose stop` sends the worker first (SIGTERM; SIGKILL after stop_grace_period), mid-Stage 1: the
    compose command (`flows.worker`) passes SIGTERM to its flow run's process first and stops the Prefect worker once
    it has ended; training saves a checkpoint at its next step and stops there, so the run ends Failed with one line."""
    save_steps = KILLED_STAGE1_STEPS // 2  # one periodic checkpoint before the signal, none between it and the stop
    stage1_settings = Stage1Settings(**{**FAST, "max_steps": KILLED_STAGE1_STEPS, "save_steps": save_steps})
    plan = tiny_plan(tiny_world, tmp_path, "stopped", [["tr"]], stage1=stage1_settings)
    plan_file = write_plan(plan, tmp_path / "stopped.yaml")
    deploy_prefect_yaml(process_env(tmp_path / "deploy-home", own_prefect_api))
    worker_command = compose_worker_command()
    worker_env = {**process_env(tmp_path / "worker-home", own_prefect_api), "LAYERMOE_WORKDIR": str(tmp_path / "data-work")}
    log = tmp_path / "worker.log"
    stage1 = plan.workdir / "stopped-round-1-parent-v1-*" / "stage1"
    with running(worker_command, worker_env, log, cwd=tmp_path) as worker:
        started = run_deployment("lifelong-expansion/cpu", parameters={"plan": str(plan_file)}, timeout=0)
        periodic = wait_until(
            lambda: glob.glob(str(stage1 / f"checkpoint-{save_steps}" / "trainer_state.json")),
            f"Stage 1's checkpoint-{save_steps}",
            worker,
            log,
        )
        os.kill(worker.pid, signal.SIGTERM)
        signalled_at = time.time()
        worker.wait(timeout=DEADLINE_S)
        worker_exited_s = time.time() - signalled_at
    assert "layermoe worker: SIGTERM to 1 flow run(s) first" in log.read_text()
    stage1_dir = Path(periodic[0]).parents[1]
    at_stop = latest_checkpoint(stage1_dir)
    assert at_stop is not None and save_steps < int(at_stop.name.split("-")[1]) < KILLED_STAGE1_STEPS, at_stop
    assert not (stage1_dir / "final").exists()
    stopped = read_flow_run(started.id)  # final already: the worker waited for its flow run's process
    assert stopped.state.name == "Failed", stopped.state
    assert stopped.state.message == f"layermoe: error: training stopped by SIGTERM at {at_stop}; rerun to resume from it"
    assert list_versions(plan.registry)["version"].tolist() == [1], "the stopped run registered nothing"
    checkpoint_saved_s = (at_stop / "trainer_state.json").stat().st_mtime - signalled_at

    with running(worker_command, worker_env, tmp_path / "worker-2.log", cwd=tmp_path):
        again = run_deployment("lifelong-expansion/cpu", parameters={"plan": str(plan_file)}, timeout=DEADLINE_S)
    second_log = (tmp_path / "worker-2.log").read_text()
    assert again.state.is_completed(), f"{again.state}\n{second_log[-8000:]}"
    assert f"stage1 resumed from {at_stop}" in second_log
    assert_round_registered(plan)
    measured = {"checkpoint_saved_s": checkpoint_saved_s, "worker_exited_s": worker_exited_s, "stopped_at": at_stop.name}
    (tmp_path / "sigterm.json").write_text(json.dumps(measured))


def wait_until_state(run_id, state_name: str, deadline_s: float) -> FlowRun:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        run = read_flow_run(run_id)
        if run.state.name == state_name:
            return run
        time.sleep(2)
    pytest.fail(f"flow run {run_id} is {read_flow_run(run_id).state.name}, not {state_name}, after {deadline_s} s")


def test_manual_promotion_pauses_for_review_and_the_answer_moves_or_keeps_the_alias(prefect_api, tiny_world, tmp_path):
    base, _ = tiny_world
    plan = tiny_plan(tiny_world, tmp_path, "reviewed", [["hu"]], promotion="manual", parent=ParentRef(version=1))
    promote(plan.registry, register_base(plan.registry, base, BASE_LANGUAGES).version)
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(plan.model_dump(mode="json")))
    serve = [sys.executable, "-m", "flows.cli", "serve", "--plan", str(plan_file)]
    with running(serve, process_env(tmp_path / "serve-home", prefect_api), tmp_path / "serve.log") as server:
        wait_until(lambda: read_deployment("add-languages/reviewed"), "the served deployments", server, tmp_path / "serve.log")
        defaults = read_deployment("add-languages/reviewed").parameters["plan"]
        runs = {
            lang: run_deployment("add-languages/reviewed", parameters={"plan": {**defaults, "new_languages": [lang]}}, timeout=0)
            for lang in ("hu", "tr")
        }
        paused = wait_for_each(runs, lambda state: state.is_paused(), "pause for review", server, tmp_path / "serve.log")
        assert {lang: run.name for lang, run in paused.items()} == {"hu": "round-1-hu", "tr": "round-1-tr"}
        for run in paused.values():
            artifacts = artifacts_of(run)
            assert "awaiting a reviewer" in artifacts[f"{run.name}-gate"] and artifacts[f"{run.name}-comparison"]
        assert show_version(plan.registry, "champion")["version"] == 1  # nothing moves while the reviewers think
        for waiting in (show_version(plan.registry, v) for v in (2, 3)):
            assert waiting["verdict"] == "pending"
            assert "**Gate verdict: PENDING** (awaiting a reviewer; the automatic gate passes it)" in waiting["description"]

        # The Resume form's answer is checked by the server against the form's schema, as the UI submits it.
        answers = ({"reason": "fine"}, {"decision": "reject"}, {"decision": "reject", "reason": "  "}, {"decision": "approve", "reason": 1})
        for unanswerable in ({}, *({"decision": answer} for answer in answers)):
            with pytest.raises(RuntimeError, match="Cannot resume this run"):
                resume_flow_run(runs["tr"].id, run_input=unanswerable)
        assert read_flow_run(runs["tr"].id).state.is_paused()
        assert main(["approve", str(runs["tr"].id), "--no"]) == 2  # the CLI refuses a reasonless rejection too
        assert main(["approve", str(runs["hu"].id), "--yes", "--override-gate", "--reason", "x"]) == 2  # it passed the gate
        assert main(["approve", str(runs["hu"].id), "--yes", "--reason", "hu reads well"]) == 0
        assert main(["approve", str(runs["tr"].id), "--no", "--reason", "en drifted too far"]) == 0
        done = wait_for_each(runs, lambda state: state.is_final(), "finish", server, tmp_path / "serve.log")
    log = (tmp_path / "serve.log").read_text()
    assert all(run.state.is_completed() for run in done.values()), f"{[r.state for r in done.values()]}\n{log[-8000:]}"
    # The reviewer's answer is written as the automatic gate writes its own: the verdict tag, the card, the reason.
    champion = show_version(plan.registry, "champion")
    assert champion["new_languages"] == ["hu"] and champion["verdict"] == "passed"
    assert champion["verdict_reason"].startswith("reviewer: hu reads well; automatic gate: passes: ")
    assert champion["description"].startswith("Round 1 +hu · APPROVED by reviewer")
    assert "**Gate verdict: PASSED** (approved by a reviewer)\n\n- reviewer: hu reads well\n" in champion["description"]
    assert "PENDING" not in champion["description"] and "### Held-out metrics per language" in champion["description"]
    versions = list_versions(plan.registry)
    assert versions.set_index("version")["verdict"].to_dict() == {
        1: "base",
        champion["version"]: "passed",
        5 - champion["version"]: "rejected",
    }
    rejected = show_version(plan.registry, 5 - champion["version"])
    assert rejected["new_languages"] == ["tr"] and rejected["aliases"] == []
    assert rejected["verdict"] == "rejected" and rejected["description"].startswith("Round 1 +tr · REJECTED by reviewer")
    assert rejected["verdict_reason"].startswith("reviewer: en drifted too far; automatic gate: passes: ")
    assert "**Gate verdict: REJECTED** (by a reviewer)\n\n- reviewer: en drifted too far\n" in rejected["description"]
    assert not rejected["gate_overridden"] and len(rejected["tags"]) <= 6
    # the registered model's own description, markdown in the UI, names the model in its load example
    assert "models:/tiny@champion" in MlflowClient(plan.registry.tracking_uri).get_registered_model("tiny").description


REVIEWED_RUN = "review-over-a-failed-gate"
FAILED_GATE = [  # en's loss rose 0.1 nats, over the default gate's 0.05
    {"language": "en", "group": "old", "metric": "loss", "parent": 2.0, "child": 2.1, "delta": 0.1},
    {"language": "es", "group": "old", "metric": "loss", "parent": 2.0, "child": 2.01, "delta": 0.01},
    {"language": "hu", "group": "new", "metric": "loss", "parent": 3.0, "child": 2.5, "delta": -0.5},
]


def review_a_failed_gate(tracking_uri: str) -> None:
    """Run in a child process: version 2 paused for review, with a comparison the automatic gate fails."""
    import pandas as pd
    from prefect import flow

    from flows.approval import review_promotion

    @flow(name="review", flow_run_name=REVIEWED_RUN)
    def review() -> bool:
        registry = RegistrySettings(tracking_uri=tracking_uri, registered_model_name="tiny")
        comparison = pd.DataFrame(FAILED_GATE)
        return review_promotion(registry, 2, 1, comparison, evaluate_gates(comparison, GateSettings()), "champion")

    review()


def test_approving_a_version_that_failed_the_gate_needs_override_gate_which_is_recorded(prefect_api, tiny_world, tmp_path, capsys):
    registry = RegistrySettings(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", registered_model_name="tiny")
    promote(registry, register_base(registry, tiny_world[0], BASE_LANGUAGES).version)
    register_base(registry, tiny_world[0], BASE_LANGUAGES)  # version 2 stands for the round's child
    code = f"from tests.test_deployments import review_a_failed_gate; review_a_failed_gate({registry.tracking_uri!r})"
    child = [sys.executable, "-c", code]
    log = tmp_path / "review.log"
    with running(child, process_env(tmp_path / "review-home", prefect_api), log) as reviewed:

        def paused_run() -> FlowRun | None:
            with get_client(sync_client=True) as client:
                runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[REVIEWED_RUN])))
            return next((run for run in runs if run.state and run.state.is_paused()), None)

        run = wait_until(paused_run, "the review to pause", reviewed, log)
        # The form for a failed gate: approving is "Approve, overriding the gate", rejecting needs a reason; the server
        # refuses otherwise.
        answers = ({"decision": "approve"}, {"decision": "approve", "override_gate": False}, {"decision": "reject"})
        for unanswerable in ({"decision": answer} for answer in answers):
            with pytest.raises(RuntimeError, match="Cannot resume this run"):
                resume_flow_run(run.id, run_input=unanswerable)

        assert main(["approve", str(run.id), "--yes", "--reason", "en drift is noise"]) == 2
        refused = capsys.readouterr()
        assert "needs the gate override" in refused.err and "--override-gate" in refused.err
        # the brief came first: the verdict, and each language once with what the gate says of it
        assert "Version 2 of tiny fails the automatic gate" in refused.out
        assert refused.out.count("exceeds the allowed increase of 0.0500 nats") == 1 and refused.out.count(" hu ") == 1
        assert show_version(registry, "champion")["version"] == 1 and read_flow_run(run.id).state.is_paused()

        assert main(["approve", str(run.id), "--yes", "--override-gate", "--reason", "en drift is noise"]) == 0
        assert "approved over the failed automatic gate" in capsys.readouterr().out
        assert reviewed.wait(timeout=DEADLINE_S) == 0, log.read_text()[-4000:]
    approved = show_version(registry, "champion")
    assert approved["version"] == 2 and approved["gate_overridden"] is True
    assert approved["verdict"] == "passed"
    assert approved["verdict_reason"].startswith(
        "reviewer: en drift is noise (overrode the automatic gate); automatic gate: fails: old language en: loss 2.0000 -> 2.1000"
    )


def test_approve_refuses_a_run_that_is_not_paused_for_review(prefect_api, capsys):
    assert main(["approve", "00000000-0000-0000-0000-000000000000", "--yes"]) == 2
    assert "does not exist" in capsys.readouterr().err


def deployment_runs(name: str) -> list[FlowRun]:
    """Every flow run of the deployment `name`, in the order they were due."""
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(name)
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[deployment.id])))
    return sorted(runs, key=lambda run: run.expected_start_time)


def completed_tick(deployment: str, name_part: str, after: FlowRun | None = None) -> FlowRun | None:
    """The first completed tick whose name holds `name_part` (and that started after `after` ended)."""
    return next(
        (
            run
            for run in deployment_runs(deployment)
            if name_part in run.name and run.state.is_completed() and (after is None or run.start_time > after.end_time)
        ),
        None,
    )


def write_plan(plan: LifelongPlan, path: Path) -> Path:
    path.write_text(yaml.safe_dump(plan.model_dump(mode="json"), sort_keys=False))
    return path


def tick_table(deployment: str, plan: LifelongPlan) -> list[dict]:
    """Tick, state, round, languages, version and seconds of every run of the schedule: what docs/scheduling.md shows."""
    versions = {v["new_languages"]: v["version"] for v in list_versions(plan.registry).to_dict(orient="records")}
    rows = []
    for number, run in enumerate(deployment_runs(deployment), start=1):
        did = re.search(r"-r(\d+)-(.+)-\d{4}-\d\d-\d\dT", run.name)
        languages = did.group(2).replace("-", ",") if did else ""
        rows.append(
            {
                "tick": number,
                "name": run.name,
                "state": run.state.name,
                "round": int(did.group(1)) if did else None,
                "version": versions.get(languages) if did else None,
                "seconds": (run.end_time - run.start_time).total_seconds() if run.start_time and run.end_time else None,
            }
        )
    return rows


SCHEDULE_INTERVAL_S = 10  # shorter than a tiny round, so ticks fall due while a round trains


@contextmanager
def served_schedule(plan_file: Path, prefect_api: str, tmp_path: Path) -> Iterator[subprocess.Popen]:
    """`layermoe serve --plan plan_file --interval SCHEDULE_INTERVAL_S`, once its lifelong deployment exists; log: serve.log."""
    serve = [sys.executable, "-m", "flows.cli", "serve", "--plan", str(plan_file), "--interval", str(SCHEDULE_INTERVAL_S)]
    env = {**process_env(tmp_path / "serve-home", prefect_api), "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    deployment = f"lifelong-expansion/{yaml.safe_load(plan_file.read_text())['name']}"
    with running(serve, env, tmp_path / "serve.log") as server:
        wait_until(lambda: read_deployment(deployment), "the served deployment", server, tmp_path / "serve.log")
        yield server


def test_a_served_schedule_runs_the_next_pending_round_at_each_tick_and_takes_a_round_appended_to_the_plan(
    prefect_api, tiny_world, tmp_path
):
    base, _ = tiny_world
    corpora = write_synthetic_corpus(tmp_path / "corpus", [*BASE_LANGUAGES, "tr", "hu", "it"], documents=400)
    plan = tiny_plan((base, corpora), tmp_path, "ticks", [["hu"], ["tr"]])
    plan_file = write_plan(plan, tmp_path / "ticks.yaml")
    deployment, log = "lifelong-expansion/ticks", tmp_path / "serve.log"
    with served_schedule(plan_file, prefect_api, tmp_path) as server:
        assert read_deployment(deployment).parameters == {"plan": str(plan_file.resolve())}
        limit = read_deployment(deployment)
        assert limit.global_concurrency_limit.limit == 1 and limit.concurrency_options.collision_strategy == "CANCEL_NEW"

        first = wait_until(lambda: completed_tick(deployment, "ticks-r1-hu-"), "round 1's tick", server, log)
        second = wait_until(lambda: completed_tick(deployment, "ticks-r2-tr-"), "round 2's tick", server, log)
        idle = wait_until(lambda: completed_tick(deployment, "ticks-idle-"), "a tick with nothing to do", server, log)
        # A person appends a round to the plan file; the schedule keeps running, and the next tick takes it.
        write_plan(plan.model_copy(update={"rounds": [*plan.rounds, RoundSpec(new_languages=["it"])]}), plan_file)
        third = wait_until(lambda: completed_tick(deployment, "ticks-r3-it-"), "the appended round's tick", server, log)

    versions = list_versions(plan.registry)
    assert versions["version"].tolist() == [1, 2, 3, 4] and versions["parent"].tolist()[1:] == [1, 2, 3]
    assert versions["new_languages"].tolist() == ["", "hu", "tr", "it"]
    assert show_version(plan.registry, "champion")["version"] == 4
    assert first.start_time < second.start_time < idle.start_time < third.start_time
    assert "nothing to do: version 3 already has every language of the plan" in artifacts_of(idle)[f"{idle.name.lower()}-tick"]

    runs = deployment_runs(deployment)
    assert len({run.name for run in runs}) == len(runs), "every tick has a name of its own"
    finished = [run for run in runs if run.state.is_final()]
    assert {run.state.name for run in finished} <= {"Completed", "Cancelled"}, [(r.name, r.state.name) for r in finished]
    # No overlap: ticks that fell due while a round trained were cancelled, and the ticks that ran never overlapped.
    assert any(run.state.name == "Cancelled" for run in finished)
    ran = sorted((run for run in finished if run.state.is_completed()), key=lambda run: run.start_time)
    overlaps = [(a.name, str(a.end_time), b.name, str(b.start_time)) for a, b in zip(ran, ran[1:]) if a.end_time > b.start_time]
    assert not overlaps
    (tmp_path / "ticks.json").write_text(json.dumps(tick_table(deployment, plan), default=str, indent=1))


def test_a_rejected_round_pauses_its_schedule_until_a_person_changes_the_plan_and_resumes_it(prefect_api, tiny_world, tmp_path, capsys):
    plan = tiny_plan(tiny_world, tmp_path, "rejects", [["hu"]], promotion="manual")
    plan_file = write_plan(plan, tmp_path / "rejects.yaml")
    deployment, log = "lifelong-expansion/rejects", tmp_path / "serve.log"
    with served_schedule(plan_file, prefect_api, tmp_path) as server:
        # The round pauses for review; the reviewer rejects it.
        review = wait_until(
            lambda: next((run for tick in deployment_runs(deployment) for run in subflow_runs(tick) if run.state.is_paused()), None),
            "the round to pause for review",
            server,
            log,
        )
        assert main(["approve", str(review.id), "--no", "--reason", "hu reads badly"]) == 0
        rejected = wait_until(lambda: completed_tick(deployment, "rejects-r1-hu-"), "the rejected round's tick", server, log)
        assert read_deployment(deployment).paused
        note = schedule_pause_note(plan.registry)
        assert note and "round 1 of the plan (hu) was rejected as version 2" in note and "lifelong-expansion/rejects is paused" in note
        assert main(["registry", "list", "--tracking-uri", plan.registry.tracking_uri, "--model-name", "tiny"]) == 0
        assert "lifelong schedule paused: " in capsys.readouterr().out
        assert show_version(plan.registry, 2)["verdict"] == "rejected"

        # While paused, no tick trains: ticks already due when the pause came end at once, named `...-paused-...`.
        time.sleep(3 * SCHEDULE_INTERVAL_S)
        later = [run for run in deployment_runs(deployment) if run.start_time and run.start_time > rejected.end_time]
        assert all(run.state.is_cancelled() or "-paused-" in run.name for run in later), [(r.name, r.state.name) for r in later]
        assert list_versions(plan.registry)["version"].tolist() == [1, 2]

        # The person changes the plan (here: the gate decides, no review) and resumes the schedule: the next tick runs the round again.
        write_plan(plan.model_copy(update={"promotion": "auto"}), plan_file)
        with get_client(sync_client=True) as client:
            client.resume_deployment(read_deployment(deployment).id)
        promoted = wait_until(lambda: completed_tick(deployment, "rejects-r1-hu-", after=rejected), "the resumed round's tick", server, log)
    assert promoted.start_time > rejected.end_time
    assert show_version(plan.registry, "champion")["version"] == 3 and show_version(plan.registry, 3)["parent_version"] == 1
    assert schedule_pause_note(plan.registry) is None
