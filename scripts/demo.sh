#!/usr/bin/env bash
# The main job: install what is missing, prepare the real CIFAR-10, then train ResNet-20
# layer-parallel on 2 MPI ranks (K=2, the recommended configs/cifar10_resnet20_k2.yaml;
# comm.backend auto: torch.distributed on a CPU) and serially on the same subset, and
# print the composed network's test accuracy and the throughput of both.
# Size knobs: DEMO_SUBSET (training images, default 4000), DEMO_EPOCHS (default 3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
./scripts/install.sh
source scripts/env.sh
prepare_cifar10
subset=${DEMO_SUBSET:-4000}
epochs=${DEMO_EPOCHS:-3}
common=(data.train_subset="$subset" train.epochs="$epochs" data.eval_subset=1000)
echo "== layer-parallel: mpirun -np 2, ResNet-20 K=2, $subset real CIFAR-10 images, $epochs epochs"
mpirun -np 2 --bind-to none -x PATH -x OMPI_MCA_rmaps_base_oversubscribe \
  hpcaux train --config configs/cifar10_resnet20_k2.yaml --out runs/demo-k2 --overwrite "${common[@]}"
echo "== serial backprop, same subset and epochs (1 process, all cores)"
hpcaux train --config configs/cifar10_resnet20_serial.yaml --out runs/demo-serial --overwrite "${common[@]}"
python - <<'PY'
import json
lp = json.load(open("runs/demo-k2/summary.json"))
se = json.load(open("runs/demo-serial/summary.json"))
print()
print(f"{'method':<34}{'test acc':>10}{'samples/s':>12}")
print(f"{'serial backprop (%d threads)' % se['threads']:<34}{se['test_acc']:>10.3f}{se['train_samples_per_s']:>12.0f}")
print(f"{'layer-parallel K=2 (composed net)':<34}{lp['test_acc']:>10.3f}{lp['train_samples_per_s']:>12.0f}")
ratio = f"throughput ratio {lp['train_samples_per_s'] / se['train_samples_per_s']:.2f}x"
if lp["auxnet_path_acc"] is None:  # the K = 2 config runs without an AuxNet (docs/accuracy.md)
    print(f"no AuxNet (lp.aux_source none): stage 2 trains on stage 1's real output; {ratio}")
else:
    gaps = " ".join(f"{g:.3f}" for g in lp["final_rel_gap"] or [])
    print(f"AuxNet path accuracy {lp['auxnet_path_acc']:.3f}; relative gap {gaps}; {ratio}")
print("accuracy on the full real test set (10,000 images); runs in runs/demo-k2 and runs/demo-serial")
PY
