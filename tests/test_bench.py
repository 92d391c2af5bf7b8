"""`hpcaux bench` end to end on a tiny real subset: every method runs, the report is written.

The numbers of a run this small mean nothing; what is checked is that every method
trains under its real launcher and that results.json, results.md and the plots hold
what docs/benchmarks.md describes. Speed claims come from the full bench, not from here.
"""
import json

import pytest

from conftest import HPCAUX, ROOT, check, run

BENCH = ROOT / "configs" / "bench_cifar10_resnet20.yaml"
TINY = ["data.train_subset=256", "train.epochs=2", "train.batch_size=32", "data.eval_subset=100",
        "data.test_subset=200", "train.eval_batch_size=100", "store.probe_size=8"]


def test_bench_runs_every_method_and_writes_the_report(tmp_path, cifar_root):
    out = tmp_path / "bench"
    proc = check(run([HPCAUX, "bench", "--config", str(BENCH), "--out", str(out), "--quick", f"data.root={cifar_root}",
                      *TINY], timeout=900))
    results = json.loads((out / "results.json").read_text())
    methods = results["methods"]
    assert list(methods)[0] == "serial_1thread" and len(methods) == 8
    failed = {n: r["error"] for n, r in methods.items() if "error" in r}
    assert not failed, failed
    for name, rec in methods.items():
        # accuracy over exactly data.test_subset = 200 images (counted once across ranks and replicas)
        assert rec["test_acc"] * 200 == pytest.approx(round(rec["test_acc"] * 200), abs=1e-6), name
        assert rec["samples_per_s"] > 0, name
        assert rec["ranks"] == (1 if name.startswith("serial") else 2) and len(rec["curve"]) == 2, name
        assert len(rec["peak_mem_mb_per_rank"]) == rec["ranks"] and min(rec["peak_mem_mb_per_rank"]) > 50, name
    assert methods["serial_kthreads"]["threads"] == 2 and methods["pipeline"]["threads"] == 1
    lp = methods["lp_al"]
    assert len(lp["aux_ms_per_rank"]) == 2 and min(lp["idle_ms_per_rank"]) == 0 and lp["auxnet_path_acc"] is not None
    assert methods["lp_al_finetune4"]["epochs"] == 2  # quick mode: 1 + 1, the fine-tune capped
    report = (out / "results.md").read_text()
    assert "| 1. serial backprop, 1 process x 1 thread | 1 × 1 |" in report and "1.00×" in report
    assert "## Cost model" in report and "| lp_penalty |" in report and "| resnet50 | 224 |" in report
    assert "## Accuracy" in report and "| lp_al_finetune |" in report
    for png in ("throughput.png", "accuracy_vs_time.png", "accuracy_vs_speedup.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "| 1. serial backprop" in proc.stdout
    # results are never overwritten by accident; --reuse keeps the finished runs
    again = run([HPCAUX, "bench", "--config", str(BENCH), "--out", str(out), "--quick"], timeout=120)
    assert again.returncode == 2 and "already holds results" in again.stderr
    reused = check(run([HPCAUX, "bench", "--config", str(BENCH), "--out", str(out), "--quick", "--reuse",
                        f"data.root={cifar_root}", *TINY], timeout=300))
    assert reused.stdout.count("reusing") == 8
    assert "(reused: ran before this invocation)" not in proc.stdout
    assert reused.stdout.count("(reused: ran before this invocation)") == 8  # every row of the table says so


def test_cost_model_projection_alone(tmp_path):
    check(run([HPCAUX, "bench", "--config", str(BENCH), "--out", str(tmp_path), "--model"], timeout=300))
    table = (tmp_path / "cost_model.md").read_text()
    assert "| resnet110 | 32 | 128 | 16 |" in table and "25 GB/s" in table
    speedups = [float(line.split("|")[-2].split("×")[0]) for line in table.splitlines() if "× (of" in line]
    assert speedups and all(1 < s for s in speedups)


def test_cost_model_counts_an_imagenet_resnet_down_to_a_one_pixel_feature_map():
    """ResNet-18 at 32 px ends at 1x1 feature maps: the one-image MAC count must not trip
    BatchNorm (it did, in training mode, after protocol C's methods had all run)."""
    from hpcaux.bench.cost_model import project

    row, = project(8, 1, 5e12, ks=(2,), models=(("resnet18", 10, 32, 8),))
    assert row["T_serial_ms"] > 0 and 1 < row["speedup"] < 2
