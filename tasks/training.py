"""Steps 4-6 of a round: Stage 1, classifier insertion, Stage 2 (review).

The stages run as jobs (layermoe_core.training.launch), in order: in this process, or with a plan
`launcher` in one `accelerate launch`, while this process only waits, forwarding rank 0's metrics.
"""

from collections.abc import Sequence

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from layermoe_core.training.launch import JobReporter, LaunchError, LauncherSettings, Stage1Job, Stage2Job, TrainJob, launch, train_in_order
from layermoe_core.training.trainer import TrainResult

from .common import artifact_key, file_step


class ProgressReporter(JobReporter):
    """Each stage's training logs go to the flow's log, and its progress to a Prefect progress artifact of its own.

    Progress is the Trainer's own step count over its own total (`max_steps`), which it works out
    from epochs too, so plans that train by epochs show progress as well.
    """

    def __init__(self, jobs: Sequence[TrainJob]):
        self.logger = get_run_logger()
        self.artifacts = {
            job.kind: create_progress_artifact(
                progress=0.0, key=artifact_key(f"{job.kind}-progress"), description=f"{job.kind} training progress"
            )
            for job in jobs
        }
        self.skipped: set[str] = set()

    def job_starts(self, index: int, job: TrainJob, trained: bool) -> None:
        if trained:
            self.skipped.add(job.kind)
            self.logger.info("%s: trained by an earlier run (%s); skipped", job.kind, job.final_dir)
        else:
            self.logger.info("%s: training; output in %s", job.kind, job.output_dir)

    def metrics(self, stage: str, metrics: dict[str, float], step: int, max_steps: int) -> None:
        self.logger.info("%s step %s: %s", stage, step, {k: round(v, 4) for k, v in metrics.items()})
        if max_steps:
            self.progress(stage, 100.0 * step / max_steps)

    def progress(self, stage: str, percent: float) -> None:
        update_progress_artifact(artifact_id=self.artifacts[stage], progress=min(100.0, percent))


def run_jobs(jobs: Sequence[TrainJob], launcher: LauncherSettings | None) -> list[TrainResult]:
    """`train_in_order` in this process, or in one accelerate launch with `launcher` (a failed or killed launch fails
    the task, its log's tail shown once, here); either way each job's progress reaches the flow's log and artifacts."""
    reporter = ProgressReporter(jobs)
    if launcher is None:
        results = train_in_order(jobs, reporter)
    else:
        get_run_logger().info("launching %s on %s processes", ", then ".join(job.kind for job in jobs), launcher.processes)
        try:
            results = launch(jobs, launcher, reporter)
        except LaunchError as error:
            lines = "\n".join(f"  | {line}" for line in error.tail)
            get_run_logger().error("the launch failed; the last %s lines of its log:\n%s", len(error.tail), lines)
            raise
    for job, result in zip(jobs, results, strict=True):
        reporter.progress(job.kind, 100.0)
        if result.resumed_from and job.kind not in reporter.skipped:
            get_run_logger().info("%s resumed from %s", job.kind, result.resumed_from)
    return results


@file_step(lambda a: a["stage2"].final_dir, name="stages 1 and 2: train new experts, then review routers and classifiers")
def train_stages(stage1: Stage1Job, stage2: Stage2Job, launcher: LauncherSettings | None = None) -> tuple[TrainResult, TrainResult]:
    """Stage 1: expand the parent with the job's allocation and train this round's experts and routers on new-language
    text. Stage 2: insert the routing classifiers into Stage 1's model, then train routers and classifiers on the
    old+new replay mix (and, with held-out tokens, on until the classifiers reach their accuracy target or the step cap).

    One task for both stages, because with a launcher they run in one launch (its imports paid once), which two tasks
    could only share by one doing the other's work; each stage keeps its own progress artifact and log lines. A rerun
    skips a stage whose final model is saved and resumes the other from its newest checkpoint.
    """
    get_run_logger().info("routing classifiers in layers %s", stage2.classifier_layers)
    trained1, trained2 = run_jobs([stage1, stage2], launcher)
    return trained1, trained2
