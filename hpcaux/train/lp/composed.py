"""The true composition F_K o ... o F_1 across the ranks of one replica.

Evaluation and the serial-parallel hybrid fine-tune both run the stages in sequence,
passing boundary activations forward (and, for the fine-tune, their gradients back) with
point-to-point send/recv. The stages stay where they were trained: no rank ever holds
more than one stage's weights, optimiser state and BatchNorm statistics, and D > 1 works
unchanged (each replica runs its own chain on its own shard; the stage gradients are
then averaged over the stage's process set as in training). A fine-tune step is a GPipe
pipeline of micro-batches (rank k idles only in the pipeline's fill and drain);
evaluation is pipelined batch by batch, since stage k computes batch b+1 while stage k+1
computes b.
"""
from __future__ import annotations

import torch

from hpcaux.comm import Comm
from hpcaux.train.lp.executor import Executor
from hpcaux.train.lp.schedule import Action, Plan, timetable
from hpcaux.train.run.evaluate import averaged_norm_statistics
from hpcaux.train.run.layout import Layout
from hpcaux.train.run.precision import Precision


class StageChain:
    """This rank's place in its replica's chain of stages."""

    def __init__(self, comm: Comm, layout: Layout, stage_module: torch.nn.Module, boundary_shapes: list[tuple],
                 device: torch.device, precision: Precision | None = None):
        """`precision`: how the fine-tune's forward passes run (evaluation runs in float32)."""
        self.comm, self.layout, self.stage, self.device = comm, layout, stage_module, device
        self.precision = precision
        self.shapes = boundary_shapes
        s = layout.stage
        self.prev = layout.rank_of(s - 1) if s > 0 else None
        self.next = layout.rank_of(s + 1) if s < layout.K - 1 else None
        self.peer_ranks = {peer: layout.rank_of(peer) for peer in (s - 1, s + 1) if 0 <= peer < layout.K}

    def _recv_input(self, batch: int, requires_grad: bool) -> torch.Tensor:
        shape = (batch, *self.shapes[self.layout.stage - 1])
        buf = torch.empty(shape, device=self.device)
        self.comm.recv(buf, self.prev, what="recv boundary activation")
        return buf.requires_grad_(requires_grad)

    def forward(self, x: torch.Tensor, requires_grad: bool = False):
        """(input, output) of this stage for a batch, receiving/sending along the chain."""
        inp = x if self.prev is None else self._recv_input(x.shape[0], requires_grad)
        out = self.stage(inp)
        if self.next is not None:
            self.comm.send(out.detach(), self.next, what="send boundary activation")
        return inp, out

    def run_timetable(self, plan: Plan, program: "ChainProgram") -> None:
        """Run this stage's timetable of `plan` (a gpipe or evaluate path) on `program`."""
        Executor(self.comm, self.peer_ranks).run(timetable(plan, self.layout.stage), program)

    @torch.no_grad()
    def correct_count(self, batches) -> tuple[int, int]:
        """(correct, total) of the composed network on `batches`; nonzero on the last stage.
        Batch by batch along the chain (the evaluate timetable): stage k computes batch
        b+1 while stage k+1 computes b, since sends do not wait."""
        return self._forward_batches(batches, training=False)

    @torch.no_grad()
    def reestimate_norm_statistics(self, batches) -> None:
        """Replace every BatchNorm's running statistics of this stage by their average over
        the composed network's forward of `batches` (each batch normalised by its own
        statistics, as in training). A stage trained on the AuxNet's predictions of its
        input keeps statistics of those; the composed network feeds it its predecessor's
        real output, which is distributed differently (docs/accuracy.md)."""
        with averaged_norm_statistics(self.stage):
            self._forward_batches(batches, training=True)

    def _forward_batches(self, batches, training: bool) -> tuple[int, int]:
        """The composed forward of `batches` along the chain (the evaluate timetable), the
        stage in training or evaluation mode; (correct, total), nonzero on the last stage."""
        was_training = self.stage.training
        self.stage.train(training)
        correct = total = 0
        for x, y in batches:
            program = ChainProgram(self, [(x, y)], self.stage)
            self.run_timetable(Plan("evaluate", self.layout.K, steps=1), program)
            correct += program.correct
            total += len(y) if self.next is None else 0
        self.stage.train(was_training)
        return correct, total

    def train_step(self, x: torch.Tensor, y: torch.Tensor, criterion, microbatches: int, apply,
                   vote) -> torch.Tensor | None:
        """One end-to-end backprop step of the composed network, as a GPipe pipeline (the
        gpipe timetable): the batch in `microbatches` parts, every part's forward (stage k
        runs part m+1 while stage k+1 runs part m: sends do not wait), then every part's
        backward in reverse, then `apply()` (average and step) and `vote(loss)` (the
        stop vote). The loss is the batch's mean, each part weighted by its share, so the
        gradient is the full batch's (with BatchNorm statistics per part, as in GPipe).

        Returns the loss on the last stage (detached, on the device: the epoch loop reads it).
        """
        parts = list(zip(x.tensor_split(min(microbatches, len(x))), y.tensor_split(min(microbatches, len(y)))))
        run = (lambda h: self.precision.forward(self.stage, h)) if self.precision else self.stage
        program = ChainProgram(self, parts, run, criterion=criterion, apply=apply, vote=vote)
        self.run_timetable(Plan("gpipe", self.layout.K, steps=1, microbatches=len(parts)), program)
        return program.loss()


class ChainProgram:
    """What one stage computes in the gpipe and evaluate timetables (the executor does the
    messages): the forward of each part of a batch on the received activation (the image
    on the first stage); with a `criterion`, the last stage's loss of each part, weighted
    by its share of the batch, and the backwards; without, the last stage's correct count."""

    def __init__(self, chain: StageChain, parts: list[tuple], run, criterion=None, apply=None, vote=None):
        self.chain, self.parts, self.run, self.criterion = chain, parts, run, criterion
        self.apply, self.vote = apply, vote   # the fine-tune's optimiser step and stop vote
        self.total = sum(len(y) for _, y in parts)
        self.inputs, self.outputs, self.returned, self.losses = {}, {}, {}, {}
        self.correct = 0

    def buffer(self, action: Action) -> torch.Tensor:
        if action.what == "activation":
            shape = (len(self.parts[action.batch][1]), *self.chain.shapes[self.chain.layout.stage - 1])
            return torch.empty(shape, device=self.chain.device)
        return torch.empty_like(self.outputs[action.batch])

    def received(self, action: Action, tensor: torch.Tensor):
        if action.what == "activation":
            self.inputs[action.batch] = tensor.requires_grad_(self.criterion is not None)
        else:
            self.returned[action.batch] = tensor

    def outgoing(self, action: Action) -> torch.Tensor:
        if action.what == "activation":
            return self.outputs[action.batch].detach()
        return self.inputs.pop(action.batch).grad

    def forward(self, action: Action):
        x, y = self.parts[action.batch]
        out = self.run(x if action.what == "image" else self.inputs[action.batch])
        self.outputs[action.batch] = out
        if self.chain.next is not None:
            return
        if self.criterion is not None:
            self.losses[action.batch] = self.criterion(out, y) * (len(y) / self.total)
        else:
            self.correct += (out.argmax(1) == y).sum().item()

    def backward(self, action: Action):
        (kind, batch), = action.roots
        if kind == "own":
            self.losses[batch].backward()
        else:
            self.outputs[batch].backward(self.returned.pop(batch))
        del self.outputs[batch]

    def opt_step(self, _action: Action):
        self.apply()

    def allreduce(self, _action: Action):
        self.vote(self.loss())

    def loss(self) -> torch.Tensor | None:
        """The batch's loss on the last stage (detached, on the device); None elsewhere."""
        return torch.stack(list(self.losses.values())).sum().detach() if self.losses else None
