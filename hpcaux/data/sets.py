"""The data sets a trainer iterates: one interface for in-memory CIFAR and ImageNet folders.

A training batch is (x, y, idx): idx are the samples' positions in the training set,
which per-sample state (AL multipliers, stored auxiliary variables) is keyed by. The
order and augmentation of an epoch depend only on (seed, epoch), so every rank of a
layer-parallel replica draws the very same batches without communicating.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Protocol

import torch

from hpcaux.data.augment import normalize, random_crop_flip, to_device
from hpcaux.data.cifar import MEAN_STD, NUM_CLASSES, load_split
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


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


class TrainingData(Protocol):
    """What every trainer reads: both data sets below provide it."""
    num_classes: int
    image_shape: tuple

    @property
    def n_train(self) -> int: ...

    @property
    def n_test(self) -> int: ...

    def steps_per_epoch(self, batch_size: int, replicas: int = 1) -> int: ...

    def train_batches(self, batch_size, *, seed, epoch, augment, device, replica=0, replicas=1,
                      images=True) -> Iterator[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]]:
        """(images, labels, sample indices) per batch; `images=False` yields None for the
        images, unread and unaugmented, for a rank that needs only the labels (the last
        stage without an AuxNet). The order does not depend on it."""

    def test_batches(self, batch_size, *, device, subset: int = 0, seed: int = 0, shard=0,
                     shards=1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def test_count(self, subset: int) -> int: ...

    def normalized_train(self, idx: torch.Tensor, device) -> torch.Tensor: ...


class TensorImageData:
    """A data set held in memory as uint8 images; CIFAR-10 and CIFAR-100."""

    def __init__(self, train_x, train_y, test_x, test_y, mean, std, num_classes):
        self.train_x, self.train_y = train_x, train_y
        self.test_x, self.test_y = test_x, test_y
        self.mean, self.std, self.num_classes = mean, std, num_classes
        self.image_shape = tuple(train_x.shape[1:])

    @property
    def n_train(self) -> int:
        return len(self.train_y)

    @property
    def n_test(self) -> int:
        return len(self.test_y)

    def steps_per_epoch(self, batch_size: int, replicas: int = 1) -> int:
        steps = self.n_train // (batch_size * replicas)
        if steps == 0:
            raise UserError(f"config key 'train.batch_size' ({batch_size}) x replicas ({replicas}) "
                            f"exceeds the {self.n_train} training images")
        return steps

    def test_count(self, subset: int) -> int:
        """How many test images `test_batches(subset=subset)` yields."""
        return self.n_test if subset <= 0 or subset >= self.n_test else subset

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

    def test_batches(self, batch_size, *, device, subset: int = 0, seed: int = 0, shard=0, shards=1):
        """Batches of (a stratified subset of) the test set, split over `shards`."""
        idx = stratified_subset(self.test_y, subset, seed)
        idx = idx[shard::shards]
        for start in range(0, len(idx), batch_size):
            b = idx[start:start + batch_size]
            yield normalize(self.test_x[b].to(device), self.mean, self.std), self.test_y[b].to(device)

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


class ImageFolderData:
    """ImageNet-style `train/<class>/*` and `val/<class>/*` folders read through torchvision."""

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def __init__(self, root: Path, train_subset: int, seed: int, workers: int):
        from torchvision import datasets, transforms as T

        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise UserError(f"ImageNet folder {root / split} not found (expected train/<class>/ and val/<class>/)")
        norm = T.Normalize(self.mean, self.std)
        self.train_aug = datasets.ImageFolder(root / "train", T.Compose(
            [T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), norm]))
        self.train_plain = datasets.ImageFolder(root / "train", T.Compose(
            [T.Resize(256), T.CenterCrop(224), T.ToTensor(), norm]))
        self.test = datasets.ImageFolder(root / "val", self.train_plain.transform)
        self.train_y = torch.tensor(self.train_plain.targets)  # by index into train/
        self.train_idx = stratified_subset(self.train_y, train_subset, seed)
        self.test_y = torch.tensor(self.test.targets)
        self.num_classes = len(self.train_plain.classes)
        self.image_shape = (3, 224, 224)
        self.workers = workers

    @property
    def n_train(self) -> int:
        return len(self.train_idx)

    @property
    def n_test(self) -> int:
        return len(self.test)

    steps_per_epoch = TensorImageData.steps_per_epoch
    test_count = TensorImageData.test_count

    def _loader(self, dataset, indices, batch_size, gen=None):
        return torch.utils.data.DataLoader(_Indexed(dataset, indices), batch_size=batch_size,
                                           num_workers=self.workers, generator=gen,
                                           persistent_workers=False)

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
        for x, y, idx in self._loader(dataset, mine, batch_size, gen):
            yield to_device(x, device), to_device(y, device), idx

    def test_batches(self, batch_size, *, device, subset: int = 0, seed: int = 0, shard=0, shards=1):
        idx = stratified_subset(self.test_y, subset, seed)[shard::shards]
        for x, y, _ in self._loader(self.test, idx, batch_size):
            yield x.to(device), y.to(device)

    def normalized_train(self, idx: torch.Tensor, device) -> torch.Tensor:
        """Training images `idx` (positions in the subset), without augmentation."""
        return torch.stack([self.train_plain[int(self.train_idx[i])][0] for i in idx]).to(device)


def cut_timing_sample(data: TrainingData, device, size: int) -> torch.Tensor:
    """The images the partition times its stages on: the first `size` training images (a
    micro-batch of the run, so the timing sees the run's per-step sizes)."""
    return data.normalized_train(torch.arange(max(1, min(size, data.n_train))), device)


def load_data(data_cfg, seed: int) -> TrainingData:
    """The configured data set, with the stratified training subset applied."""
    root = Path(data_cfg.root)
    if data_cfg.dataset == "imagenet":
        return ImageFolderData(root, data_cfg.train_subset, seed, data_cfg.workers)
    train_x, train_y = load_split(data_cfg.dataset, root, train=True)
    test_x, test_y = load_split(data_cfg.dataset, root, train=False)
    keep = stratified_subset(train_y, data_cfg.train_subset, seed)
    mean, std = MEAN_STD[data_cfg.dataset]
    return TensorImageData(train_x[keep], train_y[keep], test_x, test_y, mean, std,
                           NUM_CLASSES[data_cfg.dataset])
