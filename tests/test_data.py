"""Real CIFAR-10: preparation, loading, subsets, augmentation; ImageNet folders."""
import pickle
import shutil
import tarfile

import numpy as np
import pytest
import torch

from hpcaux.data.augment import random_crop_flip
from hpcaux.data.cifar import load_split
from hpcaux.data.prepare import prepare
from hpcaux.data.sets import load_data, stratified_subset
from hpcaux.config import load_config
from hpcaux.errors import UserError

pytestmark = pytest.mark.quick


def test_prepared_cifar10_has_the_standard_sizes(cifar_root):
    train_x, train_y = load_split("cifar10", cifar_root, train=True)
    test_x, test_y = load_split("cifar10", cifar_root, train=False)
    assert train_x.shape == (50000, 3, 32, 32) and train_x.dtype == torch.uint8
    assert test_x.shape == (10000, 3, 32, 32) and len(train_y) == 50000
    assert torch.bincount(test_y).tolist() == [1000] * 10
    assert torch.bincount(train_y).tolist() == [5000] * 10
    assert 80 < train_x.float().mean() < 160  # real images, not zeros


def test_original_release_tarball_is_accepted(cifar_root, tmp_path):
    """The original cifar-10-python.tar.gz holds cifar-10-batches-py/: it is extracted as is."""
    release = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(release, "w:gz") as tar:
        tar.add(cifar_root / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    folder = prepare("cifar10", tmp_path / "dest", release)
    assert (folder / "data_batch_5").read_bytes() == (cifar_root / "cifar-10-batches-py" / "data_batch_5").read_bytes()
    again = prepare("cifar10", tmp_path / "dest", tmp_path / "no-such-archive.tar.gz")  # complete: a no-op
    assert again == folder


def test_cifar100_reads_fine_labels(tmp_path):
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 200), ("test", 100)):
        with open(base / split, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
                         b"fine_labels": list(range(100)) * (n // 100), b"coarse_labels": [0] * n}, f)
    (base / "meta").write_bytes(pickle.dumps({}))
    data = load_data(load_config(None, ["data.dataset=cifar100", f"data.root={tmp_path}"]).data, seed=0)
    assert data.num_classes == 100 and data.n_train == 200 and data.n_test == 100


def test_missing_and_corrupt_data_are_clear_errors(cifar_root, tmp_path):
    with pytest.raises(UserError, match="data set cifar10 not found under"):
        load_split("cifar10", tmp_path, train=True)
    broken = tmp_path / "cifar-10-batches-py"
    shutil.copytree(cifar_root / "cifar-10-batches-py", broken)
    (broken / "test_batch").write_bytes((broken / "test_batch").read_bytes()[:1000])
    with pytest.raises(UserError, match="test_batch is corrupt or truncated"):
        load_split("cifar10", tmp_path, train=False)
    with pytest.raises(UserError, match="is not a readable tar file"):
        bogus = tmp_path / "bogus.tar.gz"
        bogus.write_text("not a tar")
        prepare("cifar10", tmp_path / "d2", bogus)


def test_stratified_subset_is_balanced_and_seeded(cifar_root):
    _, labels = load_split("cifar10", cifar_root, train=False)
    a = stratified_subset(labels, 1000, seed=3)
    assert torch.bincount(labels[a]).tolist() == [100] * 10
    assert torch.equal(a, stratified_subset(labels, 1000, seed=3))
    assert not torch.equal(a, stratified_subset(labels, 1000, seed=4))


def test_augmentation_keeps_shapes_is_seeded_and_changes_images(cifar_root):
    x, _ = load_split("cifar10", cifar_root, train=False)
    batch = x[:64]
    a = random_crop_flip(batch, torch.Generator().manual_seed(1))
    b = random_crop_flip(batch, torch.Generator().manual_seed(1))
    c = random_crop_flip(batch, torch.Generator().manual_seed(2))
    assert a.shape == batch.shape and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, batch)
    # a crop with zero offset 4 and no flip is the identity: check by construction
    padded_same = sum(torch.equal(a[i], batch[i]) or torch.equal(a[i], batch[i].flip(-1)) for i in range(64))
    assert padded_same < 64


def test_train_batches_identical_for_equal_seed_and_epoch(cifar_root):
    data = load_data(load_config(None, [f"data.root={cifar_root}", "data.train_subset=300"]).data, seed=0)
    kw = dict(seed=0, augment=True, device="cpu")
    first = [(x.clone(), idx) for x, _, idx in data.train_batches(64, epoch=1, **kw)]
    second = [(x.clone(), idx) for x, _, idx in data.train_batches(64, epoch=1, **kw)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    replicas = [torch.cat([idx for _, _, idx in data.train_batches(64, epoch=1, replica=r, replicas=2, **kw)])
                for r in range(2)]
    assert not set(replicas[0].tolist()) & set(replicas[1].tolist())
    # labels only (the last stage without an AuxNet): the same labels and samples, no images
    for r in range(2):
        with_images = list(data.train_batches(64, epoch=1, replica=r, replicas=2, **kw))
        labels_only = list(data.train_batches(64, epoch=1, replica=r, replicas=2, images=False, **kw))
        assert len(with_images) == len(labels_only) and all(x is None for x, _, _ in labels_only)
        assert all(torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) for a, b in zip(with_images, labels_only))


def test_imagenet_folder_reads_through_torchvision(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("n01", "n02"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    cfg = load_config(None, ["data.dataset=imagenet", "model.arch=resnet50", f"data.root={tmp_path}",
                             "data.workers=0"])
    data = load_data(cfg.data, seed=0)
    assert data.num_classes == 2 and data.n_train == 6
    x, y, idx = next(data.train_batches(4, seed=0, epoch=0, augment=True, device="cpu"))
    assert x.shape == (4, 3, 224, 224) and len(idx) == 4
    none, labels, same = next(data.train_batches(4, seed=0, epoch=0, augment=True, device="cpu", images=False))
    assert none is None and torch.equal(labels, y) and torch.equal(torch.as_tensor(same), torch.as_tensor(idx))
    test = list(data.test_batches(4, device="cpu"))
    assert sum(len(y) for _, y in test) == 6
