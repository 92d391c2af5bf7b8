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
    assert "## Cost model" in report and "| lp_penalty | auxnet, 1 |" in report and "docs/benchmarks.md" in report
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
    """`--model` needs no bench file: one projection for every report."""
    check(run([HPCAUX, "bench", "--out", str(tmp_path), "--model"], timeout=300))
    table = (tmp_path / "cost_model.md").read_text()
    assert "A projection, not a measurement" in table and "| resnet110 | 32 | 128 | 16 |" in table
    rows = json.loads((tmp_path / "projection.json").read_text())["rows"]
    assert len(rows) == 15 and all(r[m]["speedup"] > 0.5 for r in rows for m in ("gpipe", "pipeline", "auxnet", "relay"))
    missing = run([HPCAUX, "bench", "--out", str(tmp_path)], timeout=60)
    assert missing.returncode == 2 and "--config BENCH_FILE is needed" in missing.stderr


def test_a_campaign_in_pieces_stops_a_layer_parallel_method_and_resumes_it(tmp_path, cifar_root):
    """--max-epochs 1 of 2: serial training runs whole, the layer-parallel method stops
    checkpointed after its first epoch and is recorded as unfinished; the next invocation
    with --reuse keeps the serial row and resumes the method to its end."""
    bench_file = tmp_path / "bench_pieces.yaml"
    bench_file.write_text(f"base: {ROOT / 'configs' / 'cifar10_resnet20_auxnet.yaml'}\nK: 2\n"
                          "methods: [serial_1thread, lp_penalty]\noverrides: [train.progress=false]\n")
    out = tmp_path / "bench"
    command = [HPCAUX, "bench", "--config", str(bench_file), "--out", str(out), "--max-epochs", "1",
               f"data.root={cifar_root}", *TINY]
    first = check(run(command, timeout=600))
    methods = json.loads((out / "results.json").read_text())["methods"]
    assert methods["serial_1thread"]["epochs"] == 2 and "error" not in methods["serial_1thread"]
    assert methods["lp_penalty"]["unfinished"] and "continue it" in first.stdout
    assert len((out / "runs" / "lp_penalty" / "metrics.jsonl").read_text().splitlines()) == 1
    second = check(run(command[:2] + ["--reuse"] + command[2:], timeout=600))
    methods = json.loads((out / "results.json").read_text())["methods"]
    assert "reusing" in second.stdout and methods["serial_1thread"]["reused"]
    lp = methods["lp_penalty"]
    assert lp["resumed"] and not lp.get("error") and lp["epochs"] == 2 and len(lp["curve"]) == 2
    assert "(resumed: its speed is this invocation's part)" in (out / "results.md").read_text()
