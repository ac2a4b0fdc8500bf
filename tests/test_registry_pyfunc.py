"""Every version is an MLflow model: mlflow.pyfunc loads it (delta versions rebuilt) and `mlflow models serve` answers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import mlflow
import mlflow.pyfunc
import pytest
import torch
import yaml
from mlflow import MlflowClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from layermoe_core import LayerMoEError, expand, insert_classifiers
from registry import RegistrySettings, RoundInfo, promote, register_base, register_child

from .conftest import tiny_model
from .services import MlflowServer, free_loopback_port, running_mlflow_server
from .tiny_tokenizer import tiny_tokenizer

PROMPTS = ["Hello there", "abc"]
ROUND_1 = RoundInfo(round=1, old_languages=["en"], new_languages=["el"], allocation=[1, 2, 0], classifier_layers=[0])
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def own_model_cache(tmp_path, monkeypatch):
    """Each test rebuilds into a cache of its own: a copy left in the user's cache by an earlier run would be loaded
    instead of the version under test."""
    monkeypatch.setenv("LAYERMOE_REGISTRY_CACHE", str(tmp_path / "registry-cache"))


def register_champion(settings: RegistrySettings, root: Path) -> Path:
    """Base (version 1) and its delta child (version 2, champion); returns the child's folder."""
    base = tiny_model("qwen2")
    base.save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    register_base(settings, root / "base", ["en"])
    child = expand(base, ROUND_1.allocation, ["en"], ["el"])
    insert_classifiers(child, [0])
    torch.manual_seed(5)
    with torch.no_grad():
        for param in child.parameters():
            if param.requires_grad:
                param.add_(0.5 * torch.randn_like(param))
    child.eval().save_pretrained(root / "child")
    tiny_tokenizer().save_pretrained(root / "child")
    version = register_child(settings, root / "child", 1, ROUND_1, {}, {}, {}, {})
    assert version.storage == "delta"
    promote(settings, version.version)
    return root / "child"


def greedy(folder: Path, prompts: list[str], max_new_tokens: int, tokenizer_folder: Path | None = None) -> list[str]:
    """The model in `folder`, with the tokenizer in `tokenizer_folder` (default the same folder)."""
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(tokenizer_folder or folder)
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            generated = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        out.append(tokenizer.decode(generated[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
    return out


def load_and_predict(settings: RegistrySettings, monkeypatch, **params) -> tuple[list[str], object]:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", settings.tracking_uri)
    mlflow.set_tracking_uri(settings.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{settings.registered_model_name}@champion")
    return model.predict(PROMPTS, params={"max_new_tokens": 6, **params}), model


def test_pyfunc_loads_a_delta_champion_from_sqlite_and_generates(tmp_path, monkeypatch):
    settings = RegistrySettings(tracking_uri=f"sqlite:///{tmp_path}/store/mlflow.db")
    child = register_champion(settings, tmp_path)
    completions, model = load_and_predict(settings, monkeypatch)
    assert completions == greedy(child, PROMPTS, 6) and all(isinstance(c, str) for c in completions)
    signature = model.metadata.signature
    assert signature.inputs.to_dict() == signature.outputs.to_dict() == [{"type": "string", "required": True}]
    assert {p.name for p in signature.params.params} == {"max_new_tokens", "temperature", "top_p", "seed", "language"}


def test_pyfunc_pinned_to_a_language_generates_as_the_version_that_learned_it(tmp_path, monkeypatch):
    settings = RegistrySettings(tracking_uri=f"sqlite:///{tmp_path}/store/mlflow.db")
    child = register_champion(settings, tmp_path)
    plain, model = load_and_predict(settings, monkeypatch)
    base = greedy(tmp_path / "base", PROMPTS, 6, tokenizer_folder=child)  # the base's config makes it load a Qwen2 tokenizer
    assert plain != base  # the child's classifier routes some English tokens to its new experts
    assert model.predict(PROMPTS, params={"max_new_tokens": 6, "language": "en"}) == base  # the base learned en: the dense base
    assert model.predict(PROMPTS, params={"max_new_tokens": 6, "language": "el"}) == greedy(child, PROMPTS, 6) == plain
    with pytest.raises(LayerMoEError, match=r"language 'fi' is not one this model was taught; its languages are \['en', 'el'\]"):
        model.predict(PROMPTS, params={"language": "fi"})
    assert model.predict(PROMPTS, params={"max_new_tokens": 6}) == plain  # a refused pin leaves the model as it was


def test_pyfunc_language_auto_pins_each_prompt_it_identifies_and_says_which_route(tmp_path, monkeypatch):
    settings = RegistrySettings(tracking_uri=f"sqlite:///{tmp_path}/store/mlflow.db")
    child = register_champion(settings, tmp_path)
    _, model = load_and_predict(settings, monkeypatch)
    prompts = ["The cat sat on the mat and looked out of the window.", "Kalimera sas, ti kaneis", "abc"]
    answered = model.predict(prompts, params={"max_new_tokens": 6, "language": "auto"})
    # English is the base's language: pinned, the base's greedy text; the other two are not identified as en or el: plain
    assert [(a["language"], a["route"]) for a in answered] == [("en", "pinned"), ("", "plain"), ("", "plain")]
    assert answered[0]["completion"] == greedy(tmp_path / "base", prompts[:1], 6, tokenizer_folder=child)[0]
    assert [a["completion"] for a in answered[1:]] == greedy(child, prompts[1:], 6)


def test_version_page_shows_a_signature_not_zero_inputs(tmp_path):
    settings = RegistrySettings(tracking_uri=f"sqlite:///{tmp_path}/store/mlflow.db")
    register_champion(settings, tmp_path)
    client = MlflowClient(settings.tracking_uri)
    mlmodel = yaml.safe_load(
        Path(
            client.download_artifacts(client.get_model_version(settings.registered_model_name, "2").run_id, "model/MLmodel", str(tmp_path))
        ).read_text()
    )
    assert mlmodel["flavors"]["python_function"]["loader_module"] == "registry.pyfunc_model"
    assert json.loads(mlmodel["signature"]["inputs"]) == [{"type": "string", "required": True}]
    assert {p["name"] for p in json.loads(mlmodel["signature"]["params"])} == {"max_new_tokens", "temperature", "top_p", "seed", "language"}


@pytest.fixture(scope="module")
def sqlite_mlflow_server() -> Iterator[MlflowServer]:
    with tempfile.TemporaryDirectory(prefix="layermoe-pyfunc-") as workdir:
        with running_mlflow_server(f"sqlite:///{workdir}/mlflow.db", Path(workdir) / "server") as server:
            yield server


def test_pyfunc_loads_from_a_real_server_and_mlflow_models_serve_answers(sqlite_mlflow_server, tmp_path, monkeypatch):
    settings = RegistrySettings(tracking_uri=sqlite_mlflow_server.tracking_uri, registered_model_name=f"served-{uuid.uuid4().hex[:6]}")
    child = register_champion(settings, tmp_path)
    expected = greedy(child, PROMPTS, 6)
    assert load_and_predict(settings, monkeypatch)[0] == expected

    port = free_loopback_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": settings.tracking_uri,
        "PYTHONPATH": str(REPO_ROOT),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # as in an activated venv: mlflow runs uvicorn
        "LAYERMOE_REGISTRY_CACHE": str(tmp_path / "serve-cache"),
    }
    serve = subprocess.Popen(
        [
            Path(sys.executable).with_name("mlflow"),
            "models",
            "serve",
            "-m",
            f"models:/{settings.registered_model_name}@champion",
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        body = json.dumps({"inputs": PROMPTS, "params": {"max_new_tokens": 6}}).encode()
        answer = None
        deadline = time.monotonic() + 180
        while answer is None and time.monotonic() < deadline and serve.poll() is None:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=30) as response:
                    answer = json.loads(response.read())
            except (urllib.error.URLError, ConnectionError):
                time.sleep(1)
        assert answer is not None, serve.stdout.read().decode()[-4000:] if serve.poll() is not None else "no answer"
        assert answer == {"predictions": expected}
        pinned = json.dumps({"inputs": PROMPTS, "params": {"max_new_tokens": 6, "language": "en"}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", pinned, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.loads(response.read()) == {"predictions": greedy(tmp_path / "base", PROMPTS, 6, tokenizer_folder=child)}
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGTERM)
            serve.wait(timeout=30)
