"""The `lifelong-expansion` flow: the plan's rounds in order, each from the newest champion."""

from prefect import flow
from prefect.runtime import flow_run

from .add_languages import RoundSummary, add_languages
from .plan import LifelongPlan, ParentRef, check_plan_inputs


def run_name(plan: LifelongPlan) -> str:
    """`lifelong-el-hu-tr-then-bn-hi-ne`: the plan's name and its rounds' new languages."""
    return f"{plan.name}-" + "-then-".join("-".join(spec.new_languages) for spec in plan.rounds)


@flow(name="lifelong-expansion", log_prints=True, flow_run_name=lambda: run_name(LifelongPlan.model_validate(flow_run.parameters["plan"])))
def lifelong_expansion(plan: LifelongPlan) -> list[RoundSummary]:
    """Round 1 starts from the plan's parent; every later round from the version holding the alias.

    Each round's old languages are all the languages of its parent, so the model keeps
    accumulating languages; a rejected round leaves the alias, and the next round's parent, unchanged.
    """
    check_plan_inputs(plan)  # the whole plan, before round 1 trains
    summaries = []
    for index in range(len(plan.rounds)):
        parent = plan.parent if index == 0 else ParentRef(alias=plan.promote_alias)
        summaries.append(add_languages(plan.round_plan(index, parent.languages if parent.hf_path else [], parent)))
    return summaries
