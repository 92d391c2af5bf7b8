"""Helpers for the scripts that tests run under mpirun: a tiny real config and a trainer."""
from __future__ import annotations

import sys
import threading
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from hpcaux.comm import create_comm  # noqa: E402
from hpcaux.comm import launch  # noqa: E402
from hpcaux.config import load_config  # noqa: E402

CUTS = {2: [4], 3: [3, 6], 4: [3, 5, 7]}


def tiny_config(data_root: str, backend: str, K: int, D: int = 1, *overrides):
    # a narrow AuxNet where there is one (an auxnet key without an AuxNet is a config error)
    narrow = [] if any(o.startswith("lp.aux_source=") and o != "lp.aux_source=auxnet" for o in overrides) \
        else ["auxnet.width=8"]
    return load_config(ROOT / "configs" / "cifar10_resnet20_auxnet.yaml", [
        f"data.root={data_root}", "data.train_subset=128", "data.eval_subset=200", "train.batch_size=16",
        "train.eval_batch_size=100", f"comm.backend={backend}", f"parallel.K={K}", f"parallel.D={D}",
        f"parallel.cuts={CUTS[K]}", "comm.timeout_s=60", "train.progress=false", *narrow, *overrides])


def make_comm(backend: str):
    torch.set_num_threads(1)
    return create_comm(backend, 60.0, torch.device("cpu"))


def native_threads() -> int:
    """The threads of this process that Python did not start (gloo's workers, MPI's)."""
    return len(list(Path("/proc/self/task").iterdir())) - threading.active_count()


def world_size() -> int:
    return launch.world_size()


def assert_close(rank: int, name: str, mine, ref):
    """Gradients of two parameter lists are equal (a missing gradient counts as zero)."""
    assert len(mine) == len(ref), f"rank {rank}: {name}: {len(mine)} parameters against {len(ref)}"
    for i, (a, b) in enumerate(zip(mine, ref)):
        ga = a.grad if a.grad is not None else torch.zeros_like(a)
        gb = b.grad if b.grad is not None else torch.zeros_like(b)
        assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-6), \
            f"rank {rank}: {name} gradient {i} differs by {(ga - gb).abs().max().item():.3e}"


def record_exchange(exchange) -> dict:
    """Wrap the exchange's calls to record what crosses ranks, by the exchange step it
    happens at: the outputs sent on, the real inputs (tensor, labels) taken, the input
    gradients returned and the returned gradients applied (None where nothing was due)."""
    record = {"sent": {}, "real": {}, "returned": {}, "applied": {}}
    send_output, begin_step = exchange.send_output, exchange.begin_step
    return_gradient, delayed_gradient = exchange.return_gradient, exchange.delayed_gradient

    def recording_send(output, stage_input, **kept):
        record["sent"][exchange.step] = output.detach().clone()
        send_output(output, stage_input, **kept)

    def recording_real(labels):
        real = begin_step(labels)
        record["real"][exchange.step] = None if real is None else (real.tensor.detach().clone(), real.labels.clone())
        return real

    def recording_return(real, delayed):
        if real is not None:
            record["returned"][exchange.step] = real.tensor.grad.clone()
        return_gradient(real, delayed)

    def recording_delayed():
        delayed = delayed_gradient()
        record["applied"][exchange.step] = None if delayed is None or delayed.grad is None else delayed.grad.clone()
        return delayed

    exchange.send_output, exchange.begin_step = recording_send, recording_real
    exchange.return_gradient, exchange.delayed_gradient = recording_return, recording_delayed
    return record


def replica_batches(trainer, replicas: int):
    """The first batch of every replica of epoch 0: what one process on the global batch sees."""
    data, cfg = trainer.data, trainer.cfg
    return [next(data.train_batches(cfg.train.batch_size, seed=cfg.seed, epoch=0, augment=cfg.data.augment,
                                    device=torch.device("cpu"), replica=r, replicas=replicas))
            for r in range(replicas)]
