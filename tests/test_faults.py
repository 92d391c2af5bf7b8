"""Faults under a real mpirun: stop signals, a killed rank, a stuck rank.

Each run is a real training job; the signal or kill lands wherever the job happens to be,
so what is asserted holds for any moment (same final weights, a committed `latest`).
"""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import (HPCAUX, MPI_ENV, ROOT, assert_same_final_weights, check, finish, mpirun, mpirun_command,
                      wait_for_epochs)

CONFIG = str(ROOT / "configs" / "cifar10_resnet20_auxnet.yaml")
SMALL = ["data.train_subset=512", "train.batch_size=32", "data.eval_subset=100", "data.test_subset=100",
         "train.progress=false", "store.probe_size=8", "comm.backend=mpi4py", "train.eval_batch_size=50"]


def start(np_, out, *overrides, guarded=False, config=CONFIG) -> subprocess.Popen:
    """mpirun of a small training job (under `hpcaux launch` when `guarded`)."""
    cmd = ([HPCAUX, "launch"] if guarded else []) + mpirun_command(np_)
    cmd += [HPCAUX, "train", "--config", config, "--out", str(out), *SMALL, *overrides]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, **MPI_ENV})


def ranks_of(proc) -> list[int]:
    """The rank processes mpirun started (its children), in rank order."""
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    return sorted(int(pid) for pid in children)


@pytest.mark.parametrize("how,phase,schedule", [
    ("USR1 to mpirun", "layer_parallel", ["train.epochs=3"]),
    ("TERM to every rank", "finetune", ["train.epochs=1", "train.finetune_epochs=2"]),
    ("TERM to hpcaux launch, repeated until the job ends", "layer_parallel", ["train.epochs=3"])])
def test_stop_signal_saves_and_resume_ends_with_the_weights_of_an_uninterrupted_run(how, phase, schedule, tmp_path,
                                                                                   cifar_root):
    common = [f"data.root={cifar_root}", "lp.loss=al", "parallel.cuts=[4]", *schedule]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    proc = start(2, stopped, *common, guarded="hpcaux launch" in how)
    wait_for_epochs(stopped, 1, proc)
    if how.startswith("USR1"):
        proc.send_signal(signal.SIGUSR1)  # mpirun forwards SIGUSR1 to every rank
    elif how.endswith("repeated until the job ends"):  # mpirun alone would kill the ranks (exit 1)
        while proc.poll() is None:  # the repeats land in every phase: the step, the save, the exit
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.005)
    else:
        for pid in ranks_of(proc):  # what SLURM does at a time limit
            os.kill(pid, signal.SIGTERM)
    code, stdout, stderr, _ = finish(proc, 120)
    assert code == 0, stderr[-3000:]
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report["stopped_by_signal"] == ("SIGTERM" if how == "TERM to every rank" else "SIGUSR1")
    if how.endswith("repeated until the job ends"):
        assert stderr.count("hpcaux launch: SIGTERM: asking every rank to save and stop") == 1, stderr[-3000:]
    manifest = json.loads((stopped / "ckpt" / "latest" / "manifest.json").read_text())
    # nothing trained is lost: the checkpoint holds every step made before the stop
    assert manifest["epoch"] * 16 + manifest["step_in_epoch"] == report["stopped_after_step"] >= 16
    assert manifest["phase"] == phase
    assert not (stopped / "summary.json").exists()
    check(mpirun(2, [HPCAUX, "train", "--resume", str(stopped)], timeout=300))
    check(mpirun(2, [HPCAUX, "train", "--config", CONFIG, "--out", str(straight), *SMALL, *common], timeout=300))
    assert_same_final_weights(straight, stopped)
    epochs = [json.loads(line)["epoch"] for line in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]


def test_signals_repeated_to_hpcaux_launch_until_mpirun_exits_leave_a_clean_exit(tmp_path):
    """mpirun puts back, on its way out, the action SIGUSR1 had when it started; under the
    default action a repeat forwarded in its last milliseconds killed it (exit 138) after
    every rank had finished. TERM every 2 ms to `hpcaux launch`, from the ranks' start to
    mpirun's exit, over ranks that ignore SIGUSR1 (as hpcaux train's do once they have
    saved) and end by themselves."""
    ranks = tmp_path / "ranks.py"
    ranks.write_text("import signal, time\nsignal.signal(signal.SIGUSR1, signal.SIG_IGN)\n"
                     "print('ready', flush=True)\ntime.sleep(0.5)\n")
    log = tmp_path / "stderr"  # a file, not a pipe: mpirun writes a line per forwarded signal
    for _ in range(3):
        with log.open("w") as err:
            proc = subprocess.Popen([HPCAUX, "launch", *mpirun_command(2), "python", str(ranks)], stdout=subprocess.PIPE,
                                    stderr=err, text=True, cwd=ROOT, env={**os.environ, **MPI_ENV})
            for _ in range(2):
                assert proc.stdout.readline().strip() == "ready", log.read_text()[-2000:]
            deadline = time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < deadline:
                proc.send_signal(signal.SIGTERM)
                time.sleep(0.002)
            code, _, _, _ = finish(proc, 10)
        assert code == 0, log.read_text()[-2000:]


K2 = str(ROOT / "configs" / "cifar10_resnet20_k2.yaml")  # the pipeline without an AuxNet
K4 = str(ROOT / "configs" / "cifar10_resnet20_k4.yaml")  # the same, four stages, micro-batches
EXCHANGES = {"keep": (CONFIG, 2, 1, ["lp.real_inputs=beside", "lp.delayed_grad=keep"]),
             "fused, AL": (CONFIG, 2, 1, ["lp.real_inputs=only", "lp.delayed_grad=fused", "lp.loss=al"]),
             "real inputs from the store": (CONFIG, 2, 1, ["lp.real_inputs=stored"]),
             "relay at K = 3": (CONFIG, 3, 1, ["parallel.K=3", "parallel.cuts=[3,6]", "lp.real_inputs=beside",
                                               "lp.delayed_grad=fused"]),
             "relay at K = 4, 4 micro-batches": (CONFIG, 4, 1, ["parallel.K=4", "parallel.cuts=[3,5,7]",
                                                                "lp.real_inputs=only", "lp.delayed_grad=keep",
                                                                "parallel.microbatches=4"]),
             "the K = 2 config": (K2, 2, 1, []),
             "the K = 2 config, 2 replicas": (K2, 2, 2, ["parallel.D=2", "train.batch_size=16"]),
             "the K = 2 config, weight prediction": (K2, 2, 1, ["lp.weight_prediction=2"]),
             "the K = 2 config, a host read every 5 steps": (K2, 2, 1, ["train.sync_every=5"]),
             "the pipeline at K = 4": (K2, 4, 1, ["parallel.K=4", "parallel.cuts=[3,5,7]"]),
             "the K = 4 config (8 micro-batches)": (K4, 4, 1, ["parallel.cuts=[3,5,7]"])}


@pytest.mark.parametrize("exchange", list(EXCHANGES))
def test_stop_signal_inside_an_epoch_with_the_neighbour_exchange_resumes_exactly(exchange, tmp_path, cifar_root):
    """Messages of the exchange and kept graphs are in flight at every step: a stop
    settles them (no hang) and saves them with every step made (per replica: each trains
    on its own batches), and the resumed run continues the exchange, so it ends with the
    weights of an uninterrupted run."""
    config, K, D, overrides = EXCHANGES[exchange]
    common = [f"data.root={cifar_root}", "parallel.cuts=[4]", "train.epochs=3", *overrides]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    proc = start(K * D, stopped, *common, config=config)
    wait_for_epochs(stopped, 1, proc)
    time.sleep(0.5)  # a few steps into the epoch: the exchange is in its steady state
    proc.send_signal(signal.SIGUSR1)
    code, stdout, stderr, took = finish(proc, 120)
    assert code == 0, stderr[-3000:]
    report = json.loads(stdout.strip().splitlines()[-1])
    latest = stopped / "ckpt" / "latest"
    manifest = json.loads((latest / "manifest.json").read_text())
    assert manifest["epoch"] * 16 + manifest["step_in_epoch"] == report["stopped_after_step"] > 16
    if "train.sync_every=5" in overrides:  # the vote is read after steps 5, 10, 15 and 16 (the epoch's last)
        assert manifest["step_in_epoch"] in (0, 5, 10, 15), manifest
    if manifest["step_in_epoch"] and "lp.real_inputs=stored" not in overrides:  # no messages in flight there
        assert {f"exchange_{k}_{r}.pt" for k in range(K) for r in range(D)} <= set(manifest["files"])
        assert all((latest / f).is_file() for f in manifest["files"])
    check(mpirun(K * D, [HPCAUX, "train", "--resume", str(stopped)], timeout=300))
    check(mpirun(K * D, [HPCAUX, "train", "--config", config, "--out", str(straight), *SMALL, *common], timeout=300))
    files = tuple(f"stage_{k}.pt" for k in range(K)) + (("auxnet.pt",) if config == CONFIG else ())
    assert_same_final_weights(straight, stopped, files=files)


def wait_for_stop_handlers(proc, ranks: int, timeout=120):
    """Block until mpirun has started its `ranks` ranks and each catches SIGUSR1 (the
    SigCgt mask of /proc/PID/status): `hpcaux train` sets its handler before it imports
    torch. A signal sent to mpirun earlier is not held: mpirun drops it while it has no
    ranks, and a rank that has not reached its handler dies of it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        caught = []
        for pid in ranks_of(proc):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except FileNotFoundError:
                continue
            mask = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
            caught.append(bool(mask & (1 << (signal.SIGUSR1 - 1))))
        if len(caught) == ranks and all(caught):
            return
        time.sleep(0.02)
    raise TimeoutError(f"the {ranks} ranks did not set their stop handlers in {timeout} s")


def test_stop_signal_during_start_up_is_held_until_the_first_step(tmp_path, cifar_root):
    """A signal as soon as the ranks have set their handler, while they still import torch
    and load the data: it is held, the first step runs, and the job saves and exits 0."""
    stopped = tmp_path / "stopped"
    proc = start(2, stopped, f"data.root={cifar_root}", "parallel.cuts=[4]", "train.epochs=2")
    wait_for_stop_handlers(proc, 2)
    proc.send_signal(signal.SIGUSR1)
    code, stdout, stderr, _ = finish(proc, 120)
    assert code == 0, stderr[-3000:]
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report["stopped_by_signal"] == "SIGUSR1" and report["stopped_after_step"] == 1
    assert (stopped / "ckpt" / "latest").resolve().name == "stop_step_1"


def test_a_loss_that_becomes_nan_ends_every_rank_with_one_line_and_keeps_the_last_checkpoint(tmp_path, cifar_root):
    """A diverging run (here: resumed with an absurd learning rate): the non-finite loss
    rides in the step's vote, so every rank stops after the same step, nobody waits on a
    dead peer, nothing is saved over the last good checkpoint, and the user gets one line."""
    out = tmp_path / "run"
    common = [f"data.root={cifar_root}", "parallel.cuts=[4]", "train.epochs=3"]
    check(mpirun(2, [HPCAUX, "train", "--config", CONFIG, "--out", str(out), *SMALL, *common, "--max-epochs", "1"],
                 timeout=300))
    diverged = mpirun(2, [HPCAUX, "train", "--resume", str(out), "optim.lr=1e30"], timeout=300)
    assert diverged.returncode == 2, diverged.stderr[-3000:]  # a user error: lower the learning rate
    assert "hpcaux: error: the loss became NaN or Inf in epoch 2, step " in diverged.stderr, diverged.stderr[-3000:]
    assert "stopped without saving (the last checkpoint is kept): lower optim.lr or lp.rho_max" in diverged.stderr
    assert "Traceback" not in diverged.stderr
    assert (out / "ckpt" / "latest").resolve().name == "epoch_1"
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["epoch_1", "latest"]


@pytest.mark.parametrize("np_", [2, 3])
def test_a_killed_rank_ends_the_job_and_resume_continues_from_latest(np_, tmp_path, cifar_root):
    out = tmp_path / "run"
    common = [f"data.root={cifar_root}", "train.epochs=3", f"parallel.K={np_}", "comm.timeout_s=30"]
    proc = start(np_, out, *common)
    wait_for_epochs(out, 1, proc)
    victim = ranks_of(proc)[-1]
    os.kill(victim, signal.SIGKILL)
    code, _, stderr, took = finish(proc, 90)
    assert code != 0 and took < 60
    # the launcher (mpirun) or a survivor's watchdog names the lost rank
    assert f"process rank {np_ - 1} " in stderr or "hpcaux: watchdog:" in stderr, stderr[-3000:]
    latest = out / "ckpt" / "latest"
    manifest = json.loads((latest / "manifest.json").read_text())
    assert all((latest / f).is_file() for f in manifest["files"])
    check(mpirun(np_, [HPCAUX, "train", "--resume", str(out)], timeout=300))
    assert json.loads((out / "summary.json").read_text())["epochs"] == 3


def test_a_stuck_rank_is_named_by_the_watchdog_and_the_job_ends(tmp_path, cifar_root):
    """SIGSTOP leaves the peer alive but silent (a hung GPU, a stalled file system): the
    launcher sees nothing, so only the watchdog can end the job."""
    out = tmp_path / "run"
    proc = start(3, out, f"data.root={cifar_root}", "train.epochs=3", "parallel.K=3", "comm.timeout_s=10")
    wait_for_epochs(out, 1, proc)
    stuck = ranks_of(proc)[1]
    os.kill(stuck, signal.SIGSTOP)
    try:
        code, _, stderr, took = finish(proc, 90)
    finally:
        subprocess.run(["kill", "-CONT", str(stuck)], capture_output=True)
    assert code != 0 and took < 60
    lines = [line for line in stderr.splitlines() if line.startswith("hpcaux: watchdog:")]
    assert lines, stderr[-3000:]
    assert "a peer is lost or stuck" in lines[0] and "stage" in lines[0] and "step" in lines[0]
