"""`hpcaux data cifar10|cifar100 DEST --from ARCHIVE`: lay out the standard python format.

Accepts the original releases (cifar-10-python.tar.gz / cifar-100-python.tar.gz, which
already hold the pickles: they are extracted as they are) or a JPEG-folder archive
(`train/<class>/*.jpg`, `test/<class>/*.jpg`, like shared/data/cifar10-jpeg.tar.gz),
which is decoded and written as the same pickles. Nothing is overwritten: a complete
DEST is left alone, and the output is written to a temporary folder and moved into
place only when whole.
"""
from __future__ import annotations

import io
import pickle
import shutil
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from hpcaux.errors import UserError, refuse_file_in_the_way

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
LAYOUT = {
    "cifar10": ("cifar-10-batches-py",
                [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]),
    "cifar100": ("cifar-100-python", ["train", "test", "meta"]),
}


def is_prepared(dataset: str, dest: Path) -> bool:
    folder, files = LAYOUT[dataset]
    return all((dest / folder / f).is_file() for f in files)


def _open_archive(archive: Path) -> tarfile.TarFile:
    if not archive.is_file():
        raise UserError(f"archive {archive} does not exist")
    try:
        return tarfile.open(archive)
    except (tarfile.TarError, OSError) as err:
        raise UserError(f"archive {archive} is not a readable tar file ({err})") from None


def _extract_release(tar: tarfile.TarFile, folder: str, staging: Path):
    members = [m for m in tar.getmembers() if m.name.startswith(folder + "/") and m.isfile()]
    tar.extractall(staging, members=members, filter="data")


def _decode_jpeg_split(tar: tarfile.TarFile, members, classes) -> tuple[np.ndarray, list[int]]:
    from PIL import Image

    rows, labels = [], []
    for m in sorted(members, key=lambda m: m.name):
        cls = m.name.split("/")[-2]
        with Image.open(io.BytesIO(tar.extractfile(m).read())) as img:
            arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
        rows.append(arr.transpose(2, 0, 1).reshape(-1))  # CIFAR rows are channel-major
        labels.append(classes.index(cls))
    return np.stack(rows), labels


def _write_cifar10_pickles(tar: tarfile.TarFile, staging: Path):
    jpegs = [m for m in tar.getmembers() if m.isfile() and m.name.lower().endswith((".jpg", ".jpeg", ".png"))]
    split = {s: [m for m in jpegs if m.name.split("/")[-3:-2] == [s]] for s in ("train", "test")}
    if not split["train"] or not split["test"]:
        raise UserError("archive holds neither cifar-10-batches-py/ nor train/<class>/ and test/<class>/ image folders")
    classes = list(CIFAR10_CLASSES)
    unknown = {m.name.split("/")[-2] for m in jpegs} - set(classes)
    if unknown:
        raise UserError(f"archive has class folders that are not CIFAR-10 classes: {sorted(unknown)}")
    out = staging / LAYOUT["cifar10"][0]
    out.mkdir(parents=True)
    train_x, train_y = _decode_jpeg_split(tar, split["train"], classes)
    order = np.random.default_rng(0).permutation(len(train_y))  # the release is shuffled too
    train_x, train_y = train_x[order], [train_y[i] for i in order]
    per_batch = len(train_y) // 5
    for b in range(5):
        sl = slice(b * per_batch, (b + 1) * per_batch if b < 4 else len(train_y))
        _dump(out / f"data_batch_{b + 1}", train_x[sl], train_y[sl], f"training batch {b + 1} of 5")
    test_x, test_y = _decode_jpeg_split(tar, split["test"], classes)
    _dump(out / "test_batch", test_x, test_y, "testing batch 1 of 1")
    with open(out / "batches.meta", "wb") as f:
        pickle.dump({"label_names": classes, "num_cases_per_batch": per_batch, "num_vis": 3072}, f)


def _dump(path: Path, data: np.ndarray, labels: list[int], name: str):
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                     b"filenames": [b""] * len(labels)}, f)


def prepare(dataset: str, dest: str | Path, archive: str | Path) -> Path:
    """Make DEST/<standard folder> from `archive`; a no-op when it is already complete."""
    if dataset not in LAYOUT:
        raise UserError(f"unknown data set '{dataset}' (choose from {', '.join(LAYOUT)})")
    dest = Path(dest)
    folder = LAYOUT[dataset][0]
    if is_prepared(dataset, dest):
        return dest / folder
    if (dest / folder).exists():
        raise UserError(f"{dest / folder} exists but is incomplete; move it away and run again")
    if dest.is_symlink() and not dest.exists():
        raise UserError(f"data destination {dest} is a link to nothing (or to itself); remove it or point it at a folder")
    refuse_file_in_the_way(dest, "data destination")
    dest.mkdir(parents=True, exist_ok=True)
    with _open_archive(Path(archive)) as tar, tempfile.TemporaryDirectory(dir=dest) as tmp:
        staging = Path(tmp)
        names = tar.getnames()
        if any(n.startswith(folder + "/") for n in names):
            _extract_release(tar, folder, staging)
        elif dataset == "cifar10":
            _write_cifar10_pickles(tar, staging)
        else:
            raise UserError(f"archive {archive} does not hold {folder}/ (the original {dataset} release)")
        if not is_prepared(dataset, staging):
            raise UserError(f"archive {archive} is missing files of {folder}/")
        shutil.move(str(staging / folder), str(dest / folder))
    return dest / folder
