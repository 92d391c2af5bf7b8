"""The data sets a trainer iterates: one interface for in-memory CIFAR and ImageNet folders.

A training batch is (x, y, idx): idx are the samples' positions in the training set,
which per-sample state (AL multipliers, stored auxiliary variables) is keyed by. The
order and augmentation of an epoch depend only on (seed, epoch), so every rank of a
layer-parallel replica draws the very same batches without communicating.

Two held-out splits: `val`, carved from the training set (stratified, fixed by its own
seed, never trained on), on which the per-epoch curve, time to accuracy and every choice
are measured; and `test`, the official test set, read once at the end of a run. Without a
validation split (`data.val_subset: 0`) the per-epoch curve falls back to the test set.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Protocol

import torch

from hpcaux.data.augment import normalize, random_crop_flip, to_device
from hpcaux.data.cifar import MEAN_STD, NUM_CLASSES, load_split
from hpcaux.data.folders import check_image_folders
from hpcaux.errors import UserError


def stratified_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """`n` indices with classes as balanced as possible, chosen by `seed`, sorted."""
    if n <= 0 or n >= len(labels):
        return torch.arange(len(labels))
    gen = torch.Generator().manual_seed(seed)
    classes = labels.unique()
    per_class = [n // len(classes) + (i < n % len(classes)) for i in range(len(classes))]
    chosen = []
    for c, take in zip(classes, per_class):
        members = (labels == c).nonzero().flatten()
        chosen.append(members[torch.randperm(len(members), generator=gen)[:take]])
    return torch.cat(chosen).sort().values


def split_training_set(labels: torch.Tensor, val_subset: int, val_seed: int, train_subset: int,
                       seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training indices, validation indices) into a training set with `labels`.

    The validation split is drawn first, by `val_seed` alone, so every run seed and every
    `train_subset` holds out the same images; the training subset is drawn by `seed` from
    what remains. Without a split the training subset is the one runs before it drew."""
    if val_subset >= len(labels):
        raise UserError(f"config key 'data.val_subset' ({val_subset}) leaves none of the {len(labels)} "
                        f"training images to train on")
    val = stratified_subset(labels, val_subset, val_seed) if val_subset else torch.zeros(0, dtype=torch.long)
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[val] = False
    rest = keep.nonzero().flatten()
    return rest[stratified_subset(labels[rest], train_subset, seed)], val


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


class TrainingData(Protocol):
    """What every trainer reads: both data sets below provide it."""
    num_classes: int
    image_shape: tuple

    @property
    def n_train(self) -> int: ...

    def heldout_count(self, split: str, subset: int = 0) -> int:
        """How many images `heldout_batches(split, subset=subset)` yields."""

    @property
    def monitor_split(self) -> str:
        """The split of the per-epoch curve: "val" where there is one, else "test"."""

    def steps_per_epoch(self, batch_size: int, replicas: int = 1) -> int: ...

    def train_batches(self, batch_size, *, seed, epoch, augment, device, replica=0, replicas=1,
                      images=True) -> Iterator[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]]:
        """(images, labels, sample indices) per batch; `images=False` yields None for the
        images, unread and unaugmented, for a rank that needs only the labels (the last
        stage without an AuxNet). The order does not depend on it."""

    def heldout_batches(self, split: str, batch_size, *, device, subset: int = 0, seed: int = 0, shard=0,
                        shards=1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of (a stratified subset of) held-out split "val" or "test", split over `shards`."""

    def normalized_train(self, idx: torch.Tensor, device) -> torch.Tensor: ...


class _HeldOutSplits:
    """What both data sets share about their held-out splits: `heldout_labels` maps
    "val" and "test" to their labels."""

    heldout_labels: dict

    def heldout_count(self, split: str, subset: int = 0) -> int:
        n = len(self.heldout_labels[split])
        return n if subset <= 0 or subset >= n else subset

    @property
    def monitor_split(self) -> str:
        return "val" if len(self.heldout_labels["val"]) else "test"

    @property
    def n_test(self) -> int:
        return len(self.heldout_labels["test"])

    def steps_per_epoch(self, batch_size: int, replicas: int = 1) -> int:
        steps = self.n_train // (batch_size * replicas)
        if steps == 0:
            raise UserError(f"config key 'train.batch_size' ({batch_size}) x replicas ({replicas}) "
                            f"exceeds the {self.n_train} training images")
        return steps

    def _heldout_indices(self, split: str, subset: int, seed: int, shard: int, shards: int) -> torch.Tensor:
        """Positions in the split's labels of this shard's share of a stratified subset."""
        if split not in self.heldout_labels:
            raise ValueError(f"held-out split must be val or test, not {split!r}")
        return stratified_subset(self.heldout_labels[split], subset, seed)[shard::shards]


class TensorImageData(_HeldOutSplits):
    """A data set held in memory as uint8 images; CIFAR-10 and CIFAR-100."""

    def __init__(self, train: tuple, val: tuple, test: tuple, mean, std, num_classes):
        """`train`, `val`, `test`: (uint8 images N x C x H x W, int64 labels N) each."""
        self.train_x, self.train_y = train
        self.heldout = {"val": val, "test": test}
        self.heldout_labels = {split: y for split, (_, y) in self.heldout.items()}
        self.mean, self.std, self.num_classes = mean, std, num_classes
        self.image_shape = tuple(self.train_x.shape[1:])

    @property
    def n_train(self) -> int:
        return len(self.train_y)

    def train_batches(self, batch_size, *, seed, epoch, augment, device, replica=0, replicas=1, images=True):
        """Shuffled batches of replica `replica`; the last partial batch is dropped."""
        gen = epoch_generator(seed, epoch)
        order = torch.randperm(self.n_train, generator=gen)
        for step in range(self.steps_per_epoch(batch_size, replicas)):
            start = (step * replicas + replica) * batch_size
            idx = order[start:start + batch_size]
            if not images:
                yield None, to_device(self.train_y[idx], device), idx
                continue
            batch = to_device(self.train_x[idx], device)
            if augment:
                batch = random_crop_flip(batch, gen)
            yield normalize(batch, self.mean, self.std), to_device(self.train_y[idx], device), idx

    def heldout_batches(self, split: str, batch_size, *, device, subset: int = 0, seed: int = 0, shard=0, shards=1):
        x, y = self.heldout[split] if split in self.heldout else (None, None)
        idx = self._heldout_indices(split, subset, seed, shard, shards)
        for start in range(0, len(idx), batch_size):
            b = idx[start:start + batch_size]
            yield normalize(x[b].to(device), self.mean, self.std), y[b].to(device)

    def normalized_train(self, idx: torch.Tensor, device) -> torch.Tensor:
        """Training images `idx`, normalised and not augmented."""
        return normalize(self.train_x[idx].to(device), self.mean, self.std)


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, base, indices):
        self.base, self.indices = base, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        x, y = self.base[int(self.indices[i])]
        return x, y, int(self.indices[i])


class ImageFolderData(_HeldOutSplits):
    """ImageNet-style `train/<class>/*` and `val/<class>/*` folders read through torchvision.
    The folder `val/` is the test split; the validation split is carved from `train/`."""

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def __init__(self, root: Path, split: tuple, image_size: int, workers: int):
        """`split`: (training indices, validation indices) into `train/`; `image_size`: the
        training crop, evaluated on a centre crop of the image resized by 256/224 of it."""
        from torchvision import datasets, transforms as T

        norm = T.Normalize(self.mean, self.std)
        self.train_aug = datasets.ImageFolder(root / "train", T.Compose(
            [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm]))
        resize = round(image_size * 256 / 224)
        self.train_plain = datasets.ImageFolder(root / "train", T.Compose(
            [T.Resize(resize), T.CenterCrop(image_size), T.ToTensor(), norm]))
        self.test = datasets.ImageFolder(root / "val", self.train_plain.transform)
        self.train_y = torch.tensor(self.train_plain.targets)  # by index into train/
        self.train_idx, self.val_idx = split
        self.heldout_labels = {"val": self.train_y[self.val_idx], "test": torch.tensor(self.test.targets)}
        self.num_classes = len(self.train_plain.classes)
        self.image_shape = (3, image_size, image_size)
        self.workers = workers

    @property
    def n_train(self) -> int:
        return len(self.train_idx)

    def _loader(self, dataset, indices, batch_size, device, gen=None):
        """Decoding and augmentation run in `workers` processes; for a GPU their batches land
        in pinned memory, so the copy to the device does not wait for the queued work."""
        return torch.utils.data.DataLoader(_Indexed(dataset, indices), batch_size=batch_size,
                                           num_workers=self.workers, generator=gen, persistent_workers=False,
                                           pin_memory=torch.device(device).type == "cuda")

    def train_batches(self, batch_size, *, seed, epoch, augment, device, replica=0, replicas=1, images=True):
        gen = epoch_generator(seed, epoch)
        order = self.train_idx[torch.randperm(self.n_train, generator=gen)]
        steps = self.steps_per_epoch(batch_size, replicas)
        mine = torch.cat([order[(s * replicas + replica) * batch_size:][:batch_size] for s in range(steps)])
        if not images:
            for idx in mine.split(batch_size):
                yield None, to_device(self.train_y[idx], device), idx
            return
        # The loader's generator seeds its workers: equal (seed, epoch) -> equal augmentation.
        dataset = self.train_aug if augment else self.train_plain
        for x, y, idx in self._loader(dataset, mine, batch_size, device, gen):
            yield to_device(x, device), to_device(y, device), idx

    def heldout_batches(self, split: str, batch_size, *, device, subset: int = 0, seed: int = 0, shard=0, shards=1):
        positions = self._heldout_indices(split, subset, seed, shard, shards)
        dataset, files = (self.train_plain, self.val_idx[positions]) if split == "val" else (self.test, positions)
        for x, y, _ in self._loader(dataset, files, batch_size, device):
            yield to_device(x, device), to_device(y, device)

    def normalized_train(self, idx: torch.Tensor, device) -> torch.Tensor:
        """Training images `idx` (positions in the subset), without augmentation."""
        return torch.stack([self.train_plain[int(self.train_idx[i])][0] for i in idx]).to(device)


def heldout_summary(data: TrainingData, data_cfg) -> dict:
    """The summary.json fields that say which images a run's accuracies were measured on."""
    return {"val_samples": data.heldout_count("val"), "monitor_split": data.monitor_split,
            "test_samples": data.heldout_count("test", data_cfg.test_subset)}


def cut_timing_sample(data: TrainingData, device, size: int) -> torch.Tensor:
    """The images the partition times its stages on: the first `size` training images (a
    micro-batch of the run, so the timing sees the run's per-step sizes)."""
    return data.normalized_train(torch.arange(max(1, min(size, data.n_train))), device)


def image_size(data_cfg) -> int:
    """The side of the images a model trains on: CIFAR's 32, or the configured crop of
    ImageNet folders (`data.image_size`, 0 meaning ImageNet's 224)."""
    return (data_cfg.image_size or 224) if data_cfg.dataset == "imagenet" else 32


def load_data(data_cfg, seed: int) -> TrainingData:
    """The configured data set: the validation split held out (`data.val_subset`, drawn by
    `data.val_seed`) and the stratified training subset drawn by `seed` from the rest."""
    root = Path(data_cfg.root)
    if data_cfg.dataset == "imagenet":
        check_image_folders(root)
        from torchvision import datasets

        labels = torch.tensor(datasets.ImageFolder(root / "train").targets)
        split = split_training_set(labels, data_cfg.val_subset, data_cfg.val_seed, data_cfg.train_subset, seed)
        return ImageFolderData(root, split, image_size(data_cfg), data_cfg.workers)
    train_x, train_y = load_split(data_cfg.dataset, root, train=True)
    test = load_split(data_cfg.dataset, root, train=False)
    keep, val = split_training_set(train_y, data_cfg.val_subset, data_cfg.val_seed, data_cfg.train_subset, seed)
    mean, std = MEAN_STD[data_cfg.dataset]
    return TensorImageData((train_x[keep], train_y[keep]), (train_x[val], train_y[val]), test, mean, std,
                           NUM_CLASSES[data_cfg.dataset])
