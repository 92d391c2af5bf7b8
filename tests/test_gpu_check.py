"""scripts/gpu_check.sh in its CPU rehearsal (the real run needs a GPU machine)."""
import json
import os
import subprocess

from conftest import ROOT


def test_gpu_check_script_runs_on_the_cpu(tmp_path, cifar_root):
    """scripts/gpu_check.sh --cpu: the gpu tests on the CPU and the short bench at K = 2
    and 4, at tiny sizes, so that the script a GPU machine runs cannot rot; the shipped
    pipelines' sends are reported, and on the CPU none stages a tensor through the host."""
    out = tmp_path / "check"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu", str(out)], capture_output=True,
                          text=True, timeout=900, cwd=ROOT, env={**os.environ, "HPCAUX_DATA": str(cifar_root)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + (out / "tests.log").read_text()[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert result["device"] == "cpu" and result["tests_passed"] and result["tests"]["tests"] == 5, result
    assert result["tests"]["skipped"] == 0 and result["tests"]["failures"] == 0, result
    assert {(r["K"], r["method"]) for r in result["bench"]} == {(K, m) for K in (2, 4)
                                                                 for m in ("serial_1thread", "serial_bf16", "lp_al", "lp_al_fused",
                                                                           "lp_al_fused_bf16", "lp_pipeline")}
    assert [(r["config"], r["K"], r["transport"]) for r in result["shipped_pipelines"]] == [
        ("cifar10_resnet20_k2.yaml", 2, "gloo"), ("cifar10_resnet20_k4.yaml", 4, "gloo")], result
    assert all(r["host_trips_per_rank"] == [0] * r["K"] for r in result["shipped_pipelines"]), result
    assert all(r["samples_per_s"] > 0 and isinstance(r["test_acc"], float) for r in result["bench"]), result
