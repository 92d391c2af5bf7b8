"""Stop requests: SIGUSR1 and SIGTERM make a run save a checkpoint and exit cleanly.

SLURM sends SIGUSR1 ahead of a time limit or preemption (`#SBATCH --signal=USR1@120`)
and SIGTERM when it ends a job; mpirun forwards SIGUSR1 to every rank. A signal reaches
the ranks at different moments, so the handler only raises a flag (`StopRequest`); the
flag is carried as a vote inside an allreduce (`StopVote`), so every rank sees the same
verdict after the same step; `StopPoint` then decides where the run checkpoints and
unwinds (docs/design.md §5). Further signals change nothing: under SLURM a task can get
the same SIGTERM from slurmd and from srun, and dying on the second would lose the save.
That holds up to the process's exit: once the run returns, the signals are ignored
(`settle`), because Python's shutdown puts back their default action and a repeat that
lands there would end a rank that has saved with "exited on signal 10", and the job with
a failure. SIGINT (Ctrl-C) and SIGKILL still end a process at once.
"""
from __future__ import annotations

import os
import signal
import typing
from typing import Callable

if typing.TYPE_CHECKING:
    import torch

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StoppedBySignal(Exception):
    """Raised on every rank, after the checkpoint is committed, when a stop was agreed."""


class StopRequest:
    """Installed first thing in `hpcaux train` (this module imports nothing heavy), so a
    signal that arrives while torch and the data load is held, not fatal."""

    def __init__(self):
        self.signal_name: str | None = None
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum, _frame):
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name

    def release(self):
        """Give the signals their default action back (a serial run cannot checkpoint);
        one that already arrived takes effect now."""
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        if self.signal_name is not None:
            os.kill(os.getpid(), signal.Signals[self.signal_name])

    def settle(self):
        """The run has returned (its work saved or failed): ignore stop signals up to the
        exit, so a late or repeated one cannot turn a clean end into a killed rank."""
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def vote(self) -> float:
        """This rank's vote for the stop allreduce: 1 when a signal arrived, else 0."""
        return 1.0 if self.requested else 0.0


class NonFiniteLoss(Exception):
    """Raised on every rank when a rank's loss was NaN or Inf; args[0]: those ranks,
    args[1]: how many steps the verdict covers (the host reads it every train.sync_every
    steps, so the bad step is one of the last `span`)."""

    def describe(self, step, steps_per_epoch: int, stage_of) -> str:
        """The one line for the user; `step` is the watchdog's step label (a global step,
        or "finetune N") of the step the verdict was read after, `stage_of(rank)` a rank's stage."""
        span = self.args[1] if len(self.args) > 1 else 1
        if isinstance(step, int):
            first = step - span + 1
            steps = f"step {step % steps_per_epoch + 1}" if span == 1 else \
                f"one of steps {first % steps_per_epoch + 1}-{step % steps_per_epoch + 1}"
            where = f"epoch {step // steps_per_epoch + 1}, {steps} of {steps_per_epoch}"
        else:
            where = f"step {step}" if span == 1 else f"one of the {span} steps up to {step}"
        stages = ", ".join(str(s + 1) for s in sorted({stage_of(r) for r in self.args[0]}))
        return (f"the loss became NaN or Inf in {where}, on stage(s) {stages}; stopped without saving (the "
                f"last checkpoint is kept): lower optim.lr or lp.rho_max")


class StopVote:
    """This rank's vote, as a tensor that rides in the step's allreduce: [stop, bad_0, ...,
    bad_{n-1}], where stop > 0 asks every rank to stop and bad_r marks rank r's loss as not
    finite. One allreduce tells every rank both, after the same step.

    The agreed votes are added up on the device (`collect`) and read by the host only when
    the epoch loop asks for the `verdict`, every train.sync_every steps: on a GPU a read is
    a host synchronisation, which a per-step read would pay every step. Every rank reads
    after the same steps, so every rank still sees the same verdict."""

    def __init__(self, request: StopRequest | None, device, rank: int = 0, world_size: int = 1):
        import torch  # here, not at the top: StopRequest must be importable before torch

        self.request, self.rank = request, rank
        self.tensor = torch.zeros(1 + world_size, device=device)
        self.collected = torch.zeros(1 + world_size, device=device)
        self.steps_collected = 0
        self.loss_finite: "bool | torch.Tensor" = True  # a tensor stays on the device

    def cast(self) -> "torch.Tensor":
        """Fill in this rank's vote; pass the result to the allreduce, then `collect`."""
        import torch

        self.tensor.zero_()
        self.tensor[0] = self.request.vote() if self.request else 0.0
        finite = self.loss_finite
        self.tensor[1 + self.rank] = torch.logical_not(finite).float() if torch.is_tensor(finite) else float(not finite)
        return self.tensor

    def collect(self):
        """Add the agreed vote of this step (the allreduce has run) to those not yet read."""
        self.collected.add_(self.tensor)
        self.steps_collected += 1

    def cast_alone(self):
        """A one-rank run has no allreduce: its own vote is the agreed one."""
        self.cast()
        self.collect()

    def verdict(self) -> bool:
        """Whether a stop was agreed in the steps collected since the last read; raises
        NonFiniteLoss (on every rank alike) when any rank's loss was not finite in them."""
        votes = self.collected.tolist()  # the one host read
        span = self.steps_collected
        self.collected.zero_()
        self.steps_collected = 0
        bad = [rank for rank, v in enumerate(votes[1:]) if v > 0]
        if bad:
            raise NonFiniteLoss(bad, span)
        return votes[0] > 0

    def agree_alone(self, comm):
        """The vote in an allreduce of its own, for a phase without a world allreduce."""
        comm.allreduce([self.cast()], op="sum", what="allreduce stop votes")
        self.collect()


class StopPoint:
    """Where an agreed stop checkpoints, so that `--resume` continues the same run.

    A stop agreed inside an epoch checkpoints after that step (the resume skips the steps
    already made); one agreed on an epoch's last step lets the epoch be recorded first and
    checkpoints at the start of the next, unless the run ends there anyway.
    `save(epoch, step_in_epoch)` writes the checkpoint on every rank.
    """

    def __init__(self, save: Callable[[int, int], None], steps_per_epoch: int):
        self.save, self.steps = save, steps_per_epoch
        self.pending = False

    def after_step(self, agreed: bool, epoch: int, step_in_epoch: int):
        """Called after every step with the agreed vote; epoch 0-based, step_in_epoch 1-based."""
        if not agreed:
            return
        if step_in_epoch < self.steps:
            self._stop(epoch, step_in_epoch)
        self.pending = True

    def after_epoch(self, epochs_done: int, last_epoch: int):
        """Called once the epoch is recorded; stops when the vote came on its last step."""
        if self.pending and epochs_done < last_epoch:
            self._stop(epochs_done, 0)
        self.pending = False

    def _stop(self, epoch: int, step_in_epoch: int):
        self.save(epoch, step_in_epoch)
        raise StoppedBySignal(epoch * self.steps + step_in_epoch)
