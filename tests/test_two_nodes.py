"""K=2 stages x D=2 replicas across two nodes (tests/two_nodes.py), against one host.

mpirun launches through an ssh stand-in with a hostfile, 2 ranks per node; SLURM runs a
slurmd on each node. Everything a multi-node run changes is checked against the same job
on one host: the numbers (losses, final weights, the HDF5 store written through MPI-IO
from both nodes), where each rank runs, a rank lost on the other node, and a
stop-requeue-resume of slurm/train_multinode.sbatch.
"""
import json
import os
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest

from conftest import (HPCAUX, MPI_ENV, ROOT, assert_same_final_weights, check, every_backend, finish, mpirun,
                      mpirun_command, wait_for_epochs)
from slurm_cluster import LocalSlurm
from slurm_cluster import missing as slurm_missing
from two_nodes import NODES, TwoNodes, missing

CONFIG = str(ROOT / "configs" / "cifar10_resnet20_auxnet.yaml")
SMALL = ["data.train_subset=256", "train.batch_size=32", "data.eval_subset=100", "data.test_subset=100",
         "train.progress=false", "store.probe_size=8", "train.eval_batch_size=50", "parallel.cuts=[4]",
         "parallel.D=2", "store.mode=mpio"]
# Ranks 0-1 on the first node, 2-3 on the second: each replica's two stages share a node.
HOSTS = [NODES[0], NODES[0], NODES[1], NODES[1]]


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    reason = missing()
    if reason:
        pytest.skip(f"two nodes cannot be made here: {reason}")
    made = TwoNodes(tmp_path_factory.mktemp("nodes")).build()
    yield made
    made.remove()


def across(nodes) -> dict:
    """mpirun keywords that spread 4 ranks over the two nodes, 2 per node."""
    return {"env": nodes.mpi_env(), "options": ["--hostfile", str(nodes.hostfile)]}


def train(out, *overrides, **launch):
    return check(mpirun(4, [HPCAUX, "train", "--config", CONFIG, "--out", str(out), *SMALL, *overrides],
                        timeout=240, **launch))


def epoch_losses(run) -> list:
    return [json.loads(line)["stage_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def store_arrays(path) -> dict:
    arrays = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: arrays.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return arrays


def assert_placed_on_two_nodes(summary):
    """The placement docs/hpc.md promises: a replica's stages on one node, each stage's
    replicas (its gradient allreduce) across the nodes."""
    placement = summary["placement"]
    assert [p["host"] for p in placement] == HOSTS, placement
    for replica in (0, 1):
        assert len({p["host"] for p in placement if p["replica"] == replica}) == 1, placement
    for stage in (0, 1):
        assert {p["host"] for p in placement if p["stage"] == stage} == set(NODES), placement


@pytest.mark.parametrize("backend", every_backend())
def test_k2_d2_across_two_nodes_equals_one_host(backend, nodes, tmp_path, cifar_root):
    # per-sample multipliers: the two replicas, one on each node, write rows of one array
    common = [f"data.root={cifar_root}", f"comm.backend={backend}", "train.epochs=2", "lp.loss=al"]
    train(tmp_path / "one_host", *common)
    spread = train(tmp_path / "two_nodes", *common, **across(nodes))
    assert "placement on 2 nodes (hxnode1: ranks 0-1; hxnode2: ranks 2-3); 0 of 2 stage boundaries cross nodes" \
        in spread.stdout, spread.stdout
    summary = json.loads((tmp_path / "two_nodes" / "summary.json").read_text())
    assert summary["backend"] == backend and summary["store_mode"] == "mpio"
    assert_placed_on_two_nodes(summary)
    np.testing.assert_allclose(epoch_losses(tmp_path / "two_nodes"), epoch_losses(tmp_path / "one_host"), rtol=1e-5)
    assert_same_final_weights(tmp_path / "one_host", tmp_path / "two_nodes")
    # the store, written through MPI-IO by ranks on both nodes, holds what one host wrote
    mine, ref = store_arrays(tmp_path / "two_nodes" / "aux.h5"), store_arrays(tmp_path / "one_host" / "aux.h5")
    assert mine.keys() == ref.keys() and {"boundary_0/lambda", "boundary_0/snapshots/e2"} <= mine.keys(), sorted(mine)
    assert np.count_nonzero(np.abs(mine["boundary_0/lambda"]).sum(axis=tuple(range(1, mine["boundary_0/lambda"].ndim))))\
        == 256  # a row for every training sample, from both replicas
    for name in ref:
        if np.issubdtype(ref[name].dtype, np.floating) and not name.startswith("metrics/"):
            np.testing.assert_allclose(mine[name], ref[name], rtol=1e-4, atol=1e-5, err_msg=name)
    analysis = check(subprocess.run([HPCAUX, "analyze", str(tmp_path / "two_nodes" / "aux.h5")],
                                    capture_output=True, text=True, timeout=120))
    assert "epoch" in analysis.stdout and list((tmp_path / "two_nodes" / "analysis").glob("*.png"))


def processes_on(node: str) -> dict[int, tuple[bytes, list[bytes]]]:
    """Command line and environment of every process running on `node`, by pid."""
    found = {}
    for pid in subprocess.run(["ip", "netns", "pids", node], capture_output=True, text=True).stdout.split():
        try:
            found[int(pid)] = (open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" "),
                               open(f"/proc/{pid}/environ", "rb").read().split(b"\0"))
        except OSError:
            pass  # it has just exited
    return found


def rank_pid(node: str, rank: int) -> int:
    """The pid of `hpcaux train` rank `rank` among the processes of `node`."""
    processes = processes_on(node)
    for pid, (cmdline, environ) in processes.items():
        if b" train " in cmdline and f"OMPI_COMM_WORLD_RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no rank {rank} on {node}: {[c for c, _ in processes.values()]}")


def test_a_rank_killed_on_the_second_node_ends_the_job_naming_it(nodes, tmp_path, cifar_root):
    out = tmp_path / "run"
    launch = across(nodes)
    cmd = mpirun_command(4, launch["options"]) + [
        HPCAUX, "train", "--config", CONFIG, "--out", str(out), *SMALL, f"data.root={cifar_root}",
        "data.train_subset=512", "train.epochs=4", "comm.backend=mpi4py", "comm.timeout_s=30"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, **MPI_ENV, **launch["env"]})
    wait_for_epochs(out, 1, proc)
    os.kill(rank_pid(NODES[1], 3), signal.SIGKILL)
    code, _, stderr, took = finish(proc, 90)
    assert code != 0 and took < 60
    assert "process rank 3 " in stderr or "hpcaux: watchdog:" in stderr, stderr[-3000:]
    deadline = time.monotonic() + 15  # nothing left behind on either node (orted exits last)
    while any(processes_on(node) for node in NODES) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(processes_on(node) for node in NODES), \
        {node: [c for c, _ in processes_on(node).values()] for node in NODES}


@pytest.fixture(scope="module")
def cluster(nodes, tmp_path_factory):
    reason = slurm_missing()
    if reason:
        pytest.skip(f"no SLURM here: {reason}")
    made = LocalSlurm(tmp_path_factory.mktemp("slurm2"), port=6927, two_nodes=nodes)
    made.start()
    yield made
    made.stop()


def test_multinode_sbatch_stops_on_usr1_requeues_and_resumes_to_the_uninterrupted_weights(
        cluster, nodes, tmp_path, cifar_root):
    common = [f"data.root={cifar_root}", "data.train_subset=512", "train.epochs=5", "comm.backend=mpi4py"]
    job = cluster.submit_training(tmp_path / "runs", *SMALL, *common, script="slurm/train_multinode.sbatch",
                                  options=["--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=20"])
    run = tmp_path / "runs" / str(job)
    cluster.wait_for_first_checkpoint(job, run)
    cluster.run("scancel", "--signal=USR1", "--batch", str(job))
    # SLURM holds a requeued job about two minutes: train the reference meanwhile.
    train(tmp_path / "straight", *common, **across(nodes))
    info = cluster.wait(job, 480, until=("COMPLETED", "FAILED", "CANCELLED"))
    log = (tmp_path / "runs" / f"job-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert "4 ranks on hxnode[1-2]" in log and "after SIGUSR1" in log and "(restart 1)" in log, log
    assert list((run / "ckpt").glob("stop_step_*"))
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["K"], summary["D"], summary["epochs"]) == (2, 2, 5)
    assert_placed_on_two_nodes(summary)
    assert_same_final_weights(tmp_path / "straight", run)
