"""Steps 4-6 of a round: Stage 1, classifier insertion, Stage 2 (review).

With a plan `launcher`, each stage runs as an `accelerate launch` job (layermoe_core.training.launch)
and this process only waits, forwarding rank 0's metrics; without one, it trains in-process.
"""

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from layermoe_core.data.corpus import open_sequences
from layermoe_core.model.checkpoints import load_model, load_tokenizer
from layermoe_core.model.surgery import expand, insert_classifiers
from layermoe_core.training.launch import LauncherSettings, Stage1Job, Stage2Job, launch
from layermoe_core.training.trainer import MetricsCallback, Stage1Settings, Stage2Settings, TrainResult, train_stage1, train_stage2

from .common import STEP_CACHE, artifact_key


class ProgressReporter(MetricsCallback):
    """Training logs go to the flow's log, and progress to a Prefect progress artifact.

    Progress is the Trainer's own step count over its own total (`state.max_steps`), which it
    works out from epochs too, so plans that train by epochs show progress as well.
    """

    def __init__(self, stage: str):
        logger = get_run_logger()
        super().__init__(lambda metrics, step: logger.info("%s step %s: %s", stage, step, {k: round(v, 4) for k, v in metrics.items()}))
        self.artifact_id = create_progress_artifact(progress=0.0, key=artifact_key(f"{stage}-progress"),
                                                    description=f"{stage} training progress")

    def _update(self, state) -> None:
        if state.is_world_process_zero and state.max_steps:
            update_progress_artifact(artifact_id=self.artifact_id, progress=min(100.0, 100.0 * state.global_step / state.max_steps))

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=logs, **kwargs)
        self._update(state)

    def on_train_end(self, args, state, control, **kwargs):
        self._update(state)


def launched(job: Stage1Job | Stage2Job, launcher: LauncherSettings, stage: str) -> TrainResult:
    """Run `job` under accelerate launch; a failed or killed launch fails the task with its log's tail."""
    get_run_logger().info("%s: launching %s processes; log in %s", stage, launcher.processes, job.output_dir)
    result = launch(job, launcher, ProgressReporter(stage).fn)
    if result.resumed_from:
        get_run_logger().info("%s resumed from %s", stage, result.resumed_from)
    return result


@task(name="stage 1: train new experts", cache_policy=STEP_CACHE, persist_result=True)
def run_stage1(
    parent_dir: Path,
    allocation: list[int],
    old_languages: list[str],
    new_languages: list[str],
    top_k: int,
    tokens_path: Path,
    settings: Stage1Settings,
    output_dir: Path,
    launcher: LauncherSettings | None = None,
) -> TrainResult:
    """Expand the parent with `allocation` and train this round's experts and routers on new-language text.

    A rerun after an interruption resumes from the last checkpoint in output_dir.
    """
    if launcher is not None:
        job = Stage1Job(parent_dir=parent_dir, allocation=allocation, old_languages=old_languages, new_languages=new_languages,
                        top_k=top_k, tokens_path=tokens_path, settings=settings, output_dir=output_dir, tokenizer_dir=parent_dir)
        return launched(job, launcher, "stage1")
    # Seeded router initialisation: the same child in any process, on any rerun.
    model = expand(load_model(parent_dir), allocation, old_languages, new_languages, top_k=top_k,
                   router_aux_loss_coef=settings.balance_loss_coef, seed=settings.seed,
                   router_init=settings.router_init)
    result = train_stage1(model, open_sequences(tokens_path), settings, output_dir, [ProgressReporter("stage1")])
    load_tokenizer(parent_dir).save_pretrained(result.model_dir)
    return result


@task(name="stage 2: review routers and classifiers", cache_policy=STEP_CACHE, persist_result=True)
def run_stage2(
    stage1_dir: Path,
    classifier_layers: list[int],
    old_tokens_path: Path,
    new_tokens_path: Path,
    settings: Stage2Settings,
    output_dir: Path,
    launcher: LauncherSettings | None = None,
) -> TrainResult:
    """Insert the routing classifiers, then train routers and classifiers on the old+new replay mix."""
    get_run_logger().info("routing classifiers in layers %s", classifier_layers)
    if launcher is not None:
        job = Stage2Job(stage1_dir=stage1_dir, classifier_layers=classifier_layers, old_tokens_path=old_tokens_path,
                        new_tokens_path=new_tokens_path, settings=settings, output_dir=output_dir, tokenizer_dir=stage1_dir)
        return launched(job, launcher, "stage2")
    model = load_model(stage1_dir)
    insert_classifiers(model, classifier_layers, seed=settings.seed)
    result = train_stage2(
        model, open_sequences(old_tokens_path), open_sequences(new_tokens_path), settings, output_dir,
        [ProgressReporter("stage2")],
    )
    load_tokenizer(stage1_dir).save_pretrained(result.model_dir)
    return result
