"""CIFAR-10/100 from the standard python-pickle layout, held as one uint8 tensor.

Reading the pickles ourselves avoids torchvision's md5 checks (which reject re-encoded
copies) and its per-sample PIL pipeline: the whole set is 150 MB of uint8, and
augmentation runs as batched tensor ops on the training device (hpcaux.data.augment).
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from hpcaux.data.prepare import LAYOUT
from hpcaux.errors import UserError

MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}


def _read_pickle(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"data file {path} is missing; prepare the data set again with: hpcaux data")
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as err:  # truncated or not a pickle: one clear line, not a traceback
        raise UserError(f"data file {path} is corrupt or truncated ({type(err).__name__})") from None


def _get(d: dict, key: str):
    return d[key.encode()] if key.encode() in d else d[key]


def load_split(dataset: str, root: str | Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 N x 3 x 32 x 32, labels int64 N) of one split."""
    folder, files = LAYOUT[dataset]
    base = Path(root) / folder
    if not base.is_dir():
        raise UserError(f"data set {dataset} not found under {root}: expected {base}/ "
                        f"(make it with: hpcaux data {dataset} {root} --from ARCHIVE)")
    if dataset == "cifar10":
        names = [f for f in files if f.startswith("data_batch")] if train else ["test_batch"]
        label_key = "labels"
    else:
        names, label_key = (["train"] if train else ["test"]), "fine_labels"
    parts = [_read_pickle(base / n) for n in names]
    data = np.concatenate([np.asarray(_get(p, "data"), dtype=np.uint8) for p in parts])
    labels = np.concatenate([np.asarray(_get(p, label_key), dtype=np.int64) for p in parts])
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise UserError(f"data set {dataset} under {base} has unexpected shape {data.shape}; expected (N, 3072)")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)
