"""The partition under real ranks: every rank cuts alike, the stage times are measured for
every stage side by side, and the timing leaves the model as it was.

python check_balance.py BACKEND   (under mpirun -np K)
"""
import sys
from types import SimpleNamespace

import torch

from common import make_comm, world_size
from hpcaux.models import build_model
from hpcaux.models.partition import balanced_cuts, block_flops
from hpcaux.train.lp.exchange import graphs_in_flight
from hpcaux.train.run.balance import agree_on_partition

comm = make_comm(sys.argv[1])
K, rank = world_size(), comm.rank
torch.manual_seed(0)
model = build_model("resnet20", 10)
sample = torch.randn(8, 3, 32, 32)
before = {k: v.clone() for k, v in model.state_dict().items()}


def partition(balance, cuts=()):
    """The time balance as the default pipeline's stages run: graphs in flight but on the last."""
    return agree_on_partition(SimpleNamespace(K=K, balance=balance, cuts=list(cuts)), comm, model, sample, rank,
                              in_flight=graphs_in_flight(K, rank, True, "fused") if balance == "time" else 0)


for balance in ("time", "flops", "configured"):
    part = partition(balance if balance != "configured" else "time", cuts=range(1, K) if balance == "configured" else ())
    everyone = comm.gather_per_rank({f"cut {i}": float(c) for i, c in enumerate(part.cuts)})
    assert all((column == column[0]).all() for column in everyone.values()), f"rank {rank}: {balance}: {everyone}"
    assert len(part.cuts) == K - 1 and len(part.stage_ms) == K and min(part.stage_ms) > 0, part
    assert part.samples == 8, part
    if balance == "flops":
        assert part.cuts == balanced_cuts(block_flops(build_model("resnet20", 10), sample), K), part.cuts
    if balance == "configured":
        assert part.cuts == list(range(1, K)) and part.how == "configured", part
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "timing moved BN statistics"
    assert all(p.grad is None for p in model.parameters()), "timing left gradients"
    if rank == 0:
        print(f"{balance}: {part.describe()}")
comm.finalize()
