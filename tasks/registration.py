"""Step 8 of a round: register the child with its model card and reports, then move the `champion` alias as the gate says."""

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from prefect import get_run_logger, task

from layermoe_core import plots
from layermoe_core.evaluation.gates import GateDecision
from layermoe_core.training.trainer import ClassifierAccuracy
from registry import (
    RegistrySettings,
    RoundInfo,
    Verdict,
    alias_version,
    log_report_run,
    promote,
    record_verdict,
    register_child,
    tag_version,
)
from registry.tags import GATE_OVERRIDDEN

from .common import REGISTRY_RETRY_DELAYS_S, publish_markdown, registry_unreachable


@task(name="draw round plots")
def draw_plots(
    similarity: pd.DataFrame,
    allocation: pd.DataFrame,
    routing: pd.DataFrame,
    comparison: pd.DataFrame,
    *,
    signal_method: str | None,
    out_dir: Path,
) -> dict[str, Path]:
    """The round's figures; `signal_method` names the allocation's own signal where it has one (its bars over that line)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return {
        "similarity": plots.plot_similarity(similarity, out_dir / "similarity.png"),
        "allocation": plots.plot_allocation(allocation["new_experts"].tolist(), out_dir / "allocation.png"),
        "routing": plots.plot_routing_heatmap(routing, out_dir / "routing.png"),
        "languages": plots.plot_language_comparison(comparison, out_dir / "languages.png"),
        **({"signal": plots.plot_signal(allocation, signal_method, out_dir / "signal.png")} if signal_method else {}),
    }


def routing_by_language(routing: pd.DataFrame) -> pd.DataFrame:
    """Per-language routing averaged over the MoE layers: a table, since each value is one number, not a curve."""
    columns = [c for c in ("old_expert_fraction", "new_expert_weight", "router_old_mass") if c in routing.columns]
    return routing.groupby("language", sort=False)[columns].mean().reset_index()


@task(name="register child version", retries=2, retry_delay_seconds=REGISTRY_RETRY_DELAYS_S, retry_condition_fn=registry_unreachable)
def register_round(
    registry: RegistrySettings,
    child_dir: Path,
    parent_version: int,
    round_info: RoundInfo,
    *,
    tables: dict[str, pd.DataFrame],
    plot_files: dict[str, Path],
    training_history: dict[str, list[dict]],
    params: dict,
    decision: GateDecision,
    pending_review: bool = False,
    classifier_accuracy: Sequence[ClassifierAccuracy] = (),
) -> int:
    """Everything is written before this returns, the gate's `decision` included; no alias moves here. With
    `pending_review` the verdict is "pending" and the gate's decision is shown as advice to the reviewer.
    `classifier_accuracy` (Stage 2's held-out figures) is logged as the table `classifier_accuracy` and a card column."""
    if "routing" in tables:
        tables = {**tables, "routing_by_language": routing_by_language(tables["routing"])}
    history_tables = {f"{stage}_log": pd.DataFrame(rows) for stage, rows in training_history.items() if rows}
    accuracy = pd.DataFrame([entry.model_dump() for entry in classifier_accuracy]) if classifier_accuracy else None
    version = register_child(
        registry,
        child_dir,
        parent_version,
        round_info,
        {**tables, **history_tables},
        plot_files,
        {},
        params,
        comparison=tables["evaluation"],
        verdict=Verdict(passed=decision.passed, reasons=decision.reasons, decided_by="pending" if pending_review else "gate"),
        training_history=training_history,
        classifier_accuracy=accuracy,
    ).version
    get_run_logger().info(
        "registered version %s (parent %s), gate %s%s",
        version,
        parent_version,
        "passed" if decision.passed else "rejected",
        ", awaiting a reviewer" if pending_review else "",
    )
    return version


def move_alias(registry: RegistrySettings, version: int, parent_version: int, passed: bool, alias: str) -> None:
    """A passing child takes `alias`; after a rejection it stays where it is, or, where it is not set yet (a first
    round), goes to the parent, so the next round starts from the best model there is."""
    if passed:
        promote(registry, version, alias)
    elif alias_version(registry, alias) is None:
        promote(registry, parent_version, alias)


@task(name="gate and promote", retries=2, retry_delay_seconds=REGISTRY_RETRY_DELAYS_S, retry_condition_fn=registry_unreachable)
def gate_and_promote(registry: RegistrySettings, version: int, parent_version: int, decision: GateDecision, *, alias: str) -> bool:
    """The child takes `alias` only if the gate passed it: old languages held, new ones improved and every
    classifier reached its target (see move_alias). Its verdict (tag, reasons, card) was written at registration."""
    move_alias(registry, version, parent_version, decision.passed, alias)
    verdict = f"promoted to `{alias}`" if decision.passed else f"rejected; `{alias}` stays on the parent"
    publish_markdown("gate", f"Version {version} {verdict}.\n\n" + "\n".join(f"- {r}" for r in decision.reasons), "Round gate")
    return decision.passed


@task(name="record review", retries=2, retry_delay_seconds=REGISTRY_RETRY_DELAYS_S, retry_condition_fn=registry_unreachable)
def record_review(
    registry: RegistrySettings, version: int, parent_version: int, verdict: Verdict, alias: str, gate_overridden: bool = False
) -> bool:
    """A reviewer's verdict, written on the version as the gate's is (tag, reasons, card), then the alias moved as the
    gate would. An approval over a failed automatic gate is also noted on the run (`layermoe.gate_overridden`), before
    the alias moves."""
    record_verdict(registry, version, verdict)
    if gate_overridden:
        tag_version(registry, version, {GATE_OVERRIDDEN: "true"})
    move_alias(registry, version, parent_version, verdict.passed, alias)
    return verdict.passed


@task(name="log comparison report", retries=2, retry_delay_seconds=REGISTRY_RETRY_DELAYS_S, retry_condition_fn=registry_unreachable)
def log_comparison_report(registry: RegistrySettings, run_name: str, tables: dict[str, pd.DataFrame], plot: Path, params: dict) -> str:
    """The side-by-side variants tables and plot as a report run (no model); returns its run id."""
    return log_report_run(registry, run_name, tables, {"variants": plot}, params=params)
