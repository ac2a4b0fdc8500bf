"""A version's story as a markdown card (the version's description in the MLflow UI) and as its run's metrics.

The card's first line says it all (`Round 5 +pt · REJECTED by reviewer · old drift max 0.024 · gain 0.011`),
since the UI's version list shows it. Every version's run logs its held-out values under the same keys,
`<metric>.<language>`, so the UI's compare view lines versions up; the parent's values and the deltas are in
the card and the run's `evaluation` table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict

from layermoe_core.analysis.fertility import costly_languages
from layermoe_core.evaluation.metrics import new_language_gain, old_drift_max, old_language_drift, pinned_drift_max, pinned_drifts
from layermoe_core.evaluation.translation import CHRF_METRIC

from .client import open_client, store_errors
from .settings import RegistrySettings
from .tags import NEW_GAIN, OLD_DRIFT_MAX, PINNED_DRIFT_MAX, VERDICT, VERDICT_REASON
from .version_info import VersionInfo
from .versions import VersionRef, find_version


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
        """The `verdict` value: "passed", "rejected" or "pending"."""
        return "pending" if self.decided_by == "pending" else "passed" if self.passed else "rejected"

    @property
    def words(self) -> str:
        """The verdict as the card's headline says it."""
        return {
            ("gate", True): "PASSED the gate",
            ("gate", False): "REJECTED by the gate",
            ("reviewer", True): "APPROVED by reviewer",
            ("reviewer", False): "REJECTED by reviewer",
            ("pending", True): "PENDING review (gate passes)",
            ("pending", False): "PENDING review (gate fails)",
        }[self.decided_by, self.passed]


MAX_TAG_CHARS = 5000  # MLflow's limit on a tag value


def verdict_tags(verdict: Verdict) -> dict[str, str]:
    """The run tag a verdict writes: its reasons, one line."""
    return {VERDICT_REASON: "; ".join(verdict.reasons)[:MAX_TAG_CHARS]}


def drift_record(comparison: pd.DataFrame) -> dict[str, float]:
    """The registration record's summary of the comparison: worst plain and pinned drift (where measured), new-language gain."""
    values = {
        OLD_DRIFT_MAX: old_drift_max(comparison),
        PINNED_DRIFT_MAX: pinned_drift_max(comparison),
        NEW_GAIN: new_language_gain(comparison),
    }
    return {key: value for key, value in values.items() if not math.isnan(value)}


def version_page(name: str, version: int) -> str:
    """The MLflow UI route of a version, relative to wherever the UI is served (so links work behind any host)."""
    return f"#/models/{name}/versions/{version}"


def own_metrics(comparison: pd.DataFrame, side: str) -> dict[str, float]:
    """One model's held-out values (`side` "parent" or "child") under `<metric>.<language>`."""
    return {
        f"{row.metric}.{row.language}": float(getattr(row, side)) for row in comparison.itertuples() if not math.isnan(getattr(row, side))
    }


def _number(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def verdict_headline(
    round_number: int, new_languages: Sequence[str], verdict: Verdict | None, drift_max: float | None, gain: float | None
) -> str:
    """The card's first line, which the UI's version list shows: round, languages added, verdict, drift and gain."""
    added = f" +{',+'.join(new_languages)}" if new_languages else ""
    parts = [f"Round {round_number}{added}", verdict.words if verdict is not None else "not gated"]
    if drift_max is not None and not math.isnan(drift_max):
        parts.append(f"old drift max {drift_max:.3f}")
    if gain is not None and not math.isnan(gain):
        parts.append(f"gain {gain:.3f}")
    return " · ".join(parts)


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


def with_verdict(card: str, verdict: Verdict, headline: str) -> str:
    """`card` (a child_card) with `headline` as its first line and its verdict block replaced by `verdict`'s."""
    lines = [headline, *card.split("\n")[1:]]
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
    classifier_accuracy: pd.DataFrame | None = None,
) -> str:
    drift = drift_record(comparison) if comparison is not None else {}
    lines = [
        verdict_headline(round_number, new_languages, verdict, drift.get(OLD_DRIFT_MAX), drift.get(NEW_GAIN)),
        "",
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
            "### Held-out metrics per language",
            "",
            *language_table(comparison, classifier_accuracy),
            "",
            f"Old-language drift: max {_number(old_drift_max(comparison))}, mean {_number(old_language_drift(comparison))} nats; "
            f"new-language gain: {_number(new_language_gain(comparison))} nats. Every metric measured: the run's `evaluation` table.",
        ]
    return "\n".join(lines)


def language_table(comparison: pd.DataFrame, classifier_accuracy: pd.DataFrame | None = None) -> list[str]:
    """One markdown row per language: group, held-out loss (parent, child, delta), then, where measured, the
    drift pinned to the language, chrF++ per translation direction and the worst classifier layer's accuracy."""
    losses = comparison[comparison["metric"] == "loss"]
    pinned = pinned_drifts(comparison)
    chrf = comparison[comparison["metric"].str.endswith("." + CHRF_METRIC)]
    accuracy = (
        classifier_accuracy.groupby("language")["accuracy"].min() if classifier_accuracy is not None and len(classifier_accuracy) else None
    )
    head = ["language", "group", "loss parent", "loss child", "Δ loss"]
    if len(pinned):
        head.append("pinned drift")
    if len(chrf):
        head.append("chrF++ child (Δ)")
    if accuracy is not None:
        head.append("classifier accuracy (worst layer)")
    rows = []
    for row in losses.itertuples():
        cells = [row.language, row.group, _number(row.parent), _number(row.child), f"{row.delta:+.4f}"]
        if len(pinned):
            cells.append(f"{pinned[row.language]:+.4f}" if row.language in pinned.index else "")
        if len(chrf):
            mine = chrf[chrf["language"] == row.language]
            cells.append(", ".join(f"{r.metric.split('.')[1]} {r.child:.1f} ({r.delta:+.1f})" for r in mine.itertuples()))
        if accuracy is not None:
            cells.append(f"{accuracy[row.language]:.3f}" if row.language in accuracy.index else "")
        rows.append("| " + " | ".join(cells) + " |")
    align = ["---", "---", "---:", "---:", "---:", *["---:"] * (len(head) - 5)]
    return ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|", *rows]


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
        f"Base model · {', '.join(languages)} · {params_total:,} parameters",
        "",
        "## Base model (round 0)",
        "",
        f"- **Languages:** {', '.join(languages)}",
        f"- **Parameters:** {params_total:,}",
        "- **Gate verdict:** base (no gate: nothing to compare against)",
    ]
    if description:
        lines += ["", description]
    return "\n".join(lines)


TRAIN_PREFIX = "train/"  # the run page draws a section per prefix: the curves come first, together


def training_metrics(history: Mapping[str, Sequence[Mapping[str, Any]]]) -> tuple[list[tuple[str, float, int]], dict[str, float]]:
    """Trainer log rows as curves, (`train/stage1/loss`, value, step) for a key logged at two steps or more, and
    one-off values (`train/stage1/train_runtime`, logged once at the end), which belong in params: a chart of
    one point says nothing."""
    curves: list[tuple[str, float, int]] = []
    one_offs: dict[str, float] = {}
    for stage, entries in history.items():
        rows = [
            (f"{TRAIN_PREFIX}{stage}/{key}", float(value), int(entry.get("step", 0)))
            for entry in entries
            for key, value in entry.items()
            if key not in ("step", "epoch") and isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
        ]
        counts = pd.Series([key for key, _, _ in rows]).value_counts() if rows else pd.Series(dtype=int)
        for key, value, step in rows:
            if counts[key] > 1:
                curves.append((key, value, step))
            else:
                one_offs[key] = value
    return curves, one_offs


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


def record_verdict(settings: RegistrySettings, version: VersionRef, verdict: Verdict) -> VersionInfo:
    """Write a decision reached after registration (a reviewer's) as registration writes the gate's: the verdict
    tag, its reasons on the run, and the model card's headline and verdict block. No alias moves."""
    with store_errors(settings):
        client = open_client(settings, create=False)
        info = find_version(client, settings, version)
        client.set_model_version_tag(info.name, str(info.version), VERDICT, verdict.tag)
        for key, value in verdict_tags(verdict).items():
            if key != VERDICT and info.run_id is not None:
                client.set_tag(info.run_id, key, value)
        headline = verdict_headline(info.round, info.new_languages, verdict, info.old_drift_max, info.new_gain)
        client.update_model_version(info.name, str(info.version), description=with_verdict(info.description or "", verdict, headline))
        return find_version(client, settings, info.version)
