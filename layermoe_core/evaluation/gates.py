"""Promotion gates: does a child keep its old languages and gain on its new ones?

A round's child becomes `champion` only if it passes; otherwise it is registered as
rejected, with `GateDecision.reasons` saying which language broke which bound.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from ..errors import LayerMoEError
from .translation import CHRF_METRIC

if TYPE_CHECKING:
    from ..training.trainer import ClassifierAccuracy

COMPARISON_COLUMNS = ("language", "group", "metric", "parent", "child", "delta")  # metrics.compare_models' table
# Held-out loss with the model pinned to the language (surgery.pinned_language; docs/pinned-serving.md), old languages only.
PINNED_LOSS = "pinned_loss"
# Held-out bits per UTF-8 byte (metrics.bits_per_byte): measured where parent and child tokenize a language differently.
BITS_PER_BYTE = "bits_per_byte"


class GateSettings(BaseModel):
    """Bounds on the child's held-out loss (and, optionally, translation chrF++) per language, relative to its parent;
    with `promotion: manual` the gate's verdict is advice shown to the reviewer."""

    model_config = ConfigDict(extra="forbid", title="Promotion gate")

    max_old_loss_increase: float = Field(
        0.05,
        ge=0,
        title="Max old-language loss increase",
        description="Largest allowed rise of each old language's loss: nats, or a fraction of the parent's loss.",
    )
    old_loss_bound: Literal["absolute", "relative"] = Field(
        "absolute",
        title="Old-loss bound",
        description="'absolute': the bound is in nats; 'relative': it is a fraction of the parent's loss.",
    )
    require_new_improvement: bool = Field(
        True, title="New languages must improve", description="Every new language's loss must be lower than the parent's."
    )
    max_old_chrf_drop: float | None = Field(
        None,
        ge=0,
        title="Max old-language chrF++ drop",
        description="Largest allowed fall of each old language's chrF++ (points, 0-100) per direction; empty: no chrF gate.",
    )


class GateDecision(BaseModel):
    """`reasons` explain the decision: the failed checks when rejected, every check when passed."""

    model_config = ConfigDict(frozen=True)

    passed: bool
    reasons: list[str]


def _pinned_figure(pinned: pd.DataFrame, language: str) -> str:
    """The pinned drift beside the plain one, when it was measured."""
    if language not in pinned.index:
        return ""
    row = pinned.loc[language]
    return f"; pinned to {language}: {row['parent']:.4f} -> {row['child']:.4f} ({row['delta']:+.4f} nats)"


def evaluate_gates(
    comparison: pd.DataFrame, settings: GateSettings | None = None, classifier_accuracy: Sequence[ClassifierAccuracy] = ()
) -> GateDecision:
    """Apply the gates to a `compare_models` table (its `loss` rows, and its chrF++ rows when bounded). Stage 2's
    held-out classifier accuracies (`TrainResult.classifier_accuracy`) are reported against their target in the
    reasons; the bounds decide the verdict."""
    settings = settings or GateSettings()
    missing = [c for c in COMPARISON_COLUMNS if c not in comparison.columns]
    if missing:
        raise LayerMoEError(
            f"the comparison table lacks columns {missing} (it has {list(comparison.columns)}); "
            "pass the table that evaluation.compare_models returns"
        )
    loss = comparison[comparison["metric"] == "loss"]
    pinned = comparison[comparison["metric"] == PINNED_LOSS].set_index("language")
    passes: list[str] = []
    failures: list[str] = []
    for row in loss[loss["group"] == "old"].itertuples():
        allowed = settings.max_old_loss_increase * (row.parent if settings.old_loss_bound == "relative" else 1.0)
        ok = row.delta <= allowed  # False for NaN
        verdict = "within" if ok else "exceeds"
        (passes if ok else failures).append(
            f"old language {row.language}: loss {row.parent:.4f} -> {row.child:.4f} ({row.delta:+.4f} nats) "
            f"{verdict} the allowed increase of {allowed:.4f} nats" + _pinned_figure(pinned, row.language)
        )
        if row.language in pinned.index and not pinned.loc[row.language, "delta"] <= allowed:  # zero by construction: a fault
            failures.append(
                f"old language {row.language}: pinned loss rose {pinned.loc[row.language, 'delta']:+.4f} nats, beyond "
                f"{allowed:.4f}; pinned to its language the child must compute the version that learned it"
            )
    if settings.require_new_improvement:
        # Where the round extended the vocabulary, per-token losses of new text count different tokens: bits per byte do not.
        bits = comparison[(comparison["metric"] == BITS_PER_BYTE) & (comparison["group"] == "new")]
        new, unit = (bits, "bits per byte") if len(bits) else (loss[loss["group"] == "new"], "nats")
        if new.empty:
            failures.append(
                "no new language has a held-out loss in the comparison, so improvement cannot be checked; "
                "evaluate the new languages' held-out text or set require_new_improvement=False"
            )
        for row in new.itertuples():
            ok = row.delta < 0  # False for NaN
            verdict = "improved" if ok else "did not improve; it must decrease"
            (passes if ok else failures).append(
                f"new language {row.language}: {row.metric} {row.parent:.4f} -> {row.child:.4f} ({row.delta:+.4f} {unit}) {verdict}"
            )
    if settings.max_old_chrf_drop is not None:
        chrf = comparison[comparison["metric"].str.endswith("." + CHRF_METRIC) & (comparison["group"] == "old")]
        for row in chrf.itertuples():
            ok = -row.delta <= settings.max_old_chrf_drop  # False for NaN
            verdict = "within" if ok else "exceeds"
            (passes if ok else failures).append(
                f"old language {row.language}: {row.metric} {row.parent:.2f} -> {row.child:.2f} ({row.delta:+.2f} points) "
                f"{verdict} the allowed drop of {settings.max_old_chrf_drop:.2f} points"
            )
    notes = classifier_notes(classifier_accuracy)  # the verdict stays the bounds' above; the reasons name the classifiers
    if failures:
        return GateDecision(passed=False, reasons=failures + notes)
    return GateDecision(passed=True, reasons=(passes or ["no gate applies: no old-language loss and no new-language requirement"]) + notes)


def classifier_notes(classifier_accuracy: Sequence[ClassifierAccuracy]) -> list[str]:
    """One line per classifier layer: the languages below the target with their held-out accuracy, or its worst accuracy."""
    notes = []
    for layer in sorted({entry.layer for entry in classifier_accuracy}):
        entries = [entry for entry in classifier_accuracy if entry.layer == layer]
        below = [entry for entry in entries if not entry.accuracy >= entry.target]
        if below:
            notes.append(
                f"classifier in layer {layer}: held-out accuracy "
                + ", ".join(f"{entry.language} {entry.accuracy:.3f}" for entry in below)
                + f" below the target {below[0].target:.2f} after {below[0].step} Stage-2 steps; plain serving of those "
                "languages depends on it (raise stage2.classifier_max_steps, or serve with a language: pinned)"
            )
        else:
            worst = min(entries, key=lambda entry: entry.accuracy)
            notes.append(
                f"classifier in layer {layer}: held-out accuracy at least {worst.accuracy:.3f} on every language, the target reached"
            )
    return notes
