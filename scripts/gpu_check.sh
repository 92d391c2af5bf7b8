#!/usr/bin/env bash
# The GPU check: the gpu-marked tests (ranks on the GPU with torch.distributed/NCCL,
# composed evaluation against one process, the shipped K = 2 and K = 4 pipeline configs
# sending on the device with their host trips counted, a GPU checkpoint resumed on the CPU) and a
# short bench (serial against layer-parallel K=2 and K=4 on ResNet-56, batch 128, with and
# without bf16 autocast and channels_last); writes OUT/results.json. About 8 minutes on one GPU.
#   scripts/gpu_check.sh [--cpu] [OUT]      (OUT defaults to gpu_check/)
# --cpu runs the same on the CPU at tiny sizes (the test suite does, so it cannot rot).
# Not covered yet: CUDA graphs (docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
device=cuda quick=()
if [ "${1:-}" = "--cpu" ]; then
  device=cpu quick=(--quick)
  shift
fi
out=${1:-gpu_check}
mkdir -p "$out"
[ -f scripts/env.sh ] && source scripts/env.sh
python -c "import hpcaux" 2>/dev/null || pip install -q -e .
if [ "$device" = cuda ] && ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_check: torch sees no GPU here; use --cpu for the CPU rehearsal" >&2
  exit 2
fi
data_root=${HPCAUX_DATA:-data}

set +e
HPCAUX_CHECK_DEVICE=$device HPCAUX_CHECK_OUT=$out python -m pytest tests/test_gpu.py -m gpu -q -p no:cacheprovider \
  --junitxml="$out/tests.xml" > "$out/tests.log" 2>&1
tests_status=$?
set -e
for K in 2 4; do
  hpcaux bench --config configs/bench_gpu_resnet56.yaml --out "$out/bench_k$K" --overwrite --K "$K" "${quick[@]}" \
    "train.device=$device" "data.root=$data_root" > "$out/bench_k$K.log" 2>&1
done

python - "$out" "$device" "$tests_status" <<'PY'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

out, device, status = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
suite = ET.parse(out / "tests.xml").getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
tests = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
rows = []
for K in (2, 4):
    bench = json.loads((out / f"bench_k{K}" / "results.json").read_text())
    for m in bench["methods"].values():
        rows.append({"K": K, "method": m["method"], "samples_per_s": m["samples_per_s"], "test_acc": m["test_acc"],
                     "peak_mem_mb_per_rank": m["peak_mem_mb_per_rank"]})
shipped = [{"config": path.name[:-len("_summary.json")] + ".yaml", **{k: s[k] for k in (
               "K", "backend", "transport", "host_trips_per_rank", "train_samples_per_s")}}
           for path in sorted(out.glob("*_summary.json")) for s in [json.loads(path.read_text())]]
result = {"device": device, "tests": tests, "tests_passed": status == 0, "shipped_pipelines": shipped,
          "bench": rows, "not_covered": ["CUDA graphs"]}
(out / "results.json").write_text(json.dumps(result, indent=1))
print(json.dumps(result, indent=1))
sys.exit(0 if status == 0 else 1)
PY
