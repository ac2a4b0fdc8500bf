"""Reliability of an add-languages round: a real MLflow server, a killed run, two runs at once,
a registry outage at registration and bad inputs. Tiny model, synthetic corpus, as in test_flows.

Every round here adds "el" to the same tiny base with the same seeds, so each child must equal
the child of one uninterrupted reference round, bit for bit, however it was interrupted.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
import yaml
from mlflow import MlflowClient
from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
from prefect.serializers import PickleSerializer
from prefect.settings import PREFECT_API_URL, get_current_settings
from pydantic import ValidationError
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

import tasks.analysis
import tasks.evaluation
import tasks.parent
from flows.add_languages import add_languages, round_dir
from flows.bootstrap_base import BootstrapPlan, bootstrap_base
from flows.plan import ExpansionPlan, ParentRef, load_plan
from flows.worker import WORKER_EXIT_S
from layermoe_core.data.corpus import CorpusSpec
from layermoe_core.errors import LayerMoEError
from layermoe_core.model.checkpoints import load_model, load_tokenizer
from layermoe_core.training import trainer
from layermoe_core.training.trainer import TrainSettings
from registry.download import cached_version, download_version
from registry.listing import list_versions
from registry.manifest import verify_model_dir
from registry.register import register_base
from registry.settings import RegistrySettings
from registry.versions import promote, show_version
from tasks.parent import resolve_parent

from .services import MlflowServer, running_mlflow_server
from .test_flows import FAST, FAST_ROUND, bootstrap_tiny_base

pytestmark = pytest.mark.usefixtures("prefect_backend")  # one ephemeral Prefect server per module (conftest)

REPO_ROOT = Path(__file__).resolve().parents[1]
BASE_LANGUAGES = ["en", "zh"]
FIRST_CHECKPOINT = f"checkpoint-{FAST['save_steps']}"
PROCESS_DEADLINE_S = 300.0  # a guard against a hung child process, not a timing

# A round in its own process. At Stage 1's first checkpoint it SIGKILLs itself ("die"), sends itself
# SIGTERM and trains on ("sigterm"), or holds there, inside the round, until the file `go` exists ("hold").
ROUND_PROCESS = """
import os, signal, sys, time
from pathlib import Path
from transformers import TrainerCallback
from flows.add_languages import add_languages
from flows.plan import ExpansionPlan
from layermoe_core.training import trainer

plan_json, at_first_checkpoint, go = sys.argv[1:]

class AtCheckpoint(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step != args.save_steps:
            return
        if at_first_checkpoint == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        if at_first_checkpoint == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
            return
        while not Path(go).exists():
            time.sleep(0.05)

train_stage1 = trainer.train_stage1
def train_stage1_with_hook(*args, **kwargs):
    *head, callbacks = args
    return train_stage1(*head, [*callbacks, AtCheckpoint()], **kwargs)
trainer.train_stage1 = train_stage1_with_hook
add_languages(ExpansionPlan.model_validate_json(plan_json))
"""


@dataclass(frozen=True)
class World:
    root: Path
    corpora: dict[str, CorpusSpec]
    registry: RegistrySettings  # sqlite, base = version 1 = champion
    bootstrap: BootstrapPlan
    base_dir: Path  # the trained base's save_pretrained folder


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("reliability")
    bootstrap = bootstrap_tiny_base(root, BASE_LANGUAGES, TrainSettings(**FAST))
    return World(root, bootstrap.corpora, bootstrap.registry, bootstrap, root / "work" / "base" / "train" / "final")


def round_plan(world: World, registry: RegistrySettings, workdir: Path, **changes) -> ExpansionPlan:
    """Add "el" to version 1, with gates that pass (the tiny child's quality is not the point here)."""
    settings = dict(
        name="reliability",
        registry=registry,
        corpora=world.corpora,
        **FAST_ROUND,
        parent=ParentRef(version=1),
        new_languages=["el"],
        workdir=workdir,
    )
    return ExpansionPlan(**{**settings, **changes})


def registry_with_base(world: World, tracking_uri: str) -> RegistrySettings:
    """A registry of its own whose version 1 (champion) is the tiny base."""
    registry = RegistrySettings(tracking_uri=tracking_uri, registered_model_name="tiny")
    promote(registry, register_base(registry, world.base_dir, BASE_LANGUAGES).version)
    return registry


def sqlite_registry_settings(folder: Path) -> RegistrySettings:
    return RegistrySettings(tracking_uri=f"sqlite:///{folder}/mlflow.db", registered_model_name="tiny")


def sqlite_registry(world: World, folder: Path) -> RegistrySettings:
    return registry_with_base(world, f"sqlite:///{folder}/mlflow.db")


def child_weights(registry: RegistrySettings, version: int, dest: Path) -> dict[str, torch.Tensor]:
    """The registered child's weights, downloaded and verified against its manifest."""
    return load_file(download_version(registry, version, dest).path / "model.safetensors")


def assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


@pytest.fixture(scope="module")
def reference_child(world, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The child of an uninterrupted round, alone on its own registry."""
    folder = tmp_path_factory.mktemp("reference")
    registry = sqlite_registry(world, folder)
    summary = add_languages(round_plan(world, registry, folder / "work"))
    return child_weights(registry, summary.version, folder / "child")


def forbid(monkeypatch, module, name: str) -> None:
    """Make a step's library call fail: if the step runs instead of coming from Prefect's cache, the test fails."""

    def ran_again(*args, **kwargs):
        raise AssertionError(f"{module.__name__}.{name} ran again; the step should have come from Prefect's cache")

    monkeypatch.setattr(module, name, ran_again)


def forbid_recomputing_finished_steps(monkeypatch) -> None:
    forbid(monkeypatch, tasks.analysis, "sample_token_rows")
    forbid(monkeypatch, tasks.analysis, "layer_similarity")
    forbid(monkeypatch, trainer, "train_stage1")
    forbid(monkeypatch, trainer, "train_stage2")
    forbid(monkeypatch, tasks.evaluation, "evaluate_model")


class RoundProcess:
    """`ROUND_PROCESS` for one plan, sharing this process's Prefect server and result storage (PREFECT_HOME)."""

    def __init__(self, plan: ExpansionPlan, at_first_checkpoint: str, log: Path, go: Path | None = None):
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-c", ROUND_PROCESS, plan.model_dump_json(), at_first_checkpoint, str(go or log.with_suffix(".go"))],
                cwd=REPO_ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()},
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def wait_for(self, condition, what: str) -> None:
        deadline = time.monotonic() + PROCESS_DEADLINE_S
        while not condition():
            assert self.process.poll() is None, f"round process exited ({self.process.returncode}) before {what}:\n{self.output()}"
            assert time.monotonic() < deadline, f"round process never reached {what}:\n{self.output()}"
            time.sleep(0.1)

    def finish(self) -> int:
        try:
            return self.process.wait(timeout=PROCESS_DEADLINE_S)
        finally:
            self.stop()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class LogWatch(logging.Handler):
    """Sets `seen` once a flow-run log line contains `text`."""

    def __init__(self, text: str):
        super().__init__()
        self.text, self.seen = text, threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()


# -- 1. real services ----------------------------------------------------------------------
def test_round_on_real_mlflow_server_registers_model_tables_plots_and_moves_alias(world, mlflow_server: MlflowServer, tmp_path):
    registry = RegistrySettings(tracking_uri=mlflow_server.tracking_uri, registered_model_name=f"tiny-{uuid.uuid4().hex[:8]}")
    assert bootstrap_base(world.bootstrap.model_copy(update={"registry": registry})) == 1  # training steps come from the cache
    summary = add_languages(round_plan(world, registry, tmp_path / "work"))
    assert (summary.version, summary.parent_version, summary.promoted) == (2, 1, True)

    champion = show_version(registry, "champion")
    assert champion["version"] == 2 and champion["status"] == "READY" and champion["manifest_sha256"]
    assert champion["parent_version"] == 1 and champion["languages"] == [*BASE_LANGUAGES, "el"]
    assert champion["metrics"]["loss.el"] > 0

    client = MlflowClient(tracking_uri=registry.tracking_uri, registry_uri=registry.tracking_uri)
    listed = {
        folder: {Path(a.path).name for a in client.list_artifacts(champion["run_id"], folder)} for folder in ("model", "tables", "plots")
    }
    # a delta of v1
    assert {"config.json", "model.safetensors.delta.safetensors", "tokenizer.json", "layermoe_files.json"} <= listed["model"]
    assert {"similarity.csv", "allocation.csv", "routing.csv", "evaluation.csv", "stage1_log.csv"} <= listed["tables"]
    assert {"similarity.png", "allocation.png", "routing.png", "languages.png"} <= listed["plots"]
    # Proxied artifacts: the bytes sit in the server's store, and come back verified against the manifest.
    stored = [p for p in mlflow_server.artifacts_dir.rglob("layermoe_files.json") if champion["run_id"] in p.parts]
    assert len(stored) == 1
    child = load_model(download_version(registry, "champion", tmp_path / "champion").path)
    assert child.config.languages == [*BASE_LANGUAGES, "el"]


# -- 2. a run killed mid-Stage-1 ----------------------------------------------------------
def test_round_killed_mid_stage1_resumes_from_its_checkpoint_to_the_uninterrupted_child(world, reference_child, tmp_path, monkeypatch):
    registry = sqlite_registry(world, tmp_path)
    plan = round_plan(world, registry, tmp_path / "work")
    killed = RoundProcess(plan, "die", tmp_path / "killed.log")
    assert killed.finish() == -signal.SIGKILL, killed.output()

    stage1 = round_dir(plan, 1) / "stage1"
    assert (stage1 / FIRST_CHECKPOINT / "trainer_state.json").is_file() and not (stage1 / "final").exists()
    assert list_versions(registry)["version"].tolist() == [1]

    forbid(monkeypatch, tasks.analysis, "layer_similarity")  # finished before the kill: comes from the cache
    resumed_from = record_stage1_resumes(monkeypatch)
    summary = add_languages(plan)
    assert resumed_from == [stage1 / FIRST_CHECKPOINT]
    assert_same_weights(child_weights(registry, summary.version, tmp_path / "child"), reference_child)


def test_a_sigterm_mid_stage1_stops_it_at_the_next_steps_checkpoint_and_the_rerun_resumes_there_to_the_uninterrupted_child(
    world, reference_child, tmp_path, monkeypatch
):
    """What a stopping worker (`flows.worker`) or `kill PID` sends a flow run's process, while it trains in that process."""
    registry = sqlite_registry(world, tmp_path)
    plan = round_plan(world, registry, tmp_path / "work")
    stopped = RoundProcess(plan, "sigterm", tmp_path / "stopped.log")
    assert stopped.finish() == 1, stopped.output()

    stage1 = round_dir(plan, 1) / "stage1"
    at_stop = stage1 / f"checkpoint-{FAST['save_steps'] + 1}"  # the step after the periodic checkpoint the signal came at
    output = stopped.log.read_text(errors="replace")
    assert f"training stopped by SIGTERM at {at_stop}; rerun to resume from it" in output and "Finished in state Failed" in output
    assert trainer.latest_checkpoint(stage1) == at_stop and not (stage1 / "final").exists()
    assert list_versions(registry)["version"].tolist() == [1]

    resumed_from = record_stage1_resumes(monkeypatch)
    summary = add_languages(plan)
    assert resumed_from == [at_stop]
    assert list_versions(registry)["version"].tolist() == [1, 2]
    assert_same_weights(child_weights(registry, summary.version, tmp_path / "child"), reference_child)


def test_a_prefect_worker_still_running_after_its_sigterm_is_killed_once_its_flow_runs_have_ended(tmp_path):
    """Prefect's worker answers SIGTERM by sending itself SIGINT, and has been seen to run on for over 10 minutes after
    it (docs/operations.md, "Workers"). Here the compose command runs a stand-in `prefect` that ignores both signals:
    `flows.worker` kills it `WORKER_EXIT_S` after passing on the SIGTERM, and says so."""
    stand_in = tmp_path / "stand-in" / "prefect"
    stand_in.mkdir(parents=True)
    (stand_in / "__init__.py").write_text("")
    (stand_in / "__main__.py").write_text(
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "print('ignoring SIGTERM and SIGINT', flush=True)\n"
        "time.sleep(600)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(stand_in.parent), str(REPO_ROOT)])}
    command = [sys.executable, "-m", "flows.worker", "--pool", "layermoe"]
    worker = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert worker.stdout is not None
    assert worker.stdout.readline() == "ignoring SIGTERM and SIGINT\n"
    os.kill(worker.pid, signal.SIGTERM)
    signalled = time.monotonic()
    output, _ = worker.communicate(timeout=WORKER_EXIT_S + 60)
    assert time.monotonic() - signalled >= WORKER_EXIT_S
    assert "layermoe worker: SIGTERM to 0 flow run(s) first" in output
    assert f"the Prefect worker had not exited {WORKER_EXIT_S:.0f} s after SIGTERM; killing it" in output
    assert worker.returncode != 0


# -- 3. two runs at once ------------------------------------------------------------------
def test_two_runs_of_one_plan_at_once_take_turns_and_both_end_with_the_one_child_version(world, reference_child, tmp_path, monkeypatch):
    registry = sqlite_registry(world, tmp_path)
    plan = round_plan(world, registry, tmp_path / "work")
    go = tmp_path / "go"
    first = RoundProcess(plan, "hold", tmp_path / "first.log", go)
    try:
        first.wait_for(
            lambda: (round_dir(plan, 1) / "stage1" / FIRST_CHECKPOINT / "trainer_state.json").is_file(), "its first Stage-1 checkpoint"
        )
        # The first run holds the round, mid-Stage-1. Release it once the second run queues behind it.
        watch = LogWatch("another run of this round holds")
        logging.getLogger("prefect.flow_runs").addHandler(watch)
        release = threading.Thread(target=lambda: (watch.seen.wait(PROCESS_DEADLINE_S), go.touch()), daemon=True)
        release.start()
        forbid_recomputing_finished_steps(monkeypatch)  # the second run must reuse the first's steps, not redo them
        try:
            second = add_languages(plan)
        finally:
            go.touch()
            logging.getLogger("prefect.flow_runs").removeHandler(watch)
        assert watch.seen.is_set(), "the second run did not wait for the first"
        assert first.finish() == 0, first.output()
    finally:
        first.stop()

    versions = list_versions(registry)  # the first run registered version 2 before it let the second one in, which found it
    assert versions["version"].tolist() == [1, 2] and second.version == 2
    assert versions["parent"].tolist()[1:] == [1] and set(versions["status"]) == {"READY"}
    champion = show_version(registry, "champion")
    assert champion["version"] == 2 and champion["status"] == "READY" and champion["manifest_sha256"]
    assert_same_weights(child_weights(registry, 2, tmp_path / "v2"), reference_child)


def test_concurrent_registrations_on_one_sqlite_store_all_become_ready_versions(world, tmp_path):
    registry = RegistrySettings(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", registered_model_name="tiny")
    results, errors = [], []

    def register():
        try:
            results.append(promote(registry, register_base(registry, world.base_dir, BASE_LANGUAGES).version))
        except Exception as e:  # noqa: BLE001  (reported below, with the others)
            errors.append(e)

    threads = [threading.Thread(target=register) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    versions = list_versions(registry)
    assert sorted(info.version for info in results) == versions["version"].tolist() == [1, 2, 3]
    assert set(versions["status"]) == {"READY"}
    assert show_version(registry, "champion")["version"] in (1, 2, 3)


# -- 4. the registry down at registration ---------------------------------------------------
def test_registry_down_at_registration_keeps_the_checkpoint_and_a_rerun_registers_without_retraining(
    world, reference_child, tmp_path, monkeypatch
):
    backend, server_dir = f"sqlite:///{tmp_path}/server.db", tmp_path / "server"
    with ExitStack() as running:
        server = running.enter_context(running_mlflow_server(backend, server_dir))
        registry = registry_with_base(world, server.tracking_uri)
        plan = round_plan(world, registry, tmp_path / "work")
        compare_models = tasks.evaluation.compare_models

        def compare_then_stop_server(*args, **kwargs):
            table = compare_models(*args, **kwargs)
            running.close()  # the server goes down after the last training and evaluation step
            return table

        monkeypatch.setattr(tasks.evaluation, "compare_models", compare_then_stop_server)
        with pytest.raises(LayerMoEError) as failure:
            add_languages(plan)

    checkpoint = round_dir(plan, 1) / "stage2" / "final"
    assert registry.tracking_uri in str(failure.value) and str(checkpoint) in str(failure.value)
    assert (checkpoint / "model.safetensors").is_file()
    trained = {path: path.stat().st_mtime_ns for path in round_dir(plan, 1).glob("stage*/**/*.safetensors")}

    monkeypatch.undo()
    forbid_recomputing_finished_steps(monkeypatch)
    with running_mlflow_server(backend, server_dir, port=urlparse(server.tracking_uri).port):
        summary = add_languages(plan)
        assert {path: path.stat().st_mtime_ns for path in round_dir(plan, 1).glob("stage*/**/*.safetensors")} == trained
        assert (summary.version, summary.parent_version) == (2, 1)
        assert show_version(registry, "champion")["version"] == 2
        assert_same_weights(child_weights(registry, 2, tmp_path / "child"), reference_child)


# -- 5. bad inputs ------------------------------------------------------------------------
def count_registry_reads(monkeypatch) -> list:
    """Each attempt of `resolve parent` reads the registry once: the reads count the attempts."""
    reads = []
    monkeypatch.setattr(tasks.parent, "cached_version", lambda *args: reads.append(args) or cached_version(*args))
    return reads


def test_plan_naming_a_missing_parent_version_fails_at_once_and_registers_nothing(world, tmp_path, monkeypatch):
    attempts = count_registry_reads(monkeypatch)
    with pytest.raises(LayerMoEError, match=r"version 99 does not exist on registered model 'tiny': it has versions \[1"):
        add_languages(round_plan(world, world.registry, tmp_path, parent=ParentRef(version=99)))
    assert len(attempts) == 1, "a permanent error was retried"
    assert list_versions(world.registry)["version"].tolist() == [1]


def test_corrupt_parent_artifact_in_the_registry_fails_at_once_and_registers_nothing(world, tmp_path, monkeypatch):
    registry = sqlite_registry(world, tmp_path)
    (stored,) = (tmp_path / "artifacts").rglob("model/model.safetensors")
    stored.write_bytes(stored.read_bytes()[: stored.stat().st_size // 2])
    attempts = count_registry_reads(monkeypatch)
    with pytest.raises(LayerMoEError, match=r"version 1 of 'tiny': model\.safetensors is truncated or corrupt"):
        add_languages(round_plan(world, registry, tmp_path / "work"))
    assert len(attempts) == 1, "a permanent error was retried"
    assert list_versions(registry)["version"].tolist() == [1]


def test_truncated_local_copy_of_the_parent_is_downloaded_again(world, tmp_path):
    first = resolve_parent(world.registry, 1, tmp_path)
    weights = first.path / "model.safetensors"
    intact = weights.read_bytes()
    weights.write_bytes(intact[: len(intact) // 2])
    again = resolve_parent(world.registry, 1, tmp_path)
    assert again.path == first.path and weights.read_bytes() == intact
    verify_model_dir(again.path, show_version(world.registry, 1)["manifest_sha256"], "the copy")


def write_gpt2(directory: Path, tokenizer_dir: Path) -> Path:
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64, vocab_size=400)).save_pretrained(directory)
    load_tokenizer(tokenizer_dir).save_pretrained(directory)
    return directory


def write_csv(directory: Path) -> CorpusSpec:
    (directory / "el.csv").write_text("id,text\ndoc-0,αβγ δεζ\n")
    return CorpusSpec(path=directory / "el.csv")


def write_jsonl_without_text(directory: Path) -> CorpusSpec:
    (directory / "el.jsonl").write_text(json.dumps({"id": "doc-0", "content": "αβγ δεζ"}) + "\n")
    return CorpusSpec(path=directory / "el.jsonl")


BAD_ROUNDS = {
    "csv corpus": (lambda world, tmp: {"corpora": {**world.corpora, "el": write_csv(tmp)}}, r"el\.csv.* unsupported suffix"),
    "jsonl without text": (
        lambda world, tmp: {"corpora": {**world.corpora, "el": write_jsonl_without_text(tmp)}},
        r"no text field 'text' \(columns: \['id', 'content'\]\)",
    ),
    "gpt2 base": (
        lambda world, tmp: {"parent": ParentRef(hf_path=write_gpt2(tmp / "gpt2", world.base_dir), languages=BASE_LANGUAGES)},
        r"unsupported base architecture 'gpt2'",
    ),
    "non-ISO base language": (
        lambda world, tmp: {"parent": ParentRef(hf_path=world.base_dir, languages=["en", "xx1"])},
        r"bad language code 'xx1'",
    ),
}


@pytest.mark.parametrize("case", BAD_ROUNDS)
def test_bad_round_input_fails_with_a_clear_error_and_registers_nothing(world, tmp_path, case):
    changes, message = BAD_ROUNDS[case]
    before = list_versions(world.registry)
    with pytest.raises(LayerMoEError, match=message):
        add_languages(round_plan(world, world.registry, world.root / "work-bad-inputs", **changes(world, tmp_path)))
    after = list_versions(world.registry)
    assert after[["version", "aliases"]].equals(before[["version", "aliases"]])


@pytest.mark.parametrize("code", ["english", "xx1", "EN"])
def test_plan_with_a_non_iso_language_code_is_refused_naming_it(world, tmp_path, code):
    with pytest.raises(ValidationError, match=f"bad language code '{code}'"):
        round_plan(world, world.registry, tmp_path, new_languages=[code])
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump({"corpora": {"en": {"path": str(world.corpora["en"].path)}}, "new_languages": [code]}))
    with pytest.raises(LayerMoEError, match=f"plan {plan_file} is invalid: .*bad language code '{code}'"):
        load_plan(plan_file, ExpansionPlan)


# -- 6. shared result storage ---------------------------------------------------------------
PLANTED_PAYLOAD_RAN = "planted-payload-ran"


class PlantedPayload:
    """Unpickling this creates a file next to the test: proof that a stored result ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def step_results_since(start_ns: int) -> list[Path]:
    storage = get_current_settings().results.local_storage_path
    return [path for path in storage.rglob("*") if path.is_file() and path.stat().st_mtime_ns >= start_ns]


def test_step_results_are_json_and_planted_pickle_records_are_refused_and_recomputed(world, tmp_path, caplog):
    """What one writer of a shared PREFECT_HOME/storage can plant: a record naming the pickle serializer, in either
    of Prefect's layouts (metadata beside the result, or one file). Rerunning the steps must not run its payload."""
    start = time.time_ns()
    plan = world.bootstrap.model_copy(update={"workdir": tmp_path / "work", "registry": sqlite_registry_settings(tmp_path)})
    assert bootstrap_base(plan) == 1
    written = step_results_since(start)
    assert written, "the bootstrap persisted no step result"
    for path in written:  # every record and every result is JSON, and none names a pickle serializer
        text = path.read_text(encoding="utf-8")
        assert '"pickle"' not in text and json.loads(text) is not None, path

    marker = tmp_path / PLANTED_PAYLOAD_RAN
    for path in written:
        stored = json.loads(path.read_text(encoding="utf-8"))
        key = stored["storage_key"] if "storage_key" in stored else str(path)
        planted = ResultRecord(metadata=ResultRecordMetadata(serializer=PickleSerializer(), storage_key=key), result=PlantedPayload(marker))
        path.write_bytes(planted.serialize_metadata() if "storage_key" in stored else planted.serialize())
    caplog.set_level(logging.WARNING, logger="tasks.results")
    assert bootstrap_base(plan) == 1
    assert not marker.exists(), "a planted pickle in the result storage ran its code"
    assert "written by serializer 'pickle'" in caplog.text and "the step runs again" in caplog.text
    for path in step_results_since(start):
        assert '"pickle"' not in path.read_text(encoding="utf-8"), f"{path} still holds the planted record"


# -- 7. the server killed right after it created the version -----------------------------------
def test_server_killed_right_after_creating_the_version_and_the_rerun_completes_it_without_a_duplicate(world, tmp_path, monkeypatch):
    backend, server_dir = f"sqlite:///{tmp_path}/server.db", tmp_path / "server"
    with ExitStack() as running:
        server = running.enter_context(running_mlflow_server(backend, server_dir))
        registry = registry_with_base(world, server.tracking_uri)
        plan = round_plan(world, registry, tmp_path / "work")
        create = MlflowClient.create_model_version

        def create_then_stop_server(self, *args, **kwargs):
            created = create(self, *args, **kwargs)
            running.close()  # the server dies right after POST /model-versions/create
            return created

        monkeypatch.setattr(MlflowClient, "create_model_version", create_then_stop_server)
        with pytest.raises(LayerMoEError):
            add_languages(plan)

    monkeypatch.undo()
    forbid_recomputing_finished_steps(monkeypatch)
    with running_mlflow_server(backend, server_dir, port=urlparse(server.tracking_uri).port):
        left = list_versions(registry)
        assert left["version"].tolist() == [1, 2] and left["status"].tolist() == ["READY", "INCOMPLETE"]
        assert show_version(registry, "champion")["version"] == 1  # never promoted half-registered
        summary = add_languages(plan)
        versions = list_versions(registry)
        assert summary.version == 2 and versions["version"].tolist() == [1, 2] and set(versions["status"]) == {"READY"}
        champion = show_version(registry, "champion")
        assert champion["version"] == 2 and champion["description"] and champion["verdict"] == "passed"
        client = MlflowClient(tracking_uri=registry.tracking_uri, registry_uri=registry.tracking_uri)
        assert client.get_run(champion["run_id"]).info.status == "FINISHED"
        download_version(registry, 2, tmp_path / "child")  # every file there, verified


def record_stage1_resumes(monkeypatch) -> list:
    """The checkpoint each Stage 1 trained in this process resumed from (None: from the start), as it trains."""
    resumed_from = []
    train_stage1 = trainer.train_stage1

    def record_resume(*args, **kwargs):
        result = train_stage1(*args, **kwargs)
        resumed_from.append(result.resumed_from)
        return result

    monkeypatch.setattr(trainer, "train_stage1", record_resume)
    return resumed_from
