"""The HDF5 store, checkpoints, resume and offline analysis, on real short runs under mpirun."""
import json
import shutil

import h5py
import numpy as np
import pytest

from conftest import HPCAUX, ROOT, assert_same_final_weights, check, digest, mpirun, run

SCRIPTS = ROOT / "tests" / "mpi"
CONFIG = str(ROOT / "configs" / "cifar10_resnet20_auxnet.yaml")
TINY = ["data.train_subset=96", "train.batch_size=32", "data.eval_subset=100", "data.test_subset=100",
        "train.progress=false", "store.probe_size=8", "comm.backend=mpi4py", "train.eval_batch_size=50"]
TIMING = ("step_ms", "aux_ms", "comm_ms", "epoch_s")


def train(np_, out, *overrides, env=None, timeout=300):
    return mpirun(np_, [HPCAUX, "train", "--config", CONFIG, "--out", str(out), *TINY, *overrides],
                  timeout=timeout, env=env)


def contents(path) -> dict:
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        out["meta"] = {k: v for k, v in f["meta"].attrs.items() if k != "mode"}
    return out


@pytest.mark.parametrize("np_,variant", [(2, ["lp.loss=al", "parallel.cuts=[4]"]),
                                        (3, ["lp.loss=al", "lp.aux_source=stored",
                                             "data.augment=false", "parallel.cuts=[3,6]"])])
def test_mpio_and_per_rank_stores_hold_identical_contents(np_, variant, tmp_path, cifar_root):
    pytest.importorskip("mpi4py")
    if not h5py.get_config().mpi:
        pytest.skip("h5py has no parallel HDF5 here")
    for mode in ("mpio", "per_rank"):
        check(train(np_, tmp_path / mode, f"data.root={cifar_root}", f"parallel.K={np_}", "train.epochs=2",
                    f"store.mode={mode}", *variant))
    a, b = contents(tmp_path / "mpio" / "aux.h5"), contents(tmp_path / "per_rank" / "aux.h5")
    assert set(a) == set(b)
    meta_a, meta_b = a.pop("meta"), b.pop("meta")
    assert meta_a["config"] == meta_b["config"].replace("per_rank", "mpio") and meta_a["K"] == np_
    for name in a:
        if name.split("/")[-1] not in TIMING:
            assert np.array_equal(a[name], b[name], equal_nan=True), name
    expected = {f"boundary_{k}/lambda" for k in range(np_ - 1)}
    if "lp.aux_source=stored" in variant:
        expected |= {f"boundary_{k}/z" for k in range(np_ - 1)}
    else:
        expected |= {f"boundary_{k}/snapshots/e{e}" for k in range(np_ - 1) for e in (1, 2)}
    assert expected <= set(a)
    assert np.abs(a["boundary_0/lambda"]).max() > 0  # the multipliers were updated and stored
    assert a["metrics/composed_acc"].shape == (2,)


@pytest.mark.parametrize("mode", ["mpio", "per_rank"])
@pytest.mark.parametrize("np_", [2, 3])
def test_collective_writes_with_idle_ranks_do_not_hang(np_, mode, tmp_path):
    if mode == "mpio" and not h5py.get_config().mpi:
        pytest.skip("h5py has no parallel HDF5 here")
    proc = check(mpirun(np_, ["python", str(SCRIPTS / "check_store.py"), str(tmp_path), mode], timeout=90))
    assert f"store checks passed ({mode}, {np_} ranks)" in proc.stdout


def test_resume_gives_the_same_weights_and_store(tmp_path, cifar_root):
    common = [f"data.root={cifar_root}", "train.epochs=3", "lp.loss=al",
              "parallel.cuts=[4]"]
    check(train(2, tmp_path / "straight", *common))
    check(train(2, tmp_path / "pieces", *common, "--max-epochs", "1"))
    for _ in range(2):
        check(mpirun(2, [HPCAUX, "train", "--resume", str(tmp_path / "pieces"), "--max-epochs", "1"], timeout=300))
    assert_same_final_weights(tmp_path / "straight", tmp_path / "pieces")
    a, b = contents(tmp_path / "straight" / "aux.h5"), contents(tmp_path / "pieces" / "aux.h5")
    assert np.allclose(a["boundary_0/lambda"], b["boundary_0/lambda"], atol=1e-6)
    assert np.array_equal(a["metrics/composed_acc"], b["metrics/composed_acc"])
    assert len((tmp_path / "pieces" / "metrics.jsonl").read_text().splitlines()) == 3


def test_resume_refuses_another_k_and_accepts_another_d(tmp_path, cifar_root):
    out = tmp_path / "run"
    check(train(2, out, f"data.root={cifar_root}", "train.epochs=2", "parallel.cuts=[4]", "--max-epochs", "1"))
    before = digest(out)
    proc = mpirun(3, [HPCAUX, "train", "--resume", str(out), "parallel.K=3", "parallel.cuts=[3,6]"], timeout=120)
    assert proc.returncode == 2
    assert "was written with parallel.K=2; this run has parallel.K=3" in proc.stderr
    assert digest(out) == before
    check(mpirun(4, [HPCAUX, "train", "--resume", str(out), "parallel.D=2"], timeout=300))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["D"] == 2 and summary["epochs"] == 2


def test_latest_never_names_a_half_written_checkpoint(tmp_path, cifar_root):
    out = tmp_path / "run"
    proc = train(2, out, f"data.root={cifar_root}", "train.epochs=3", "parallel.cuts=[4]",
                 env={"HPCAUX_FAULT_KILL_IN_SAVE": "1:epoch_2"})
    assert proc.returncode != 0
    assert (out / "ckpt" / "epoch_2" / "stage_0.pt").exists()  # rank 0 had written its file
    assert (out / "ckpt" / "latest").resolve().name == "epoch_1"
    assert json.loads((out / "ckpt" / "latest" / "manifest.json").read_text())["epoch"] == 1
    check(mpirun(2, [HPCAUX, "train", "--resume", str(out)], timeout=300))
    assert (out / "ckpt" / "latest").resolve().name == "final"
    assert json.loads((out / "summary.json").read_text())["epochs"] == 3
    assert not (out / "ckpt" / "epoch_3").exists()  # the last epoch is saved once, as final


def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(tmp_path, cifar_root):
    out = tmp_path / "run"
    check(train(2, out, f"data.root={cifar_root}", "train.epochs=1", "parallel.cuts=[4]"))
    old = digest(out)
    # the new run dies while writing its first checkpoint: the old run is still there, whole
    proc = train(2, out, f"data.root={cifar_root}", "train.epochs=2", "parallel.cuts=[4]", "--overwrite",
                 env={"HPCAUX_FAULT_KILL_IN_SAVE": "1:epoch_1"})
    assert proc.returncode != 0
    assert digest(out / ".replaced") == old
    # the next attempt finishes; once it has committed a checkpoint the old run is gone
    check(train(2, out, f"data.root={cifar_root}", "train.epochs=2", "parallel.cuts=[4]", "--overwrite"))
    assert not (out / ".replaced").exists()
    assert json.loads((out / "summary.json").read_text())["epochs"] == 2
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_resume_after_a_death_in_a_checkpoint_write_keeps_one_metrics_row_per_epoch(tmp_path, cifar_root):
    """The row of epoch 2 is written before its checkpoint; the job dies in between; the
    resume redoes epoch 2 and must not leave the row twice."""
    out = tmp_path / "run"
    proc = train(2, out, f"data.root={cifar_root}", "train.epochs=3", "parallel.cuts=[4]",
                 env={"HPCAUX_FAULT_KILL_IN_SAVE": "1:epoch_2"})
    assert proc.returncode != 0
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    check(mpirun(2, [HPCAUX, "train", "--resume", str(out)], timeout=300))
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_corrupt_checkpoint_and_store_are_clear_errors_and_touch_nothing(tmp_path, cifar_root):
    out = tmp_path / "run"
    check(train(2, out, f"data.root={cifar_root}", "train.epochs=2", "parallel.cuts=[4]", "--max-epochs", "1"))
    stage = out / "ckpt" / "epoch_1" / "stage_1.pt"
    stage.write_bytes(stage.read_bytes()[:500])
    before = digest(out)
    proc = mpirun(2, [HPCAUX, "train", "--resume", str(out)], timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hpcaux: error:")]
    assert errors and f"checkpoint file {stage} is corrupt or truncated" in errors[0]
    assert digest(out) == before
    broken = tmp_path / "broken.h5"
    broken.write_bytes((out / "aux.h5").read_bytes()[:300])
    proc = run([HPCAUX, "analyze", str(broken)], timeout=60)
    assert proc.returncode == 2 and f"HDF5 store {broken} is corrupt" in proc.stderr


def test_analyze_a_real_run_offline(tmp_path, cifar_root):
    out = tmp_path / "run"
    check(train(2, out, f"data.root={cifar_root}", "train.epochs=2", "lp.loss=al"))
    shutil.copytree(out, tmp_path / "moved")  # aux.h5 must not depend on where the run was
    proc = check(run([HPCAUX, "analyze", str(tmp_path / "moved" / "aux.h5"), "--out", str(tmp_path / "plots")],
                     timeout=120))
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:4] == ["epoch", "rho", "composed", "auxnet-path"] and "lambda_rms[0]" in lines[0]
    assert "z_mean[0]" not in lines[0]  # no stored z in this run: no empty column for it
    assert {"real_drift[0]", "probe_gap[0]"} <= set(lines[0].split())  # the AuxNet against the composed network
    assert lines[1].split()[0] == "1" and lines[2].split()[0] == "2"
    for name in ("gap_rho.png", "step_time.png", "accuracy.png", "histograms.png", "snapshot_drift.png"):
        png = tmp_path / "plots" / name
        assert png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG", name
    with h5py.File(tmp_path / "moved" / "aux.h5", "r") as f:  # plain h5py, no hpcaux
        assert f["metrics/rel_gap"].shape == (2, 1) and f["boundary_0/lambda"].shape[0] == 96
        assert f["boundary_0/real_snapshots/e2"].shape == f["boundary_0/snapshots/e2"].shape
    if shutil.which("h5dump"):
        dump = check(run(["h5dump", "-H", str(tmp_path / "moved" / "aux.h5")], timeout=60))
        assert 'DATASET "lambda"' in dump.stdout and 'GROUP "metrics"' in dump.stdout
