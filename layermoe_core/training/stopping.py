"""Training that stops at a checkpoint when its process is asked to stop with SIGTERM.

A container stop (`docker compose stop`) reaches the worker's command (`flows.worker`), which passes
SIGTERM to each flow run's process first; a launched stage's flow process passes it on to its ranks
(`launch.launch`).
The signal is only recorded: at the next optimizer step's end the ranks agree on it (an all-reduce, so
all of them stop at the same step), the Trainer saves a checkpoint there, the kind `latest_checkpoint`
resumes from, and training ends with `TrainingStopped`. A second SIGTERM goes to the handler that was
there before, which stops the process at once (Prefect's raises its `TerminationSignal`). Ctrl-C (SIGINT)
is left to the CLI, which stops at once (`flows.cli`).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..errors import LayerMoEError


class TrainingStopped(LayerMoEError):
    """Training stopped on SIGTERM, after saving `checkpoint` (None: it stopped before any was saved)."""

    def __init__(self, checkpoint: Path | None):
        where = f"at {checkpoint}" if checkpoint else "before its first checkpoint"
        super().__init__(f"training stopped by SIGTERM {where}; rerun to resume from it")
        self.checkpoint = checkpoint


@contextmanager
def caught_sigterm(on_sigterm: Callable[[], None]) -> Iterator[None]:
    """Within: the first SIGTERM calls `on_sigterm()` and the process goes on; the previous handler comes back at
    once, so a second SIGTERM takes its way. A SIGTERM caught in a block that then ends normally (it came too late
    to stop anything) is raised again on leaving, for the previous handler.

    Python takes signals in the main thread only; elsewhere nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    caught: list[bool] = []

    def handle(signum: int, frame) -> None:
        signal.signal(signal.SIGTERM, previous)
        caught.append(True)
        on_sigterm()

    signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
    if caught:
        signal.raise_signal(signal.SIGTERM)


class StopOnSigterm(TrainerCallback):
    """Stops training at the end of the first optimizer step after a SIGTERM, with a checkpoint saved there.

    Every rank calls `on_step_end` at every step, so the ranks all-reduce their flags there: one rank's
    SIGTERM stops them all at the same step.
    """

    def __init__(self) -> None:
        self.requested = False  # this rank caught a SIGTERM
        self.stopped_at: int | None = None  # the step whose checkpoint the ranks saved on it

    def request(self) -> None:
        self.requested = True

    def on_step_end(self, args, state, control, **kwargs):
        agreed = torch.tensor([int(self.requested)], device=args.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX)
        if agreed.item():
            self.stopped_at = state.global_step
            control.should_save = control.should_training_stop = True

    def raise_if_stopped(self, accelerator, output_dir: Path) -> None:
        """After `Trainer.train`: `TrainingStopped` if it stopped on a SIGTERM, once every rank is done (so rank 0's
        checkpoint is complete before any rank exits)."""
        if self.stopped_at is None:
            return
        accelerator.wait_for_everyone()
        raise TrainingStopped(Path(output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.stopped_at}")
