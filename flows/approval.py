"""The manual promotion gate (`promotion: manual`): a person approves or rejects each child.

After evaluation the child is registered with the verdict "pending" (its card shows the automatic
gate's advice), and the round pauses with the comparison table and the gate's advice as artifacts.
The Prefect UI's "Resume" form (or `layermoe approve RUN_ID --yes|--no --reason ...`) answers it,
and the answer is written on the version as the automatic gate's is: the `verdict` tag, the
reasons on its run and the model card's verdict, with the reviewer's reason. Approve moves the alias to the
child; reject leaves the alias where it is. Approving a version the automatic gate failed needs an explicit
override (`--override-gate`, or the form's "Approve, overriding the gate"), noted on its run as
`layermoe.gate_overridden`. See docs/registry.md.
"""

from collections.abc import Callable
from typing import Literal
from uuid import UUID

import pandas as pd
from prefect import get_client, get_run_logger
from prefect.exceptions import ObjectNotFound
from prefect.flow_runs import pause_flow_run, resume_flow_run
from prefect.input import RunInput, read_flow_run_input
from prefect.input.run_input import keyset_from_paused_state
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from layermoe_core.errors import LayerMoEError
from layermoe_core.evaluation.gates import GateDecision
from registry import RegistrySettings, Verdict
from tasks.common import publish_markdown, publish_table
from tasks.registration import record_review

REVIEW_TIMEOUT_S = 7 * 24 * 3600  # unanswered for a week, the run fails and the alias stays
REVIEW_POLL_S = 5
REJECTION_NEEDS_A_REASON = "a rejection needs a reason: it is stored on the version for whoever looks next"
FAILED_GATE_NEEDS_AN_OVERRIDE = "the automatic gate failed this version: approving it needs the gate override, recorded on the version"


def _required(*keys: str) -> Callable[[dict], None]:
    """List `keys` in the schema's `required` although they have defaults. Prefect's form labels a field
    "(Optional)" unless it is listed, and fills in a field's default, which is how the chosen variant's
    constants (`decision`, `override_gate`) get into the answer; listing them makes the server insist on them."""

    def add(schema: dict) -> None:
        schema["required"] = sorted({*keys, *schema.get("required", [])})

    return add


class Reject(BaseModel):
    model_config = ConfigDict(title="Reject", json_schema_extra=_required("decision"))

    decision: Literal["reject"] = Field("reject", title="Reject", description="Its verdict becomes rejected; the alias stays.")
    reason: str = Field(title="Reason", description="Why; stored on the version.", pattern=r"\S")  # the server's rule

    @model_validator(mode="before")
    @classmethod
    def _a_rejection_has_a_reason(cls, values: object) -> object:
        """The pattern's rule (the server checks the form against it), in words the CLI prints."""
        if isinstance(values, dict) and values.get("decision", "reject") == "reject" and not str(values.get("reason") or "").strip():
            raise ValueError(REJECTION_NEEDS_A_REASON)
        return values


class Approve(BaseModel):
    model_config = ConfigDict(title="Approve", json_schema_extra=_required("decision"))

    decision: Literal["approve"] = Field("approve", title="Approve", description="Move the alias to this version.")
    reason: str = Field("", title="Reason", description="Why; stored on the version.")


class ApproveOverGate(Approve):
    """Approving a version the automatic gate failed is its own choice in the form, so the override is explicit."""

    model_config = ConfigDict(title="Approve, overriding the gate", json_schema_extra=_required("decision", "override_gate"))

    override_gate: Literal[True] = Field(
        True,
        title="Override the gate",
        description="Approve although the automatic gate failed it; the override is recorded on the version (layermoe.gate_overridden).",
    )


class Review(RunInput):
    """The reviewer's answer: the Resume form in the Prefect UI, one button per answer. Reject comes first, so Submit
    alone sends a rejection without a reason, which is refused: no answer is given by default."""

    decision: Reject | Approve = Field(title="Decision")

    @property
    def approved(self) -> bool:
        return isinstance(self.decision, Approve)

    @property
    def reason(self) -> str:
        return self.decision.reason


class ReviewOfFailedGate(Review):
    """The Resume form for a version the automatic gate failed: approving it overrides the gate, on the record."""

    decision: Reject | ApproveOverGate = Field(title="Decision")


def review_promotion(
    registry: RegistrySettings,
    version: int,
    parent_version: int,
    comparison: pd.DataFrame,
    decision: GateDecision,
    alias: str,
) -> bool:
    """Pause for a person's decision on `version`, with the gate's `decision` as advice; returns whether it took `alias`."""
    verdict = "passes" if decision.passed else "fails"
    publish_table("comparison", comparison.round(4), f"Version {version} vs its parent, held out: the review's evidence")
    brief = review_brief(registry, version, alias, comparison, verdict, decision.reasons)
    publish_markdown("gate", brief, "Round gate (manual promotion)")
    logger = get_run_logger()
    logger.info("version %s %s the gate; paused for review (Resume in the UI, or layermoe approve)", version, verdict)
    # The brief is also the Resume form's description, so the reviewer decides with the evidence in view.
    form = Review if decision.passed else ReviewOfFailedGate
    review = pause_flow_run(wait_for_input=form.with_initial_data(description=brief), timeout=REVIEW_TIMEOUT_S, poll_interval=REVIEW_POLL_S)
    overridden = review.approved and not decision.passed
    reason = f"reviewer: {review.reason.strip() or 'no reason given'}" + (" (overrode the automatic gate)" if overridden else "")
    advice = f"automatic gate: {'passes' if decision.passed else 'fails'}"
    verdict = Verdict(passed=review.approved, reasons=[reason, *(f"{advice}: {r}" for r in decision.reasons)], decided_by="reviewer")
    record_review(registry, version, parent_version, verdict, alias, gate_overridden=overridden)
    if review.approved:
        outcome = f"approved ({reason}): version {version} holds `{alias}`"
    else:
        outcome = f"rejected ({reason}); `{alias}` stays where it was"
    publish_markdown("review", f"Version {version} {outcome}.", "Reviewer's decision")
    logger.info("review: %s", outcome)
    return review.approved


def review_brief(registry: RegistrySettings, version: int, alias: str, comparison: pd.DataFrame, verdict: str, reasons: list[str]) -> str:
    """What a reviewer needs in one markdown page: the version, the gate's verdict, one row per language with its
    held-out losses and what the gate says of it, and what each answer does."""
    losses = comparison[comparison["metric"] == "loss"]
    said: set[str] = set()

    def gate_says(row) -> str:
        """The gate's reason for this language's loss, less the losses the row already shows."""
        prefix = f"{row.group} language {row.language}: loss "
        reason = next((r for r in reasons if r.startswith(prefix)), None)
        if reason is None:
            return ""
        said.add(reason)
        return reason.split(" nats) ", 1)[-1]

    rows = [f"| {r.language} | {r.group} | {r.parent:.4f} | {r.child:.4f} | {r.delta:+.4f} | {gate_says(r)} |" for r in losses.itertuples()]
    others = [reason for reason in reasons if reason not in said]  # not about one language's loss: chrF, a missing language
    failed = verdict == "fails"
    return "\n".join(
        [
            f"**Version {version}** of `{registry.registered_model_name}` {verdict} the automatic gate; awaiting a reviewer's decision.",
            "",
            "| language | group | parent loss | child loss | delta | gate |",
            "|---|---|---:|---:|---:|---|",
            *rows,
            *(["", *(f"- {reason}" for reason in others)] if others else []),
            "",
            f"Approve moves `{alias}` to version {version}"
            + (" and overrides the failed gate (Approve, overriding the gate; `layermoe approve --yes --override-gate`)" if failed else "")
            + f". Reject records it as rejected, with your reason; `{alias}` stays.",
        ]
    )


class PausedReview(BaseModel):
    """A round paused for review, as `layermoe approve` finds it: the run, its brief and which form it waits for."""

    run_id: UUID
    name: str
    brief: str
    gate_failed: bool


def paused_review(flow_run_id: str) -> PausedReview:
    """The paused round `flow_run_id` names, with the brief its Resume form shows; an error if it is not waiting."""
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
    if not (run.state and run.state.is_paused() and run.state.state_details.run_input_keyset):
        raise LayerMoEError(
            f"flow run {run.name} ({run_id}) is {run.state.name if run.state else 'not started'}, "
            "not paused for review; only a round with `promotion: manual` waits for a decision"
        )
    keyset = keyset_from_paused_state(run.state)
    schema = read_flow_run_input(keyset["schema"], flow_run_id=run_id) or {}
    brief = read_flow_run_input(keyset["description"], flow_run_id=run_id) or ""
    return PausedReview(run_id=run_id, name=run.name, brief=brief, gate_failed=schema.get("title") == ReviewOfFailedGate.__name__)


def review_answer(approve: bool, reason: str, override_gate: bool, gate_failed: bool) -> Review | ReviewOfFailedGate:
    """The form's answer from the CLI's flags, refused as the UI refuses it (see Review and ReviewOfFailedGate)."""
    if override_gate and not approve:
        raise LayerMoEError("--override-gate goes with --yes: a rejection overrides nothing")
    if override_gate and not gate_failed:
        raise LayerMoEError("--override-gate: the automatic gate passed this version, so there is nothing to override; drop it")
    if approve and gate_failed and not override_gate:
        raise LayerMoEError(f"{FAILED_GATE_NEEDS_AN_OVERRIDE} (pass --override-gate)")
    try:
        if not approve:
            decision: Reject | Approve = Reject(reason=reason)
        else:
            decision = ApproveOverGate(reason=reason) if gate_failed else Approve(reason=reason)
        return ReviewOfFailedGate(decision=decision) if gate_failed else Review(decision=decision)
    except ValidationError as error:
        message = "; ".join(str(e["ctx"]["error"]) if "ctx" in e else e["msg"] for e in error.errors())
        raise LayerMoEError(f"{message} (pass --reason)") from None


def answer_review(paused: PausedReview, answer: Review | ReviewOfFailedGate) -> None:
    """Resume a paused round with a decision, as the UI's Resume form does."""
    resume_flow_run(paused.run_id, run_input=answer.model_dump())
