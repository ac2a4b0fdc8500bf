"""The MLflow registry: lineage, aliases only via promote, verified downloads, clear errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from pydantic import ValidationError  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from layermoe_core import LayerMoEError, expand, insert_classifiers  # noqa: E402
from registry import (  # noqa: E402
    RegistrySettings,
    RoundInfo,
    download_version,
    get_version,
    lineage,
    list_versions,
    promote,
    register_base,
    register_child,
    show_version,
    tag_version,
    version_table,
)

from .conftest import save_with_tiny_tokenizer, tiny_model  # noqa: E402
from .tiny_tokenizer import tiny_tokenizer  # noqa: E402

ROUND_1 = RoundInfo(round=1, old_languages=["en"], new_languages=["el"], allocation=[2, 0, 1], classifier_layers=[0])


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """One migrated MLflow database, copied per test: creating the schema is the slow part."""
    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def settings(empty_store, tmp_path) -> RegistrySettings:
    db = tmp_path / "mlruns" / "mlflow.db"
    db.parent.mkdir()
    shutil.copyfile(empty_store, db)
    return RegistrySettings(tracking_uri=f"sqlite:///{db}")


@pytest.fixture
def base_dir(tmp_path) -> Path:
    return save_with_tiny_tokenizer(tiny_model("qwen2"), tmp_path / "base")


@pytest.fixture
def child(tmp_path):
    """A round-1 child whose new experts and routers differ from the parent's, saved with its tokenizer."""
    model = expand(tiny_model("qwen2"), ROUND_1.allocation, ["en"], ["el"])
    insert_classifiers(model, ROUND_1.classifier_layers)
    torch.manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn_like(param))
    path = tmp_path / "child"
    model.eval().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return model, path


@pytest.fixture
def plot(tmp_path) -> Path:
    fig, ax = plt.subplots(figsize=(2, 1))
    ax.bar([0, 1, 2], ROUND_1.allocation)
    fig.savefig(tmp_path / "whatever.png")
    plt.close(fig)
    return tmp_path / "whatever.png"


@pytest.fixture
def registered(settings, base_dir, child, plot):
    """Version 1: the base (en). Version 2: its round-1 child (el), with tables, plot, metrics and params."""
    base = register_base(settings, base_dir, ["en"], description="tiny base")
    similarity = pd.DataFrame({"layer": [0, 1, 2], "similarity": [0.5, 0.9, 0.7]})
    kid = register_child(
        settings,
        child[1],
        base.version,
        ROUND_1,
        tables={"similarity": similarity},
        plots={"allocation": plot},
        metrics={"ppl_el": 12.5, "ppl_en": 9.0},
        params={"delta": 3, "languages": ["el"]},
    )
    return base, kid


def test_a_table_logged_on_a_version_reads_back_by_name(settings, registered):
    base, kid = registered
    assert version_table(settings, kid.version, "similarity").to_dict("list") == {"layer": [0, 1, 2], "similarity": [0.5, 0.9, 0.7]}
    assert version_table(settings, kid.version, "evaluation") is None  # that round logged no such table
    assert version_table(settings, base.version, "similarity") is None


def artifact_dir(settings: RegistrySettings, run_id: str) -> Path:
    return Path(urlparse(MlflowClient(settings.tracking_uri).get_run(run_id).info.artifact_uri).path)


def test_child_version_carries_six_short_tags_and_its_record_on_the_run(settings, registered, child):
    base, kid = registered
    model, _ = child
    assert (base.version, kid.version) == (1, 2)
    assert kid.tags == {
        "kind": "child",
        "round": "1",
        "languages": "en + el",
        "parent": "1",
        "weights": "delta",
    }  # no verdict: none was given
    assert base.tags == {
        "kind": "base",
        "round": "0",
        "languages": "en",
        "verdict": "base",
        "weights": "whole",
    }
    assert (kid.parent_version, kid.round, kid.old_languages, kid.new_languages) == (1, 1, ["en"], ["el"])
    assert kid.allocation == [2, 0, 1] and kid.classifier_layers == [0]
    assert kid.params_total == model.num_parameters()
    assert kid.params_added == model.num_parameters() - tiny_model("qwen2").num_parameters()
    assert kid.source == f"runs:/{kid.run_id}/model" and kid.status == "READY" and kid.is_ready

    run = MlflowClient(settings.tracking_uri).get_run(kid.run_id)
    assert run.data.metrics == {"ppl_el": 12.5, "ppl_en": 9.0}
    record = {key: value for key, value in run.data.params.items() if key.startswith("layermoe.")}
    assert {key: value for key, value in run.data.params.items() if key not in record} == {"delta": "3", "languages": '["el"]'}
    assert record["layermoe.allocation"] == "[2, 0, 1]" and record["layermoe.manifest_sha256"] == kid.manifest_sha256
    assert run.data.tags["parent"] == "1" and run.info.status == "FINISHED"
    stored = artifact_dir(settings, kid.run_id)
    assert pd.read_csv(stored / "tables" / "similarity.csv")["similarity"].tolist() == [0.5, 0.9, 0.7]
    assert (stored / "plots" / "allocation.png").read_bytes()[:4] == b"\x89PNG"
    # a delta on version 1: the new config and weights, not the unchanged tokenizer; an MLflow model (MLmodel)
    assert {p.name for p in (stored / "model").iterdir()} == {
        "config.json",
        "model.safetensors.delta.safetensors",
        "MLmodel",
        "layermoe_files.json",
        "layermoe_layout.json",
        "layermoe_stored.json",
        "layermoe_tensors.json",
    }
    assert kid.storage == "delta" and base.storage == "whole"


def test_aliases_move_only_through_promote(settings, registered):
    base, kid = registered
    assert base.aliases == [] and kid.aliases == []
    with pytest.raises(LayerMoEError, match=r"alias 'champion' is not set.*versions \[1, 2\]"):
        get_version(settings, "champion")
    assert promote(settings, base.version).aliases == ["champion"]
    assert get_version(settings, "champion").version == 1
    promote(settings, kid.version)
    assert get_version(settings, "champion").version == 2
    assert list_versions(settings)["aliases"].tolist() == ["", "champion"]


def test_download_verifies_and_reloads_with_identical_logits(settings, registered, child, tmp_path, token_ids):
    model, _ = child
    promote(settings, registered[1].version)
    local = download_version(settings, "champion", tmp_path / "fetched")
    assert (local.path, local.version, local.run_id) == (tmp_path / "fetched", 2, registered[1].run_id)
    assert local.tags["parent"] == "1"
    reloaded = AutoModelForCausalLM.from_pretrained(local.path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(token_ids).logits, model(token_ids).logits, atol=0, rtol=0)
        assert not torch.allclose(model(token_ids).logits, tiny_model("qwen2")(token_ids).logits, atol=1e-3)
    assert AutoTokenizer.from_pretrained(local.path)("Hi 2").input_ids == tiny_tokenizer()("Hi 2").input_ids


def one_byte_flipped(data: bytes) -> bytes:
    """One byte in the middle changed: inside a random weight matrix that every later version reads. (The file's
    tail holds all-ones norms, whose bytes a child takes from the first equal tensor, so a later version never
    reads them.)"""
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    return bytes(flipped)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: f.write_bytes(f.read_bytes()[:-100]), r"model\.safetensors is truncated or corrupt"),
        (lambda f: f.write_bytes(one_byte_flipped(f.read_bytes())), r"model\.safetensors is corrupt \(sha256"),
    ],
    ids=["truncated", "same-size-corrupt"],
)
def test_damaged_weights_are_named_and_never_reach_dest(settings, registered, tmp_path, damage, message):
    weights = artifact_dir(settings, registered[0].run_id) / "model" / "model.safetensors"  # the base, which version 2 builds on
    damage(weights)
    elsewhere = settings.model_copy(update={"cache_dir": tmp_path / "empty-cache"})  # another machine: nothing cached yet
    with pytest.raises(LayerMoEError, match="version 1 of 'layermoe': " + message):
        download_version(elsewhere, 2, tmp_path / "fetched")
    assert not (tmp_path / "fetched").exists()
    assert not any(p.name.startswith(".fetched-partial-") for p in tmp_path.iterdir())


def test_missing_version_or_alias_names_what_exists(settings, registered, tmp_path):
    promote(settings, 1, alias="stable")
    with pytest.raises(LayerMoEError, match=r"version 7 does not exist.*versions \[1, 2\] and aliases \{'stable': 1\}"):
        download_version(settings, 7, tmp_path / "a")
    with pytest.raises(LayerMoEError, match=r"alias 'champion' is not set.*versions \[1, 2\] and aliases \{'stable': 1\}"):
        download_version(settings, "champion", tmp_path / "b")
    other = settings.model_copy(update={"registered_model_name": "elsewhere"})
    with pytest.raises(LayerMoEError, match=r"'elsewhere' does not exist.*registered models there: \['layermoe'\]"):
        show_version(other, 1)


def test_pickle_files_are_refused_at_registration_and_download(settings, registered, base_dir, tmp_path):
    (base_dir / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(LayerMoEError, match=r"pickle files \['pytorch_model\.bin'\]"):
        register_base(settings, base_dir, ["en"])
    assert list_versions(settings)["version"].tolist() == [1, 2]  # nothing was registered

    shutil.copyfile(base_dir / "pytorch_model.bin", artifact_dir(settings, registered[0].run_id) / "model" / "extra.pt")
    with pytest.raises(LayerMoEError, match=r"pickle files \['extra\.pt'\]"):
        download_version(settings.model_copy(update={"cache_dir": tmp_path / "empty-cache"}), 2, tmp_path / "fetched")


def test_list_show_and_lineage_describe_versions(settings, registered):
    table = list_versions(settings)
    assert table[["version", "parent", "round", "languages", "new_languages"]].astype(object).values.tolist() == [
        [1, pd.NA, 0, "en", ""],
        [2, 1, 1, "en,el", "el"],
    ]
    shown = show_version(settings, "2")
    assert shown["parent_version"] == 1 and shown["allocation"] == [2, 0, 1] and shown["languages"] == ["en", "el"]
    assert shown["metrics"]["ppl_el"] == 12.5 and shown["params"]["delta"] == "3"
    assert shown["run_id"] == registered[1].run_id and shown["status"] == "READY"
    assert [v.version for v in lineage(settings, 2)] == [2, 1]


def test_tag_version_notes_on_the_run_and_keeps_the_versions_six_tags(settings, registered):
    tagged = tag_version(settings, 2, {"layermoe.gate_overridden": "true", "layermoe.note": "old-language drift 0.4"})
    assert tagged.gate_overridden and tagged.run_tags["layermoe.note"] == "old-language drift 0.4"
    assert show_version(settings, 2)["gate_overridden"] is True and len(tagged.tags) <= 6
    for lineage_tag in ("parent", "verdict"):
        with pytest.raises(LayerMoEError, match=lineage_tag):
            tag_version(settings, 2, {lineage_tag: "7"})


def test_child_round_info_must_match_its_config_and_parent(settings, registered, child):
    kwargs = dict(tables={}, plots={}, metrics={}, params={})
    with pytest.raises(LayerMoEError, match=r"does not match the newest round.*'allocation': \[2, 0, 1\]"):
        register_child(settings, child[1], 1, ROUND_1.model_copy(update={"allocation": [1, 1, 1]}), **kwargs)
    with pytest.raises(LayerMoEError, match=r"round 1 does not follow parent version 2 \(round 1\); pass round 2"):
        register_child(settings, child[1], 2, ROUND_1, **kwargs)
    with pytest.raises(ValidationError, match="round"):
        RoundInfo(**{**ROUND_1.model_dump(), "round": 0})


def test_unreachable_tracking_server_names_uri_and_kept_checkpoint(base_dir):
    dead = RegistrySettings(tracking_uri="http://127.0.0.1:9", connect_timeout_s=2)
    with pytest.raises(LayerMoEError, match=r"registry at http://127\.0\.0\.1:9 is unreachable") as caught:
        register_base(dead, base_dir, ["en"])
    assert f"checkpoint is still at {base_dir}" in str(caught.value)


def test_settings_default_to_env_or_local_sqlite_and_refuse_file_store(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert RegistrySettings().tracking_uri == "http://tracking:5000"
    assert RegistrySettings().experiment_artifact_location() is None  # the server decides
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    local = RegistrySettings()
    assert local.tracking_uri == "sqlite:///mlruns/mlflow.db"
    assert local.experiment_artifact_location() == (Path("mlruns").resolve() / "artifacts").as_uri()
    with pytest.raises(ValidationError, match="file store is refused"):
        RegistrySettings(tracking_uri=str(tmp_path / "mlruns"))


def test_cli_promotes_downloads_and_lists_verdict_drift_and_gain(settings, registered, tmp_path, capsys):
    from flows.cli import main as layermoe

    uri = ["registry", "--tracking-uri", settings.tracking_uri]
    assert layermoe([*uri, "promote", "2", "--alias", "stable"]) == 0
    assert "version 2 now holds the alias 'stable'" in capsys.readouterr().out
    assert layermoe([*uri, "promote", "7"]) == 2
    assert "version 7 does not exist" in capsys.readouterr().err
    assert layermoe([*uri, "download", "stable", str(tmp_path / "stable")]) == 0
    assert (tmp_path / "stable" / "model.safetensors").is_file()
    snippet = capsys.readouterr().out.split("load it in Python with:\n", 1)[1]
    loaded = run_in_fresh_process(snippet + "print(type(model).__name__, model.config.languages, type(tokenizer).__name__)", tmp_path)
    assert loaded.split() == ["LayerMoEForCausalLM", "['en',", "'el']", type(tiny_tokenizer()).__name__]
    assert layermoe([*uri, "list"]) == 0
    header, base_row, child_row = capsys.readouterr().out.splitlines()[-3:]
    columns = "version aliases parent round languages new_languages verdict old_drift_max pinned_drift_max new_gain storage stored_bytes"
    assert header.split()[:12] == columns.split()
    assert base_row.split()[0] == "1" and "base" in base_row.split()
    assert "stable" in child_row and "delta" in child_row


def run_in_fresh_process(code: str, cwd: Path) -> str:
    """`code`'s output in a new interpreter that imports nothing first, as a user's own script would."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def test_a_bare_import_of_layermoe_core_does_not_load_a_version(settings, registered, tmp_path):
    """Why the download's snippet imports modeling_layermoe: the line it once printed fails as written."""
    path = download_version(settings, 2, tmp_path / "v2").path
    code = f"import layermoe_core\nfrom transformers import AutoModelForCausalLM\nAutoModelForCausalLM.from_pretrained({str(path)!r})"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "layermoe" in done.stderr


def test_cli_show_prints_the_version_and_its_card_and_json_on_request(settings, registered, capsys):
    from flows.cli import main as layermoe

    uri = ["registry", "--tracking-uri", settings.tracking_uri]
    assert layermoe([*uri, "show", "2"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("layermoe version 2\n") and "  lineage    2 <- 1\n" in text and "  round      1: en, el (new: el)\n" in text
    assert "Round 1: adds el" in text and "## " not in text and "|---" not in text  # the card rendered, not its markdown
    assert layermoe([*uri, "show", "2", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (
        shown["lineage"] == [2, 1]
        and shown["metrics"]["ppl_el"] == 12.5
        and shown["description"].startswith("Round 1 +el · not gated\n\n## Round 1")
    )


def test_cli_finds_the_registered_model_when_the_store_holds_one_and_names_them_otherwise(settings, base_dir, capsys):
    from flows.cli import main as layermoe

    named = settings.model_copy(update={"registered_model_name": "tiny-demo"})
    register_base(named, base_dir, ["en"])
    assert layermoe(["registry", "list", "--tracking-uri", settings.tracking_uri]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[:2] == ["1", "<NA>"]
    MlflowClient(settings.tracking_uri).create_registered_model("other")
    assert layermoe(["registry", "list", "--tracking-uri", settings.tracking_uri]) == 2
    assert "holds 2 registered models (other, tiny-demo); pick one with --model-name" in capsys.readouterr().err
    assert layermoe(["registry", "show", "1", "--tracking-uri", settings.tracking_uri, "--model-name", "tiny-demo"]) == 0
