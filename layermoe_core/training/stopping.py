"""Training that stops at a checkpoint when its process is asked to stop (SIGTERM, or SIGINT from Ctrl-C).

A container stop (`docker compose stop`) reaches a Prefect process worker, which passes SIGTERM on to
the flow run's process; a launched stage's flow process passes it on to its ranks (`launch.launch`).
The signal is only recorded: at the next optimizer step's end the ranks agree on it (an all-reduce, so
all of them stop at the same step), the Trainer saves a checkpoint there, the kind `latest_checkpoint`
resumes from, and training ends with `TrainingStopped`. A second signal goes to the handler that was
there before, which stops the process at once (Prefect's raises its `TerminationSignal`).
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

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingStopped(LayerMoEError):
    """Training stopped on a signal, after saving `checkpoint` (None: the process was stopped before any was saved)."""

    def __init__(self, signum: int, checkpoint: Path | None):
        where = f"at {checkpoint}" if checkpoint else "before its first checkpoint"
        super().__init__(f"training stopped by {signal.Signals(signum).name} {where}; rerun to resume from it")
        self.signum, self.checkpoint = signum, checkpoint


@contextmanager
def caught_stop_signals(on_signal: Callable[[int], None]) -> Iterator[None]:
    """Within: the first SIGTERM or SIGINT calls `on_signal(signum)` and the process goes on; the previous handlers
    come back at once, so a second signal takes their way. A signal caught in a block that then ends normally
    (it came too late to stop anything) is raised again on leaving, for the previous handler.

    Python takes signals in the main thread only; elsewhere nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    caught: list[int] = []

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def handle(signum: int, frame) -> None:
        restore()
        caught.append(signum)
        on_signal(signum)

    for signum in STOP_SIGNALS:
        signal.signal(signum, handle)
    try:
        yield
    finally:
        restore()
    if caught:
        signal.raise_signal(caught[0])


class StopOnSignal(TrainerCallback):
    """Stops training at the end of the first optimizer step after a stop signal, with a checkpoint saved there.

    Every rank calls `on_step_end` at every step, so the ranks all-reduce the signal number there (0: none):
    one rank's signal stops them all at the same step.
    """

    def __init__(self) -> None:
        self.caught = 0  # the signal number this rank caught, 0 while none
        self.stopped: tuple[int, int] | None = None  # (signal the ranks agreed on, the step whose checkpoint was saved)

    def record(self, signum: int) -> None:
        self.caught = signum

    def on_step_end(self, args, state, control, **kwargs):
        agreed = torch.tensor([self.caught], device=args.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX)
        if agreed.item():
            self.stopped = (int(agreed.item()), state.global_step)
            control.should_save = control.should_training_stop = True

    def raise_if_stopped(self, accelerator, output_dir: Path) -> None:
        """After `Trainer.train`: `TrainingStopped` if it stopped on a signal, once every rank is done (so rank 0's
        checkpoint is complete before any rank exits)."""
        if self.stopped is None:
            return
        signum, step = self.stopped
        accelerator.wait_for_everyone()
        raise TrainingStopped(signum, Path(output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}")
