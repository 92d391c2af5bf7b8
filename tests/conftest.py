"""Shared fixtures: the real CIFAR-10 and Imagenette data, mpirun with a timeout, the installed backends."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("HPCAUX_TEST_DATA", ROOT / "data"))
ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
IMAGENETTE_ARCHIVE = ROOT.parent / "shared" / "data" / "imagenette-128.tar.gz"
HPCAUX = str(Path(sys.executable).parent / "hpcaux")
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_rmaps_base_oversubscribe": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    """The prepared real CIFAR-10 (scripts/test.sh prepares it; this prepares it if not)."""
    if not (DATA / "cifar-10-batches-py" / "test_batch").is_file():
        subprocess.run([HPCAUX, "data", "cifar10", str(DATA), "--from", str(ARCHIVE)], check=True)
    return DATA


@pytest.fixture(scope="session")
def imagenette_root() -> Path:
    """The real Imagenette in ImageNet's folder layout (scripts/test.sh prepares it)."""
    root = DATA / "imagenette"
    if not (root / "val").is_dir():
        subprocess.run([HPCAUX, "data", "imagenette", str(root), "--from", str(IMAGENETTE_ARCHIVE)], check=True)
    return root


def run(cmd, timeout: float, env=None, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, **MPI_ENV, **(env or {})})


def mpirun_command(np: int, options=()) -> list[str]:
    """`mpirun -np N` passing MPI_ENV on to the ranks (`options`: e.g. a hostfile)."""
    cmd = ["mpirun", "-np", str(np), "--bind-to", "none", *options]
    for key in MPI_ENV:
        cmd += ["-x", key]
    return cmd


def mpirun(np: int, args, timeout: float = 180, env=None, options=()) -> subprocess.CompletedProcess:
    """Run `args` under a real `mpirun -np N`; the timeout turns a hang into a failure."""
    return run(mpirun_command(np, options) + list(args), timeout, env)


def wait_for_epochs(out, n: int, proc, timeout=240):
    """Block until the checkpoint of epoch `n` is committed (the job is then in epoch n + 1)."""
    deadline = time.monotonic() + timeout
    manifest = out / "ckpt" / "latest" / "manifest.json"
    while time.monotonic() < deadline:
        try:
            if json.loads(manifest.read_text())["epoch"] >= n:
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise TimeoutError(f"no checkpoint of epoch {n} in {out}")


def finish(proc, timeout) -> tuple[int, str, str, float]:
    started = time.monotonic()
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"job still running {timeout} s after the fault:\n{stderr[-3000:]}")
    return proc.returncode, stdout, stderr, time.monotonic() - started


def check(proc: subprocess.CompletedProcess):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


def installed_backends() -> list[str]:
    from hpcaux.comm import available_backends
    return available_backends()


def every_backend() -> list:
    """Every comm backend as a test parameter: one that is not installed shows as a skip
    with its reason, never silently drops out of the parametrisation."""
    from hpcaux.comm import REQUIRES
    return [pytest.param(name, marks=pytest.mark.skipif(name not in installed_backends(),
                                                        reason=f"comm backend {name} is not installed"))
            for name in REQUIRES]


def digest(folder: Path) -> dict:
    """Every file under `folder` by content hash: equal digests mean nothing was touched."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def assert_same_final_weights(run_a: Path, run_b: Path, files=("stage_0.pt", "stage_1.pt", "auxnet.pt")):
    """The `final` checkpoints of two layer-parallel runs hold the same weights."""
    import torch
    for name in files:
        a = torch.load(run_a / "ckpt" / "final" / name)
        b = torch.load(run_b / "ckpt" / "final" / name)
        key = "auxnet" if name == "auxnet.pt" else "stage"
        for k in a[key]:
            assert torch.allclose(a[key][k].float(), b[key][k].float(), atol=1e-6), (name, k)
