"""Gradient equivalence with the one-process joint loss (hpcaux.train.lp.joint), under
mpirun -np K*D:  python check_gradients.py BACKEND DATA_ROOT RUN_DIR K D MODE...

MODE is penalty (with label smoothing and the convolutional local head), al or stored. Each rank's stage (and local head) gradient and the
allreduced AuxNet gradient must equal the gradient of L computed in one process on the
same weights: for D > 1, L averaged over every replica's batch (one process sees the
global batch). Then one whole step: the AL multipliers and the stored z of the batch
must move exactly as the formulas of docs/design.md §1 say.
"""
import math
import sys
from pathlib import Path

import torch

from common import assert_close, make_comm, replica_batches, tiny_config
from hpcaux.store.names import lambda_name, z_name
from hpcaux.train.layer_parallel import LayerParallelTrainer
from hpcaux.train.lp.joint import JointObjective

backend, data_root, run_root = sys.argv[1], sys.argv[2], Path(sys.argv[3])
K, D, modes = int(sys.argv[4]), int(sys.argv[5]), sys.argv[6:]
comm = make_comm(backend)
rho = 2.0
OVERRIDES = {"penalty": ["optim.label_smoothing=0.1", "lp.local_head=conv"],
             "al": ["lp.loss=al", "store.mode=mpio", "lp.local_head=conv2"],
             "stored": ["lp.aux_source=stored", "data.augment=false"]}


def random_multipliers(n_train, shapes):
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(n_train, *s, generator=gen) * 0.1 for s in shapes]


for mode in modes:
    cfg = tiny_config(data_root, backend, K, D, *OVERRIDES[mode])
    trainer = LayerParallelTrainer(cfg, run_root / mode, comm, torch.device("cpu"))
    s, step = trainer.layout.stage, trainer.step
    twin = JointObjective(cfg, trainer.parts.cuts, trainer.parts.shapes, trainer.data.num_classes, trainer.data.image_shape)
    lams = random_multipliers(trainer.data.n_train, trainer.parts.shapes) if mode == "al" else None
    if lams and s < K - 1:
        trainer.store.fill_rows(lambda_name(s), 0, lams[s])
    trainer.store.flush(comm.barrier)
    batches = replica_batches(trainer, D)
    x, y, idx = batches[trainer.layout.replica]
    if mode == "stored":  # K = 2: both ranks see z_0, the input of one and the target of the other
        z_before = trainer.store.read_rows(z_name(0), idx)
        step.compute_gradients(x, y, idx, rho)  # also steps z of the batch in the store
        z_leaf = z_before.clone().requires_grad_()
        total, _, terms = twin.loss(x, y, rho, boundary_values={0: z_leaf})
        as_target, as_input = torch.autograd.grad(terms[0], z_leaf, retain_graph=True)[0], \
            torch.autograd.grad(terms[1], z_leaf, retain_graph=True)[0]
        total.backward()
    else:
        step.compute_gradients(x, y, idx, rho)
        multipliers_of = (lambda i: {k: lams[k][i] for k in range(K - 1)}) if lams else None
        twin.replica_mean_loss(batches, rho, multipliers_of).backward()
    assert_close(comm.rank, "stage", step.stage_params, twin.parameters_of_stage(s))
    if twin.auxnet is not None:
        assert_close(comm.rank, "AuxNet", list(trainer.parts.auxnet.parameters()), list(twin.auxnet.parameters()))

    if mode == "stored":  # z -= z_lr * (B * numel / rho * dL_0/dz + B * dL_1/dz), docs/algorithm.md
        trainer.store.flush(comm.barrier)
        B = len(idx)
        expected = z_before - cfg.lp.z_lr * (B * math.prod(trainer.parts.shapes[0]) / rho * as_target + B * as_input)
        after = trainer.store.read_rows(z_name(0), idx)
        assert torch.allclose(after, expected, atol=1e-5), \
            f"rank {comm.rank}: z step differs by {(after - expected).abs().max().item():.3e}"
        assert not torch.allclose(after, z_before), "z did not move"
    if mode == "al":  # one whole step: lambda += rho * residual of the step's forward pass
        _, residuals, _ = twin.loss(x, y, rho, multipliers={k: lams[k][idx] for k in range(K - 1)})
        step(x, y, idx, rho)
        if s < K - 1:
            after = trainer.store.read_rows(lambda_name(s), idx)
            assert torch.allclose(after, lams[s][idx] + rho * residuals[s], atol=1e-5), "AL update differs"
    trainer.store.close(comm.barrier)
    print(f"rank {comm.rank}: {mode} gradients match the single-process joint loss")
comm.finalize()
