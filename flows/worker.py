"""The compose workers' command: `prefect worker start ARGS`, stopped in the order a checkpoint needs.

On SIGTERM, Prefect's process worker interrupts itself and kills its flow runs' processes outright, so
training could not save a checkpoint (docs/operations.md, "Workers"). Here a SIGTERM (or SIGINT) goes first
to each flow run's process, where training stops at the end of its current step with a checkpoint
(`layermoe_core.training.stopping`) and the run records its end. Once they have all exited, the worker gets
the SIGTERM and stops, with nothing left to kill; one that has not exited `WORKER_EXIT_S` later (Prefect's worker
can miss the SIGINT it sends itself on SIGTERM) is killed. A second signal passes SIGTERM to the worker at once.

    python -m flows.worker --pool layermoe --type process --with-healthcheck
"""

import signal
import subprocess
import sys
from collections.abc import Sequence

import psutil

WORKER_EXIT_S = 30.0  # after its flow runs have ended, what a Prefect worker gets to deregister and exit


class _Stop(Exception):
    """Raised by the signal handler to leave the wait for the worker."""


def main(argv: Sequence[str]) -> int:
    # In a session of its own, so a terminal's Ctrl-C to this group reaches only this process.
    worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", *argv], start_new_session=True)

    def stop(signum, frame):
        raise _Stop

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    try:
        return worker.wait()
    except _Stop:
        pass
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: worker.send_signal(signal.SIGTERM))
    try:
        runs = psutil.Process(worker.pid).children()  # each flow run's process, in a session of its own
    except psutil.NoSuchProcess:  # the worker ended by itself meanwhile
        runs = []
    print(f"layermoe worker: SIGTERM to {len(runs)} flow run(s) first; the worker stops once they have ended", flush=True)
    for run in runs:
        try:
            run.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(runs)
    worker.send_signal(signal.SIGTERM)
    try:
        return worker.wait(timeout=WORKER_EXIT_S)
    except subprocess.TimeoutExpired:
        print(f"layermoe worker: the Prefect worker had not exited {WORKER_EXIT_S:.0f} s after SIGTERM; killing it", flush=True)
        worker.kill()
        return worker.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
