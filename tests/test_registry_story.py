"""What a person sees in the MLflow UI, read from a real `mlflow server`'s REST API: each version tells its story."""

from __future__ import annotations

import json
import tempfile
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import pytest

from registry import (
    RegistrySettings,
    Verdict,
    list_versions,
    register_base,
    register_child,
)

from .conftest import save_with_tiny_tokenizer, tiny_model
from .services import MlflowServer, running_mlflow_server
from .test_registry_delta import grow


@pytest.fixture(scope="module")
def sqlite_mlflow_server() -> Iterator[MlflowServer]:
    """A real `mlflow server` on loopback with a sqlite backend (the PostgreSQL one needs postgres binaries)."""
    with tempfile.TemporaryDirectory(prefix="layermoe-story-") as workdir:
        with running_mlflow_server(f"sqlite:///{workdir}/mlflow.db", Path(workdir) / "server") as server:
            yield server


def api(server: MlflowServer, path: str, **params) -> dict:
    with urllib.request.urlopen(f"{server.tracking_uri}/api/2.0/mlflow/{path}?{urllib.parse.urlencode(params)}") as response:
        return json.loads(response.read())


def comparison(old: dict[str, tuple[float, float]], new: dict[str, tuple[float, float]]) -> pd.DataFrame:
    rows = [
        {"language": lang, "group": group, "metric": "loss", "parent": p, "child": c, "delta": c - p}
        for group, languages in (("old", old), ("new", new))
        for lang, (p, c) in languages.items()
    ]
    return pd.DataFrame(rows)


HISTORY = {
    "stage1": [
        {"loss": 3.0, "learning_rate": 1e-3, "epoch": 0.5, "step": 2},
        {"loss": 2.5, "learning_rate": 5e-4, "epoch": 1.0, "step": 4},
    ],
    "stage2": [{"loss": 2.2, "step": 2}, {"loss": 2.1, "step": 4}, {"train_loss": 2.15, "train_runtime": 1.0, "step": 4}],
}
PLAN = {"stage1": {"learning_rate": 0.001, "max_steps": 4}, "allocation": {"method": "layermoe", "delta": 3}, "new_languages": ["el"]}


@pytest.fixture(scope="module")
def story(sqlite_mlflow_server, tmp_path_factory):
    """Base (en) -> round 1 (adds el, passes) -> round 2 (adds hu, rejected), on the real server."""
    root = tmp_path_factory.mktemp("story")
    settings = RegistrySettings(tracking_uri=sqlite_mlflow_server.tracking_uri, registered_model_name=f"story-{uuid.uuid4().hex[:6]}")
    base = tiny_model("qwen2")
    save_with_tiny_tokenizer(base, root / "base")
    register_base(settings, root / "base", ["en"])
    round1 = grow(base, ["en"], ["el"], [2, 0, 1], seed=3)
    save_with_tiny_tokenizer(round1, root / "r1")
    fig, _ = plt.subplots(figsize=(2, 1))
    fig.savefig(root / "plot.png")
    plt.close(fig)
    first = comparison({"en": (2.00, 2.01)}, {"el": (4.0, 2.9)})
    register_child(
        settings,
        root / "r1",
        1,
        {"round": 1, "old_languages": ["en"], "new_languages": ["el"], "allocation": [2, 0, 1], "classifier_layers": [0]},
        {"evaluation": first},
        {"routing": root / "plot.png"},
        {},
        PLAN,
        comparison=first,
        verdict=Verdict(passed=True, reasons=["old language en: within", "new language el: improved"]),
        training_history=HISTORY,
    )
    save_with_tiny_tokenizer(grow(round1, ["en", "el"], ["hu"], [1, 1, 0], seed=4), root / "r2")
    second = comparison({"en": (2.01, 2.30), "el": (2.9, 2.85)}, {"hu": (4.2, 3.1)})
    register_child(
        settings,
        root / "r2",
        2,
        {"round": 2, "old_languages": ["en", "el"], "new_languages": ["hu"], "allocation": [1, 1, 0], "classifier_layers": [0]},
        {"evaluation": second},
        {},
        {},
        PLAN,
        comparison=second,
        verdict=Verdict(passed=False, reasons=["old language en: loss 2.0100 -> 2.3000 exceeds"]),
        training_history=HISTORY,
    )
    return sqlite_mlflow_server, settings


def version_page(story, version: int) -> tuple[str, dict[str, str], dict]:
    server, settings = story
    mv = api(server, "model-versions/get", name=settings.registered_model_name, version=version)["model_version"]
    run = api(server, "runs/get", run_id=mv["run_id"])["run"]
    return mv.get("description", ""), {t["key"]: t["value"] for t in mv["tags"]}, run


def test_model_card_names_languages_parent_link_allocation_metrics_and_verdict(story):
    _, settings = story
    card, tags, _ = version_page(story, 2)
    assert "## Round 1: adds el" in card
    assert "**Old languages:** en" in card and "**New languages:** el" in card
    assert f"[version 1](#/models/{settings.registered_model_name}/versions/1)" in card
    assert "| 0 | 2 | yes |" in card and "| 1 | 0 |  |" in card and "| 2 | 1 |  |" in card
    assert "| en | old | loss | 2.0000 | 2.0100 | +0.0100 |" in card and "| el | new | loss | 4.0000 | 2.9000 | -1.1000 |" in card
    assert "**Gate verdict: PASSED**" in card and "- new language el: improved" in card

    rejected, tags2, _ = version_page(story, 3)
    assert "**Gate verdict: REJECTED**" in rejected and "exceeds" in rejected
    assert (tags["layermoe.verdict"], tags2["layermoe.verdict"]) == ("passed", "rejected")
    assert "exceeds" in tags2["layermoe.verdict_reason"]
    base_card, base_tags, _ = version_page(story, 1)
    assert base_tags["layermoe.verdict"] == "base" and "**Languages:** en" in base_card


def test_every_version_logs_per_language_metrics_under_the_same_keys_with_deltas_and_max_drift(story):
    _, _, run2 = version_page(story, 2)
    _, _, run3 = version_page(story, 3)
    metrics2 = {m["key"]: m["value"] for m in run2["data"]["metrics"]}
    metrics3 = {m["key"]: m["value"] for m in run3["data"]["metrics"]}
    assert metrics2["loss.en"] == pytest.approx(2.01) and metrics2["loss.en.parent"] == pytest.approx(2.0)
    assert metrics2["loss.en.delta"] == pytest.approx(0.01) and metrics2["loss.el.delta"] == pytest.approx(-1.1)
    assert {"loss.en", "loss.en.parent", "loss.en.delta", "loss.el", "loss.el.delta"} <= metrics3.keys()
    # the mean hides a language that broke: -0.0 + 0.29 -> mean 0.12, max 0.29 is what the gate checks
    assert metrics3["old_language_drift_max"] == pytest.approx(0.29) and metrics3["old_language_drift"] == pytest.approx(0.12)
    _, tags3, _ = version_page(story, 3)
    assert float(tags3["layermoe.old_drift_max"]) == pytest.approx(0.29) and float(tags3["layermoe.new_gain"]) == pytest.approx(1.1)


def test_base_version_gets_its_held_out_metrics_from_the_first_round(story):
    _, _, base_run = version_page(story, 1)
    assert {m["key"]: m["value"] for m in base_run["data"]["metrics"]} == pytest.approx({"loss.en": 2.0, "loss.el": 4.0})


def test_training_losses_are_curves_and_the_plan_is_flat_params(story):
    server, _ = story
    _, _, run = version_page(story, 2)
    history = api(server, "metrics/get-history", run_id=run["info"]["run_id"], metric_key="stage1.loss")["metrics"]
    assert [(m["step"], m["value"]) for m in history] == [(2, 3.0), (4, 2.5)]
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params == {
        "stage1.learning_rate": "0.001",
        "stage1.max_steps": "4",
        "allocation.method": "layermoe",
        "allocation.delta": "3",
        "new_languages": '["el"]',
    }


def test_registry_list_shows_verdict_drift_and_gain(story):
    _, settings = story
    table = list_versions(settings).set_index("version")
    assert table["verdict"].tolist() == ["base", "passed", "rejected"]
    assert table.loc[3, "old_drift_max"] == pytest.approx(0.29) and table.loc[2, "new_gain"] == pytest.approx(1.1)
    assert pd.isna(table.loc[1, "old_drift_max"])
