"""`layermoe registry list` reads the store without MLflow, and its rows are the ones MLflow's client reads."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from layermoe_core.errors import LayerMoEError
from registry import RegistrySettings, RoundInfo, promote, register_base, register_child
from registry.listing import RestReader, SqliteReader, list_versions, read_listing, versions_frame
from registry.model_card import Verdict, record_verdict
from registry.versions import ClientReader, set_schedule_pause_note, sole_registered_model_name

from .conftest import tiny_model
from .services import running_mlflow_server
from .test_registry_delta import grow
from .tiny_tokenizer import tiny_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
PAUSE_NOTE = "round 2 was rejected twice; append a round or fix its plan"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> RegistrySettings:
    """Model 'layermoe': version 1, a base with two aliases; version 2, its round-1 child rejected by a reviewer with a
    reason; version 3, a round-2 registration killed after the version was created (INCOMPLETE). Its lifelong
    schedule is paused. The store also holds a registered model 'other' and a prompt, which MLflow lists apart."""
    root = tmp_path_factory.mktemp("listing")
    settings = RegistrySettings(tracking_uri=f"sqlite:///{root}/mlflow.db", cache_dir=root / "cache")
    model = tiny_model("llama")
    for folder, grown in (("base", None), ("round-1", (["en"], ["el"], [1, 0, 1])), ("round-2", (["en", "el"], ["hu"], [1, 1, 0]))):
        model = grow(model, *grown, seed=len(folder)) if grown else model  # saved before the next round grows it
        model.save_pretrained(root / folder)
        tiny_tokenizer().save_pretrained(root / folder)
    register_base(settings, root / "base", ["en"])
    first = RoundInfo(round=1, old_languages=["en"], new_languages=["el"], allocation=[1, 0, 1], classifier_layers=[0])
    register_child(settings, root / "round-1", 1, first, {}, {}, {"loss.el": 2.5}, {"stage1.learning_rate": 0.001})
    record_verdict(settings, 2, Verdict(passed=False, reasons=["el loss fell by 0.001 nats only"], decided_by="reviewer"))
    promote(settings, 1, "champion")
    promote(settings, 1, "stable")
    promote(settings, 2, "candidate")
    second = RoundInfo(round=2, old_languages=["en", "el"], new_languages=["hu"], allocation=[1, 1, 0], classifier_layers=[0])
    create = MlflowClient.create_model_version

    def create_then_die(self, *args, **kwargs):
        create(self, *args, **kwargs)
        raise KeyboardInterrupt  # the process ends right after the version exists

    with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(MlflowClient, "create_model_version", create_then_die)
        register_child(settings, root / "round-2", 2, second, {}, {}, {}, {})
    set_schedule_pause_note(settings, PAUSE_NOTE)
    client = MlflowClient(settings.tracking_uri)
    client.create_registered_model("other")
    client.register_prompt("greeting", "Hello {{name}}")
    return settings


@pytest.fixture(scope="module")
def served(store, tmp_path_factory) -> Iterator[RegistrySettings]:
    """The same store behind a real `mlflow server`."""
    with running_mlflow_server(store.tracking_uri, tmp_path_factory.mktemp("server")) as server:
        yield store.model_copy(update={"tracking_uri": server.tracking_uri})


def test_the_sqlite_file_read_directly_gives_mlflows_rows(store):
    direct, client = SqliteReader(store), ClientReader(store)
    assert direct.model_names() == client.model_names() == ["layermoe", "other"]
    assert direct.model("layermoe") == client.model("layermoe")
    table = list_versions(store)
    pd.testing.assert_frame_equal(table, versions_frame(client.model("layermoe")[1]))
    assert table["status"].tolist() == ["READY", "READY", "INCOMPLETE"]
    assert table["aliases"].tolist() == ["champion,stable", "candidate", ""]
    assert table["verdict"].tolist() == ["base", "rejected", ""]  # version 3 died before any verdict
    assert table["parent"].astype(object).tolist() == [pd.NA, 1, 2]
    assert read_listing(store).schedule_pause_note == PAUSE_NOTE
    assert direct.model("layermoe")[1][1].verdict_reason == "el loss fell by 0.001 nats only"


def test_the_rest_api_read_directly_gives_mlflows_rows(store, served):
    rest, client = RestReader(served), ClientReader(served)
    assert rest.model_names() == client.model_names() == ["layermoe", "other"]
    assert rest.model("layermoe") == client.model("layermoe") == ClientReader(store).model("layermoe")
    pd.testing.assert_frame_equal(list_versions(served), list_versions(store))


@pytest.mark.parametrize("where", ["sqlite", "server"])
def test_several_registered_models_are_named_as_mlflows_client_names_them(store, served, where):
    settings = store if where == "sqlite" else served
    with pytest.raises(LayerMoEError) as fast:
        read_listing(settings, find_name=True)
    with pytest.raises(LayerMoEError) as client:
        sole_registered_model_name(settings)
    assert str(fast.value) == str(client.value)
    assert "holds 2 registered models (layermoe, other); pick one with --model-name" in str(fast.value)


def layermoe_registry_list(*args: str) -> subprocess.CompletedProcess:
    """`layermoe registry list ARGS` in a fresh process that logs every module it imports (`-X importtime`)."""
    command = [sys.executable, "-X", "importtime", "-m", "flows.cli", "registry", "list", *args]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def imported_modules(importtime_log: str) -> set[str]:
    return {line.split("|")[-1].strip() for line in importtime_log.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("where", ["sqlite", "server"])
def test_the_command_lists_versions_without_importing_mlflow(store, served, where):
    uri = (store if where == "sqlite" else served).tracking_uri
    listed = layermoe_registry_list("--tracking-uri", uri, "--model-name", "layermoe")
    assert listed.returncode == 0, listed.stderr[-3000:]
    header, *rows, blank, pause = listed.stdout.splitlines()
    assert header.split()[:4] == ["version", "aliases", "parent", "round"] and len(rows) == 3 and blank == ""
    assert rows[1].split()[:3] == ["2", "candidate", "1"] and rows[2].split()[-1] == "INCOMPLETE"
    assert pause == f"lifelong schedule paused: {PAUSE_NOTE}"
    modules = imported_modules(listed.stderr)
    assert "registry.listing" in modules and "pandas" in modules
    assert not {m for m in modules if m.split(".")[0] == "mlflow"}

    unnamed = layermoe_registry_list("--tracking-uri", uri)
    assert unnamed.returncode == 2
    assert "layermoe: error: " in unnamed.stderr and "pick one with --model-name, e.g. --model-name layermoe" in unnamed.stderr
    assert not {m for m in imported_modules(unnamed.stderr) if m.split(".")[0] == "mlflow"}


def test_listing_a_store_that_does_not_exist_creates_nothing(tmp_path):
    listed = layermoe_registry_list("--tracking-uri", f"sqlite:///{tmp_path}/absent/mlflow.db")
    assert listed.returncode == 2
    (error,) = [line for line in listed.stderr.splitlines() if not line.startswith("import time:")]
    assert error.startswith(f"layermoe: error: there is no MLflow store at {tmp_path}/absent/mlflow.db")
    assert list(tmp_path.iterdir()) == []


def test_a_server_that_is_down_is_named_without_mlflow(tmp_path):
    listed = layermoe_registry_list("--tracking-uri", "http://127.0.0.1:9", "--model-name", "layermoe")
    assert listed.returncode == 2
    (error,) = [line for line in listed.stderr.splitlines() if not line.startswith("import time:")]
    assert error.startswith("layermoe: error: the MLflow registry at http://127.0.0.1:9 is unreachable")
