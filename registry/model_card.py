"""A version's story as a markdown card (the version's description in the MLflow UI) and as metrics.

The metric keys are the same in every version, so the UI's compare view lines versions up:
`<metric>.<language>` is this version's held-out value, `<metric>.<language>.parent` its parent's
on the same tokens, `<metric>.<language>.delta` = child - parent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict

from layermoe_core.analysis.fertility import costly_languages

from .tags import NEW_GAIN, OLD_DRIFT_MAX, PINNED_DRIFT_MAX, VERDICT, VERDICT_REASON

PINNED_LOSS = "pinned_loss"  # layermoe_core.evaluation.gates.PINNED_LOSS (registry imports no torch to read a table)


class Verdict(BaseModel):
    """The decision on a child: the automatic gate's (layermoe_core.evaluation.gates.GateDecision has its fields) or a reviewer's.

    With `promotion: manual` a child is registered `pending` (its `passed` is then the gate's advice)
    and gets the reviewer's verdict when the round resumes.
    """

    model_config = ConfigDict(frozen=True)

    passed: bool
    reasons: list[str]
    decided_by: Literal["gate", "reviewer", "pending"] = "gate"

    @property
    def tag(self) -> str:
        """The `layermoe.verdict` value: "passed", "rejected" or "pending"."""
        return "pending" if self.decided_by == "pending" else "passed" if self.passed else "rejected"


MAX_TAG_CHARS = 5000  # MLflow's limit on a model version tag value
REJECTED, REJECTED_REASON = "layermoe.rejected", "layermoe.rejected_reason"
APPROVED, APPROVED_REASON = "layermoe.approved", "layermoe.approved_reason"
OUTCOME_TAGS = (VERDICT, VERDICT_REASON, REJECTED, REJECTED_REASON, APPROVED, APPROVED_REASON)


def verdict_tags(verdict: Verdict) -> dict[str, str]:
    """The version tags a verdict writes: the verdict and its reasons, plus `layermoe.rejected` (any rejection)
    or `layermoe.approved` (a reviewer's approval) with the same reasons."""
    reason = "; ".join(verdict.reasons)[:MAX_TAG_CHARS]
    tags = {VERDICT: verdict.tag, VERDICT_REASON: reason}
    if verdict.tag == "rejected":
        tags |= {REJECTED: "true", REJECTED_REASON: reason}
    elif verdict.tag == "passed" and verdict.decided_by == "reviewer":
        tags |= {APPROVED: "true", APPROVED_REASON: reason}
    return tags


def version_page(name: str, version: int) -> str:
    """The MLflow UI route of a version, relative to wherever the UI is served (so links work behind any host)."""
    return f"#/models/{name}/versions/{version}"


def _loss_deltas(comparison: pd.DataFrame, group: str) -> pd.Series:
    return comparison.loc[(comparison["metric"] == "loss") & (comparison["group"] == group), "delta"]


def old_drift_max(comparison: pd.DataFrame) -> float:
    """The largest old-language loss rise (nats): what the gate bounds. NaN without old languages."""
    deltas = _loss_deltas(comparison, "old")
    return float(deltas.max()) if len(deltas) else math.nan


def pinned_drifts(comparison: pd.DataFrame) -> pd.Series:
    """Per old language (index): its loss rise with parent and child pinned to it (nats), 0 by construction. Empty if not measured."""
    rows = comparison[(comparison["metric"] == PINNED_LOSS) & (comparison["group"] == "old")]
    return rows.set_index("language")["delta"].astype(float)


def pinned_drift_max(comparison: pd.DataFrame) -> float:
    """The largest pinned drift (nats); NaN where pinned loss was not measured."""
    drifts = pinned_drifts(comparison)
    return float(drifts.max()) if len(drifts) else math.nan


def drift_tags(comparison: pd.DataFrame) -> dict[str, float]:
    """The version tags `registry list` shows: worst plain and pinned drift (when measured), new-language gain."""
    pinned = pinned_drift_max(comparison)
    return {
        OLD_DRIFT_MAX: old_drift_max(comparison),
        NEW_GAIN: new_language_gain(comparison),
        **({} if math.isnan(pinned) else {PINNED_DRIFT_MAX: pinned}),
    }


def old_language_drift(comparison: pd.DataFrame) -> float:
    """Mean old-language loss rise (nats), as layermoe_core.evaluation.metrics.old_language_drift."""
    deltas = _loss_deltas(comparison, "old")
    return float(deltas.mean()) if len(deltas) else math.nan


def new_language_gain(comparison: pd.DataFrame) -> float:
    """Mean new-language loss decrease (nats), as layermoe_core.evaluation.metrics.new_language_gain."""
    deltas = _loss_deltas(comparison, "new")
    return float(-deltas.mean()) if len(deltas) else math.nan


def comparison_metrics(comparison: pd.DataFrame) -> dict[str, float]:
    """Per-language metrics under stable keys, plus the round summaries the gate and the UI use."""
    metrics = {
        "old_language_drift": old_language_drift(comparison),
        "old_language_drift_max": old_drift_max(comparison),
        "pinned_drift_max": pinned_drift_max(comparison),
        "new_language_gain": new_language_gain(comparison),
    }
    for row in comparison.itertuples():
        key = f"{row.metric}.{row.language}"
        metrics[key] = float(row.child)
        metrics[f"{key}.parent"] = float(row.parent)
        metrics[f"{key}.delta"] = float(row.delta)
    return {key: value for key, value in metrics.items() if not math.isnan(value)}


def own_metrics(comparison: pd.DataFrame, side: str) -> dict[str, float]:
    """One model's held-out values (`side` "parent" or "child") under `<metric>.<language>`."""
    return {
        f"{row.metric}.{row.language}": float(getattr(row, side)) for row in comparison.itertuples() if not math.isnan(getattr(row, side))
    }


def _number(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


VERDICT_HEAD = "**Gate verdict"  # the card's verdict block runs from this line to the next "### " heading


def _verdict_lines(verdict: Verdict | None) -> list[str]:
    if verdict is None:
        return [f"{VERDICT_HEAD}:** not evaluated."]
    head = {
        ("gate", True): "PASSED**",
        ("gate", False): "REJECTED**",
        ("reviewer", True): "PASSED** (approved by a reviewer)",
        ("reviewer", False): "REJECTED** (by a reviewer)",
        ("pending", True): "PENDING** (awaiting a reviewer; the automatic gate passes it)",
        ("pending", False): "PENDING** (awaiting a reviewer; the automatic gate rejects it)",
    }[verdict.decided_by, verdict.passed]
    return [f"{VERDICT_HEAD}: {head}", "", *[f"- {reason}" for reason in verdict.reasons]]


def with_verdict(card: str, verdict: Verdict) -> str:
    """`card` (a child_card) with its verdict block replaced by `verdict`'s; appended if the card has none."""
    lines = card.split("\n")
    start = next((i for i, line in enumerate(lines) if line.startswith(VERDICT_HEAD)), None)
    if start is None:
        return "\n".join([*lines, "", *_verdict_lines(verdict)])
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("### ")), len(lines))
    return "\n".join([*lines[:start], *_verdict_lines(verdict), "", *lines[end:]])


def child_card(
    name: str,
    round_number: int,
    parent_version: int,
    parent_round: int,
    old_languages: Sequence[str],
    new_languages: Sequence[str],
    allocation: Sequence[int],
    classifier_layers: Sequence[int],
    comparison: pd.DataFrame | None,
    verdict: Verdict | None,
    params_added: int | None,
) -> str:
    lines = [
        f"## Round {round_number}: adds {', '.join(new_languages)}",
        "",
        f"- **Old languages:** {', '.join(old_languages)}",
        f"- **New languages:** {', '.join(new_languages)}",
        f"- **Parent:** [version {parent_version}]({version_page(name, parent_version)}) (round {parent_round})",
        f"- **New experts:** {sum(allocation)}" + (f", {params_added:,} parameters added" if params_added is not None else ""),
        f"- **Classifier layers:** {', '.join(map(str, classifier_layers)) or 'none'}",
        "",
        *_verdict_lines(verdict),
        "",
        "### Allocation per layer",
        "",
        "| layer | new experts | classifier |",
        "|---:|---:|:---:|",
        *[f"| {layer} | {count} | {'yes' if layer in classifier_layers else ''} |" for layer, count in enumerate(allocation)],
    ]
    if comparison is not None and len(comparison):
        lines += [
            "",
            "### Held-out metrics: parent / child / delta",
            "",
            "| language | group | metric | parent | child | delta |",
            "|---|---|---|---:|---:|---:|",
            *[
                f"| {r.language} | {r.group} | {r.metric} | {_number(r.parent)} | {_number(r.child)} | {r.delta:+.4f} |"
                for r in comparison.itertuples()
            ],
            "",
            f"Old-language drift: max {_number(old_drift_max(comparison))}, mean {_number(old_language_drift(comparison))} nats; "
            f"new-language gain: {_number(new_language_gain(comparison))} nats.",
        ]
        lines += _forgetting_lines(comparison)
    return "\n".join(lines)


def _forgetting_lines(comparison: pd.DataFrame) -> list[str]:
    """Plain (classifier-routed) against pinned drift per old language, where pinned loss was measured."""
    pinned = pinned_drifts(comparison)
    if pinned.empty:
        return []
    plain = comparison[(comparison["metric"] == "loss") & (comparison["group"] == "old")].set_index("language")["delta"]
    return [
        "",
        "### Forgetting per old language: plain / pinned",
        "",
        "Plain: the served model routes each token by its classifiers. Pinned: served with the request's language, "
        "the model computes the version that learned it, so its drift is 0 by construction; both are measured.",
        "",
        "| old language | plain drift (nats) | pinned drift (nats) |",
        "|---|---:|---:|",
        *[f"| {language} | {plain.get(language, math.nan):+.4f} | {drift:+.4f} |" for language, drift in pinned.items()],
    ]


def fertility_metrics(fertility: pd.DataFrame) -> dict[str, float]:
    """`tokens_per_char.<language>` and `tokens_per_word.<language>` under the parent's tokenizer (and `....child` under
    the round's extended one, where it has one), for the UI's compare view."""
    metrics = {}
    for row in fertility.to_dict("records"):
        for column in ("tokens_per_char", "tokens_per_word", "child_tokens_per_char", "child_tokens_per_word"):
            value = float(row.get(column, math.nan))
            if not math.isnan(value):
                name = column.removeprefix("child_")
                metrics[f"{name}.{row['language']}" + (".child" if column.startswith("child_") else "")] = value
    return metrics


def fertility_lines(fertility: pd.DataFrame) -> list[str]:
    """The card's fertility section: what each language's held-out text costs in tokens, and the costly new scripts."""
    child = "child_tokens_per_char" in fertility.columns
    return [
        "",
        "### Tokenizer fertility",
        "",
        "Tokens per character and per whitespace word of each language's held-out text, under the parent's tokenizer"
        + (" and under this version's extended one." if child else "."),
        "",
        "| language | group | tokens per character | tokens per word |" + (" extended: per character | per word |" if child else ""),
        "|---|---|---:|---:|" + ("---:|---:|" if child else ""),
        *[
            f"| {r.language} | {r.group} | {_number(r.tokens_per_char)} | {_number(r.tokens_per_word)} |"
            + (f" {_number(r.child_tokens_per_char)} | {_number(r.child_tokens_per_word)} |" if child else "")
            for r in fertility.itertuples()
        ],
        *[f"\n**{warning}**" for warning in costly_languages(fertility)],
    ]


def base_card(languages: Sequence[str], params_total: int, description: str | None) -> str:
    lines = [
        "## Base model (round 0)",
        "",
        f"- **Languages:** {', '.join(languages)}",
        f"- **Parameters:** {params_total:,}",
        "- **Gate verdict:** base (no gate: nothing to compare against)",
    ]
    if description:
        lines += ["", description]
    return "\n".join(lines)


def step_metric_rows(history: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[tuple[str, float, int]]:
    """Trainer log rows as (key, value, step): `stage1.loss` at each logged step, so the UI draws curves."""
    rows = []
    for stage, entries in history.items():
        for entry in entries:
            step = int(entry.get("step", 0))
            for key, value in entry.items():
                numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
                if key not in ("step", "epoch") and numeric and not math.isnan(float(value)):
                    rows.append((f"{stage}.{key}", float(value), step))
    return rows


def flatten_params(params: Mapping[str, object], prefix: str = "") -> dict[str, object]:
    """Nested settings as dotted keys (`stage1.learning_rate`), so runs line up column by column."""
    flat: dict[str, object] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, f"{name}."))
        else:
            flat[name] = value
    return flat
