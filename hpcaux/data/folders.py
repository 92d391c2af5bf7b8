"""`hpcaux data imagenet|imagenette DEST --from ARCHIVE`: an ImageNet-format folder tree.

The layout torchvision's ImageFolder and most ImageNet code read: `train/<class>/*` and
`val/<class>/*`, one folder per class (a WordNet id such as n01440764), the same classes
in both. The archive may hold that tree at its top or under one folder
(`imagenette-128/train/...`, as shared/data/imagenette-128.tar.gz does). The tree is
checked and counted before it is moved into place: a wrong layout is one clear error and
DEST is left as it was. A DEST that already holds a valid tree is only counted again.
"""
from __future__ import annotations

import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hpcaux.errors import UserError, refuse_file_in_the_way

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
SPLITS = ("train", "val")


@dataclass
class FolderCounts:
    """Images per split and the class names of a checked tree."""
    classes: list[str]
    images: dict  # split: count

    def describe(self) -> str:
        return (f"{self.images['train']} training and {self.images['val']} validation images "
                f"in {len(self.classes)} classes")


def check_image_folders(root: Path, shown_as: str | None = None) -> FolderCounts:
    """Count a `train/` + `val/` tree, or raise UserError saying what is wrong with it.
    `shown_as` names the tree in messages (an archive's, not its temporary unpacked path)."""
    name = shown_as or str(root)
    classes = {}
    for split in SPLITS:
        folder, where = root / split, f"{name}/{split}"
        if not folder.is_dir():
            raise UserError(f"ImageNet folder {where} not found (expected train/<class>/ and val/<class>/)")
        loose = sorted(p.name for p in folder.iterdir() if p.is_file())
        if loose:
            raise UserError(f"ImageNet folder {where} holds files outside class folders ({loose[0]}, ...): "
                            f"expected {split}/<class>/<image>")
        classes[split] = {p.name: _count_images(p) for p in folder.iterdir() if p.is_dir()}
        if not classes[split]:
            raise UserError(f"ImageNet folder {where} has no class folders")
        empty = sorted(c for c, n in classes[split].items() if n == 0)
        if empty:
            raise UserError(f"ImageNet folder {where} has class folders without images: {', '.join(empty[:5])}")
    if set(classes["train"]) != set(classes["val"]):
        only = sorted(set(classes["train"]) ^ set(classes["val"]))
        raise UserError(f"ImageNet folders {name}/train and {name}/val hold different classes "
                        f"(in one only: {', '.join(only[:5])})")
    return FolderCounts(sorted(classes["train"]), {s: sum(classes[s].values()) for s in SPLITS})


def _count_images(folder: Path) -> int:
    return sum(1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _tree_top(staging: Path) -> Path:
    """Where train/ and val/ are in an extracted archive: at its top or one folder down."""
    if (staging / "train").is_dir():
        return staging
    tops = [p for p in staging.iterdir() if p.is_dir() and (p / "train").is_dir()]
    if len(tops) != 1:
        raise UserError("archive holds no train/<class>/ and val/<class>/ folders (at its top or under one folder)")
    return tops[0]


def prepare_image_folders(dest: str | Path, archive: str | Path) -> tuple[Path, FolderCounts]:
    """DEST/train and DEST/val from `archive`, checked; a valid DEST is counted, not touched.
    The archive is unpacked beside DEST and moved in only when it passed the check, so a
    wrong archive leaves no DEST behind."""
    dest = Path(dest)
    if (dest / "train").exists() or (dest / "val").exists():
        return dest, check_image_folders(dest)
    refuse_file_in_the_way(dest, "data destination")
    archive = Path(archive)
    if not archive.is_file():
        raise UserError(f"archive {archive} does not exist")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}-unpacking-") as tmp:
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, OSError) as err:
            raise UserError(f"archive {archive} is not a readable tar file ({err})") from None
        top = _tree_top(Path(tmp))
        counts = check_image_folders(top, "/".join([archive.name, *top.relative_to(tmp).parts]))
        dest.mkdir(exist_ok=True)
        for split in SPLITS:
            shutil.move(str(top / split), str(dest / split))
    return dest, counts
