"""The hybrid fine-tune step against one-process backprop of the composed network, under
mpirun -np K*D:  python check_finetune.py BACKEND DATA_ROOT RUN_DIR K D M

Each rank's stage gradient as FinetuneStep's optimiser step finds it (backprop across the
ranks by send/recv, the gpipe timetable of M micro-batches run by the executor, averaged
over the replicas; caught by an optimiser step pre-hook) must equal the
gradient of the cross-entropy of the composed network in one process, run on the same M
micro-batches (BatchNorm normalises each on its own), averaged over every replica's batch.
"""
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from common import assert_close, make_comm, replica_batches, tiny_config
from hpcaux.train.layer_parallel import LayerParallelTrainer
from hpcaux.train.lp.joint import JointObjective

backend, data_root, run_dir, K, D = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
M = int(sys.argv[6])
comm = make_comm(backend)
cfg = tiny_config(data_root, backend, K, D, "optim.label_smoothing=0.1", f"parallel.microbatches={M}")
trainer = LayerParallelTrainer(cfg, run_dir, comm, torch.device("cpu"))
twin = JointObjective(cfg, trainer.parts.cuts, trainer.parts.shapes, trainer.data.num_classes, trainer.data.image_shape)
composed = torch.nn.Sequential(*twin.stages)
batches = replica_batches(trainer, D)
x, y, _ = batches[trainer.layout.replica]
stepped = []   # the gradients the optimiser steps with
trainer.parts.stage_opt.register_step_pre_hook(
    lambda *_: stepped.extend(SimpleNamespace(grad=p.grad.clone()) for p in trainer.parts.stage.parameters()))
loss = trainer.finetune_step()(x, y, None)["loss"]


def batch_loss(bx, by):
    """The batch's mean cross-entropy, its M micro-batches weighted by their share."""
    return sum(F.cross_entropy(composed(xm), ym, label_smoothing=0.1) * len(ym) / len(by)
               for xm, ym in zip(bx.tensor_split(M), by.tensor_split(M)))


reference = torch.stack([batch_loss(bx, by) for bx, by, _ in batches]).mean()
reference.backward()
assert_close(comm.rank, "stage", stepped, list(twin.stages[trainer.layout.stage].parameters()))
if trainer.layout.is_last and D == 1:
    assert abs(loss.item() - reference.item()) < 1e-5, (loss, reference.item())
trainer.store.close(comm.barrier)
print(f"rank {comm.rank}: fine-tune gradients match one-process backprop")
comm.finalize()
