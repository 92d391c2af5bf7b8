"""Run every method of a bench file, one after another on the same machine, and collect
what each run wrote (summary.json, metrics.jsonl) into BENCH/results.json.

Each method is a real `hpcaux train` (under the launcher for multi-rank methods), so the
bench measures exactly what users run. Runs go to BENCH/runs/<method>, their output to
BENCH/logs/<method>.log. A failed method is recorded as failed and the bench goes on.
With --max-epochs a layer-parallel method may stop unfinished (checkpointed, recorded as
unfinished); the next invocation with --reuse resumes it where it stopped.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from hpcaux.bench.methods import method_overrides
from hpcaux.bench.spec import BenchSpec
from hpcaux.config import load_config
from hpcaux.errors import UserError
from hpcaux.train.run.rundir import write_json


def check_bench_dir(out: Path, reuse: bool, overwrite: bool):
    if (out / "results.json").exists() and not (reuse or overwrite):
        raise UserError(f"bench directory {out} already holds results; use --reuse to keep finished runs "
                        f"or --overwrite to run everything again")


def run_bench(spec: BenchSpec, out: Path, quick: bool, reuse: bool, extra: list[str],
              max_epochs: int | None = None) -> dict:
    shared = spec.overrides + (spec.quick if quick else []) + extra
    cfg = load_config(spec.base, shared)  # a bad override fails here, before any run
    kept = _committed_records(out, shared) if reuse else {}
    for name in spec.methods:
        if spec.method(name).retired:  # its setting no longer loads: only its finished run counts
            if not (reuse and (_has_run(out, name) or name in kept)):
                raise UserError(f"bench method {name} uses a retired setting: it can only be reused from its "
                                f"finished run in {out / 'runs' / name} (--reuse), or dropped from the bench file")
            continue
        load_config(spec.base, shared + method_overrides(spec.method(name), spec.K, cfg.train.batch_size,
                                                         cfg.train.epochs, spec.finetune_epochs, spec.backend))
    (out / "logs").mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    records = {}
    for name in spec.methods:
        if name in kept and not _has_run(out, name):
            print(f"bench: {name}: reusing its row of {out / 'results.json'} (its run directory is gone)", flush=True)
            records[name] = {**kept[name], "reused": True}
        else:
            records[name] = _run_method(spec, out, name, shared, cfg, reuse, max_epochs)
    for name in kept.keys() - records.keys():  # dropped from the bench file since: its row is still a measurement
        records[name] = {**kept[name], "reused": True}
    results = {"machine": machine(), "date": started, "K": spec.K, "quick": quick, "base": str(spec.base),
               "overrides": shared, "batch_size": cfg.train.batch_size, "epochs": cfg.train.epochs,
               "train_subset": cfg.data.train_subset, "reference": spec.reference,
               "command": " ".join(shlex.quote(a) for a in ["hpcaux", *sys.argv[1:]]),
               "methods": records}
    write_json(out / "results.json", results)
    return results


def _has_run(out: Path, name: str) -> bool:
    """Whether method `name` has a finished run in this bench directory (BENCH/runs/<name>)."""
    return (out / "runs" / name / "summary.json").exists()


def _committed_records(out: Path, shared: list[str]) -> dict:
    """The finished rows of an earlier invocation's results.json. Run directories are not
    committed (docs/benchmarks.md), so in a fresh clone `--reuse` keeps these rows rather
    than running every method again to add one, and keeps those of methods the bench file
    no longer lists; rows run under other overrides are refused."""
    path = out / "results.json"
    if not path.exists():
        return {}
    try:
        earlier = json.loads(path.read_text())
        methods, overrides = earlier["methods"], earlier["overrides"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"{path} is not a bench results file ({type(err).__name__}); move it away or use --overwrite") \
            from None
    if overrides != shared:
        raise UserError(f"{path} was run with overrides {' '.join(overrides)}, not {' '.join(shared)}: "
                        f"--reuse would mix them; use another --out or --overwrite")
    return {name: rec for name, rec in methods.items() if "error" not in rec}


def _run_method(spec, out: Path, name: str, shared: list[str], cfg, reuse: bool, max_epochs: int | None) -> dict:
    method = spec.method(name)
    run_dir = out / "runs" / name
    reused = reuse and _has_run(out, name)
    # an unfinished layer-parallel run (stopped by --max-epochs) continues from its checkpoint
    resumed = reuse and not reused and method.layer_parallel and (run_dir / "ckpt" / "latest").exists()
    record = {"method": name, "label": method.label, "ranks": method.ranks(spec.K), "reused": reused,
              "resumed": resumed}
    if reused:
        print(f"bench: {name}: reusing {run_dir}", flush=True)
    else:
        overrides = shared + method_overrides(method, spec.K, cfg.train.batch_size, cfg.train.epochs,
                                              spec.finetune_epochs, spec.backend)
        cmd = [sys.executable, "-m", "hpcaux.cli", "train"] + (
            ["--resume", str(run_dir)] if resumed else
            ["--config", str(spec.base), "--out", str(run_dir), "--overwrite", *overrides])
        if max_epochs and method.layer_parallel:
            cmd += ["--max-epochs", str(max_epochs)]
        if method.ranks_per_k:
            cmd = shlex.split(spec.launcher.format(ranks=spec.K)) + cmd
        print(f"bench: {name}: {method.label} ...", flush=True)
        log = out / "logs" / f"{name}.log"
        with open(log, "w") as f:
            f.write(" ".join(shlex.quote(c) for c in cmd) + "\n")
            f.flush()
            code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=os.environ).returncode
        if code != 0:
            print(f"bench: {name} failed (exit {code}); see {log}", flush=True)
            return {**record, "error": f"exit {code}, see logs/{name}.log"}
        if not _has_run(out, name):
            print(f"bench: {name}: unfinished after --max-epochs {max_epochs}; run the bench again with --reuse "
                  f"to continue it", flush=True)
            return {**record, "error": "unfinished (--max-epochs): continue with --reuse", "unfinished": True}
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    record.update(_measurements(summary, metrics, cfg.train.batch_size))
    print(f"bench: {name}: {record['samples_per_s']:.0f} samples/s, test acc {record['test_acc']:.4f}", flush=True)
    return record


def _measurements(summary: dict, metrics: list[dict], batch: int) -> dict:
    """One method's numbers, the same fields for every method (None where not separable)."""
    sps = summary["train_samples_per_s"]
    per_rank = {k: summary.get(f"{k}_per_rank") for k in ("step_ms", "stage_ms", "aux_ms", "comm_ms", "peak_mem_mb")}
    comm = per_rank["comm_ms"]
    elapsed, curve = 0.0, []
    for m in metrics:
        elapsed += m["epoch_s"]
        curve.append([elapsed, m.get("composed_acc", m.get("eval_acc"))])
    return {"threads": summary.get("threads"), "epochs": summary["epochs"] + summary.get("finetune_epochs", 0),
            "test_acc": summary["test_acc"],
            # the per-epoch curve's split: a choice is made on the validation accuracy, never the test's
            "monitor_split": summary.get("monitor_split", "test"),
            "val_acc": curve[-1][1] if curve and summary.get("monitor_split") == "val" else None,
            "auxnet_path_acc": summary.get("auxnet_path_acc"),
            "final_rel_gap": summary.get("final_rel_gap"), "samples_per_s": sps,
            "step_ms": batch / sps * 1e3, "step_ms_per_rank": per_rank["step_ms"],
            "stage_ms_per_rank": per_rank["stage_ms"], "aux_ms_per_rank": per_rank["aux_ms"],
            "comm_ms_per_rank": comm,
            # waiting for the slowest rank shows up inside the allreduce: comm above the fastest rank's
            "idle_ms_per_rank": [c - min(comm) for c in comm] if comm else None,
            "peak_mem_mb_per_rank": per_rank["peak_mem_mb"], "wall_s": summary["wall_s"],
            "train_s": summary.get("train_s"), "finetune_s": summary.get("finetune_s"),
            "aux_fraction_of_stage": summary.get("aux_fraction_of_stage"),
            "cuts": summary.get("cuts"), "cut_imbalance": summary.get("cut_imbalance"), "curve": curve}


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "python": platform.python_version(), "host": platform.node()}
