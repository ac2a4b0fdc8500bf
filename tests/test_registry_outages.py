"""A registry that is down, dies mid-registration, is not MLflow, or is not there: clear errors, fast, nothing half-done."""

from __future__ import annotations

import functools
import http.server
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import urlparse

import pytest
from mlflow import MlflowClient

from flows.cli import main as layermoe
from layermoe_core import LayerMoEError
from registry import (
    RegistrySettings,
    RegistryUnavailable,
    RoundInfo,
    find_or_register_base,
    list_versions,
    promote,
    register_base,
    register_child,
    show_version,
)

from .conftest import save_with_tiny_tokenizer, tiny_model
from .services import running_mlflow_server
from .tiny_tokenizer import tiny_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
# The bar: a dead registry is reported within a minute, not after MLflow's own retries (docs/registry.md, "Outages").
ERROR_WITHIN_S = 60


@pytest.fixture
def base_dir(tmp_path) -> Path:
    return save_with_tiny_tokenizer(tiny_model("llama"), tmp_path / "base")


def runs_by_status(tracking_uri: str, experiment_name: str) -> dict[str, str]:
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    return {run.info.run_id: run.info.status for run in client.search_runs([experiment.experiment_id])}


def test_default_http_limits_report_a_dead_registry_within_a_minute():
    settings = RegistrySettings(tracking_uri="http://127.0.0.1:9")
    assert settings.worst_case_wait_s() < ERROR_WITHIN_S
    with pytest.raises(ValueError, match="request_retries"):
        RegistrySettings(request_retries=11)


def test_server_killed_mid_registration_fails_fast_and_the_retry_closes_the_orphan_run(base_dir, tmp_path, monkeypatch):
    backend, server_dir = f"sqlite:///{tmp_path}/server.db", tmp_path / "server"
    real_log_artifact = MlflowClient.log_artifact
    with ExitStack() as running:
        server = running.enter_context(running_mlflow_server(backend, server_dir))
        settings = RegistrySettings(tracking_uri=server.tracking_uri)

        def stop_server_then_log(self, *args, **kwargs):
            running.close()  # the server dies after the run exists and before the weights are stored
            return real_log_artifact(self, *args, **kwargs)

        monkeypatch.setattr(MlflowClient, "log_artifact", stop_server_then_log)
        started = time.monotonic()
        with pytest.raises(RegistryUnavailable) as failure:
            register_base(settings, base_dir, ["en"])
        took = time.monotonic() - started
    assert took < ERROR_WITHIN_S, f"the outage was reported after {took:.0f} s"
    assert server.tracking_uri in str(failure.value) and f"checkpoint is still at {base_dir}" in str(failure.value)

    monkeypatch.undo()
    with running_mlflow_server(backend, server_dir, port=urlparse(server.tracking_uri).port):
        (orphan,) = runs_by_status(server.tracking_uri, settings.experiment_name)
        assert runs_by_status(server.tracking_uri, settings.experiment_name)[orphan] == "RUNNING"  # the server died first
        version = register_base(settings, base_dir, ["en"])
        statuses = runs_by_status(server.tracking_uri, settings.experiment_name)
        assert statuses == {orphan: "FAILED", version.run_id: "FINISHED"}
        assert version.version == 1 and version.is_ready
    assert not any(base_dir.glob(".layermoe-unfinished-runs*"))


def test_failure_with_the_registry_up_marks_the_run_failed_at_once(base_dir, tmp_path, monkeypatch):
    settings = RegistrySettings(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(MlflowClient, "log_artifact", full_disk)
    with pytest.raises(RegistryUnavailable, match="No space left on device"):
        register_base(settings, base_dir, ["en"])
    assert list(runs_by_status(settings.tracking_uri, settings.experiment_name).values()) == ["FAILED"]


@pytest.fixture
def plain_web_server(tmp_path) -> Iterator[str]:
    """A web server that answers every path, but is not MLflow (python -m http.server)."""
    (tmp_path / "index.html").write_text("<html>hello</html>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_web_server_that_is_not_mlflow_is_named_as_such(plain_web_server, base_dir, capsys):
    settings = RegistrySettings(tracking_uri=plain_web_server)
    with pytest.raises(LayerMoEError, match=r"answers HTTP 404 .* but is not an MLflow tracking server") as failure:
        list_versions(settings)
    assert not isinstance(failure.value, RegistryUnavailable)  # retrying will not help
    with pytest.raises(LayerMoEError, match="not an MLflow tracking server"):
        register_base(settings, base_dir, ["en"])
    assert layermoe(["registry", "--tracking-uri", plain_web_server, "list"]) == 2
    assert "is not an MLflow tracking server" in capsys.readouterr().err


def test_browsing_a_folder_without_a_store_creates_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert layermoe(["registry", "list"]) == 2
    assert "there is no MLflow store at" in capsys.readouterr().err
    with pytest.raises(LayerMoEError, match="there is no MLflow store"):
        show_version(RegistrySettings(), "champion")
    assert list(tmp_path.iterdir()) == []


def test_the_same_base_is_registered_once(base_dir, tmp_path):
    settings = RegistrySettings(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    first = find_or_register_base(settings, base_dir, ["en"])
    assert find_or_register_base(settings, base_dir, ["en"]).version == first.version == 1
    assert find_or_register_base(settings, base_dir, ["en", "de"]).version == 2  # other languages: another base
    tiny_model("llama", seed=1).save_pretrained(base_dir)
    assert find_or_register_base(settings, base_dir, ["en"]).version == 3  # other weights: another base
    assert list_versions(settings)["verdict"].tolist() == ["base", "base", "base"]


def test_a_registration_killed_after_creating_the_version_is_marked_and_the_rerun_completes_it(tmp_path, monkeypatch):
    """Killed between creating the version and closing its run: the version is marked INCOMPLETE and never promoted;
    registering the same child again finds it and completes it, with no second version."""
    from .test_registry_delta import grow

    settings = RegistrySettings(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", cache_dir=tmp_path / "cache")
    base = tiny_model("qwen2")
    for folder, model in ((tmp_path / "v1", base), (tmp_path / "child", grow(base, ["en"], ["el"], [1, 1, 1], seed=1))):
        model.save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
    promote(settings, register_base(settings, tmp_path / "v1", ["en"]).version)
    info = RoundInfo(round=1, old_languages=["en"], new_languages=["el"], allocation=[1, 1, 1], classifier_layers=[0])
    create = MlflowClient.create_model_version

    def create_then_die(self, *args, **kwargs):
        create(self, *args, **kwargs)
        raise KeyboardInterrupt  # the process ends right after the version exists

    monkeypatch.setattr(MlflowClient, "create_model_version", create_then_die)
    with pytest.raises(KeyboardInterrupt):
        register_child(settings, tmp_path / "child", 1, info, {}, {}, {}, {})
    monkeypatch.undo()
    assert list_versions(settings)["status"].tolist() == ["READY", "INCOMPLETE"]
    with pytest.raises(LayerMoEError, match=r"version 2 is not fully registered \(.*registration incomplete\); rerun its round"):
        promote(settings, 2)

    again = register_child(settings, tmp_path / "child", 1, info, {}, {}, {}, {})
    assert again.version == 2 and again.is_ready and again.description
    assert list_versions(settings)["status"].tolist() == ["READY", "READY"]
    assert MlflowClient(settings.tracking_uri).get_run(again.run_id).info.status == "FINISHED"
    assert promote(settings, 2).aliases == ["champion"]
    assert register_child(settings, tmp_path / "child", 1, info, {}, {}, {}, {}).version == 2  # a third run: still one version


# Opens a store once `go` exists, as a command does at its start.
OPEN_STORE_WHEN_TOLD = """
import sys, time
from pathlib import Path
from registry import RegistrySettings, find_or_register_base
tracking_uri, base_dir, ready, go = sys.argv[1:]
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.005)
print(find_or_register_base(RegistrySettings(tracking_uri=tracking_uri), Path(base_dir), ["en"]).version)
"""


def test_commands_started_together_on_a_store_that_does_not_exist_yet_all_succeed(base_dir, tmp_path):
    """MLflow creates a new sqlite store's tables when a process first opens it; started together, the commands take turns."""
    tracking_uri = f"sqlite:///{tmp_path}/new/mlflow.db"
    go, env = tmp_path / "go", {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    ready = [tmp_path / f"ready-{i}" for i in range(3)]
    commands = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_STORE_WHEN_TOLD, tracking_uri, str(base_dir), str(flag), str(go)],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for flag in ready
    ]
    deadline = time.monotonic() + 300
    while not all(flag.exists() for flag in ready):
        assert time.monotonic() < deadline and all(c.poll() is None for c in commands), [c.communicate() for c in commands]
        time.sleep(0.05)
    go.touch()
    results = [(command.wait(timeout=300), *command.communicate()) for command in commands]
    assert [code for code, _, _ in results] == [0, 0, 0], [err[-3000:] for _, _, err in results]
    assert all("Traceback" not in err for _, _, err in results)
    versions = list_versions(RegistrySettings(tracking_uri=tracking_uri))
    assert set(versions["status"]) == {"READY"} and {int(out.split()[-1]) for _, out, _ in results} <= set(versions["version"])
