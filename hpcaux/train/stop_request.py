"""Stop requests: SIGUSR1 and SIGTERM make a run save a checkpoint and exit cleanly.

SLURM sends SIGUSR1 ahead of a time limit or preemption (`#SBATCH --signal=USR1@120`)
and SIGTERM when it ends a job; mpirun forwards SIGUSR1 to every rank. A signal reaches
the ranks at different moments, so the handler only raises a flag: the trainer carries the
flag inside the step's world allreduce (layer-parallel) and every rank sees the same
verdict after the same step, finishes it, and all save together (DESIGN.md section 5).
A second signal of the same kind falls back to its default action, for a user who wants
the process gone now.
"""
from __future__ import annotations

import os
import signal

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    def __init__(self):
        self.signal_name: str | None = None
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum, _frame):
        if self.signal_name == signal.Signals(signum).name:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def vote(self) -> float:
        """This rank's vote for the stop allreduce: 1 when a signal arrived, else 0."""
        return 1.0 if self.requested else 0.0
