"""The `lifelong-expansion` flow: one tick of a lifelong schedule.

A tick reads the plan file when it runs, resolves the parent then (the version holding the plan's alias,
or the plan's own parent until a round takes the alias), and runs the plan's first pending round: the
first whose new languages the parent lacks. With none pending it trains nothing and says so. A person
extends the lifetime by appending a round to the file; the next tick takes it. A rejected round pauses
the tick's deployment (see `pause_schedule`), so a schedule never retrains it tick after tick.
docs/scheduling.md walks through it.
"""

import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from prefect import flow, get_client, get_run_logger
from prefect.context import FlowRunContext
from prefect.runtime import flow_run
from prefect.states import Failed, State
from pydantic import BaseModel

from layermoe_core.errors import LayerMoEError
from registry.versions import get_version, set_schedule_pause_note
from tasks.common import publish_markdown

from .add_languages import RoundSummary, add_languages, name_this_run
from .plan import check_plan_inputs, parse_lifelong_plan, read_plan_file


class Tick(BaseModel):
    """What one tick did; `summary` is the round it ran, if it ran one."""

    outcome: Literal["promoted", "rejected", "nothing to do", "paused"]
    message: str
    plan_sha256: str
    summary: RoundSummary | None = None


def utc_stamp() -> str:
    """`2026-12-07T04-58-12`: part of every tick's name, so no two ticks read alike."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H-%M-%S")


def first_run_name() -> str:
    """The name a tick starts with, before the plan is read: the plan file's stem and the time."""
    return f"{Path(flow_run.parameters['plan']).stem}-{utc_stamp()}"


@flow(name="lifelong-expansion", log_prints=True, flow_run_name=first_run_name)
def lifelong_expansion(plan: str) -> Tick | State:
    """Run the next pending round of the lifelong plan file `plan` (a path the worker can read).

    A scheduled tick that cannot run (a plan the person is still editing, a round half done) fails with
    its one `layermoe: error:` line and no traceback; called directly, it raises, for the caller to report.
    """
    try:
        return next_round(Path(plan))
    except LayerMoEError as error:
        if FlowRunContext.get().flow_run.deployment_id is None:
            raise
        get_run_logger().error("layermoe: error: %s", error)
        return Failed(message=f"layermoe: error: {error}")


def next_round(path: Path) -> Tick:
    """The tick itself: read the plan, resolve the parent, then run the pending round (or say why not)."""
    content = read_plan_file(path)
    lifelong = parse_lifelong_plan(path, content)
    plan_sha256 = hashlib.sha256(content).hexdigest()
    get_run_logger().info("plan %s, sha256 %s", path.resolve(), plan_sha256)
    if schedule_paused():
        # A tick the scheduler had already queued when a rejection paused the schedule.
        name_this_run(f"{lifelong.name}-paused-{utc_stamp()}")
        message = "the schedule is paused after a rejected round; resume it once the plan is changed"
        return finish(Tick(outcome="paused", message=message, plan_sha256=plan_sha256))

    parent = check_plan_inputs(lifelong)
    parent_label = f"the base {parent.ref.hf_path}" if parent.version is None else f"version {parent.version}"
    index = lifelong.pending_round(parent.languages)
    if index is None:
        message = f"nothing to do: {parent_label} already has every language of the plan"
        name_this_run(f"{lifelong.name}-idle-{utc_stamp()}")
        return finish(Tick(outcome="nothing to do", message=message, plan_sha256=plan_sha256))

    new = lifelong.rounds[index].new_languages
    name_this_run(f"{lifelong.name}-r{parent.round + 1}-{'-'.join(new)}-{utc_stamp()}")
    set_schedule_pause_note(lifelong.registry, None)  # a tick that trains again was resumed by a person
    summary = add_languages(lifelong.round_plan(index, parent.languages if parent.version is None else [], parent.ref))
    if summary.promoted:
        message = f"round {index + 1} of the plan ({', '.join(new)}) is version {summary.version}, now `{lifelong.promote_alias}`"
        return finish(Tick(outcome="promoted", message=message, plan_sha256=plan_sha256, summary=summary))

    reason = get_version(lifelong.registry, summary.version).verdict_reason or "no reason recorded"
    message = (
        f"round {index + 1} of the plan ({', '.join(new)}) was rejected as version {summary.version} ({reason}); "
        f"{pause_schedule()}. Change the plan (for example Stage 2's steps or the gate), then resume the schedule: "
        "the next tick runs the round again with the changed plan"
    )
    set_schedule_pause_note(lifelong.registry, f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC: {message}")
    return finish(Tick(outcome="rejected", message=message, plan_sha256=plan_sha256, summary=summary))


def schedule_paused() -> bool:
    """Whether this run is a scheduled tick of a deployment whose schedule is paused (a run started by hand is not)."""
    run = FlowRunContext.get().flow_run
    if run.deployment_id is None or not run.auto_scheduled:
        return False
    with get_client(sync_client=True) as client:
        return bool(client.read_deployment(run.deployment_id).paused)


def pause_schedule() -> str:
    """Pause the deployment this tick runs from, so no later tick retrains the rejected round; say what was paused.

    A rerun of an unchanged plan would reuse the round's finished steps and reach the same verdict, so a retry
    is worth running only once a person has changed something: the schedule waits for them.
    """
    deployment_id = FlowRunContext.get().flow_run.deployment_id
    if deployment_id is None:
        return "no schedule runs this plan (the tick was started by hand)"
    with get_client(sync_client=True) as client:
        client.pause_deployment(deployment_id)
        name = client.read_deployment(deployment_id).name
    return f"the schedule of deployment lifelong-expansion/{name} is paused"


def finish(tick: Tick) -> Tick:
    """The tick's one line, in the log and as the run's `tick` artifact."""
    get_run_logger().info(tick.message)
    publish_markdown("tick", f"**{tick.outcome}**: {tick.message}\n\nplan sha256 `{tick.plan_sha256}`", "What this tick did")
    return tick


def run_pending_rounds(plan: str | Path) -> list[Tick]:
    """Tick until the plan has nothing pending or a round is rejected: `layermoe lifelong` and the demo."""
    ticks = [lifelong_expansion(str(plan))]
    while ticks[-1].outcome == "promoted":
        ticks.append(lifelong_expansion(str(plan)))
    return ticks
