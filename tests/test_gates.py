"""Promotion gates: the child keeps its old languages and improves its new ones."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from pydantic import ValidationError

from layermoe_core import LayerMoEError
from layermoe_core.evaluation.gates import GateSettings, evaluate_gates
from layermoe_core.evaluation.metrics import compare_models


def comparison(parent: dict[str, float], child: dict[str, float], old: list[str], new: list[str]) -> pd.DataFrame:
    def table(losses):
        return pd.DataFrame([{"language": k, "loss": v, "perplexity": math.exp(v), "tokens": 10} for k, v in losses.items()])

    return compare_models(table(parent), table(child), old, new)


def test_child_within_old_bound_and_better_on_new_passes_with_every_check_listed():
    table = comparison({"en": 2.0, "es": 2.5, "el": 5.0}, {"en": 2.04, "es": 2.4, "el": 4.0}, ["en", "es"], ["el"])
    decision = evaluate_gates(table)
    assert decision.passed
    assert len(decision.reasons) == 3
    assert decision.reasons[0] == "old language en: loss 2.0000 -> 2.0400 (+0.0400 nats) within the allowed increase of 0.0500 nats"
    assert decision.reasons[2] == "new language el: loss 5.0000 -> 4.0000 (-1.0000 nats) improved"


def test_old_language_forgetting_beyond_the_bound_fails_naming_language_and_numbers():
    table = comparison({"en": 2.0, "es": 2.5, "el": 5.0}, {"en": 2.2, "es": 2.5, "el": 4.0}, ["en", "es"], ["el"])
    decision = evaluate_gates(table)
    assert not decision.passed
    assert decision.reasons == ["old language en: loss 2.0000 -> 2.2000 (+0.2000 nats) exceeds the allowed increase of 0.0500 nats"]


def test_new_language_without_improvement_fails_unless_not_required():
    table = comparison({"en": 2.0, "el": 5.0, "hu": 4.0}, {"en": 2.0, "el": 4.5, "hu": 4.1}, ["en"], ["el", "hu"])
    decision = evaluate_gates(table)
    assert not decision.passed
    assert decision.reasons == ["new language hu: loss 4.0000 -> 4.1000 (+0.1000 nats) did not improve; it must decrease"]
    assert evaluate_gates(table, GateSettings(require_new_improvement=False)).passed


def test_relative_bound_scales_with_the_parents_loss():
    table = comparison({"en": 2.0, "zh": 4.0, "el": 5.0}, {"en": 2.1, "zh": 4.1, "el": 4.0}, ["en", "zh"], ["el"])
    decision = evaluate_gates(table, GateSettings(max_old_loss_increase=0.04, old_loss_bound="relative"))
    assert not decision.passed  # en may rise 0.08, zh 0.16
    assert decision.reasons == ["old language en: loss 2.0000 -> 2.1000 (+0.1000 nats) exceeds the allowed increase of 0.0800 nats"]


def test_nan_loss_never_passes():
    table = comparison({"en": 2.0, "el": 5.0}, {"en": float("nan"), "el": float("nan")}, ["en"], ["el"])
    decision = evaluate_gates(table)
    assert not decision.passed and len(decision.reasons) == 2


def test_missing_new_language_loss_fails_when_improvement_is_required():
    table = comparison({"en": 2.0}, {"en": 2.0}, ["en"], [])
    decision = evaluate_gates(table)
    assert not decision.passed and "no new language has a held-out loss" in decision.reasons[0]


def test_gate_input_is_validated():
    with pytest.raises(LayerMoEError, match="lacks columns"):
        evaluate_gates(pd.DataFrame({"language": ["en"], "loss": [2.0]}))
    with pytest.raises(ValidationError):
        GateSettings(max_old_loss_increase=-0.1)
    with pytest.raises(ValidationError):
        GateSettings(old_loss_bound="percent")
