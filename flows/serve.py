"""`layermoe serve`: every user story as a deployment, served from one process.

`add-languages`, `compare` and `lifelong-expansion` are served together, so each has a "Run" button in
the Prefect UI. add-languages and compare are forms whose defaults are the plan's first round;
lifelong-expansion takes the plan file itself, which each tick reads anew (flows/lifelong_expansion.py),
and carries the schedule. The plan file may be a lifelong plan (with `rounds`) or a one-round plan.
"""

from pathlib import Path

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import RunnerDeployment
from pydantic import BaseModel

from layermoe_core.errors import LayerMoEError

from .add_languages import add_languages
from .compare import ComparePlan, compare
from .lifelong_expansion import lifelong_expansion
from .plan import ExpansionPlan, LifelongPlan, load_lifelong_plan

# A tick due while the previous one still trains is cancelled, not queued: it would find the same round
# pending and wait on its lock, and queued ticks pile up over a long round. The next tick after it runs.
ONE_TICK_AT_A_TIME = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)


def form_defaults(plan: ExpansionPlan | ComparePlan) -> dict:
    """The plan as a deployment's default parameters, which the run form shows.

    Each settings section is a JSON editor in the form (flows/plan.py `run_form`) and holds only what the plan
    sets, the expert budget also its method and delta; an optional section the plan does not set (the launcher) is
    left out. Input paths (corpora, an HF parent) are absolute, as the plan file means them, so a run from the form
    reads the same files wherever `serve` was started.
    """
    defaults = plan.model_dump(mode="json")
    for name in type(plan).model_fields:
        value = getattr(plan, name)
        if isinstance(value, BaseModel):
            defaults[name] = value.model_dump(mode="json", exclude_defaults=True)
        elif value is None:
            del defaults[name]
    defaults["allocation"] = {"method": plan.allocation.method, "delta": plan.allocation.delta, **defaults["allocation"]}
    defaults["corpora"] = {
        language: spec.model_dump(mode="json", exclude_defaults=True) | ({"path": str(spec.path.resolve())} if spec.path else {})
        for language, spec in plan.corpora.items()
    }
    if plan.parent.hf_path is not None:
        defaults["parent"]["hf_path"] = str(plan.parent.hf_path.resolve())
    return defaults


def first_round(lifelong: LifelongPlan) -> ExpansionPlan:
    parent = lifelong.parent
    return lifelong.round_plan(0, parent.languages if parent.hf_path else [], parent).model_copy(update={"name": lifelong.name})


def story_deployments(
    path: str | Path, name: str | None = None, cron: str | None = None, interval: int | None = None
) -> list[RunnerDeployment]:
    lifelong = load_lifelong_plan(path)
    one_round = first_round(lifelong)
    name = name or lifelong.name
    return [
        add_languages.to_deployment(
            name=name, parameters={"plan": form_defaults(one_round)}, description="One round: add the plan's new languages to its parent."
        ),
        compare.to_deployment(
            name=name,
            parameters={"plan": form_defaults(ComparePlan.model_validate(one_round.model_dump()))},
            description="LayerMoE vs uniform MoE-LPR vs no classifier, from one parent.",
        ),
        lifelong_expansion.to_deployment(
            name=name,
            cron=cron,
            interval=interval,
            parameters={"plan": str(Path(path).resolve())},
            concurrency_limit=ONE_TICK_AT_A_TIME,
            description="Each run: the plan file's next pending round, from the current champion; nothing to do when none is pending.",
        ),
    ]


def serve_plan(path: str | Path, name: str | None = None, cron: str | None = None, interval: int | None = None) -> None:
    """Serve until Ctrl-C; the Prefect UI lists the three deployments under `name` (default: the plan's name)."""
    if cron and interval:
        raise LayerMoEError("give either --cron or --interval, not both")
    serve(*story_deployments(path, name, cron, interval))
