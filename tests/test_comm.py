"""Every installed backend passes the same collective checks under real mpirun -np 2 and 3."""
import time

import pytest

from conftest import ROOT, check, every_backend, installed_backends, mpirun

SCRIPTS = ROOT / "tests" / "mpi"


@pytest.mark.parametrize("np", [2, 3])
@pytest.mark.parametrize("backend", every_backend())
def test_collectives(backend, np):
    proc = check(mpirun(np, ["python", str(SCRIPTS / "check_comm.py"), backend], timeout=120))
    assert proc.stdout.count("comm checks passed") == np


@pytest.mark.parametrize("backend", every_backend())
def test_watchdog_aborts_a_hang_and_names_the_peer(backend):
    started = time.monotonic()
    proc = mpirun(2, ["python", str(SCRIPTS / "hang.py"), backend, "3"], timeout=90)
    assert proc.returncode != 0
    assert time.monotonic() - started < 60
    line = [ln for ln in proc.stderr.splitlines() if "watchdog" in ln]
    assert line, proc.stderr[-3000:]
    assert "rank 1 (stage 1, step 3)" in line[0] and "recv boundary activation from rank 0" in line[0], line[0]


def test_unknown_or_missing_backend_is_a_clear_error():
    from hpcaux.comm import create_comm
    from hpcaux.errors import UserError

    with pytest.raises(UserError, match="unknown comm backend 'nccl'"):
        create_comm("nccl")


def test_auto_backend_is_torch_on_cpus_and_horovod_on_gpus_where_installed_unless_the_run_sends_every_step():
    import torch

    from hpcaux.comm import resolve_backend

    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", None) == "torch"
    on_gpu = "horovod" if "horovod" in installed_backends() else "torch"
    assert resolve_backend("auto", torch.device("cuda", 0)) == on_gpu
    assert resolve_backend("mpi4py", torch.device("cuda", 0)) == "mpi4py"
    # the pipeline and the exchange send activations every step: NCCL keeps them on the device
    assert resolve_backend("auto", torch.device("cuda", 0), sends_every_step=True) == "torch"
    assert resolve_backend("horovod", torch.device("cuda", 0), sends_every_step=True) == "horovod"


@pytest.mark.skipif("horovod" not in installed_backends(), reason="Horovod is not installed")
def test_horovod_backend_under_horovodrun_gloo():
    """No MPI world under horovodrun --gloo: send/recv go over a gloo group instead."""
    from conftest import check, run

    proc = check(run(["horovodrun", "-np", "2", "-H", "localhost:2", "--gloo", "python",
                      str(SCRIPTS / "check_comm.py"), "horovod"], timeout=180))
    assert proc.stdout.count("comm checks passed (horovod, 2 ranks)") == 2


def test_a_device_tensor_staged_through_host_memory_is_counted_and_nothing_else_is():
    """Comm._staged is where every backend moves a tensor to the memory it sends from: a
    device tensor given a host buffer counts one host trip; a tensor already there is used
    as it is, and a host tensor copied to a device (an NCCL collective of host-born
    statistics) is no trip through the host. (The meta device stands in for a GPU.)"""
    import torch

    from hpcaux.comm.loopback import LoopbackComm, LoopbackWorld

    comm, host, device = LoopbackComm(LoopbackWorld(1), 0), torch.device("cpu"), torch.device("meta")
    on_host = torch.ones(3)
    assert comm._staged(on_host, host) is on_host and comm.host_trips == 0
    assert comm._staged(on_host, device).device == device and comm.host_trips == 0
    staged = comm._staged(torch.empty(3, device=device), host, fill=False)
    assert staged.device == host and staged.shape == (3,) and comm.host_trips == 1
