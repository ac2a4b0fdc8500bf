"""Delta versions: a child stores what its round added, and downloads rebuild the full model byte for byte."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from urllib.parse import urlparse

import mlflow.artifacts
import pytest
import torch
from mlflow import MlflowClient
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from flows.cli import main as layermoe
from layermoe_core import LayerMoEError, expand, insert_classifiers
from layermoe_core.model.files import list_model_files
from registry import (
    RegistrySettings,
    download_version,
    get_version,
    list_versions,
    register_base,
    register_child,
)
from registry.manifest import MANIFEST_NAME, build_manifest, text_digest

from .conftest import tiny_model
from .tiny_tokenizer import tiny_tokenizer


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def grow(parent, old: list[str], new: list[str], allocation: list[int], seed: int, dtype=torch.float32):
    """One round's child: new experts and a router per layer, a classifier at layer 0, trained (here: perturbed)."""
    child = expand(parent, allocation, old, new)
    insert_classifiers(child, [0])
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in child.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn_like(param))
    return child.to(dtype).eval()


ROUNDS = [(["en"], ["el"], [2, 0, 1]), (["en", "el"], ["hu"], [1, 1, 1]), (["en", "el", "hu"], ["tr"], [1, 2, 0])]


@pytest.fixture
def chain(tmp_path):
    return build_chain(tmp_path, "qwen2", torch.float32)


def build_chain(tmp_path: Path, family: str, dtype: torch.dtype) -> tuple[RegistrySettings, list[Path]]:
    """Base + three rounds registered on one sqlite store; returns settings and each version's saved folder."""
    settings = RegistrySettings(tracking_uri=f"sqlite:///{tmp_path}/store/mlflow.db", cache_dir=tmp_path / "cache")
    model = tiny_model(family).to(dtype)
    folders = [tmp_path / "v1"]
    model.save_pretrained(folders[0])
    tiny_tokenizer().save_pretrained(folders[0])
    register_base(settings, folders[0], ["en"])
    for number, (old, new, allocation) in enumerate(ROUNDS, start=1):
        model = grow(model, old, new, allocation, seed=number, dtype=dtype)
        folders.append(tmp_path / f"v{number + 1}")
        model.save_pretrained(folders[-1])
        tiny_tokenizer().save_pretrained(folders[-1])
        info = {"round": number, "old_languages": old, "new_languages": new, "allocation": allocation, "classifier_layers": [0]}
        register_child(settings, folders[-1], number, info, {}, {}, {}, {})
    return settings, folders


def stored_tensor_names(settings: RegistrySettings, version: int) -> set[str]:
    run_id = get_version(settings, version).run_id
    folder = Path(urlparse(MlflowClient(settings.tracking_uri).get_run(run_id).info.artifact_uri).path) / "model"
    with safe_open(folder / "model.safetensors.delta.safetensors", framework="pt") as f:
        return set(f.keys())


def tensor_names(folder: Path) -> set[str]:
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        return set(f.keys())


def test_a_child_stores_only_its_new_experts_routers_and_classifiers(chain):
    settings, folders = chain
    table = list_versions(settings).set_index("version")
    assert table["storage"].tolist() == ["whole", "delta", "delta", "delta"]
    for version in (2, 3, 4):
        names = stored_tensor_names(settings, version)
        child, parent = tensor_names(folders[version - 1]), tensor_names(folders[version - 2])
        # new experts, routers and classifiers: the names this round added; the dense MLPs it turned into
        # each layer's original expert (same bytes, new name) and everything the parent had are referenced
        added = {n for n in child if n.removeprefix("causal_lm.") not in {p.removeprefix("causal_lm.") for p in parent}}
        assert names == {n for n in added if "original_mlp" not in n}
        assert any("new_experts" in n for n in names) and any("routers" in n for n in names) and any("classifier" in n for n in names)
        whole = (folders[version - 1] / "model.safetensors").stat().st_size
        assert table.loc[version, "stored_bytes"] < whole


@pytest.mark.parametrize("family, dtype", [("qwen2", torch.float32), ("llama", torch.bfloat16)], ids=["qwen2-fp32", "llama-bf16"])
def test_every_version_downloads_byte_identical_and_loads_the_same_model(family, dtype, tmp_path, token_ids):
    settings, folders = build_chain(tmp_path, family, dtype)
    for version, folder in enumerate(folders, start=1):
        local = download_version(settings, version, tmp_path / f"fetched-v{version}")
        assert sha256(local.path / "model.safetensors") == sha256(folder / "model.safetensors")
        assert list_model_files(local.path, exclude=(MANIFEST_NAME,)) == list_model_files(folder)
    original = AutoModelForCausalLM.from_pretrained(folders[-1]).eval()
    rebuilt = AutoModelForCausalLM.from_pretrained(tmp_path / "fetched-v4").eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(token_ids).logits, original(token_ids).logits, atol=0, rtol=0)


def test_each_versions_files_are_downloaded_once(chain, tmp_path, monkeypatch):
    settings, _ = chain
    fresh = settings.model_copy(update={"cache_dir": tmp_path / "fresh-cache"})
    fetched = []
    real = mlflow.artifacts.download_artifacts
    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", lambda **kw: fetched.append(kw["artifact_uri"]) or real(**kw))
    download_version(fresh, 4, tmp_path / "a")
    assert len(fetched) == 4  # versions 4, 3, 2 and the base
    download_version(fresh, 3, tmp_path / "b")
    download_version(fresh, 4, tmp_path / "c")
    assert len(fetched) == 4


def test_a_missing_link_is_named(chain, tmp_path):
    settings, _ = chain
    MlflowClient(settings.tracking_uri).delete_model_version(settings.registered_model_name, "2")
    fresh = settings.model_copy(update={"cache_dir": tmp_path / "fresh-cache"})
    with pytest.raises(LayerMoEError, match=r"version 3 of 'layermoe' is stored as a delta on version 2, which is missing"):
        download_version(fresh, 4, tmp_path / "fetched")
    assert not (tmp_path / "fetched").exists()


def test_a_damaged_link_is_named(chain, tmp_path):
    settings, _ = chain
    run_id = get_version(settings, 2).run_id
    folder = Path(urlparse(MlflowClient(settings.tracking_uri).get_run(run_id).info.artifact_uri).path) / "model"
    delta = folder / "model.safetensors.delta.safetensors"
    delta.write_bytes(delta.read_bytes()[:-4] + b"\x00\x00\x00\x00")
    fresh = settings.model_copy(update={"cache_dir": tmp_path / "fresh-cache"})
    with pytest.raises(LayerMoEError, match=r"version 2 of 'layermoe': model\.safetensors\.delta\.safetensors is corrupt"):
        download_version(fresh, 4, tmp_path / "fetched")


def test_whole_storage_when_asked_and_versions_registered_whole_before_deltas_still_load(tmp_path):
    settings = RegistrySettings(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", cache_dir=tmp_path / "cache", delta_storage=False)
    base = tiny_model("qwen2")
    base.save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    legacy = register_as_before_deltas(settings, tmp_path / "base")
    child = grow(base, ["en"], ["el"], [1, 1, 1], seed=1)
    child.save_pretrained(tmp_path / "child")
    tiny_tokenizer().save_pretrained(tmp_path / "child")
    info = {"round": 1, "old_languages": ["en"], "new_languages": ["el"], "allocation": [1, 1, 1], "classifier_layers": [0]}
    whole = register_child(settings, tmp_path / "child", legacy, info, {}, {}, {}, {})
    assert whole.storage == "whole"
    downloaded = download_version(settings, 1, tmp_path / "v1").path
    assert sha256(downloaded / "model.safetensors") == sha256(tmp_path / "base" / "model.safetensors")
    assert sha256(download_version(settings, 2, tmp_path / "v2").path / "model.safetensors") == sha256(
        tmp_path / "child" / "model.safetensors"
    )
    # a delta child of a version stored before deltas is stored whole: there are no tensor digests to diff against
    delta_ok = settings.model_copy(update={"delta_storage": True})
    shutil.rmtree(tmp_path / "child")
    child.save_pretrained(tmp_path / "child")
    tiny_tokenizer().save_pretrained(tmp_path / "child")
    assert register_child(delta_ok, tmp_path / "child", legacy, info, {}, {}, {}, {}).storage == "whole"


def register_as_before_deltas(settings: RegistrySettings, model_dir: Path) -> int:
    """A base the way layermoe 0.1 stored it: the model directory and its manifest as artifacts, no layout."""
    client = MlflowClient(settings.tracking_uri)
    client.create_registered_model(settings.registered_model_name)
    run = client.create_run(client.create_experiment("before-deltas"))
    files = list_model_files(model_dir)
    manifest = build_manifest(model_dir, files)
    for name in files:
        client.log_artifact(run.info.run_id, str(model_dir / name), "model")
    client.log_text(run.info.run_id, manifest, f"model/{MANIFEST_NAME}")
    tags = {
        "layermoe.kind": "base",
        "layermoe.round": "0",
        "layermoe.languages": '["en"]',
        "layermoe.manifest_sha256": text_digest(manifest),
    }
    return int(client.create_model_version(settings.registered_model_name, f"runs:/{run.info.run_id}/model", run.info.run_id, tags).version)


def test_download_writes_a_standalone_save_pretrained_folder(chain, tmp_path, capsys):
    settings, folders = chain
    dest = tmp_path / "downloaded"
    assert layermoe(["registry", "--tracking-uri", settings.tracking_uri, "download", "4", str(dest)]) == 0
    assert sha256(dest / "model.safetensors") == sha256(folders[-1] / "model.safetensors")
    assert AutoModelForCausalLM.from_pretrained(dest).config.languages == ["en", "el", "hu", "tr"]
    assert "version 4" in capsys.readouterr().out


def test_a_damaged_cache_is_fetched_again(chain, tmp_path):
    settings, folders = chain
    download_version(settings, 4, tmp_path / "first")
    cached = settings.version_cache(1) / "model.safetensors"  # the base, which every later version reads from
    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside a random weight matrix (the tail holds all-ones norms, which dedupe)
    cached.write_bytes(bytes(data))
    local = download_version(settings, 4, tmp_path / "second")
    assert sha256(local.path / "model.safetensors") == sha256(folders[-1] / "model.safetensors")
    assert sha256(cached) == sha256(folders[0] / "model.safetensors")  # the damaged cached file was replaced


def test_registering_a_child_fetches_no_parent_weights(tmp_path, monkeypatch):
    settings = RegistrySettings(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", cache_dir=tmp_path / "cache")
    base = tiny_model("qwen2")
    base.save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    register_base(settings, tmp_path / "base", ["en"])
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)  # another machine registers the child
    grow(base, ["en"], ["el"], [1, 1, 1], seed=1).save_pretrained(tmp_path / "child")
    tiny_tokenizer().save_pretrained(tmp_path / "child")
    fetched = []
    real = mlflow.artifacts.download_artifacts
    monkeypatch.setattr(
        mlflow.artifacts, "download_artifacts", lambda **kw: fetched.append(kw["artifact_uri"].rsplit("/", 1)[1]) or real(**kw)
    )
    info = {"round": 1, "old_languages": ["en"], "new_languages": ["el"], "allocation": [1, 1, 1], "classifier_layers": [0]}
    assert register_child(settings, tmp_path / "child", 1, info, {}, {}, {}, {}).storage == "delta"
    assert sorted(fetched) == ["layermoe_files.json", "layermoe_stored.json", "layermoe_tensors.json"]
