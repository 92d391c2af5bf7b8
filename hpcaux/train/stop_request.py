"""Stop requests: SIGUSR1 and SIGTERM make a run save a checkpoint and exit cleanly.

SLURM sends SIGUSR1 ahead of a time limit or preemption (`#SBATCH --signal=USR1@120`)
and SIGTERM when it ends a job; mpirun forwards SIGUSR1 to every rank. A signal reaches
the ranks at different moments, so the handler only raises a flag: the trainer carries the
flag inside the step's world allreduce (layer-parallel) and every rank sees the same
verdict after the same step, finishes it, and all save together (docs/design.md §5).
Further signals change nothing: under SLURM a task can get the same SIGTERM from slurmd
and from srun, and dying on the second would lose the save. SIGINT (Ctrl-C) and SIGKILL
still end a process at once.
"""
from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    def __init__(self):
        self.signal_name: str | None = None
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum, _frame):
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def vote(self) -> float:
        """This rank's vote for the stop allreduce: 1 when a signal arrived, else 0."""
        return 1.0 if self.requested else 0.0
