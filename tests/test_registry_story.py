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
    RoundInfo,
    Verdict,
    list_versions,
    register_base,
    register_child,
)
from registry.model_card import child_card

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
        RoundInfo(round=1, old_languages=["en"], new_languages=["el"], allocation=[2, 0, 1], classifier_layers=[0]),
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
        RoundInfo(round=2, old_languages=["en", "el"], new_languages=["hu"], allocation=[1, 1, 0], classifier_layers=[0]),
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
    assert card.split("\n")[0] == "Round 1 +el · PASSED the gate · old drift max 0.010 · gain 1.100"
    assert "## Round 1: adds el" in card
    assert "**Old languages:** en" in card and "**New languages:** el" in card
    assert f"[version 1](#/models/{settings.registered_model_name}/versions/1)" in card
    assert "| 0 | 2 | yes |" in card and "| 1 | 0 |  |" in card and "| 2 | 1 |  |" in card
    assert "**Gate verdict: PASSED**" in card and "- new language el: improved" in card

    rejected, tags2, run2 = version_page(story, 3)
    assert rejected.split("\n")[0] == "Round 2 +hu · REJECTED by the gate · old drift max 0.290 · gain 1.100"
    assert "**Gate verdict: REJECTED**" in rejected and "exceeds" in rejected
    assert (tags["verdict"], tags2["verdict"]) == ("passed", "rejected")
    assert "exceeds" in {t["key"]: t["value"] for t in run2["data"]["tags"]}["layermoe.verdict_reason"]
    base_card, base_tags, _ = version_page(story, 1)
    assert base_tags["verdict"] == "base" and "**Languages:** en" in base_card
    assert base_card.split("\n")[0].startswith("Base model · en · ")


def test_every_version_has_at_most_six_short_tags(story):
    for version in (1, 2, 3):
        _, tags, _ = version_page(story, version)
        assert len(tags) <= 6 and set(tags) <= {
            "kind",
            "round",
            "languages",
            "parent",
            "verdict",
            "weights",
        }
        assert all(len(value) <= 20 for value in tags.values()), tags
        # MLflow's version page lists the tags sorted by key in a table five rows high: the verdict must be in view
        assert "verdict" not in tags or sorted(tags).index("verdict") < 5, sorted(tags)


def test_card_table_has_one_row_per_language_with_loss_parent_child_and_delta(story):
    card, _, _ = version_page(story, 3)
    table = card.split("### Held-out metrics per language\n\n", 1)[1].split("\n\n", 1)[0].split("\n")
    assert table == [
        "| language | group | loss parent | loss child | Δ loss |",
        "|---|---|---:|---:|---:|",
        "| en | old | 2.0100 | 2.3000 | +0.2900 |",
        "| el | old | 2.9000 | 2.8500 | -0.0500 |",
        "| hu | new | 4.2000 | 3.1000 | -1.1000 |",
    ]


def test_every_version_logs_per_language_metrics_under_the_same_keys_and_its_drift_as_params(story):
    _, _, run2 = version_page(story, 2)
    _, _, run3 = version_page(story, 3)
    metrics2 = {m["key"]: m["value"] for m in run2["data"]["metrics"] if "/" not in m["key"]}
    metrics3 = {m["key"]: m["value"] for m in run3["data"]["metrics"] if "/" not in m["key"]}
    assert metrics2 == pytest.approx({"loss.en": 2.01, "loss.el": 2.9, "loss.hu": 4.2})  # hu: measured on it by round 2
    assert metrics3 == pytest.approx({"loss.en": 2.30, "loss.el": 2.85, "loss.hu": 3.1})
    # the mean hides a language that broke: -0.05 + 0.29 -> mean 0.12, max 0.29 is what the gate checks
    params3 = {p["key"]: p["value"] for p in run3["data"]["params"]}
    assert float(params3["layermoe.old_drift_max"]) == pytest.approx(0.29) and float(params3["layermoe.new_gain"]) == pytest.approx(1.1)


def test_base_version_gets_its_held_out_metrics_from_the_first_round(story):
    _, _, base_run = version_page(story, 1)
    assert {m["key"]: m["value"] for m in base_run["data"]["metrics"]} == pytest.approx({"loss.en": 2.0, "loss.el": 4.0})


def test_training_losses_are_curves_under_one_prefix_and_one_off_values_are_params(story):
    server, _ = story
    _, _, run = version_page(story, 2)
    history = api(server, "metrics/get-history", run_id=run["info"]["run_id"], metric_key="train/stage1/loss")["metrics"]
    assert [(m["step"], m["value"]) for m in history] == [(2, 3.0), (4, 2.5)]
    curves = {m["key"] for m in run["data"]["metrics"] if m["key"].startswith("train/")}
    assert curves == {"train/stage1/loss", "train/stage1/learning_rate", "train/stage2/loss"}
    params = {p["key"]: p["value"] for p in run["data"]["params"] if not p["key"].startswith("layermoe.")}
    assert params == {
        "stage1.learning_rate": "0.001",
        "stage1.max_steps": "4",
        "allocation.method": "layermoe",
        "allocation.delta": "3",
        "new_languages": '["el"]',
        "train/stage2/train_loss": "2.15",
        "train/stage2/train_runtime": "1.0",
    }


def test_registry_list_shows_verdict_drift_and_gain(story):
    _, settings = story
    table = list_versions(settings).set_index("version")
    assert table["verdict"].tolist() == ["base", "passed", "rejected"]
    assert table.loc[3, "old_drift_max"] == pytest.approx(0.29) and table.loc[2, "new_gain"] == pytest.approx(1.1)
    assert pd.isna(table.loc[1, "old_drift_max"])


def test_card_row_per_language_adds_pinned_drift_chrf_and_classifier_accuracy_where_measured():
    rows = [
        ("en", "old", "loss", 2.0, 2.01),
        ("en", "old", "pinned_loss", 2.0, 2.0),
        ("en", "old", "translation.en-hu.chrfpp", 40.0, 39.5),
        ("hu", "new", "loss", 4.0, 3.0),
        ("hu", "new", "translation.hu-en.chrfpp", 10.0, 20.0),
    ]
    measured = pd.DataFrame(
        [{"language": lang, "group": g, "metric": m, "parent": p, "child": c, "delta": c - p} for lang, g, m, p, c in rows]
    )
    accuracy = pd.DataFrame(
        [
            {"layer": 0, "language": "en", "accuracy": 0.95, "target": 0.8},
            {"layer": 1, "language": "en", "accuracy": 0.9, "target": 0.8},
            {"layer": 0, "language": "hu", "accuracy": 0.7, "target": 0.8},
        ]
    )
    verdict = Verdict(passed=False, reasons=["classifier in layer 0: hu below target"], decided_by="pending")
    card = child_card("m", 1, 1, 0, ["en"], ["hu"], [1, 1], [0, 1], measured, verdict, None, accuracy)
    assert card.split("\n")[0] == "Round 1 +hu · PENDING review (gate fails) · old drift max 0.010 · gain 1.000"
    table = card.split("### Held-out metrics per language\n\n", 1)[1].split("\n\n", 1)[0].split("\n")
    assert table == [
        "| language | group | loss parent | loss child | Δ loss | pinned drift | chrF++ child (Δ) | classifier accuracy (worst layer) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        "| en | old | 2.0000 | 2.0100 | +0.0100 | +0.0000 | en-hu 39.5 (-0.5) | 0.900 |",
        "| hu | new | 4.0000 | 3.0000 | -1.0000 |  | hu-en 20.0 (+10.0) | 0.700 |",
    ]
