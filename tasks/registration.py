"""Step 8 of a round: register the child with its reports, then gate the `champion` alias."""

from pathlib import Path

import pandas as pd
from prefect import get_run_logger, task

from layermoe_core import plots
from layermoe_core.evaluation import new_language_gain, old_language_drift
from layermoe_core.gates import GateSettings, evaluate_gates
from registry.register import register_child
from registry.settings import RegistrySettings
from registry.versions import promote, tag_version

from .common import REGISTRY_RETRY_DELAYS_S, publish_markdown, registry_unreachable


@task(name="draw round plots")
def draw_plots(
    similarity: pd.DataFrame, allocation: list[int], routing: pd.DataFrame, comparison: pd.DataFrame, out_dir: Path
) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    return {
        "similarity": plots.plot_similarity(similarity, out_dir / "similarity.png"),
        "allocation": plots.plot_allocation(allocation, out_dir / "allocation.png"),
        "routing": plots.plot_routing_heatmap(routing, out_dir / "routing.png"),
        "languages": plots.plot_language_comparison(comparison, out_dir / "languages.png"),
    }


@task(name="register child version", retries=2, retry_delay_seconds=REGISTRY_RETRY_DELAYS_S, retry_condition_fn=registry_unreachable)
def register_round(
    registry: RegistrySettings,
    child_dir: Path,
    parent_version: int,
    round_info: dict,
    tables: dict[str, pd.DataFrame],
    plot_files: dict[str, Path],
    training_history: dict[str, list[dict]],
    params: dict,
) -> int:
    """Everything is written before this returns; no alias moves here (the gate decides)."""
    comparison = tables["evaluation"]
    metrics = {
        "old_language_drift": old_language_drift(comparison),
        "new_language_gain": new_language_gain(comparison),
        **{f"{row.language}.{row.metric}.{side}": getattr(row, side) for row in comparison.itertuples() for side in ("parent", "child")},
    }
    history_tables = {f"{stage}_log": pd.DataFrame(rows) for stage, rows in training_history.items() if rows}
    version = register_child(
        registry, child_dir, parent_version, round_info, {**tables, **history_tables}, plot_files, metrics, params
    ).version
    get_run_logger().info("registered version %s (parent %s)", version, parent_version)
    return version


@task(name="gate and promote")
def gate_and_promote(registry: RegistrySettings, version: int, comparison: pd.DataFrame, gates: GateSettings, alias: str) -> bool:
    """The child takes `alias` only if old languages held and new ones improved; else it is tagged rejected."""
    decision = evaluate_gates(comparison, gates)
    if decision.passed:
        promote(registry, version, alias)
    else:
        tag_version(registry, version, {"layermoe.rejected": "true", "layermoe.rejected_reason": "; ".join(decision.reasons)})
    verdict = f"promoted to `{alias}`" if decision.passed else f"rejected; `{alias}` stays on the parent"
    publish_markdown("gate", f"Version {version} {verdict}.\n\n" + "\n".join(f"- {r}" for r in decision.reasons), "Round gate")
    return decision.passed
