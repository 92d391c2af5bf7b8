"""The GPU path: layer-parallel ranks on the device with torch.distributed (NCCL on CUDA).

The device is HPCAUX_CHECK_DEVICE (default cuda); without CUDA these tests skip, and
`scripts/gpu_check.sh --cpu` runs them on the CPU (gloo) so that they cannot rot. Ranks
are launched with mpirun where it exists, else with torchrun (GPU images often lack MPI).
With HPCAUX_CHECK_OUT set, the shipped configs' summaries are copied there (gpu_check.sh
reports their transport and host trips).
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import HPCAUX, MPI_ENV, ROOT, check, mpirun

DEVICE = os.environ.get("HPCAUX_CHECK_DEVICE", "cuda")
CONFIG = str(ROOT / "configs" / "cifar10_resnet20_auxnet.yaml")
SMALL = ["data.train_subset=256", "train.batch_size=32", "data.eval_subset=200", "data.test_subset=500",
         "train.progress=false", "store.probe_size=8", "train.eval_batch_size=100", "store.mode=per_rank"]
TINY = [*SMALL, "comm.backend=torch", "parallel.cuts=[4]"]

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="no CUDA device here")]


def launch(np_: int, args, timeout=600) -> subprocess.CompletedProcess:
    """`np_` ranks of `args` (an hpcaux command line) under mpirun, else torchrun."""
    if shutil.which("mpirun"):
        return mpirun(np_, args, timeout=timeout)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(np_), "--no-python", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, **MPI_ENV})


def train(out, cifar_root, *overrides, np_=2):
    check(launch(np_, [HPCAUX, "train", "--config", CONFIG, "--out", str(out), f"data.root={cifar_root}", *TINY,
                       *overrides]))


@pytest.mark.parametrize("np_,K", [(2, 2), (4, 4)])
def test_ranks_on_the_device_train_and_compose_like_one_process(np_, K, tmp_path, cifar_root):
    """K ranks (sharing the device when there are fewer): the composed network evaluated
    across the ranks on the device counts exactly what one CPU process counts from the
    checkpoint."""
    out = tmp_path / "run"
    cuts = {2: "[4]", 4: "[2,4,6]"}[K]
    train(out, cifar_root, f"train.device={DEVICE}", "train.epochs=1", f"parallel.K={K}", f"parallel.cuts={cuts}",
          np_=np_)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"].startswith(DEVICE) and summary["backend"] == "torch"
    again = check(subprocess.run([HPCAUX, "eval", str(out), "--subset", "500"], capture_output=True, text=True,
                                 timeout=300, cwd=ROOT))
    assert json.loads(again.stdout.strip().splitlines()[-1])["test_acc"] == pytest.approx(summary["test_acc"], abs=1e-9)


@pytest.mark.parametrize("config,K", [("cifar10_resnet20_k2.yaml", 2), ("cifar10_resnet20_k4.yaml", 4)])
def test_the_shipped_pipeline_configs_send_on_the_device(config, K, tmp_path, cifar_root):
    """The shipped K = 2 and K = 4 pipelines as shipped (comm.backend auto), at tiny sizes:
    auto takes torch.distributed (they send every micro-batch); with a GPU per rank the
    sends go over NCCL and no device tensor is staged through host memory (the count of
    such copies is 0 on every rank). Ranks that share a GPU fall back to gloo, whose
    tensors must go through the host: then every rank counts them. On the CPU (gloo)
    nothing is on another device and the count is 0."""
    out = tmp_path / "run"
    check(launch(K, [HPCAUX, "train", "--config", str(ROOT / "configs" / config), "--out", str(out),
                     f"data.root={cifar_root}", *SMALL, f"train.device={DEVICE}", "train.epochs=1"]))
    summary = json.loads((out / "summary.json").read_text())
    if os.environ.get("HPCAUX_CHECK_OUT"):
        shutil.copy(out / "summary.json", os.path.join(os.environ["HPCAUX_CHECK_OUT"], f"{config[:-5]}_summary.json"))
    own_gpus = DEVICE == "cuda" and torch.cuda.device_count() >= K
    assert summary["backend"] == "torch" and summary["transport"] == ("nccl" if own_gpus else "gloo"), summary
    trips = summary["host_trips_per_rank"]
    assert len(trips) == K and (all(n > 0 for n in trips) if DEVICE == "cuda" and not own_gpus else trips == [0] * K)
    assert summary["test_acc"] > 0


def test_a_checkpoint_written_on_the_device_resumes_on_the_cpu(tmp_path, cifar_root):
    out = tmp_path / "run"
    check(launch(2, [HPCAUX, "train", "--config", CONFIG, "--out", str(out), f"data.root={cifar_root}", *TINY,
                     f"train.device={DEVICE}", "train.epochs=2", "--max-epochs", "1"]))
    assert not (out / "summary.json").exists()
    check(launch(2, [HPCAUX, "train", "--resume", str(out), "train.device=cpu"]))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["device"] == "cpu"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]

