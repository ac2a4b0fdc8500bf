"""`layermoe serve`: every user story as a deployment, served from one process.

`add-languages`, `compare` and `lifelong-expansion` are served together, so each has a
"Run" button and a form in the Prefect UI, with the user's plan as its default parameters;
only `lifelong-expansion` carries the schedule. The plan file may be a lifelong plan (with
`rounds`) or a one-round plan (with `new_languages`); the other deployments' defaults are
derived from it.
"""

from pathlib import Path

import yaml
from prefect import serve
from prefect.deployments.runner import RunnerDeployment

from layermoe_core.errors import LayerMoEError

from .add_languages import add_languages
from .compare import ComparePlan, compare
from .lifelong_expansion import lifelong_expansion
from .plan import ExpansionPlan, LifelongPlan, RoundSpec, load_plan


def story_plans(path: str | Path) -> tuple[ExpansionPlan, ComparePlan, LifelongPlan]:
    """The default plan of each deployment, all read from one plan file.

    From a lifelong plan, add-languages and compare default to its first round; from a
    one-round plan, lifelong-expansion defaults to that round alone.
    """
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) if Path(path).is_file() else None
    if isinstance(raw, dict) and "rounds" in raw:
        lifelong = load_plan(path, LifelongPlan)
        parent = lifelong.parent
        first = lifelong.round_plan(0, parent.languages if parent.hf_path else [], parent)
        one_round = first.model_copy(update={"name": lifelong.name})
    else:
        one_round = load_plan(path, ExpansionPlan)
        shared = one_round.model_dump(exclude={"new_languages", "old_languages"})
        lifelong = LifelongPlan.model_validate({**shared, "rounds": [RoundSpec(new_languages=one_round.new_languages).model_dump()]})
    return one_round, ComparePlan.model_validate(one_round.model_dump()), lifelong


def form_defaults(plan: ExpansionPlan | LifelongPlan) -> dict:
    """The plan as a deployment's default parameters. Corpora are a JSON editor in the form (a mapping of
    language -> corpus), so each corpus lists only what the plan sets, e.g. {"el": {"path": ...}}."""
    defaults = plan.model_dump(mode="json")
    defaults["corpora"] = {language: spec.model_dump(mode="json", exclude_defaults=True) for language, spec in plan.corpora.items()}
    return defaults


def story_deployments(
    path: str | Path, name: str | None = None, cron: str | None = None, interval: int | None = None
) -> list[RunnerDeployment]:
    one_round, comparison, lifelong = story_plans(path)
    name = name or lifelong.name
    return [
        add_languages.to_deployment(
            name=name, parameters={"plan": form_defaults(one_round)}, description="One round: add the plan's new languages to its parent."
        ),
        compare.to_deployment(
            name=name,
            parameters={"plan": form_defaults(comparison)},
            description="LayerMoE vs uniform MoE-LPR vs no classifier, from one parent.",
        ),
        lifelong_expansion.to_deployment(
            name=name,
            cron=cron,
            interval=interval,
            parameters={"plan": form_defaults(lifelong)},
            description="Every round of the plan, each from the newest champion.",
        ),
    ]


def serve_plan(path: str | Path, name: str | None = None, cron: str | None = None, interval: int | None = None) -> None:
    """Serve until Ctrl-C; the Prefect UI lists the three deployments under `name` (default: the plan's name)."""
    if cron and interval:
        raise LayerMoEError("give either --cron or --interval, not both")
    serve(*story_deployments(path, name, cron, interval))
