"""The pipeline baseline's step against one-process backprop, under mpirun -np K with the
torch backend:  python check_pipeline.py DATA_ROOT RUN_DIR K

GPipe splits the batch into parallel.microbatches micro-batches, each with its own
BatchNorm statistics, and averages their gradients: each rank's stage gradient must equal
the gradient of the mean micro-batch cross-entropy of the serial network in one process.
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from common import assert_close, make_comm, tiny_config
from hpcaux.models import build_model
from hpcaux.models.partition import make_stages
from hpcaux.train.baselines import PipelineTrainer
from hpcaux.train.run.runtime import seed_everything

data_root, run_dir, K = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
comm = make_comm("torch")
cfg = tiny_config(data_root, "torch", K, 1, "method=pipeline", "parallel.microbatches=4")
trainer = PipelineTrainer(cfg, run_dir, comm, torch.device("cpu"), create_run=lambda: None)
x, y, _ = next(iter(trainer._batches(0)))
trainer.optimizer.zero_grad()
trainer.gradients(x, y)
seed_everything(cfg.seed)
reference = build_model(cfg.model.arch, trainer.data.num_classes)
stages = make_stages(reference, trainer.cuts, boundary_norm=False)
loss = torch.stack([F.cross_entropy(reference(xm), ym) for xm, ym in zip(x.chunk(4), y.chunk(4))]).mean()
loss.backward()
assert_close(comm.rank, "stage", list(trainer.stage.parameters()), list(stages[trainer.layout.stage].parameters()))
print(f"rank {comm.rank}: pipeline gradients match one-process backprop")
comm.finalize()
