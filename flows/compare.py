"""`compare`: the paper's headline claim on the user's own data, in one run.

From the same parent it runs the round three ways: the LayerMoE allocation with budget
delta, the uniform MoE-LPR baseline with `uniform_budget_factor` x delta experts spread
evenly (2.5x in the paper: "60% fewer experts"), and LayerMoE without routing classifiers
(the ablation). Each variant is registered as its own version holding the alias
`compare-<variant>`, so the `champion` alias never moves; the side-by-side table and plot go
to an MLflow report run and to the Prefect UI.
"""

import math
from pathlib import Path

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run
from pydantic import Field

from layermoe_core import plots
from layermoe_core.allocation import AllocationSettings
from layermoe_core.checkpoints import num_decoder_layers
from layermoe_core.evaluation import compare_variants
from registry.reports import log_report_run
from registry.versions import show_version
from tasks.common import publish_table

from .add_languages import RoundSummary, add_languages, fetch_parent
from .plan import ExpansionPlan


class ComparePlan(ExpansionPlan):
    uniform_budget_factor: float = Field(2.5, gt=0, description="uniform baseline budget = factor x allocation.delta")
    ablate_classifier: bool = Field(True, description="also run LayerMoE without routing classifiers")


def variant_plans(plan: ComparePlan, num_layers: int) -> dict[str, ExpansionPlan]:
    """The plan of each variant; they differ only in allocation, classifiers and the alias they take."""
    shared = plan.model_dump(exclude={"uniform_budget_factor", "ablate_classifier"})
    per_layer = max(1, math.ceil(plan.uniform_budget_factor * plan.allocation.delta / num_layers))
    overrides = {
        "layermoe": {},
        "uniform": {"allocation": AllocationSettings(method="uniform", per_layer=per_layer).model_dump()},
    }
    if plan.ablate_classifier:
        overrides["no-classifier"] = {"classifier_layers": 0}
    return {
        name: ExpansionPlan.model_validate({**shared, **change, "name": f"{plan.name}-{name}", "promote_alias": f"compare-{name}"})
        for name, change in overrides.items()
    }


@task(name="report comparison")
def report_comparison(plan: ComparePlan, summaries: dict[str, RoundSummary], out_dir: Path) -> pd.DataFrame:
    table = compare_variants({
        name: {"comparison": s.table(), "allocation": s.allocation,
               "params_added": show_version(plan.registry, s.version).get("params_added", 0)}
        for name, s in summaries.items()
    })
    plot = plots.plot_variant_comparison(table, out_dir / "variants.png")
    log_report_run(plan.registry, f"compare-{plan.name}", {"variants": table}, {"variants": plot},
                   params={"parent": next(iter(summaries.values())).parent_version,
                           "versions": {name: s.version for name, s in summaries.items()}})
    publish_table("variants", table.round(4), "LayerMoE vs uniform MoE-LPR vs no classifier, same parent and data")
    return table


def run_name(plan: ComparePlan) -> str:
    """`compare-<plan name>-hu`: the comparison's own run; its variants' rounds are named by round."""
    return f"compare-{plan.name}-" + "-".join(plan.new_languages)


@flow(name="compare", log_prints=True, flow_run_name=lambda: run_name(ComparePlan.model_validate(flow_run.parameters["plan"])))
def compare(plan: ComparePlan) -> pd.DataFrame:
    parent = fetch_parent(plan)
    pinned = plan.model_copy(update={"parent": plan.parent.model_copy(update={"version": parent.version, "hf_path": None})})
    summaries = {name: add_languages(variant) for name, variant in variant_plans(pinned, num_decoder_layers(parent.path)).items()}
    table = report_comparison(plan, summaries, plan.workdir.resolve() / f"compare-{plan.name}")
    get_run_logger().info("comparison:\n%s", table.to_string(index=False))
    return table
