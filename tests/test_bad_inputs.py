"""The bad-input catalogue (docs/troubleshooting.md): each mistake gives one clear line,
exit status 2, no traceback, and leaves every existing file byte-identical.

All cases share one workspace holding a resumable run (`victim`), broken copies of it and
of the data; its digest is compared before and after each case.
"""
import json
import shutil
import subprocess
import sys

import h5py
import pytest

from conftest import ARCHIVE, HPCAUX, ROOT, check, digest, mpirun, run

LP = str(ROOT / "configs" / "cifar10_resnet20_auxnet.yaml")
SERIAL = str(ROOT / "configs" / "cifar10_resnet20_serial.yaml")
TINY = ["data.train_subset=96", "train.batch_size=32", "data.eval_subset=100", "data.test_subset=100",
        "train.progress=false", "store.probe_size=8", "comm.backend=mpi4py", "train.eval_batch_size=50",
        "parallel.cuts=[4]"]
HIDE_HOROVOD = "import sys; sys.modules['horovod'] = None; from hpcaux.cli import main; sys.exit(main())"


@pytest.fixture(scope="module")
def ws(tmp_path_factory, cifar_root):
    """The workspace: a resumable run, broken copies, broken data, odd files."""
    ws = tmp_path_factory.mktemp("ws")
    victim = ws / "victim"
    check(mpirun(2, [HPCAUX, "train", "--config", LP, "--out", str(victim), f"data.root={cifar_root}", *TINY,
                     "train.epochs=2", "--max-epochs", "1"], timeout=300))
    for name, broken in (("bad_ckpt", "ckpt/epoch_1/stage_1.pt"), ("bad_store", "aux.h5")):
        shutil.copytree(victim, ws / name, symlinks=True)
        (ws / name / broken).write_bytes((ws / name / broken).read_bytes()[:500])
    (ws / "no_ckpt").mkdir()
    (ws / "no_ckpt" / "config.yaml").write_text((victim / "config.yaml").read_text())
    (ws / "empty").mkdir()
    (ws / "bad.yaml").write_text("model: {arch: resnet20\noptim: [\n")
    (ws / "list.yaml").write_text("- method\n- serial\n")
    (ws / "not_hdf5.h5").write_text("this is not an HDF5 file\n")
    (ws / "dup.yaml").write_text("optim:\n  lr: 0.1\n  lr: 0.2\n")
    (ws / "false.yaml").write_text("false\n")
    (ws / "latin1.yaml").write_bytes("method: s\xe9rial\n".encode("latin-1"))
    with h5py.File(ws / "no_epoch.h5", "w") as f:  # a store whose run died in its first epoch
        f.create_group("meta").attrs["K"] = 2
        f.create_dataset("metrics/composed_acc", shape=(0,), maxshape=(None,), dtype="f8")
    al = ws / "al_victim"
    check(mpirun(2, [HPCAUX, "train", "--config", LP, "--out", str(al), f"data.root={cifar_root}", *TINY,
                     "train.epochs=2", "lp.loss=al", "--max-epochs", "1"], timeout=300))
    done = ws / "done"
    check(mpirun(2, [HPCAUX, "train", "--config", LP, "--out", str(done), f"data.root={cifar_root}", *TINY,
                     "train.epochs=1"], timeout=300))
    shutil.copytree(victim, ws / "copied", symlinks=False)  # `cp -rL`: ckpt/latest becomes a folder
    shutil.copytree(victim, ws / "empty_store", symlinks=True)
    (ws / "empty_store" / "aux.h5").write_bytes(b"")
    shutil.copytree(victim, ws / "odd_manifest", symlinks=True)
    manifest = ws / "odd_manifest" / "ckpt" / "epoch_1" / "manifest.json"
    manifest.write_text(json.dumps({k: v for k, v in json.loads(manifest.read_text()).items() if k != "phase"}))
    source = cifar_root / "cifar-10-batches-py"
    for name, change in (("truncated", "data_batch_2"), ("partial", "data_batch_3")):
        folder = ws / name / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for f in source.iterdir():
            if f.name != change:
                (folder / f.name).symlink_to(f)
        if name == "truncated":
            (folder / change).write_bytes((source / change).read_bytes()[:1000])
    return ws


def lp(*args):
    return ["train", "--config", LP, *args]


# id: (ranks, argv after `hpcaux` (or python -c ...), fragment of the one error line).
# {ws} and {data} are filled in per run.
CATALOGUE = {
    "unknown config key": (1, ["train", "--config", SERIAL, "--out", "{ws}/new", "optim.lrr=0.1"],
                           "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"),
    "value of the wrong type": (1, ["train", "--config", SERIAL, "--out", "{ws}/new", "optim.lr=fast"],
                                "config key 'optim.lr' must be float, got 'fast'"),
    "value below its minimum": (1, ["train", "--config", SERIAL, "--out", "{ws}/new", "train.batch_size=0"],
                                "config key 'train.batch_size' must be >= 1, got 0"),
    "value not among the choices": (1, ["train", "--config", SERIAL, "--out", "{ws}/new", "comm.backend=nccl2"],
                                    "config key 'comm.backend' must be one of auto, horovod, torch, mpi4py"),
    "override without '='": (1, ["train", "--config", SERIAL, "--out", "{ws}/new", "optim.lr"],
                             "override 'optim.lr' is not of the form key=value"),
    "keys that contradict": (1, ["train", "--config", LP, "--out", "{ws}/new", "lp.loss=al", "lp.aux_source=none",
                                 "lp.real_inputs=only"],
                             "config key 'lp.aux_source' is none, which needs lp.loss=penalty"),
    "boundary norm off with an AuxNet": (1, ["train", "--config", LP, "--out", "{ws}/new", "lp.boundary_norm=false"],
                                         "config key 'lp.boundary_norm' is false, which needs lp.aux_source=none"),
    "weight prediction without a kept forward": (1, ["train", "--config", LP, "--out", "{ws}/new",
                                                     "lp.weight_prediction=2"],
                                                 "config key 'lp.weight_prediction' is 2, which needs lp.delayed_grad keep"),
    "real-input multipliers without a middle stage": (1, ["train", "--config", LP, "--out", "{ws}/new", "lp.loss=al_real",
                                                          "lp.real_inputs=beside", "lp.delayed_grad=fused"],
                                                      "config key 'lp.loss' is al_real, which needs the relayed exchange "
                                                      "(lp.real_inputs beside or only, lp.delayed_grad keep or fused) and "
                                                      "parallel.K >= 3, got real_inputs beside, delayed_grad fused and K=2"),
    "micro-batches with per-sample multipliers": (1, ["train", "--config", LP, "--out", "{ws}/new", "lp.loss=al",
                                                      "parallel.microbatches=2"],
                                                  "config key 'parallel.microbatches' is 2, which needs lp.aux_source "
                                                  "auxnet or none and lp.loss penalty"),
    "real inputs from the store with a delayed gradient": (1, ["train", "--config", LP, "--out", "{ws}/new",
                                                               "lp.real_inputs=stored", "lp.delayed_grad=keep"],
                                                           "config key 'lp.real_inputs' is stored, which needs "
                                                           "lp.delayed_grad none and lp.aux_source auxnet"),
    "real inputs from the store in per-rank files": (1, ["train", "--config", LP, "--out", "{ws}/new",
                                                         "lp.real_inputs=stored", "store.mode=per_rank"],
                                                     "config key 'lp.real_inputs' is stored, which needs the one shared "
                                                     "HDF5 file"),
    "AuxNet head layers not one per boundary": (1, ["train", "--config", LP, "--out", "{ws}/new",
                                                    "auxnet.head_layers=[1,2]"],
                                                "config key 'auxnet.head_layers' needs K-1 = 1 counts >= 0, one per "
                                                "boundary, got [1, 2]"),
    "config file missing": (1, ["train", "--config", "{ws}/none.yaml", "--out", "{ws}/new"],
                            "config file {ws}/none.yaml does not exist"),
    "config file not YAML": (1, ["train", "--config", "{ws}/bad.yaml", "--out", "{ws}/new"],
                             "config file {ws}/bad.yaml is not valid YAML"),
    "config file not a mapping": (1, ["train", "--config", "{ws}/list.yaml", "--out", "{ws}/new"],
                                  "must hold a mapping of keys, not list"),
    "--resume with --config": (1, ["train", "--resume", "{ws}/victim", "--config", LP],
                               "--resume RUN takes the run's own config and directory"),
    "--max-epochs 0": (2, ["train", "--resume", "{ws}/victim", "--max-epochs", "0"], "--max-epochs must be >= 1, got 0"),
    "train without --out": (1, ["train", "--config", SERIAL], "train needs --config FILE and --out RUN"),
    "world size not K x D": (3, lp("--out", "{ws}/new", "data.root={data}", *TINY),
                             "world size 3 is not parallel.K x parallel.D = 2 x 1 = 2"),
    "world size not a multiple of K": (3, lp("--out", "{ws}/new", "data.root={data}", "parallel.D=0", *TINY),
                                       "world size 3 is not a multiple of parallel.K = 2"),
    "cut beyond the model": (2, lp("--out", "{ws}/new", "data.root={data}", *TINY, "parallel.cuts=[40]"),
                             "config key 'parallel.cuts' [40] is beyond the model's 11 blocks"),
    "no AuxNet with three stages, no delayed gradient": (3, lp("--out", "{ws}/new", "data.root={data}", *TINY,
                                         "parallel.K=3", "parallel.cuts=[3,6]", "lp.aux_source=none",
                                         "lp.real_inputs=only", "lp.delayed_grad=none"),
                                    "config key 'lp.aux_source' none with parallel.K=3 needs lp.delayed_grad keep or fused"),
    "K larger than the model": (1, ["train", "--config", SERIAL, "--out", "{ws}/new", "method=layer_parallel",
                                    "parallel.K=12", "data.root={data}"],
                                   "config key 'parallel.K' is 12, larger than the model's 11 blocks"),
    "pipeline in bf16": (2, ["train", "--config", SERIAL, "--out", "{ws}/new", "data.root={data}", *TINY,
                             "method=pipeline", "parallel.K=2", "comm.backend=torch", "train.precision=bf16"],
                         "method pipeline runs in float32 and the default memory format"),
    "serial method on 2 ranks": (2, ["train", "--config", SERIAL, "--out", "{ws}/new", "data.root={data}"],
                                 "method serial runs in one process, but 2 ranks were launched"),
    "data set not there": (2, lp("--out", "{ws}/new", "data.root={ws}/nowhere", *TINY),
                           "data set cifar10 not found under {ws}/nowhere"),
    "data file truncated": (2, lp("--out", "{ws}/new", "data.root={ws}/truncated", *TINY),
                            "data file {ws}/truncated/cifar-10-batches-py/data_batch_2 is corrupt or truncated"),
    "data file missing": (2, lp("--out", "{ws}/new", "data.root={ws}/partial", *TINY),
                          "data file {ws}/partial/cifar-10-batches-py/data_batch_3 is missing"),
    "existing run without --resume": (2, lp("--out", "{ws}/victim", "data.root={data}", *TINY),
                                      "run directory {ws}/victim already holds a run"),
    "--resume of a folder with no run": (2, ["train", "--resume", "{ws}/empty"],
                                         "run directory {ws}/empty holds no run to resume"),
    "--resume with no checkpoint": (2, ["train", "--resume", "{ws}/no_ckpt", "data.root={data}"],
                                    "no checkpoint in {ws}/no_ckpt"),
    "--resume with another K": (3, ["train", "--resume", "{ws}/victim", "parallel.K=3", "parallel.cuts=[3,6]"],
                                "was written with parallel.K=2; this run has parallel.K=3"),
    "--resume of a truncated checkpoint": (2, ["train", "--resume", "{ws}/bad_ckpt"],
                                           "checkpoint file {ws}/bad_ckpt/ckpt/epoch_1/stage_1.pt is corrupt or truncated"),
    "--resume of a truncated aux.h5": (2, ["train", "--resume", "{ws}/bad_store"],
                                       "HDF5 store {ws}/bad_store/aux.h5 is corrupt"),
    "analyze a file that is not HDF5": (1, ["analyze", "{ws}/not_hdf5.h5"],
                                        "HDF5 store {ws}/not_hdf5.h5 is corrupt or not an hpcaux store"),
    "eval of a run without checkpoint": (1, ["eval", "{ws}/no_ckpt"], "no checkpoint in {ws}/no_ckpt"),
    "backend not installed": (2, ["-c", HIDE_HOROVOD, "train", "--config", LP, "--out", "{ws}/new",
                                  "comm.backend=horovod", "data.root={data}"],
                              "comm backend 'horovod' is not installed"),
    "GPU asked for, none there": (1, ["train", "--config", SERIAL, "--out", "{ws}/new", "train.device=cuda"],
                                  "config key 'train.device' is cuda but torch sees no GPU"),
    "data archive missing": (1, ["data", "cifar10", "{ws}/newdata", "--from", "{ws}/none.tar.gz"],
                             "archive {ws}/none.tar.gz does not exist"),
    # --- issue 14: numbers that are not numbers, files that are not configs, runs that must not be lost
    "NaN learning rate": (1, ["train", "--config", SERIAL, "--out", "{ws}/new", "optim.lr=.nan"],
                          "config key 'optim.lr' must be a finite number, got nan"),
    "infinite rho cap": (1, ["train", "--config", LP, "--out", "{ws}/new", "lp.rho_max=.inf"],
                         "config key 'lp.rho_max' must be a finite number, got inf"),
    "NaN watchdog timeout": (1, ["train", "--config", LP, "--out", "{ws}/new", "comm.timeout_s=.nan"],
                             "config key 'comm.timeout_s' must be a finite number"),
    "seed beyond the generator": (1, ["train", "--config", SERIAL, "--out", "{ws}/new", "seed=99999999999"],
                                  "config key 'seed' must be <= 4294967295"),
    "duplicate YAML key": (1, ["train", "--config", "{ws}/dup.yaml", "--out", "{ws}/new"],
                           "is not valid YAML at line 3: duplicate key 'lr'"),
    "config file is false": (1, ["train", "--config", "{ws}/false.yaml", "--out", "{ws}/new"],
                             "must hold a mapping of keys, not bool"),
    "config file not UTF-8": (1, ["train", "--config", "{ws}/latin1.yaml", "--out", "{ws}/new"],
                              "config file {ws}/latin1.yaml is not UTF-8 text"),
    "bad option value": (1, ["train", "--config", SERIAL, "--out", "{ws}/new", "--max-epochs", "x"],
                         "hpcaux train: argument --max-epochs: invalid int value: 'x'"),
    "unknown subcommand": (1, ["trian"], "invalid choice: 'trian'"),
    "launch without a launcher": (1, ["launch"], "launch: give the launcher command"),
    "launch of a launcher not on PATH": (1, ["launch", "mpiexec-missing", "-np", "2"],
                                         "launch: mpiexec-missing not found on PATH"),
    "--out below a file": (1, ["train", "--config", SERIAL, "--out", "{ws}/bad.yaml/run"],
                           "run directory {ws}/bad.yaml/run is below {ws}/bad.yaml, which is a file"),
    "--overwrite with a late failing check": (2, lp("--out", "{ws}/victim", "--overwrite", "data.root={data}", *TINY,
                                                    "train.batch_size=512"),
                                              "config key 'train.batch_size' (512) x replicas (1) exceeds the 96"),
    "probe set beyond the held-out set": (2, lp("--out", "{ws}/new", "data.root={data}", *TINY, "store.probe_size=20000"),
                                          "config key 'store.probe_size' (20000) exceeds the 5000 held-out images"),
    "validation split as large as the training set": (2, lp("--out", "{ws}/new", "data.root={data}", *TINY,
                                                            "data.val_subset=50000"),
                                                      "config key 'data.val_subset' (50000) leaves none of the 50000"),
    "image size for CIFAR": (1, ["train", "--config", SERIAL, "--out", "{ws}/new", "data.image_size=64"],
                             "config key 'data.image_size' (64) applies to ImageNet folders only"),
    "--resume of a finished run": (2, ["train", "--resume", "{ws}/done"], "run {ws}/done is finished"),
    "--resume of a run copied with cp -rL": (2, ["train", "--resume", "{ws}/copied"],
                                             "{ws}/copied/ckpt/latest is a copy, not a link"),
    "--resume with an empty aux.h5": (2, ["train", "--resume", "{ws}/empty_store"],
                                      "HDF5 store {ws}/empty_store/aux.h5 is missing or empty"),
    "--resume with a manifest missing a key": (2, ["train", "--resume", "{ws}/odd_manifest"],
                                               "manifest.json lacks phase"),
    "--resume of an AL run on another subset": (2, ["train", "--resume", "{ws}/al_victim", "data.train_subset=128"],
                                                "holds boundary_0/lambda with shape (96,"),
    "analyze into a file": (1, ["analyze", "{ws}/victim/aux.h5", "--out", "{ws}/bad.yaml"],
                            "plot folder {ws}/bad.yaml is (or is below) {ws}/bad.yaml, a file"),
    "analyze before the first epoch": (1, ["analyze", "{ws}/no_epoch.h5"], "has no finished epoch yet"),
    "ImageNet folders from a CIFAR archive": (1, ["data", "imagenette", "{ws}/imagenette", "--from", str(ARCHIVE)],
                                              f"ImageNet folder {ARCHIVE.name}/val not found"),
    "data into a file": (1, ["data", "cifar10", "{ws}/bad.yaml", "--from", str(ARCHIVE)],
                         "data destination {ws}/bad.yaml is (or is below) {ws}/bad.yaml, a file"),
}


@pytest.mark.parametrize("case", list(CATALOGUE))
def test_bad_input_is_one_clear_line_and_touches_nothing(case, ws, cifar_root):
    ranks, argv, fragment = CATALOGUE[case]
    fill = {"ws": ws, "data": cifar_root}
    argv = [a.format(**fill) for a in argv]
    program = [sys.executable] if argv[0] == "-c" else [HPCAUX]
    before = digest(ws)
    proc = mpirun(ranks, program + argv, timeout=180) if ranks > 1 else run(program + argv, timeout=180)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hpcaux: error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1 and fragment.format(**fill) in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert digest(ws) == before
    assert not (ws / "new").exists()


def mount_tmpfs(path, *options) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_read_only_run_directory_is_refused(tmp_path, cifar_root):
    ro = tmp_path / "ro"
    if not mount_tmpfs(ro, "ro", "size=1m"):
        pytest.skip("cannot mount a tmpfs here (needs root and mount rights)")
    try:
        proc = run([HPCAUX, "train", "--config", SERIAL, "--out", str(ro / "run"), f"data.root={cifar_root}"], timeout=120)
        assert proc.returncode == 2 and f"hpcaux: error: run directory {ro}/run is not writable" in proc.stderr
        assert "Traceback" not in proc.stderr
    finally:
        subprocess.run(["umount", "-l", str(ro)])


def test_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, cifar_root):
    """A resume on a file system with room for the run but not for its next checkpoint."""
    source = tmp_path / "source"
    check(mpirun(2, [HPCAUX, "train", "--config", LP, "--out", str(source), f"data.root={cifar_root}", *TINY,
                     "train.epochs=2", "--max-epochs", "1"], timeout=300))
    used_kb = sum(p.stat().st_size for p in source.rglob("*") if p.is_file()) // 1024
    full = tmp_path / "full"
    if not mount_tmpfs(full, f"size={used_kb + 256}k"):
        pytest.skip("cannot mount a tmpfs here (needs root and mount rights)")
    try:
        run_dir = full / "run"
        shutil.copytree(source, run_dir, symlinks=True)
        kept = digest(run_dir / "ckpt" / "epoch_1")
        proc = mpirun(2, [HPCAUX, "train", "--resume", str(run_dir)], timeout=300)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("hpcaux: error:")]
        assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
        # torch.save names ENOSPC; HDF5 only says its write failed
        assert "no space left on the device" in errors[0] or "HDF5 could not write" in errors[0], errors[0]
        assert "the last committed checkpoint is kept" in errors[0] and "Traceback" not in proc.stderr
        assert (run_dir / "ckpt" / "latest").resolve().name == "epoch_1"
        assert digest(run_dir / "ckpt" / "epoch_1") == kept
        # moved to a disk with room, the run continues from that checkpoint and finishes
        shutil.copytree(run_dir, tmp_path / "roomy", symlinks=True)
    finally:
        subprocess.run(["umount", "-l", str(full)])  # lazy: a finished rank may still hold it
    check(mpirun(2, [HPCAUX, "train", "--resume", str(tmp_path / "roomy")], timeout=300))
    assert (tmp_path / "roomy" / "summary.json").exists()


def test_troubleshooting_states_how_many_cases_are_checked():
    doc = (ROOT / "docs" / "troubleshooting.md").read_text()
    assert f"`tests/test_bad_inputs.py` checks {len(CATALOGUE)} cases" in doc
