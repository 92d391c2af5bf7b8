"""Gradient equivalence under mpirun -np K: python check_gradients.py BACKEND DATA_ROOT RUN_DIR.

Each rank's stage gradient, and the allreduced AuxNet gradient, must equal the gradient
of the whole joint loss L (sum of every stage's term) computed in one process; for the
penalty and the augmented-Lagrangian objectives. Also checks the AL multiplier update.
"""
import sys
from pathlib import Path

import torch

from common import make_comm, tiny_config, world_size
from hpcaux.models import build_model
from hpcaux.models.partition import make_stages
from hpcaux.train.layer_parallel import LayerParallelTrainer, build_auxnet, build_local_head
from hpcaux.train.losses import stage_term
from hpcaux.train.lp_store import lambda_name
from hpcaux.train.runtime import seed_everything

backend, data_root, run_root = sys.argv[1], sys.argv[2], Path(sys.argv[3])
K = world_size()
comm = make_comm(backend)
rho = 2.0


def multipliers(n_train, shapes):
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(n_train, *s, generator=gen) * 0.1 for s in shapes]


def reference_gradients(cfg, trainer, x, y, idx, lams):
    """The joint loss of docs/design.md §1 in one process, and its gradients."""
    seed_everything(cfg.seed)
    model = build_model(cfg.model.arch, trainer.data.num_classes)
    stages = make_stages(model, trainer.cuts, boundary_norm=True)
    heads = [build_local_head(trainer.shapes, k, trainer.data.num_classes, cfg.seed) for k in range(K - 1)]
    auxnet = build_auxnet(cfg, trainer.shapes, trainer.data.image_shape)
    preds = auxnet(x)
    total, residuals = 0.0, {}
    for k in range(K):
        out = stages[k](x if k == 0 else preds[k - 1])
        term = stage_term(out, preds.get(k), y, is_last=k == K - 1, rho=rho,
                          multiplier=lams[k][idx] if lams and k < K - 1 else None,
                          local_head=heads[k] if k < K - 1 else None, local_weight=cfg.lp.local_cls_weight)
        total = total + term.loss
        residuals[k] = term.residual
    total.backward()
    return stages, heads, auxnet, residuals


def assert_close(name, mine, ref):
    for i, (a, b) in enumerate(zip(mine, ref)):
        ga = a.grad if a.grad is not None else torch.zeros_like(a)
        gb = b.grad if b.grad is not None else torch.zeros_like(b)
        assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-6), \
            f"rank {comm.rank}: {name} gradient {i} differs by {(ga - gb).abs().max().item():.3e}"


for loss in ("penalty", "al"):
    extra = ["lp.loss=al", "lp.multipliers=per_sample"] if loss == "al" else []
    cfg = tiny_config(data_root, backend, K, 1, *extra)
    trainer = LayerParallelTrainer(cfg, run_root / loss, comm, torch.device("cpu"))
    s = trainer.layout.stage
    lams = multipliers(trainer.data.n_train, trainer.shapes) if loss == "al" else None
    if lams and s < K - 1:
        trainer.store.fill_rows(lambda_name(s), 0, lams[s])
    trainer.store.flush(comm.barrier)
    x, y, idx = next(trainer._batches(0, augment=True))
    trainer.compute_gradients(x, y, idx, rho)
    stages, heads, auxnet, residuals = reference_gradients(cfg, trainer, x, y, idx, lams)
    assert_close("stage", list(trainer.stage.parameters()), list(stages[s].parameters()))
    if s < K - 1:
        assert_close("local head", list(trainer.local_head.parameters()), list(heads[s].parameters()))
    assert_close("AuxNet", list(trainer.auxnet.parameters()), list(auxnet.parameters()))
    if loss == "al":
        before = trainer.store.read_rows(lambda_name(s), idx) if s < K - 1 else None
        trainer.train_step(x, y, idx, rho)  # collective; same weights as above: same residual
        if s < K - 1:
            expected = before + rho * residuals[s]
            after = trainer.store.read_rows(lambda_name(s), idx)
            assert torch.allclose(after, expected, atol=1e-5), "AL update differs"
    trainer.store.close(comm.barrier)
    print(f"rank {comm.rank}: {loss} gradients match the single-process joint loss")
comm.finalize()
