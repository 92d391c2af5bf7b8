"""slurm/*.sbatch on a real single-node SLURM cluster (munged, slurmctld, slurmd).

The fixture starts the daemons with a private slurm.conf and stops them after. Jobs run
the real scripts with a tiny real config on 2 tasks (the node has 2 CPUs).
"""
import json
import subprocess
import time

import h5py
import pytest

from conftest import HPCAUX, ROOT, assert_same_final_weights, check, mpirun
from slurm_cluster import LocalSlurm, missing

TINY = ["data.train_subset=512", "train.batch_size=32", "data.eval_subset=100", "data.test_subset=100",
        "train.progress=false", "store.probe_size=8", "comm.backend=mpi4py", "train.eval_batch_size=50",
        "parallel.cuts=[4]"]
CONFIG = "configs/cifar10_resnet20_k2.yaml"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = missing()
    if reason:
        pytest.skip(f"no SLURM here: {reason}")
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    yield cluster
    cluster.stop()


def submit_training(slurm, runs, *overrides) -> int:
    runs.mkdir(parents=True, exist_ok=True)  # SLURM does not create the --output folder
    slurm.env["HPCAUX_RUNS"] = str(runs)
    return slurm.submit(f"--output={runs}/job-%j.out", "slurm/train.sbatch", CONFIG, *overrides, cwd=ROOT)


def test_sbatch_trains_and_a_dependent_job_analyzes_the_run(slurm, tmp_path, cifar_root):
    job = submit_training(slurm, tmp_path, f"data.root={cifar_root}", "train.epochs=2", *TINY)
    analysis = slurm.submit(f"--dependency=afterok:{job}", f"--output={tmp_path}/analyze-%j.out",
                            "slurm/analyze.sbatch", str(tmp_path / str(job)), cwd=ROOT)
    assert slurm.wait(job, 300)["JobState"] == "COMPLETED", (tmp_path / f"job-{job}.out").read_text()
    assert slurm.wait(analysis, 120)["JobState"] == "COMPLETED", (tmp_path / f"analyze-{analysis}.out").read_text()
    run = tmp_path / str(job)
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["K"], summary["D"], summary["epochs"]) == (2, 1, 2)  # D derived from the 2 tasks
    with h5py.File(run / "aux.h5", "r") as f:
        assert f["metrics/composed_acc"].shape[0] == 2
    for rank in (0, 1):
        assert "epoch 2" in (run / "logs" / f"rank-{rank}.log").read_text() or rank == 1
    assert list((run / "analysis").glob("*.png"))


def test_usr1_saves_requeues_resumes_and_ends_like_an_uninterrupted_run(slurm, tmp_path, cifar_root):
    common = [f"data.root={cifar_root}", "train.epochs=6", "lp.loss=al", "lp.multipliers=per_sample", *TINY]
    job = submit_training(slurm, tmp_path / "runs", *common)
    run = tmp_path / "runs" / str(job)
    deadline = time.monotonic() + 240
    while not (run / "ckpt" / "latest").exists():
        state = slurm.job(job)
        assert time.monotonic() < deadline and state["JobState"] in ("PENDING", "RUNNING"), state
        time.sleep(0.5)
    slurm.run("scancel", "--signal=USR1", "--batch", str(job))
    # SLURM holds a requeued job about two minutes: train the reference meanwhile.
    check(mpirun(2, [HPCAUX, "train", "--config", str(ROOT / CONFIG), "--out", str(tmp_path / "straight"), *common],
                 timeout=300))
    info = slurm.wait(job, 480, until=("COMPLETED", "FAILED", "CANCELLED"))
    log = (tmp_path / "runs" / f"job-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert "after SIGUSR1" in log and "requeueing" in log and "(restart 1)" in log
    assert "resumed from" in (run / "logs" / "rank-0.log").read_text()
    assert list((run / "ckpt").glob("stop_step_*"))
    assert_same_final_weights(tmp_path / "straight", run)
    assert json.loads((run / "summary.json").read_text())["epochs"] == 6


def test_scripts_are_valid_bash():
    for script in ("train.sbatch", "train_multinode.sbatch", "analyze.sbatch", "run_training.sh"):
        subprocess.run(["bash", "-n", str(ROOT / "slurm" / script)], check=True)
