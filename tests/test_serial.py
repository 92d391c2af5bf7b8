"""A short serial run on real CIFAR-10 learns, writes its files, and `hpcaux eval` agrees."""
import json
import subprocess

from conftest import HPCAUX, ROOT


def test_short_serial_run_learns_and_eval_reproduces(tmp_path, cifar_root):
    out = tmp_path / "run"
    proc = subprocess.run([HPCAUX, "train", "--config", str(ROOT / "configs" / "cifar10_resnet20_serial.yaml"),
                           "--out", str(out), f"data.root={cifar_root}", "data.train_subset=2000",
                           "train.epochs=3", "data.eval_subset=500", "data.test_subset=2000", "train.progress=false"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3 and metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("method", "model", "K", "D", "epochs", "train_samples", "test_acc", "wall_s", "train_samples_per_s"):
        assert key in summary
    assert summary["train_samples"] == 2000 and summary["test_acc"] > 0.2
    again = subprocess.run([HPCAUX, "eval", str(out), "--subset", "2000"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert abs(json.loads(again.stdout)["test_acc"] - summary["test_acc"]) < 1e-9
    refused = subprocess.run([HPCAUX, "train", "--config", str(ROOT / "configs" / "cifar10_resnet20_serial.yaml"),
                              "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "already holds a run" in refused.stderr
    assert json.loads((out / "summary.json").read_text()) == summary


def test_serial_run_in_bf16_and_channels_last_learns_and_eval_in_float32_agrees(tmp_path, cifar_root):
    """train.precision=bf16 and train.channels_last: the forward passes change, the
    checkpoint does not (float32, the usual layout), so `hpcaux eval` counts the same."""
    out = tmp_path / "run"
    proc = subprocess.run([HPCAUX, "train", "--config", str(ROOT / "configs" / "cifar10_resnet20_serial.yaml"),
                           "--out", str(out), f"data.root={cifar_root}", "data.train_subset=2000", "train.epochs=3",
                           "data.eval_subset=200", "data.test_subset=1000", "train.progress=false",
                           "train.precision=bf16", "train.channels_last=true", "train.sync_every=3"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["precision"] == "bf16" and summary["channels_last"] is True and summary["test_acc"] > 0.2
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    again = subprocess.run([HPCAUX, "eval", str(out), "--subset", "1000"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert abs(json.loads(again.stdout)["test_acc"] - summary["test_acc"]) < 1e-9


def test_every_subcommand_has_help():
    from hpcaux.cli import _parser

    subcommands = list(_parser()._subparsers._group_actions[0].choices)
    assert subcommands == ["train", "eval", "analyze", "bench", "data", "launch"]
    for sub in subcommands:
        proc = subprocess.run([HPCAUX, sub, "--help"], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and f"usage: hpcaux {sub}" in proc.stdout, sub


def test_eval_of_missing_run_is_a_clear_error(tmp_path):
    proc = subprocess.run([HPCAUX, "eval", str(tmp_path / "nope")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip() == f"hpcaux: error: run directory {tmp_path / 'nope'} does not exist"
