"""Delta versions: a child stores what its round added, and downloads rebuild the full model byte for byte."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sqlite3
from pathlib import Path
from urllib.parse import urlparse

import mlflow.artifacts
import mlflow.pyfunc
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
    RoundInfo,
    download_version,
    get_version,
    list_versions,
    manifest,
    register_base,
    register_child,
)
from registry.manifest import MANIFEST_NAME, build_manifest, text_digest
from registry.storage import LAYOUT_NAME, STORED_NAME, TENSORS_NAME
from registry.tags import MANIFEST_SHA256, STORED_SHA256

from .conftest import tiny_model
from .services import running_mlflow_server
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


def build_chain(tmp_path: Path, family: str, dtype: torch.dtype, tracking_uri: str | None = None) -> tuple[RegistrySettings, list[Path]]:
    """Base + three rounds registered on one store (default: a sqlite file); returns settings and each version's saved folder."""
    settings = RegistrySettings(tracking_uri=tracking_uri or f"sqlite:///{tmp_path}/store/mlflow.db", cache_dir=tmp_path / "cache")
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
        info = RoundInfo(round=number, old_languages=old, new_languages=new, allocation=allocation, classifier_layers=[0])
        register_child(settings, folders[-1], number, info, {}, {}, {}, {})
    return settings, folders


def stored_tensor_names(settings: RegistrySettings, version: int) -> set[str]:
    with safe_open(artifact_folder(settings, version, None) / "model.safetensors.delta.safetensors", framework="pt") as f:
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


def test_what_a_round_stores_beside_its_weights_does_not_grow_with_the_rounds(tmp_path):
    """Each version lists only the tensors its round changed and their digests, and its weights files' headers are
    written again on download: five rounds alike store the same listings, and every version downloads byte for byte."""
    settings = RegistrySettings(tracking_uri=f"sqlite:///{tmp_path}/store/mlflow.db", cache_dir=tmp_path / "cache")
    model, languages = tiny_model("qwen2"), ["en", "el", "hu", "tr", "pt", "fi"]
    folders = [tmp_path / "v1"]
    model.save_pretrained(folders[0])
    register_base(settings, folders[0], languages[:1])
    for number in range(1, 6):
        old, new = languages[:number], languages[number : number + 1]
        model = grow(model, old, new, [1, 1, 1], seed=number)
        folders.append(tmp_path / f"v{number + 1}")
        model.save_pretrained(folders[-1])
        info = RoundInfo(round=number, old_languages=old, new_languages=new, allocation=[1, 1, 1], classifier_layers=[0])
        register_child(settings, folders[-1], number, info, {}, {}, {}, {})
    folders_of = [artifact_folder(settings, version, None) for version in range(3, 7)]
    listings = [sum((folder / name).stat().st_size for name in (LAYOUT_NAME, TENSORS_NAME)) for folder in folders_of]
    assert max(listings) - min(listings) <= 0.01 * min(listings), listings
    for version in range(3, 7):
        layout = json.loads((artifact_folder(settings, version, None) / LAYOUT_NAME).read_text())["files"]["model.safetensors"]
        assert "header" not in layout and layout["drop"] == []
        assert len(layout["tensors"]) == len(stored_tensor_names(settings, version))  # its own tensors, no others
    for version, folder in enumerate(folders, start=1):
        local = download_version(settings, version, tmp_path / "fetched" / f"v{version}")
        assert sha256(local.path / "model.safetensors") == sha256(folder / "model.safetensors")


def test_a_child_of_a_sharded_base_refers_to_its_shards_and_downloads_byte_for_byte(tmp_path):
    """A Hub base often comes in shards; a round saves its child as one file, whose tensors are found in the shards."""
    settings = RegistrySettings(tracking_uri=f"sqlite:///{tmp_path}/store/mlflow.db", cache_dir=tmp_path / "cache")
    base = tiny_model("llama").to(torch.bfloat16)
    base.save_pretrained(tmp_path / "v1", max_shard_size=20_000)  # bytes: several shards of a tiny model
    shards = sorted(path.name for path in (tmp_path / "v1").glob("*.safetensors"))
    assert len(shards) > 1
    register_base(settings, tmp_path / "v1", ["en"])
    model, folders = base, [tmp_path / "v1"]
    for number, (old, new, allocation) in enumerate(ROUNDS[:2], start=1):
        model = grow(model, old, new, allocation, seed=number, dtype=torch.bfloat16)
        folders.append(tmp_path / f"v{number + 1}")
        model.save_pretrained(folders[-1])
        info = RoundInfo(round=number, old_languages=old, new_languages=new, allocation=allocation, classifier_layers=[0])
        register_child(settings, folders[-1], number, info, {}, {}, {}, {})
    first = json.loads((artifact_folder(settings, 2, None) / LAYOUT_NAME).read_text())["files"]["model.safetensors"]
    assert first["base"] is None and {origin[1] for origin in first["tensors"].values() if origin[0] == "parent"} == set(shards)
    second = json.loads((artifact_folder(settings, 3, None) / LAYOUT_NAME).read_text())["files"]["model.safetensors"]
    assert second["base"] == "model.safetensors" and "header" not in second
    for version, folder in enumerate(folders, start=1):
        local = download_version(settings, version, tmp_path / "fetched" / f"v{version}")
        for path in folder.glob("*.safetensors"):
            assert sha256(local.path / path.name) == sha256(path)


def test_a_header_safetensors_would_not_write_is_kept_verbatim_and_rebuilt_byte_for_byte(tmp_path):
    """A weights file written by another tool (here: its header's JSON spaced out) still downloads byte for byte."""
    settings = RegistrySettings(tracking_uri=f"sqlite:///{tmp_path}/store/mlflow.db", cache_dir=tmp_path / "cache")
    base_and_child(settings, tmp_path)
    file = tmp_path / "v3" / "model.safetensors"
    shutil.copytree(tmp_path / "v2", file.parent)
    data = file.read_bytes()
    size = int.from_bytes(data[:8], "little")
    text = json.dumps(json.loads(data[8 : 8 + size])).encode()  # ", " and ": " where safetensors writes "," and ":"
    text += b" " * (-len(text) % 8)
    file.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + size :])
    grown = grow(AutoModelForCausalLM.from_pretrained(tmp_path / "v2"), ["en", "el"], ["hu"], [1, 1, 1], seed=2)
    grown.save_pretrained(tmp_path / "v4")
    for folder, number, old, new in ((tmp_path / "v3", 2, ["en"], ["el"]), (tmp_path / "v4", 3, ["en", "el"], ["hu"])):
        info = RoundInfo(round=number, old_languages=old, new_languages=new, allocation=[1, 1, 1], classifier_layers=[0])
        register_child(settings, folder, number, info, {}, {}, {}, {})
    kept = json.loads((artifact_folder(settings, 3, None) / LAYOUT_NAME).read_text())["files"]["model.safetensors"]
    assert "header" in kept and kept["tensors"] == {}  # every tensor carried over from version 2; only the header differs
    for version, folder in ((3, tmp_path / "v3"), (4, tmp_path / "v4")):
        local = download_version(settings, version, tmp_path / "fetched" / f"v{version}")
        assert sha256(local.path / "model.safetensors") == sha256(folder / "model.safetensors")


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


def test_a_local_store_is_read_in_place_and_each_weight_byte_once(chain, tmp_path, monkeypatch):
    """Nothing is copied into the cache or through MLflow; the stored weights are read by the rebuild alone, whose
    output is checked against the manifest as it is written (no file is read back to hash it)."""
    settings, folders = chain
    fresh = settings.model_copy(update={"cache_dir": tmp_path / "fresh-cache"})
    hashed, mlflow_copies = [], []
    real_hash, real_download = manifest.sha256_file, mlflow.artifacts.download_artifacts
    monkeypatch.setattr(manifest, "sha256_file", lambda path: hashed.append(path.name) or real_hash(path))
    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", lambda **kw: mlflow_copies.append(kw) or real_download(**kw))
    for version in (4, 3, 4):
        local = download_version(fresh, version, tmp_path / f"v{version}-{len(hashed)}")
        assert sha256(local.path / "model.safetensors") == sha256(folders[version - 1] / "model.safetensors")
    assert not mlflow_copies and not fresh.cache_dir.exists()
    assert hashed and not [name for name in hashed if name.endswith(".safetensors")]


@pytest.mark.parametrize("store", ["sqlite file", "mlflow server"])
def test_a_lineage_is_read_from_the_store_in_one_listing_and_rebuilt_byte_for_byte(store, tmp_path, monkeypatch):
    """MLflow's client is asked for the version downloaded only; its ancestors come from one read of the versions."""
    with contextlib.ExitStack() as stack:
        uri = None
        if store == "mlflow server":
            uri = stack.enter_context(running_mlflow_server(f"sqlite:///{tmp_path}/server.db", tmp_path / "server")).tracking_uri
        settings, folders = build_chain(tmp_path, "llama", torch.float32, uri)
        asked = []
        real = MlflowClient.get_model_version
        monkeypatch.setattr(
            MlflowClient, "get_model_version", lambda client, name, version: asked.append(version) or real(client, name, version)
        )
        local = download_version(settings.model_copy(update={"cache_dir": tmp_path / "fresh-cache"}), 4, tmp_path / "fetched")
        assert asked == ["4"]
        assert sha256(local.path / "model.safetensors") == sha256(folders[-1] / "model.safetensors")


def test_a_missing_link_is_named(chain, tmp_path):
    settings, _ = chain
    MlflowClient(settings.tracking_uri).delete_model_version(settings.registered_model_name, "2")
    fresh = settings.model_copy(update={"cache_dir": tmp_path / "fresh-cache"})
    with pytest.raises(LayerMoEError, match=r"version 3 of 'layermoe' is stored as a delta on version 2, which is missing"):
        download_version(fresh, 4, tmp_path / "fetched")
    assert not (tmp_path / "fetched").exists()


def test_a_damaged_link_is_named(chain, tmp_path):
    settings, _ = chain
    delta = artifact_folder(settings, 2, None) / "model.safetensors.delta.safetensors"
    delta.write_bytes(delta.read_bytes()[:-4] + b"\x00\x00\x00\x00")
    fresh = settings.model_copy(update={"cache_dir": tmp_path / "fresh-cache"})
    with pytest.raises(LayerMoEError, match=r"version 2 of 'layermoe': model\.safetensors\.delta\.safetensors is corrupt"):
        download_version(fresh, 4, tmp_path / "fetched")


@pytest.mark.parametrize("damaged", [2, 4], ids=["an-ancestor", "its-own-delta"])
def test_the_pyfunc_loader_names_a_damaged_stored_file_of_the_lineage(chain, damaged, tmp_path, monkeypatch, caplog):
    """`mlflow.pyfunc.load_model` rebuilds a delta version as `download_version` does: a same-size damage to a stored
    weights file of its lineage fails the rebuilt model's check, then every byte of the lineage is checked and the
    damaged file named; no rebuilt model is left in the cache."""
    settings, _ = chain
    delta = artifact_folder(settings, damaged, None) / "model.safetensors.delta.safetensors"
    delta.write_bytes(delta.read_bytes()[:-4] + b"\x00\x00\x00\x00")
    cache = tmp_path / "pyfunc-cache"
    monkeypatch.setenv("LAYERMOE_REGISTRY_CACHE", str(cache))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", settings.tracking_uri)
    mlflow.set_tracking_uri(settings.tracking_uri)
    with pytest.raises(LayerMoEError, match=rf"version {damaged} of 'layermoe': model\.safetensors\.delta\.safetensors is corrupt"):
        mlflow.pyfunc.load_model(f"models:/{settings.registered_model_name}/4")
    assert "checking every byte of the stored files" in caplog.text
    assert not any((cache / "models").iterdir())  # the staging folder went with the failure


def test_whole_storage_when_asked_and_versions_registered_whole_before_deltas_still_load(tmp_path):
    settings = RegistrySettings(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", cache_dir=tmp_path / "cache", delta_storage=False)
    base = tiny_model("qwen2")
    base.save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    legacy = register_as_before_deltas(settings, tmp_path / "base")
    child = grow(base, ["en"], ["el"], [1, 1, 1], seed=1)
    child.save_pretrained(tmp_path / "child")
    tiny_tokenizer().save_pretrained(tmp_path / "child")
    info = RoundInfo(round=1, old_languages=["en"], new_languages=["el"], allocation=[1, 1, 1], classifier_layers=[0])
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
    client.log_param(run.info.run_id, "layermoe.manifest_sha256", text_digest(manifest))
    client.set_terminated(run.info.run_id)
    tags = {"kind": "base", "round": "0", "languages": "en"}
    return int(client.create_model_version(settings.registered_model_name, f"runs:/{run.info.run_id}/model", run.info.run_id, tags).version)


def test_download_writes_a_standalone_save_pretrained_folder(chain, tmp_path, capsys):
    settings, folders = chain
    dest = tmp_path / "downloaded"
    assert layermoe(["registry", "--tracking-uri", settings.tracking_uri, "download", "4", str(dest)]) == 0
    assert sha256(dest / "model.safetensors") == sha256(folders[-1] / "model.safetensors")
    assert AutoModelForCausalLM.from_pretrained(dest).config.languages == ["en", "el", "hu", "tr"]
    assert "version 4" in capsys.readouterr().out


@pytest.mark.parametrize("store", ["sqlite file", "mlflow server"])
def test_registering_a_child_fetches_no_parent_weights(store, tmp_path, monkeypatch):
    """A child's registration reads small listings of its lineage and no weights: the parent's manifest, and each
    version's layout and own tensor digests (the parent's full set is composed from them), in place from a local
    store, fetched from a remote one."""
    with contextlib.ExitStack() as stack:
        uri = f"sqlite:///{tmp_path}/mlflow.db"
        if store == "mlflow server":
            uri = stack.enter_context(running_mlflow_server(f"sqlite:///{tmp_path}/server.db", tmp_path / "server")).tracking_uri
        settings = RegistrySettings(tracking_uri=uri, cache_dir=tmp_path / "cache")
        model = tiny_model("qwen2")
        model.save_pretrained(tmp_path / "v1")
        tiny_tokenizer().save_pretrained(tmp_path / "v1")
        register_base(settings, tmp_path / "v1", ["en"])
        fetched = []
        real = mlflow.artifacts.download_artifacts
        monkeypatch.setattr(
            mlflow.artifacts, "download_artifacts", lambda **kw: fetched.append(kw["artifact_uri"].rsplit("/", 1)[1]) or real(**kw)
        )
        for number, (old, new, allocation) in enumerate(ROUNDS[:2], start=1):
            shutil.rmtree(tmp_path / "cache", ignore_errors=True)  # another machine registers each child
            fetched.clear()
            model = grow(model, old, new, allocation, seed=number)
            model.save_pretrained(tmp_path / f"v{number + 1}")
            tiny_tokenizer().save_pretrained(tmp_path / f"v{number + 1}")
            info = RoundInfo(round=number, old_languages=old, new_languages=new, allocation=allocation, classifier_layers=[0])
            assert register_child(settings, tmp_path / f"v{number + 1}", number, info, {}, {}, {}, {}).storage == "delta"
        lineage = ["layermoe_layout.json", "layermoe_stored.json", "layermoe_tensors.json"]
        expected = [] if store == "sqlite file" else sorted(["layermoe_files.json", *lineage, *lineage])
        assert sorted(fetched) == expected
        shutil.rmtree(tmp_path / "cache", ignore_errors=True)
        local = download_version(settings, 3, tmp_path / "fetched")
        assert sha256(local.path / "model.safetensors") == sha256(tmp_path / "v3" / "model.safetensors")


# -- file names from a version's layout and manifest (a shared registry's writer controls them) ----------------
def base_and_child(settings: RegistrySettings, tmp_path: Path) -> None:
    """Version 1 (whole) and version 2, a delta on it."""
    base = tiny_model("qwen2")
    for folder, model in ((tmp_path / "v1", base), (tmp_path / "v2", grow(base, ["en"], ["el"], [1, 1, 1], seed=1))):
        model.save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
    register_base(settings, tmp_path / "v1", ["en"])
    info = RoundInfo(round=1, old_languages=["en"], new_languages=["el"], allocation=[1, 1, 1], classifier_layers=[0])
    register_child(settings, tmp_path / "v2", 1, info, {}, {}, {}, {})


def artifact_folder(settings: RegistrySettings, version: int, artifacts_root: Path | None) -> Path:
    """Where the store keeps the version's model artifacts: a sqlite store's own folder, or a server's proxied root."""
    client = MlflowClient(settings.tracking_uri, registry_uri=settings.tracking_uri)
    uri = urlparse(client.get_run(get_version(settings, version).run_id).info.artifact_uri)
    return (Path(uri.path) if artifacts_root is None else artifacts_root / uri.path.lstrip("/")) / "model"


def rewrite_as_a_registry_writer_could(
    settings: RegistrySettings, version: int, artifacts_root: Path | None, change, database: Path
) -> None:
    """`change(layout, manifest)`, then the stored listing and both digests on the run made to match, so every checksum
    holds. MLflow refuses to change a logged param, so the writer edits the store's database (`database`)."""
    folder = artifact_folder(settings, version, artifacts_root)
    layout, manifest = (json.loads((folder / name).read_text()) for name in (LAYOUT_NAME, MANIFEST_NAME))
    change(layout, manifest)
    (folder / LAYOUT_NAME).write_text(json.dumps(layout, indent=1, sort_keys=True))
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    listing = json.loads((folder / STORED_NAME).read_text())
    for name in (LAYOUT_NAME, MANIFEST_NAME):
        listing["files"][name] = {"sha256": sha256(folder / name), "bytes": (folder / name).stat().st_size}
    (folder / STORED_NAME).write_text(json.dumps(listing, indent=1, sort_keys=True))
    run_id = get_version(settings, version).run_id
    with sqlite3.connect(database) as db:
        for key, name in ((STORED_SHA256, STORED_NAME), (MANIFEST_SHA256, MANIFEST_NAME)):
            db.execute("UPDATE params SET value = ? WHERE run_uuid = ? AND key = ?", (sha256(folder / name), run_id, key))


def write_outside(tmp_path: Path):
    """The layout adds a file named ../../../escaped.txt, a copy of config.json, to the rebuilt folder."""

    def change(layout, manifest):
        layout["files"]["../../../escaped.txt"] = {"parent": "config.json"}

    return change


def write_to_an_absolute_path(tmp_path: Path):
    def change(layout, manifest):
        layout["files"][str(tmp_path / "escaped.txt")] = {"parent": "config.json"}

    return change


def copy_a_file_of_the_machine_in(tmp_path: Path):
    """config.json taken from an absolute path (a secret of the downloading machine), the manifest saying so."""
    secret = tmp_path / "secret.txt"
    secret.write_text("a file of the machine that downloads")

    def change(layout, manifest):
        layout["files"]["config.json"] = {"stored": str(secret)}
        manifest["files"]["config.json"] = {"sha256": sha256(secret), "bytes": secret.stat().st_size}

    return change


ESCAPES = {
    ".. in a file name": (write_outside, r"names the file '\.\./\.\./\.\./escaped\.txt', which leaves its folder"),
    "absolute file name": (write_to_an_absolute_path, r"escaped\.txt', which leaves its folder"),
    "absolute stored file": (copy_a_file_of_the_machine_in, r"secret\.txt', which leaves its folder"),
}


def assert_refused_and_nothing_written(settings: RegistrySettings, tmp_path: Path, message: str) -> None:
    fresh = settings.model_copy(update={"cache_dir": tmp_path / "fresh-cache"})
    with pytest.raises(LayerMoEError, match=message):
        download_version(fresh, 2, tmp_path / "downloads" / "fetched")
    assert not list(tmp_path.rglob("escaped.txt")) and not (tmp_path / "downloads" / "fetched").exists()


@pytest.mark.parametrize("escape", ESCAPES)
def test_a_layout_naming_a_path_outside_the_folder_is_refused_and_nothing_is_written(tmp_path, escape):
    settings = RegistrySettings(tracking_uri=f"sqlite:///{tmp_path}/store/mlflow.db", cache_dir=tmp_path / "cache")
    base_and_child(settings, tmp_path)
    change, message = ESCAPES[escape]
    rewrite_as_a_registry_writer_could(settings, 2, None, change(tmp_path), tmp_path / "store" / "mlflow.db")
    assert_refused_and_nothing_written(settings, tmp_path, message)


def test_a_layout_of_another_format_is_refused_with_its_fix_and_nothing_is_written(tmp_path, capsys):
    settings = RegistrySettings(tracking_uri=f"sqlite:///{tmp_path}/store/mlflow.db", cache_dir=tmp_path / "cache")
    base_and_child(settings, tmp_path)

    def first_format(layout, manifest):
        layout["format"] = "layermoe-layout/1"

    rewrite_as_a_registry_writer_could(settings, 2, None, first_format, tmp_path / "store" / "mlflow.db")
    assert_refused_and_nothing_written(settings, tmp_path, "layout format 'layermoe-layout/1', and this layermoe reads")
    capsys.readouterr()
    assert layermoe(["registry", "--tracking-uri", settings.tracking_uri, "download", "2", str(tmp_path / "cli")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("layermoe: error:")]
    assert len(errors) == 1 and errors[0].endswith("re-register the version from its checkpoint"), errors
    assert not (tmp_path / "cli").exists()


def test_a_layout_naming_a_path_outside_the_folder_is_refused_through_a_server(tmp_path, capfd):
    """The same, with artifacts proxied by an `mlflow server`, and from the command line: one error line."""
    with running_mlflow_server(f"sqlite:///{tmp_path}/server.db", tmp_path / "server") as server:
        settings = RegistrySettings(tracking_uri=server.tracking_uri, cache_dir=tmp_path / "cache")
        base_and_child(settings, tmp_path)
        rewrite_as_a_registry_writer_could(settings, 2, server.artifacts_dir, write_outside(tmp_path), tmp_path / "server.db")
        assert_refused_and_nothing_written(settings, tmp_path, ESCAPES[".. in a file name"][1])
        rewrite_as_a_registry_writer_could(
            settings, 2, server.artifacts_dir, copy_a_file_of_the_machine_in(tmp_path), tmp_path / "server.db"
        )
        capfd.readouterr()
        assert layermoe(["registry", "--tracking-uri", server.tracking_uri, "download", "2", str(tmp_path / "cli")]) == 2
        errors = [line for line in capfd.readouterr().err.splitlines() if line.startswith("layermoe: error:")]
        assert len(errors) == 1 and "secret.txt', which leaves its folder" in errors[0], errors
        assert not (tmp_path / "cli").exists()


def test_a_damaged_or_symlinked_cache_of_a_remote_store_is_fetched_again(tmp_path, caplog):
    """A remote store's files are cached once; a cached weight that changed, or a cached file that became a symlink,
    fails the rebuilt model's check, and the lineage's copies are checked byte for byte, the bad one fetched again."""
    with running_mlflow_server(f"sqlite:///{tmp_path}/server.db", tmp_path / "server") as server:
        settings, folders = build_chain(tmp_path, "qwen2", torch.float32, server.tracking_uri)
        download_version(settings, 4, tmp_path / "first")
        weights = settings.version_cache(1) / "model.safetensors"  # the base, which every later version reads from
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF  # inside a random weight matrix (the tail holds all-ones norms, which dedupe)
        weights.write_bytes(bytes(data))
        local = download_version(settings, 4, tmp_path / "second")
        assert "version 4 of 'layermoe': model.safetensors is corrupt (sha256 differs from the one registered)" in caplog.text
        assert "version 1 of 'layermoe': model.safetensors is corrupt" in caplog.text  # found by the byte-for-byte check
        assert sha256(local.path / "model.safetensors") == sha256(folders[-1] / "model.safetensors")
        assert sha256(weights) == sha256(folders[0] / "model.safetensors")  # the damaged cached file was replaced

        secret = tmp_path / "secret.txt"
        secret.write_text("a file of the machine that downloads")
        config = settings.version_cache(1) / "config.json"
        config.unlink()
        config.symlink_to(secret)
        local = download_version(settings, 2, tmp_path / "third")
        assert "config.json is a symlink, which could point at any file; refused" in caplog.text
        assert sha256(local.path / "config.json") == sha256(folders[1] / "config.json") and not config.is_symlink()


def test_a_symlink_in_a_local_store_is_refused_not_followed(chain, tmp_path):
    settings, folders = chain
    stored = artifact_folder(settings, 2, None) / "config.json"
    secret = tmp_path / "secret.json"
    shutil.copyfile(stored, secret)  # the registered bytes, so only the link itself can be refused
    stored.unlink()
    stored.symlink_to(secret)
    fresh = settings.model_copy(update={"cache_dir": tmp_path / "fresh-cache"})
    with pytest.raises(LayerMoEError, match=r"config\.json.*symlink"):
        download_version(fresh, 2, tmp_path / "fetched")
    assert not (tmp_path / "fetched").exists() and not fresh.version_cache(2).exists()
