"""K x D: after a few steps every replica of a stage, and every AuxNet copy, is identical.

python check_replicas.py BACKEND DATA_ROOT RUN_DIR K D   (under mpirun -np K*D)
"""
import sys
from pathlib import Path

import torch
from torch.nn.utils import parameters_to_vector

from common import make_comm, tiny_config
from hpcaux.train.layer_parallel import LayerParallelTrainer

backend, data_root, run_dir, K, D = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
comm = make_comm(backend)
cfg = tiny_config(data_root, backend, K, D, "data.train_subset=256")
trainer = LayerParallelTrainer(cfg, run_dir, comm, torch.device("cpu"))
for i, (x, y, idx) in enumerate(trainer.batches(0, augment=True)):
    trainer.step(x, y, idx, rho=1.0)
    if i == 2:
        break
stage = parameters_to_vector(trainer.parts.stage.parameters()).detach()
aux = torch.cat([parameters_to_vector(trainer.parts.auxnet.parameters()).detach(),
                 *[b.flatten() for b in trainer.parts.auxnet.buffers() if b.is_floating_point()]])
stage_mean, aux_mean = stage.clone(), aux.clone()
comm.allreduce([stage_mean], op="mean", group=trainer.step.stage_group)
comm.allreduce([aux_mean], op="mean")
assert torch.allclose(stage, stage_mean, atol=1e-6), f"rank {comm.rank}: stage replicas differ"
assert torch.allclose(aux, aux_mean, atol=1e-6), f"rank {comm.rank}: AuxNet copies differ"
print(f"rank {comm.rank}: stage {trainer.layout.stage} replica {trainer.layout.replica} identical")
trainer.store.close(comm.barrier)
comm.finalize()
