"""Bench files and the runner's bookkeeping without training: a variant of a retired
setting keeps its finished row and is never run again."""
import json

import pytest

from conftest import ROOT
from hpcaux.bench.runner import run_bench
from hpcaux.bench.spec import load_bench
from hpcaux.errors import UserError

pytestmark = pytest.mark.quick

BENCH = f"""base: {ROOT / "configs" / "cifar10_resnet20_auxnet.yaml"}
K: 2
reference: serial_1thread
methods: [serial_1thread, lp_old]
variants:
  lp_old: {{method: lp_al, overrides: [lp.delayed_grad=replay, lp.real_inputs=beside], retired: true}}
"""


def _finished(run_dir, acc):
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"train_samples_per_s": 100.0, "epochs": 1, "test_acc": acc,
                                                      "wall_s": 10.0}))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "epoch_s": 9.0, "eval_acc": acc}) + "\n")


def test_a_retired_variant_is_reused_from_its_run_and_never_validated(tmp_path):
    (tmp_path / "bench.yaml").write_text(BENCH)
    spec = load_bench(tmp_path / "bench.yaml")
    assert spec.method("lp_old").retired and not spec.method("serial_1thread").retired
    out = tmp_path / "out"
    _finished(out / "runs" / "serial_1thread", 0.7)
    _finished(out / "runs" / "lp_old", 0.65)
    results = run_bench(spec, out, quick=False, reuse=True, extra=[])
    assert {n: (r["reused"], r["test_acc"]) for n, r in results["methods"].items()} == \
        {"serial_1thread": (True, 0.7), "lp_old": (True, 0.65)}


def test_a_retired_variant_without_its_run_is_one_error_before_anything_runs(tmp_path):
    (tmp_path / "bench.yaml").write_text(BENCH)
    out = tmp_path / "out"
    with pytest.raises(UserError, match="bench method lp_old uses a retired setting"):
        run_bench(load_bench(tmp_path / "bench.yaml"), out, quick=False, reuse=True, extra=[])
    assert not (out / "runs").exists()


def test_reuse_keeps_the_committed_rows_when_the_run_directories_are_gone(tmp_path):
    """A fresh clone has results.json but no runs/ (not committed): --reuse keeps its rows,
    the retired variant's included, and refuses rows run under other overrides."""
    (tmp_path / "bench.yaml").write_text(BENCH)
    spec = load_bench(tmp_path / "bench.yaml")
    out = tmp_path / "out"
    _finished(out / "runs" / "serial_1thread", 0.7)
    _finished(out / "runs" / "lp_old", 0.65)
    run_bench(spec, out, quick=False, reuse=True, extra=["seed=1"])
    for name in ("serial_1thread", "lp_old"):
        for f in (out / "runs" / name).iterdir():
            f.unlink()
    results = run_bench(spec, out, quick=False, reuse=True, extra=["seed=1"])
    assert {n: (r["reused"], r["test_acc"]) for n, r in results["methods"].items()} == \
        {"serial_1thread": (True, 0.7), "lp_old": (True, 0.65)}
    (tmp_path / "bench.yaml").write_text(BENCH.replace("methods: [serial_1thread, lp_old]", "methods: [serial_1thread]"))
    results = run_bench(load_bench(tmp_path / "bench.yaml"), out, quick=False, reuse=True, extra=["seed=1"])
    assert results["methods"]["lp_old"]["test_acc"] == 0.65  # dropped from the file, still a measurement
    with pytest.raises(UserError, match="was run with overrides .*seed=1.*--reuse would mix them"):
        run_bench(spec, out, quick=False, reuse=True, extra=["seed=2"])
    assert json.loads((out / "results.json").read_text())["overrides"][-1] == "seed=1"  # left as it was
