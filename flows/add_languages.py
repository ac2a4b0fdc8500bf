"""The `add-languages` flow: one LayerMoE expansion round, from a registry parent to a gated child version.

Steps (each a task in tasks/): resolve parent -> sample tokens -> layer similarity ->
allocate experts -> Stage 1 -> routing classifiers + Stage 2 -> routing statistics ->
evaluate parent vs child -> register the child -> gate the `champion` alias.
Registration is the last step, so a round that fails anywhere registers nothing. Two runs of the
same plan take turns (a lock in the round folder); the second reuses the first's cached steps.
"""

import fcntl
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
from prefect import flow, get_client, get_run_logger
from prefect.context import FlowRunContext
from prefect.runtime import flow_run
from prefect.states import Completed, State

from layermoe_core.data.corpus import load_documents, validate_language_code
from layermoe_core.errors import LayerMoEError
from layermoe_core.evaluation.gates import evaluate_gates
from layermoe_core.model.files import check_model_dir
from layermoe_core.training.launch import Stage1Job, Stage2Job
from layermoe_core.training.trainer import TrainResult
from registry import RoundInfo
from tasks.analysis import (
    TOKEN_STORE_DIR,
    Sampling,
    allocation_total,
    classifier_layers,
    extend_vocabulary,
    measure_allocation_signal,
    measure_fertility,
    measure_similarity,
    new_experts,
    plan_allocation,
    sample_tokens,
)
from tasks.evaluation import evaluate_round, measure_routing, sample_heldout_text
from tasks.parent import ParentModel, register_base_model, resolve_parent
from tasks.registration import draw_plots, gate_and_promote, register_round
from tasks.training import train_stages

from .approval import review_promotion
from .plan import ExpansionPlan, PlanFile, plan_parameter

ROUND_LOCK = ".round.lock"  # in the round folder; see exclusive_round


class RoundSummary(RoundInfo):
    """What a round did (its RoundInfo, as registered) and how it ended."""

    version: int
    parent_version: int
    promoted: bool
    comparison: list[dict]

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.comparison)


def round_languages(plan: ExpansionPlan, parent: ParentModel) -> list[str]:
    """The old languages: the plan's, which must be the parent's, or by default the parent's own."""
    old = plan.old_languages or parent.languages
    if not old:
        raise LayerMoEError(f"parent version {parent.version} records no languages; list old_languages in the plan")
    unknown = sorted(set(old) - set(parent.languages)) if parent.languages else []
    if unknown:
        raise LayerMoEError(
            f"old languages {unknown} are unknown to parent version {parent.version} (it knows {parent.languages}); "
            "fix old_languages or pick another parent"
        )
    plan.check_parent_languages(parent.languages)
    return old


def round_dir(plan: ExpansionPlan, parent_version: int) -> Path:
    """Same plan and parent -> same folder, so a rerun resumes its checkpoints and cached steps.

    The placement is left out: where the measuring steps run does not change what the round computes.
    """
    digest = hashlib.sha256(plan.model_dump_json(exclude={"name", "placement"}).encode()).hexdigest()[:10]
    return plan.workdir.resolve() / f"{plan.name}-parent-v{parent_version}-{digest}"


def fetch_parent(plan: ExpansionPlan) -> ParentModel:
    """The round's parent, local and verified; an `hf_path` parent is registered as the base first.

    Before the base is registered, the corpora are read and the folder is checked against the plan, so a round
    that cannot run changes nothing; a base already registered with the same files is reused, and no alias
    moves onto it here.
    """
    ref = plan.parent.ref
    if plan.parent.hf_path is not None:
        languages = plan.parent.languages or plan.old_languages
        check_corpora_readable(plan, languages + plan.new_languages)
        plan.check_parent_model(check_model_dir(plan.parent.hf_path))
        ref = register_base_model(plan.registry, plan.parent.hf_path, languages, None)
    return resolve_parent(plan.registry, ref, plan.workdir.resolve() / "registry-downloads")


def check_corpora_readable(plan: ExpansionPlan, languages: list[str]) -> None:
    """Valid codes, and every local corpus of the round exists, parses and holds a document (LayerMoEError if not)."""
    for code in languages:
        validate_language_code(code)
    plan.check_corpora(languages)
    for language in languages:
        if plan.corpora[language].path is not None:
            load_documents(plan.corpora[language])


@contextmanager
def exclusive_round(work: Path) -> Iterator[None]:
    """One run at a time per round folder: a second run of the same plan waits, then reuses the first's steps.

    Without it, two runs of one plan would train into the same checkpoint folders at once. The
    kernel drops an flock when its holder dies, so a killed run leaves no stale lock.
    """
    work.mkdir(parents=True, exist_ok=True)
    with (work / ROUND_LOCK).open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            get_run_logger().info("another run of this round holds %s; waiting for it to finish", work / ROUND_LOCK)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def run_name(plan: ExpansionPlan, round_number: int | None = None) -> str:
    """`round-2-bn-hi-ne`; a round for another alias (a compare variant) adds it: `round-1-hu-compare-uniform`."""
    name = f"round-{round_number}-" if round_number is not None else f"{plan.name}-"
    name += "-".join(plan.new_languages)
    return name if plan.promote_alias == "champion" else f"{name}-{plan.promote_alias}"


def name_this_run(name: str) -> None:
    """Rename the running flow run, in the UI and for the artifact keys of the steps after this."""
    context = FlowRunContext.get()
    with get_client(sync_client=True) as client:
        client.set_flow_run_name(context.flow_run.id, name)
    context.flow_run.name = name  # as Prefect's engine does when it names a run


def nothing_to_do(plan: ExpansionPlan, parent: ParentModel) -> State | None:
    """A run whose parent already knows every new language ends Completed, training and registering nothing.

    So a scheduled run of a deployment's plan file adds its languages once and then says so; a parent that
    knows only some of them is an error (`round_languages`).
    """
    if not set(plan.new_languages) <= set(parent.languages):
        return None
    message = f"nothing to do: version {parent.version} already has {', '.join(plan.new_languages)}"
    get_run_logger().info(message)
    return Completed(message=message)


@flow(name="add-languages", log_prints=True, flow_run_name=lambda: run_name(plan_parameter(flow_run.parameters["plan"], ExpansionPlan)))
def add_languages(plan: ExpansionPlan | PlanFile) -> RoundSummary | State:
    plan = plan_parameter(plan, ExpansionPlan)
    parent = fetch_parent(plan)
    idle = nothing_to_do(plan, parent)
    if idle is not None:
        return idle
    plan.check_parent_model(parent.path)
    name_this_run(run_name(plan, parent.round + 1))  # which round it is, only the parent knows
    work = round_dir(plan, parent.version)
    with exclusive_round(work):
        return run_round(plan, parent, work)


def run_round(plan: ExpansionPlan, parent: ParentModel, work: Path) -> RoundSummary:
    """Every step after the parent is local, in the round's folder `work`; a step whose output is gone runs again."""
    old, new, tokens = round_languages(plan, parent), plan.new_languages, plan.tokens
    placement = plan.placement.with_offload_folder(work / "offload")
    sampling = Sampling(
        corpora=plan.corpora,
        tokenizer_dir=parent.path,
        seq_len=tokens.seq_len,
        seed=tokens.seed,
        heldout_fraction=tokens.heldout_fraction,
        store_dir=plan.workdir.resolve() / TOKEN_STORE_DIR,
        out_dir=work / "tokens",
    )

    # 1-3: where the new languages sit in the parent, and how many experts each layer gets
    analysis = sample_tokens(sampling, "analysis", old + new, tokens.analysis_tokens, parallel="auto")
    similarity = measure_similarity(
        parent.path, analysis, old, new, score=plan.similarity_score, batch_size=plan.similarity_batch_size, placement=placement
    )
    signal = measure_allocation_signal(
        parent.path, analysis, old, new, plan.allocation, batch_size=plan.similarity_batch_size, placement=placement
    )
    allocation = plan_allocation(similarity, signal, plan.allocation, classifier_layer_count=plan.classifier_layer_count)
    # With `vocabulary.extend`, the child's tokenizer adds tokens for the new scripts: its text is sampled with it
    child_sampling = sampling
    if plan.vocabulary.extend:
        tokenizer_dir = extend_vocabulary(
            parent.path,
            plan.corpora,
            old,
            new,
            plan.vocabulary.extend,
            seed=tokens.seed,
            heldout_fraction=tokens.heldout_fraction,
            out_dir=work / "tokenizer",
        )
        child_sampling = sampling.model_copy(update={"tokenizer_dir": tokenizer_dir, "out_dir": work / "child-tokens"})
    fertility = measure_fertility(
        parent.path,
        plan.corpora,
        old,
        new,
        seed=tokens.seed,
        heldout_fraction=tokens.heldout_fraction,
        child_tokenizer_dir=child_sampling.tokenizer_dir if plan.vocabulary.extend else None,
    )
    round_info = RoundInfo(
        round=parent.round + 1,
        old_languages=old,
        new_languages=new,
        allocation=new_experts(allocation),
        classifier_layers=classifier_layers(allocation),
    )

    # 4-6: Stage 1 trains the new experts; Stage 2 the routers and classifiers, on a replay mix
    stage1, heldout, stage2 = train_child(plan, parent, round_info, child_sampling, work)
    parent_heldout = (
        sample_tokens(sampling, "heldout", old + new, tokens.eval_tokens, split="heldout") if plan.vocabulary.extend else heldout
    )

    # 7: the child against its parent, on held-out tokens and text
    routing = measure_routing(stage2.model_dir, heldout, old, fertility, batch_size=plan.evaluation.batch_size, placement=placement)
    text = sample_heldout_text(
        plan.corpora, old + new, plan.evaluation, seed=tokens.seed, heldout_fraction=tokens.heldout_fraction, out_dir=work / "heldout-text"
    )
    comparison, samples = evaluate_round(
        parent.path,
        stage2.model_dir,
        heldout,
        old,
        new,
        plan.evaluation,
        text_dir=text,
        placement=placement,
        parent_tokens_path=parent_heldout,
    )
    decision = evaluate_gates(comparison, plan.evaluation.gates, stage2.classifier_accuracy)

    # 8: register the child with its reports, then move the alias as the gate (or a reviewer) decides
    version = register_round(
        plan.registry,
        stage2.model_dir,
        parent.version,
        round_info,
        tables={
            "similarity": similarity,
            "routing": routing,
            "evaluation": comparison,
            "samples": samples,
            "allocation": allocation,
            "allocation_total": allocation_total(allocation),
            "fertility": fertility,
            **({"signal": signal} if signal is not None else {}),
        },
        plot_files=draw_plots(
            similarity,
            allocation,
            routing,
            comparison,
            out_dir=work / "plots",
            signal_method=plan.allocation.method if signal is not None else None,
        ),
        training_history={"stage1": stage1.log_history, "stage2": stage2.log_history},
        params={**plan.model_dump(mode="json", exclude={"corpora", "registry"}), "corpora": sorted(plan.corpora)},
        decision=decision,
        pending_review=plan.promotion == "manual",
        classifier_accuracy=stage2.classifier_accuracy,
    )
    if plan.promotion == "manual":
        promoted = review_promotion(plan.registry, version, parent.version, comparison, decision, plan.promote_alias)
    else:
        promoted = gate_and_promote(plan.registry, version, parent.version, decision, alias=plan.promote_alias)
    summary = RoundSummary(
        **round_info.model_dump(),
        version=version,
        parent_version=parent.version,
        promoted=promoted,
        comparison=comparison.to_dict(orient="records"),
    )
    get_run_logger().info("round done: version %s, promoted=%s\n%s", version, promoted, summary.table().to_string(index=False))
    return summary


def train_child(
    plan: ExpansionPlan, parent: ParentModel, round_info: RoundInfo, sampling: Sampling, work: Path
) -> tuple[TrainResult, Path, TrainResult]:
    """Stage 1 (the new experts, on new-language tokens), the routing classifiers, then Stage 2 (routers and
    classifiers, on a replay mix, their classifiers measured on held-out tokens, which evaluation reuses).

    Every token sample is drawn first (each is seeded), so that with a launcher both stages train in one launch.
    """
    old, new, tokens = round_info.old_languages, round_info.new_languages, plan.tokens
    stage1_tokens = sample_tokens(sampling, "stage1", new, tokens.stage1_tokens)
    heldout = sample_tokens(sampling, "heldout", old + new, tokens.eval_tokens, split="heldout")
    replay_old = sample_tokens(sampling, "replay-old", old, tokens.stage2_tokens)
    replay_new = sample_tokens(sampling, "replay-new", new, tokens.stage2_tokens)

    stage1 = Stage1Job(
        parent_dir=parent.path,
        tokenizer_dir=sampling.tokenizer_dir,
        allocation=round_info.allocation,
        old_languages=old,
        new_languages=new,
        top_k=plan.top_k,
        tokens_path=stage1_tokens,
        settings=plan.stage1,
        output_dir=work / "stage1",
        extend_vocabulary=bool(plan.vocabulary.extend),
    )
    stage2 = Stage2Job(
        stage1_dir=stage1.final_dir,  # Stage 2 loads Stage 1's saved model, in a launch as on a rerun
        tokenizer_dir=stage1.final_dir,
        classifier_layers=round_info.classifier_layers,
        old_tokens_path=replay_old,
        new_tokens_path=replay_new,
        settings=plan.stage2,
        output_dir=work / "stage2",
        heldout_tokens_path=heldout,
    )
    stage1_result, stage2_result = train_stages(stage1, stage2, plan.launcher)
    return stage1_result, heldout, stage2_result
