"""Stage 2 trains the routing classifiers to a held-out accuracy target within a step cap; the gate names a
classifier that missed it (docs/pinned-serving.md)."""

from __future__ import annotations

import pandas as pd
import pytest
from transformers import AutoModelForCausalLM

from layermoe_core import LayerMoEError, expand, insert_classifiers
from layermoe_core.analysis.routing_stats import routing_statistics
from layermoe_core.evaluation.gates import GateSettings, evaluate_gates
from layermoe_core.training.trainer import Stage2Settings, train_stage2

from .conftest import tiny_model
from .test_lifelong_invariants import text
from .test_training import QUICK, WIDE

OLD, NEW = ["aa"], ["bb"]


def stage2(tmp_path, family: str, target: float, cap: int | None, max_steps: int = 10):
    """A round-1 child (classifiers in layers 0 and 2) through Stage 2 with held-out text of both languages."""
    child = expand(tiny_model(family, **WIDE), [1, 1, 1], OLD, NEW, seed=1)
    insert_classifiers(child, [0, 2], seed=1)
    settings = Stage2Settings(
        learning_rate=5e-2,
        max_steps=max_steps,
        classifier_coef=2.0,
        classifier_target_accuracy=target,
        classifier_max_steps=cap,
        **QUICK,
    )
    heldout = {"aa": text("aa", 8, seed=7), "bb": text("bb", 8, seed=7)}
    return train_stage2(child, {"aa": text("aa", 24)}, {"bb": text("bb", 24)}, settings, tmp_path, heldout_sequences=heldout), heldout


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_stage2_trains_on_past_its_planned_steps_until_every_classifier_reaches_the_target(tmp_path, family):
    result, heldout = stage2(tmp_path, family, target=0.95, cap=200, max_steps=2)
    assert 2 < result.global_step < 200, "the planned 2 steps do not reach 0.95 here; the cap of 200 does"
    assert (result.global_step - 2) % QUICK["logging_steps"] == 0  # measured every logging_steps past the plan
    assert sorted((entry.layer, entry.language) for entry in result.classifier_accuracy) == [(0, "aa"), (0, "bb"), (2, "aa"), (2, "bb")]
    assert all(entry.accuracy >= 0.95 and entry.step == result.global_step for entry in result.classifier_accuracy)
    # the recorded figures are the saved model's
    saved = routing_statistics(AutoModelForCausalLM.from_pretrained(result.model_dir), heldout, OLD).dropna(subset=["classifier_accuracy"])
    recorded = {(e.layer, e.language): e.accuracy for e in result.classifier_accuracy}
    assert {(r.layer, r.language): r.classifier_accuracy for r in saved.itertuples()} == pytest.approx(recorded, abs=1e-6)
    decision = evaluate_gates(passing_comparison(), GateSettings(), result.classifier_accuracy)
    assert decision.passed and decision.reasons[-2:] == [
        f"classifier in layer {layer}: held-out accuracy at least "
        f"{min(e.accuracy for e in result.classifier_accuracy if e.layer == layer):.3f} on every language, the target reached"
        for layer in (0, 2)
    ]


def test_a_target_not_reached_within_the_cap_is_recorded_and_the_gate_reason_names_the_classifier(tmp_path):
    result, _ = stage2(tmp_path, "qwen2", target=1.0, cap=12, max_steps=4)
    assert result.global_step == 12
    below = [entry for entry in result.classifier_accuracy if entry.accuracy < 1.0]
    assert below, "an accuracy of 1.0 on every token is out of reach in 12 steps"
    decision = evaluate_gates(passing_comparison(), GateSettings(), result.classifier_accuracy)
    assert decision.passed  # the verdict is the bounds' (the gate policy's); the reason names the classifier
    drifted = passing_comparison().assign(child=[2.5, 3.0], delta=[0.5, -1.0])
    rejected = evaluate_gates(drifted, GateSettings(), result.classifier_accuracy)
    assert not rejected.passed and rejected.reasons[0].startswith("old language aa: loss 2.0000 -> 2.5000")
    assert any(r.startswith("classifier in layer") for r in rejected.reasons)  # named beside the failed bound
    layer = below[0].layer
    (reason,) = [r for r in decision.reasons if r.startswith(f"classifier in layer {layer}: held-out accuracy ")]
    assert f"{below[0].language} {below[0].accuracy:.3f}" in reason and "below the target 1.00 after 12 Stage-2 steps" in reason


def test_without_a_cap_stage2_stops_at_its_planned_steps_and_still_records_accuracy(tmp_path):
    result, _ = stage2(tmp_path, "llama", target=1.0, cap=None, max_steps=6)
    assert result.global_step == 6 and len(result.classifier_accuracy) == 4


def test_a_cap_below_the_planned_steps_is_refused():
    with pytest.raises(LayerMoEError, match=r"classifier_max_steps=5 needs max_steps set and at most equal to it \(max_steps=10\)"):
        Stage2Settings(max_steps=10, classifier_max_steps=5)


def passing_comparison() -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"language": "aa", "group": "old", "metric": "loss", "parent": 2.0, "child": 2.0, "delta": 0.0},
            {"language": "bb", "group": "new", "metric": "loss", "parent": 4.0, "child": 3.0, "delta": -1.0},
        ]
    )


def test_held_out_text_must_cover_every_language(tmp_path):
    child = expand(tiny_model("qwen2", **WIDE), [1, 1, 1], OLD, NEW)
    insert_classifiers(child, [0])
    settings = Stage2Settings(max_steps=2, **QUICK)
    with pytest.raises(LayerMoEError, match=r"held-out sequences lack \['bb'\]"):
        train_stage2(child, {"aa": text("aa", 8)}, {"bb": text("bb", 8)}, settings, tmp_path, heldout_sequences={"aa": text("aa", 4)})
