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
import torch.nn.functional as F

from hpcaux.comm import Comm
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

    @torch.no_grad()
    def correct_count(self, batches) -> tuple[int, int]:
        """(correct, total) of the composed network on `batches`; nonzero on the last stage."""
        was_training = self.stage.training
        self.stage.eval()
        correct = total = 0
        for x, y in batches:
            _, out = self.forward(x)
            if self.next is None:
                correct += (out.argmax(1) == y).sum().item()
                total += len(y)
        self.stage.train(was_training)
        return correct, total

    def backprop_step(self, x: torch.Tensor, y: torch.Tensor, criterion=F.cross_entropy,
                      microbatches: int = 1) -> torch.Tensor | None:
        """One end-to-end backprop step of the composed network, as a GPipe pipeline: the
        batch in `microbatches` parts, every part's forward (stage k runs part m+1 while
        stage k+1 runs part m: sends do not wait), then every part's backward in reverse.
        The loss is the batch's mean, each part weighted by its share, so the gradient is
        the full batch's (with BatchNorm statistics per part, as in GPipe).

        Leaves this stage's parameter gradients in .grad; the caller averages and steps.
        Returns the loss on the last stage (detached, on the device: the epoch loop reads it).
        """
        parts = list(zip(x.tensor_split(min(microbatches, len(x))), y.tensor_split(min(microbatches, len(y)))))
        sends, kept, losses = [], [], []
        for xm, ym in parts:
            inp = xm if self.prev is None else self._recv_input(len(xm), requires_grad=True)
            out = self.precision.forward(self.stage, inp) if self.precision else self.stage(inp)
            if self.next is None:
                losses.append(criterion(out, ym) * (len(ym) / len(y)))
            else:
                sends.append(self.comm.isend(out, self.next, what="isend boundary activation"))
            kept.append((inp, out))
        for m in reversed(range(len(parts))):
            inp, out = kept[m]
            if self.next is None:
                losses[m].backward()
            else:
                out.backward(self.comm.recv(torch.empty_like(out), self.next, what="recv boundary gradient"))
            if self.prev is not None:
                sends.append(self.comm.isend(inp.grad, self.prev, what="isend boundary gradient"))
        for pending in sends:
            pending.wait()
        return torch.stack(losses).sum().detach() if losses else None
