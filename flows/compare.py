"""`compare`: every allocation signal on the user's own parent and data, side by side, in one run.

From the same parent it runs the round once per variant (`variants`, any subset of VARIANTS):
- `layermoe`: the plan's LayerMoE allocation (1/similarity), budget delta;
- `uniform`: the MoE-LPR baseline, `uniform_budget_factor` x delta experts spread evenly
  (2.5x in the paper: "60% fewer experts");
- `neuron` (NeuronMoE), `param_delta` (DMoE), `late_layers` (Apollo's post-MoE): the other
  papers' signals, with the plan's allocation settings for their signals;
- `no_classifier`: LayerMoE without routing classifiers (the ablation).
With `equal_budget` the budgeted variants spend exactly delta (largest-remainder rounding; the
neuron signal is spread in proportion rather than by NeuronMoE's min-max range); otherwise each
uses its paper's mapping and the realised count is what the table states. Each variant is
registered as its own version holding the alias `compare-<variant>`, so the `champion` alias
never moves; the side-by-side table and plot go to an MLflow report run and to the Prefect UI.
With `seeds: N` each variant runs N times (Stage-1/2 seeds +0..N-1, same data); the table gives
the mean and std over seeds, and every run is logged beside it.
"""

import math
from pathlib import Path
from typing import Literal, get_args

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run
from prefect.states import State
from pydantic import ConfigDict, Field, model_validator

from layermoe_core import plots
from layermoe_core.analysis.allocation import AllocationSettings
from layermoe_core.errors import LayerMoEError
from layermoe_core.evaluation.metrics import compare_variants, old_drift_max, summarise_seeds
from layermoe_core.model.checkpoints import num_decoder_layers
from registry import get_version
from tasks.common import publish_table
from tasks.registration import log_comparison_report

from .add_languages import RoundSummary, add_languages, fetch_parent, nothing_to_do
from .plan import ExpansionPlan, PlanFile, plan_parameter, run_form

VariantName = Literal["layermoe", "uniform", "neuron", "param_delta", "late_layers", "no_classifier"]
VARIANTS: tuple[str, ...] = get_args(VariantName)


class ComparePlan(ExpansionPlan):
    """One round run once per allocation variant from the same parent; each variant's version holds the alias compare-VARIANT."""

    model_config = ConfigDict(
        title="Compare plan",
        json_schema_extra=run_form("new_languages", "corpora", "allocation", "variants", "promotion", "old_languages", "parent"),
    )

    variants: list[VariantName] = Field(
        ["layermoe", "uniform", "no_classifier"],
        min_length=1,
        title="Variants",
        description=f"the variants to run, in this order: any of {', '.join(VARIANTS)}",
    )
    uniform_budget_factor: float = Field(
        2.5, gt=0, title="Uniform budget factor", description="uniform baseline budget = factor x allocation.delta"
    )
    equal_budget: bool = Field(
        True, title="Equal budget", description="budgeted variants spend exactly delta (largest remainder); else each paper's mapping"
    )
    seeds: int = Field(
        1, ge=1, title="Seeds", description="runs per variant, with Stage-1/2 seeds +0, +1, ...; the table gives mean and std"
    )

    @model_validator(mode="after")
    def _distinct_variants(self) -> "ComparePlan":
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants {self.variants} repeat a name; list each variant once")
        return self


def with_variants(plan: ComparePlan, variants: list[str]) -> ComparePlan:
    """The plan with the command line's variants; an unknown name is an error that lists the known ones."""
    unknown = [name for name in variants if name not in VARIANTS]
    if unknown:
        raise LayerMoEError(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if len(set(variants)) != len(variants):
        raise LayerMoEError(f"variants {variants} repeat a name; list each variant once")
    return plan.model_copy(update={"variants": variants})


def variant_allocation(plan: ComparePlan, name: str, num_layers: int) -> AllocationSettings:
    """The variant's allocation: the plan's budget, bounds and signal settings under the variant's method."""
    if name == "uniform":
        return AllocationSettings(
            method="uniform", per_layer=max(1, math.ceil(plan.uniform_budget_factor * plan.allocation.delta / num_layers))
        )
    method = "layermoe" if name == "no_classifier" else name
    shared = plan.allocation.model_dump(exclude={"method", "mapping", "rounding", "per_layer", "fixed"})
    if not plan.equal_budget:
        return AllocationSettings(**shared, method=method, rounding=plan.allocation.rounding)
    return AllocationSettings(**shared, method=method, rounding="exact", mapping="proportional" if method == "neuron" else None)


def variant_plans(plan: ComparePlan, num_layers: int) -> dict[tuple[str, int], ExpansionPlan]:
    """The plan of each (variant, seed); they differ only in allocation, classifiers, training seeds and alias.

    The data seed (tokens.seed) stays, so every run trains and is evaluated on the same text;
    seed i > 0 takes the alias `compare-<variant>-seed<i>`.
    """
    shared = plan.model_dump(exclude={"variants", "uniform_budget_factor", "equal_budget", "seeds"})
    plans = {}
    for name in plan.variants:
        change = {"allocation": variant_allocation(plan, name, num_layers).model_dump()}
        if name == "no_classifier":
            change["classifier_layer_count"] = 0
        for seed in range(plan.seeds):
            alias = f"compare-{name.replace('_', '-')}" + (f"-seed{seed}" if seed else "")
            stages = {stage: {**shared[stage], "seed": shared[stage]["seed"] + seed} for stage in ("stage1", "stage2")}
            plans[name, seed] = ExpansionPlan.model_validate(
                {**shared, **change, **stages, "name": f"{plan.name}-{alias[8:]}", "promote_alias": alias}
            )
    return plans


@task(name="report comparison")
def report_comparison(plan: ComparePlan, summaries: dict[tuple[str, int], RoundSummary], out_dir: Path) -> pd.DataFrame:
    """Mean and std over seeds per variant (table `variants`, plot with error bars), and every run (`variant_runs`)."""
    per_seed = compare_variants(
        {
            f"{name}/{seed}": {
                "variant": name,
                "seed": seed,
                "comparison": s.table(),
                "allocation": s.allocation,
                "params_added": get_version(plan.registry, s.version).params_added or 0,
            }
            for (name, seed), s in summaries.items()
        }
    )
    per_seed.insert(3, "allocation", [" ".join(map(str, s.allocation)) for s in summaries.values()])
    per_seed.insert(6, "old_drift_max", [old_drift_max(s.table()) for s in summaries.values()])
    table = summarise_seeds(per_seed)
    plot = plots.plot_variant_comparison(table, out_dir / "variants.png")
    log_comparison_report(
        plan.registry,
        f"compare-{plan.name}",
        {"variants": table, "variant_runs": per_seed},
        plot,
        {
            "parent": next(iter(summaries.values())).parent_version,
            "seeds": plan.seeds,
            "versions": {f"{name}/{seed}": s.version for (name, seed), s in summaries.items()},
        },
    )
    publish_table("variants", table.round(4), f"{', '.join(plan.variants)}: same parent and data, {plan.seeds} seed(s)")
    return table


def run_name(plan: ComparePlan) -> str:
    """`compare-<plan name>-hu`: the comparison's own run; its variants' rounds are named by round."""
    return f"compare-{plan.name}-" + "-".join(plan.new_languages)


@flow(name="compare", log_prints=True, flow_run_name=lambda: run_name(plan_parameter(flow_run.parameters["plan"], ComparePlan)))
def compare(plan: ComparePlan | PlanFile) -> pd.DataFrame | State:
    plan = plan_parameter(plan, ComparePlan)
    parent = fetch_parent(plan)
    idle = nothing_to_do(plan, parent)
    if idle is not None:
        return idle
    pinned = plan.model_copy(update={"parent": plan.parent.model_copy(update={"version": parent.version, "hf_path": None})})
    summaries = {key: add_languages(variant) for key, variant in variant_plans(pinned, num_decoder_layers(parent.path)).items()}
    table = report_comparison(plan, summaries, plan.workdir.resolve() / f"compare-{plan.name}")
    get_run_logger().info("comparison:\n%s", table.to_string(index=False))
    return table
