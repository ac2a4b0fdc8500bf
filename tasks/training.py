"""Steps 4-6 of a round: Stage 1, classifier insertion, Stage 2 (review).

Each step runs its job (layermoe_core.training.launch): in this process, or with a plan `launcher` as an
`accelerate launch` job, while this process only waits, forwarding rank 0's metrics.
"""

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from layermoe_core.training.launch import BaseJob, LaunchError, LauncherSettings, Stage1Job, Stage2Job, launch
from layermoe_core.training.trainer import FINAL_DIR_NAME, MetricsCallback, TrainResult

from .common import artifact_key, file_step


class ProgressReporter(MetricsCallback):
    """Training logs go to the flow's log, and progress to a Prefect progress artifact.

    Progress is the Trainer's own step count over its own total (`state.max_steps`), which it
    works out from epochs too, so plans that train by epochs show progress as well.
    """

    def __init__(self, stage: str):
        logger = get_run_logger()
        super().__init__(lambda metrics, step: logger.info("%s step %s: %s", stage, step, {k: round(v, 4) for k, v in metrics.items()}))
        self.artifact_id = create_progress_artifact(
            progress=0.0, key=artifact_key(f"{stage}-progress"), description=f"{stage} training progress"
        )

    def _update(self, state) -> None:
        if state.is_world_process_zero and state.max_steps:
            update_progress_artifact(artifact_id=self.artifact_id, progress=min(100.0, 100.0 * state.global_step / state.max_steps))

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=logs, **kwargs)
        self._update(state)

    def on_train_end(self, args, state, control, **kwargs):
        self._update(state)


def run_job(job: Stage1Job | Stage2Job | BaseJob, launcher: LauncherSettings | None, stage: str) -> TrainResult:
    """`job.run` in this process, or under accelerate launch with `launcher` (a failed or killed launch fails the task,
    its log's tail shown once, here); either way its progress reaches the flow's log and artifacts."""
    reporter = ProgressReporter(stage)
    if launcher is None:
        result = job.run([reporter])
    else:
        get_run_logger().info("%s: launching %s processes; log in %s", stage, launcher.processes, job.output_dir)
        try:
            result = launch(job, launcher, reporter.fn)
        except LaunchError as error:
            lines = "\n".join(f"  | {line}" for line in error.tail)
            get_run_logger().error("%s: the launch failed; the last %s lines of its log:\n%s", stage, len(error.tail), lines)
            raise
    if result.resumed_from:
        get_run_logger().info("%s resumed from %s", stage, result.resumed_from)
    return result


@file_step(lambda a: a["job"].output_dir / FINAL_DIR_NAME, name="stage 1: train new experts")
def run_stage1(job: Stage1Job, launcher: LauncherSettings | None = None) -> TrainResult:
    """Expand the parent with the job's allocation and train this round's experts and routers on new-language text.

    A rerun after an interruption resumes from the last checkpoint in the job's output_dir.
    """
    return run_job(job, launcher, "stage1")


@file_step(lambda a: a["job"].output_dir / FINAL_DIR_NAME, name="stage 2: review routers and classifiers")
def run_stage2(job: Stage2Job, launcher: LauncherSettings | None = None) -> TrainResult:
    """Insert the routing classifiers, then train routers and classifiers on the old+new replay mix (and, with held-out
    tokens, on until the classifiers reach their accuracy target or the step cap)."""
    get_run_logger().info("routing classifiers in layers %s", job.classifier_layers)
    return run_job(job, launcher, "stage2")
