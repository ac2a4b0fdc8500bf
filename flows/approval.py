"""The manual promotion gate (`promotion: manual`): a person approves or rejects each child.

After evaluation and registration the round pauses with the comparison table and the gate's
verdict as artifacts. The Prefect UI's "Resume" form (or `layermoe approve RUN_ID --yes|--no
--reason ...`) answers it: approve moves the alias to the child; reject tags the child
`layermoe.rejected` with the reviewer's reason and leaves the alias where it is.
"""

from uuid import UUID

import pandas as pd
from prefect import get_client, get_run_logger
from prefect.exceptions import ObjectNotFound
from prefect.flow_runs import pause_flow_run, resume_flow_run
from prefect.input import RunInput
from pydantic import Field

from layermoe_core.errors import LayerMoEError
from layermoe_core.evaluation.gates import GateSettings, evaluate_gates
from registry import RegistrySettings, promote, tag_version
from tasks.common import publish_markdown, publish_table

REVIEW_TIMEOUT_S = 7 * 24 * 3600  # unanswered for a week, the run fails and the alias stays
REVIEW_POLL_S = 5


class Review(RunInput):
    """The reviewer's answer: the resume form in the Prefect UI."""

    approve: bool = Field(description="Approve: move the alias to this version. Reject: tag it layermoe.rejected.")
    reason: str = Field("", description="Why; stored on the version (required to reject).")


def review_promotion(registry: RegistrySettings, version: int, comparison: pd.DataFrame, gates: GateSettings, alias: str) -> bool:
    """Pause for a person's decision on `version`; returns whether it took `alias`."""
    decision = evaluate_gates(comparison, gates)
    verdict = "passes" if decision.passed else "fails"
    publish_table("comparison", comparison.round(4), f"Version {version} vs its parent, held out: the review's evidence")
    publish_markdown(
        "gate",
        f"Version {version} {verdict} the automatic gate; awaiting a reviewer's decision.\n\n"
        + "\n".join(f"- {r}" for r in decision.reasons)
        + f"\n\nApprove moves `{alias}` to version {version}; reject tags it `layermoe.rejected` with the reason.",
        "Round gate (manual promotion)",
    )
    logger = get_run_logger()
    logger.info("version %s %s the gate; paused for review (Resume in the UI, or layermoe approve)", version, verdict)
    review = pause_flow_run(wait_for_input=Review, timeout=REVIEW_TIMEOUT_S, poll_interval=REVIEW_POLL_S)
    if review.approve:
        promote(registry, version, alias)
        tag_version(registry, version, {"layermoe.approved": "true", "layermoe.approved_reason": review.reason})
        outcome = f"approved: version {version} holds `{alias}`"
    else:
        reason = f"reviewer: {review.reason or 'no reason given'}"
        tag_version(registry, version, {"layermoe.rejected": "true", "layermoe.rejected_reason": reason})
        outcome = f"rejected ({reason}); `{alias}` stays where it was"
    publish_markdown("review", f"Version {version} {outcome}.", "Reviewer's decision")
    logger.info("review: %s", outcome)
    return review.approve


def answer_review(flow_run_id: str, approve: bool, reason: str) -> str:
    """Resume a paused round with a decision, as the UI's resume form does; returns the run's name."""
    if not approve and not reason.strip():
        raise LayerMoEError("a rejection needs --reason: it is stored on the version for whoever looks next")
    try:
        run_id = UUID(flow_run_id)
    except ValueError:
        raise LayerMoEError(f"{flow_run_id!r} is not a flow run id; copy it from the paused run's page in the Prefect UI") from None
    with get_client(sync_client=True) as client:
        try:
            run = client.read_flow_run(run_id)
        except ObjectNotFound:
            raise LayerMoEError(
                f"flow run {run_id} does not exist on {client.api_url}; is PREFECT_API_URL the server that ran it?"
            ) from None
    if not (run.state and run.state.is_paused()):
        raise LayerMoEError(
            f"flow run {run.name} ({run_id}) is {run.state.name if run.state else 'not started'}, "
            "not paused for review; only a round with `promotion: manual` waits for a decision"
        )
    resume_flow_run(run_id, run_input=Review(approve=approve, reason=reason).model_dump())
    return run.name
