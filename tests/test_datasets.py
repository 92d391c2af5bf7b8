"""Data sets beyond CIFAR-10, end to end through `hpcaux data` and `hpcaux train`: a
CIFAR-100 miniature in the official cifar-100-python format, and a tiny subset of the
real Imagenette through the ImageNet path (ResNet-18), serial and layer-parallel."""
import json
import pickle
import subprocess
import tarfile

import numpy as np

from conftest import HPCAUX, ROOT, check, mpirun

QUICK_RUN = ["train.epochs=1", "train.batch_size=32", "train.progress=false", "optim.warmup_epochs=0"]


def _write_cifar100_release(path, n_train=600, n_test=200):
    """cifar-100-python.tar.gz as the original release lays it out: pickled dicts with
    byte-string keys, `fine_labels` (100 classes) and `coarse_labels` (20 superclasses)."""
    rng = np.random.default_rng(0)
    folder = path.parent / "cifar-100-python"
    folder.mkdir()
    for split, n in (("train", n_train), ("test", n_test)):
        fine = [i % 100 for i in range(n)]
        with open(folder / split, "wb") as f:
            pickle.dump({b"filenames": [b"x.png"] * n, b"batch_label": split.encode(),
                         b"fine_labels": fine, b"coarse_labels": [c // 5 for c in fine],
                         b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class{i}" for i in range(100)],
                     "coarse_label_names": [f"super{i}" for i in range(20)]}, f)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname="cifar-100-python")


def _summary(out):
    return json.loads((out / "summary.json").read_text())


def test_cifar100_release_prepares_and_trains_serial_and_layer_parallel(tmp_path):
    archive = tmp_path / "cifar-100-python.tar.gz"
    _write_cifar100_release(archive)
    prepared = check(subprocess.run([HPCAUX, "data", "cifar100", str(tmp_path / "data"), "--from", str(archive)],
                                    capture_output=True, text=True, timeout=120))
    assert "cifar-100-python" in prepared.stdout
    common = ["data.dataset=cifar100", f"data.root={tmp_path / 'data'}", "data.val_subset=200", *QUICK_RUN]
    check(subprocess.run([HPCAUX, "train", "--config", str(ROOT / "configs" / "cifar10_resnet20_serial.yaml"),
                          "--out", str(tmp_path / "serial"), *common], capture_output=True, text=True, timeout=300))
    check(mpirun(2, [HPCAUX, "train", "--config", str(ROOT / "configs" / "cifar10_resnet20_k2.yaml"),
                     "--out", str(tmp_path / "k2"), *common], timeout=300))
    for run in ("serial", "k2"):
        summary = _summary(tmp_path / run)
        assert summary["dataset"] == "cifar100" and summary["train_samples"] == 400
        assert summary["val_samples"] == 200 and summary["test_samples"] == 200
    import torch  # the last stage's classifier has one output per fine label

    last = torch.load(tmp_path / "k2" / "ckpt" / "latest" / "stage_1.pt", map_location="cpu", weights_only=False)
    classifier = [t for name, t in last["stage"].items() if name.endswith("fc.weight")]
    assert [tuple(t.shape) for t in classifier] == [(100, 64)]


IMAGENETTE_RUN = ["data.train_subset=128", "data.val_subset=50", "data.test_subset=100", "data.image_size=64",
                  "data.workers=1", "store.probe_size=16", *QUICK_RUN]


def test_imagenette_subset_trains_resnet18_serial_and_layer_parallel(tmp_path, imagenette_root):
    common = [f"data.root={imagenette_root}", *IMAGENETTE_RUN]
    check(subprocess.run([HPCAUX, "train", "--config", str(ROOT / "configs" / "imagenette_resnet18_serial.yaml"),
                          "--out", str(tmp_path / "serial"), *common], capture_output=True, text=True, timeout=300))
    for config in ("k2", "auxnet"):
        check(mpirun(2, [HPCAUX, "train", "--config", str(ROOT / "configs" / f"imagenette_resnet18_{config}.yaml"),
                         "--out", str(tmp_path / config), *common], timeout=300))
    for run in ("serial", "k2", "auxnet"):
        summary = _summary(tmp_path / run)
        assert summary["model"] == "resnet18" and summary["train_samples"] == 128
        assert summary["val_samples"] == 50 and summary["test_samples"] == 100
        assert summary["monitor_split"] == "val"
    assert _summary(tmp_path / "auxnet")["auxnet_path_acc"] is not None  # the AuxNet ran at 64 px
