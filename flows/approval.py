"""The manual promotion gate (`promotion: manual`): a person approves or rejects each child.

After evaluation the child is registered with the verdict "pending" (its card shows the automatic
gate's advice), and the round pauses with the comparison table and the gate's advice as artifacts.
The Prefect UI's "Resume" form (or `layermoe approve RUN_ID --yes|--no --reason ...`) answers it,
and the answer is written on the version as the automatic gate's is: the `layermoe.verdict` tag and
the model card's verdict, with the reviewer's reason. Approve moves the alias to the child (and tags it
`layermoe.approved`); reject tags it `layermoe.rejected` and leaves the alias where it is.
"""

from collections.abc import Sequence
from uuid import UUID

import pandas as pd
from prefect import get_client, get_run_logger
from prefect.exceptions import ObjectNotFound
from prefect.flow_runs import pause_flow_run, resume_flow_run
from prefect.input import RunInput
from pydantic import Field

from layermoe_core.errors import LayerMoEError
from layermoe_core.evaluation.gates import GateSettings, evaluate_gates
from layermoe_core.training.trainer import ClassifierAccuracy
from registry import RegistrySettings, Verdict
from tasks.common import publish_markdown, publish_table
from tasks.registration import record_review

REVIEW_TIMEOUT_S = 7 * 24 * 3600  # unanswered for a week, the run fails and the alias stays
REVIEW_POLL_S = 5


class Review(RunInput):
    """The reviewer's answer: the resume form in the Prefect UI."""

    approve: bool = Field(description="Approve: move the alias to this version. Reject: tag it layermoe.rejected.")
    reason: str = Field("", description="Why; stored on the version (required to reject).")


def review_promotion(
    registry: RegistrySettings,
    version: int,
    parent_version: int,
    comparison: pd.DataFrame,
    gates: GateSettings,
    alias: str,
    classifier_accuracy: Sequence[ClassifierAccuracy] = (),
) -> bool:
    """Pause for a person's decision on `version`; returns whether it took `alias`."""
    decision = evaluate_gates(comparison, gates, classifier_accuracy)
    verdict = "passes" if decision.passed else "fails"
    publish_table("comparison", comparison.round(4), f"Version {version} vs its parent, held out: the review's evidence")
    brief = review_brief(registry, version, alias, comparison, verdict, decision.reasons)
    publish_markdown("gate", brief, "Round gate (manual promotion)")
    logger = get_run_logger()
    logger.info("version %s %s the gate; paused for review (Resume in the UI, or layermoe approve)", version, verdict)
    # The brief is also the Resume form's description, so the reviewer decides with the evidence in view.
    review = pause_flow_run(
        wait_for_input=Review.with_initial_data(description=brief), timeout=REVIEW_TIMEOUT_S, poll_interval=REVIEW_POLL_S
    )
    reason = f"reviewer: {review.reason.strip() or 'no reason given'}"
    advice = f"automatic gate: {'passes' if decision.passed else 'fails'}"
    verdict = Verdict(passed=review.approve, reasons=[reason, *(f"{advice}: {r}" for r in decision.reasons)], decided_by="reviewer")
    record_review(registry, version, parent_version, verdict, alias)
    if review.approve:
        outcome = f"approved ({reason}): version {version} holds `{alias}`"
    else:
        outcome = f"rejected ({reason}); `{alias}` stays where it was"
    publish_markdown("review", f"Version {version} {outcome}.", "Reviewer's decision")
    logger.info("review: %s", outcome)
    return review.approve


def review_brief(registry: RegistrySettings, version: int, alias: str, comparison: pd.DataFrame, verdict: str, reasons: list[str]) -> str:
    """What a reviewer needs in one markdown page: the version, the gate's advice, the held-out losses, what each answer does."""
    losses = comparison[comparison["metric"] == "loss"]
    return "\n".join(
        [
            f"**Version {version}** of `{registry.registered_model_name}` {verdict} the automatic gate; awaiting a reviewer's decision.",
            "",
            *(f"- {reason}" for reason in reasons),
            "",
            "| language | group | parent loss | child loss | delta |",
            "|---|---|---:|---:|---:|",
            *(f"| {r.language} | {r.group} | {r.parent:.4f} | {r.child:.4f} | {r.delta:+.4f} |" for r in losses.itertuples()),
            "",
            f"Approve moves `{alias}` to version {version}. Reject tags it `layermoe.rejected` with your reason; `{alias}` stays.",
        ]
    )


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
