"""The executor: runs a rank's timetable (schedule.py), one action after another.

The timetable says what happens in which order; the executor does the messages itself
and hands every computation to a *program*, an object with one method per computing op
(`forward`, `backward`, `opt_step`, `allreduce`, ...) that holds the stage's tensors
between actions. So the message bookkeeping of every path lives here once: a receive is
posted into the buffer the program asks for (`buffer(action)`), completed at its
RECV_WAIT and handed over (`received(action, tensor)`); a send takes the tensor the
program names (`outgoing(action)`) and is waited on when the actions end. The shape
follows torch.distributed.pipelining's split of PipelineStage (what a stage computes) from
its schedule classes (in which order), and DeepSpeed's engine dispatching the
instructions of PipeSchedule.steps().
"""
from __future__ import annotations

from hpcaux.comm import Comm
from hpcaux.train.lp.schedule import Action, Op

_MESSAGE_OPS = (Op.RECV_POST, Op.RECV_WAIT, Op.SEND)


class Executor:
    """One rank's executor: `peer_ranks[stage]` is the world rank of a peer stage."""

    def __init__(self, comm: Comm, peer_ranks: dict[int, int]):
        self.comm, self.peer_ranks = comm, peer_ranks

    def run(self, actions: list[Action], program) -> None:
        """Run `actions` in order on `program`; returns once every send has completed."""
        posted, sends = {}, []
        for action in actions:
            key = (action.peer, action.what, action.batch)
            if action.op is Op.RECV_POST:
                posted[key] = self.comm.irecv(program.buffer(action), self.peer_ranks[action.peer],
                                              what=f"irecv {action.what} of micro-batch {action.batch}")
            elif action.op is Op.RECV_WAIT:
                program.received(action, posted.pop(key).wait())
            elif action.op is Op.SEND:
                sends.append(self.comm.isend(program.outgoing(action), self.peer_ranks[action.peer],
                                             what=f"isend {action.what} of micro-batch {action.batch}"))
            else:
                self._compute(action, program)
        if posted:
            raise RuntimeError(f"timetable left receives posted and never waited on: {sorted(posted)}")
        for pending in sends:
            pending.wait()

    @staticmethod
    def _compute(action: Action, program) -> None:
        method = getattr(program, action.op.value, None)
        if method is None:
            raise RuntimeError(f"{type(program).__name__} cannot run a {action.op.value} action")
        method(action)
