"""slurm/*.sbatch on a real single-node SLURM cluster (munged, slurmctld, slurmd).

The fixture starts the daemons with a private slurm.conf and stops them after. Jobs run
the real scripts with a tiny real config on 2 tasks (the node has 2 CPUs).
"""
import json
import signal
import subprocess
import time

import h5py
import pytest

from conftest import HPCAUX, ROOT, assert_same_final_weights, check, mpirun
from slurm_cluster import LocalSlurm, missing

TINY = ["data.train_subset=512", "train.batch_size=32", "data.eval_subset=100", "data.test_subset=100",
        "train.progress=false", "store.probe_size=8", "comm.backend=mpi4py", "train.eval_batch_size=50",
        "parallel.cuts=[4]"]
CONFIG = "configs/cifar10_resnet20_auxnet.yaml"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = missing()
    if reason:
        pytest.skip(f"no SLURM here: {reason}")
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    yield cluster
    cluster.stop()


def test_sbatch_trains_and_a_dependent_job_analyzes_the_run(slurm, tmp_path, cifar_root):
    job = slurm.submit_training(tmp_path, f"data.root={cifar_root}", "train.epochs=2", *TINY)
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
    common = [f"data.root={cifar_root}", "train.epochs=6", "lp.loss=al", *TINY]
    job = slurm.submit_training(tmp_path / "runs", *common)
    run = tmp_path / "runs" / str(job)
    slurm.wait_for_first_checkpoint(job, run)
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


def test_term_to_the_whole_job_under_mpirun_saves_and_the_job_exits_0(slurm, tmp_path, cifar_root):
    """What a time limit or a plain scancel does: SIGTERM to the batch script, mpirun and
    every rank, here twice 50 ms apart. mpirun aborts on TERM, so the script gives the ranks
    time (odls_base_sigkill_timeout): they save a stop checkpoint and the script exits 0,
    without requeueing. (srun ends its step with SIGKILL on a TERM of its own; see
    docs/hpc.md and the test below.)"""
    slurm.env["HPCAUX_LAUNCHER"] = "mpirun"
    try:
        job = slurm.submit_training(tmp_path / "runs", f"data.root={cifar_root}", "train.epochs=6", *TINY)
    finally:
        del slurm.env["HPCAUX_LAUNCHER"]
    run = tmp_path / "runs" / str(job)
    slurm.wait_for_first_checkpoint(job, run)
    for _ in range(2):
        slurm.run("scancel", "--full", "--signal=TERM", str(job))
        time.sleep(0.05)
    info = slurm.wait(job, 120, until=("COMPLETED", "FAILED", "CANCELLED"))
    log = (tmp_path / "runs" / f"job-{job}.out").read_text()
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "0", (info, log)
    assert "stopped by SIGTERM with stop_step_" in log and "requeueing" not in log, log
    assert (run / "ckpt" / "latest").resolve().name.startswith("stop_step_")
    assert not (run / "summary.json").exists()


def test_term_twice_to_hpcaux_launch_srun_saves_and_exits_0(slurm, tmp_path, cifar_root):
    """A user's TERM to the launcher of an srun job (srun alone would kill the step): the
    guard passes SIGUSR1 to srun, which forwards it; every rank saves; exit 0."""
    run = tmp_path / "run"
    cmd = [HPCAUX, "launch", "srun", "-n", "2", "--mpi=pmix", HPCAUX, "train", "--config", str(ROOT / CONFIG),
           "--out", str(run), f"data.root={cifar_root}", "train.epochs=6", *TINY]
    proc = subprocess.Popen(cmd, env=slurm.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (run / "ckpt" / "latest").exists():
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.5)
    for _ in range(2):
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.05)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "hpcaux launch: SIGTERM: asking every rank to save and stop (SIGUSR1 to srun" in stderr
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report["stopped_by_signal"] == "SIGUSR1"
    assert (run / "ckpt" / "latest").resolve().name == f"stop_step_{report['stopped_after_step']}"


def test_scripts_are_valid_bash():
    for script in ("train.sbatch", "train_multinode.sbatch", "analyze.sbatch", "run_training.sh"):
        subprocess.run(["bash", "-n", str(ROOT / "slurm" / script)], check=True)
