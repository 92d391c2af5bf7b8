"""Real CIFAR-10: preparation, loading, subsets, augmentation; ImageNet folders and Imagenette."""
import pickle
import shutil
import tarfile

import numpy as np
import pytest
import torch

from hpcaux.data.augment import random_crop_flip
from hpcaux.data.cifar import load_split
from hpcaux.data.folders import check_image_folders, prepare_image_folders
from hpcaux.data.prepare import prepare
from hpcaux.data.sets import heldout_summary, load_data, split_training_set, stratified_subset
from hpcaux.config import config_from_dict, load_config
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
    data = load_data(load_config(None, ["data.dataset=cifar100", f"data.root={tmp_path}",
                                        "data.val_subset=100"]).data, seed=0)
    assert data.num_classes == 100 and data.n_train == 100 and data.n_test == 100
    assert data.heldout_count("val") == 100


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


def test_validation_split_is_held_out_stratified_and_the_same_for_every_run_seed(cifar_root):
    cfg = load_config(None, [f"data.root={cifar_root}", "data.train_subset=1000", "data.val_subset=500"])
    runs = [load_data(cfg.data, seed=s) for s in (0, 1)]
    _, all_labels = load_split("cifar10", cifar_root, train=True)
    splits = [split_training_set(all_labels, 500, 0, 1000, seed=s) for s in (0, 1)]
    assert torch.equal(splits[0][1], splits[1][1])  # one validation split for every run seed
    assert not torch.equal(splits[0][0], splits[1][0])  # the training subset follows the seed
    for (train, val), data in zip(splits, runs):
        assert not set(train.tolist()) & set(val.tolist())
        assert torch.bincount(all_labels[val]).tolist() == [50] * 10
        assert torch.bincount(all_labels[train]).tolist() == [100] * 10
        assert data.n_train == 1000 and data.heldout_count("val") == 500 and data.monitor_split == "val"
        assert torch.equal(data.heldout["val"][0], load_split("cifar10", cifar_root, train=True)[0][val])
        trained = torch.cat([idx for _, _, idx in data.train_batches(100, seed=0, epoch=0, augment=False, device="cpu")])
        # no validation image among those trained on (compared as pixels)
        seen = {bytes(data.train_x[i].numpy()) for i in trained.tolist()}
        assert not seen & {bytes(x.numpy()) for x in data.heldout["val"][0]}
        val = list(data.heldout_batches("val", 128, device="cpu", subset=200))
        assert sum(len(y) for _, y in val) == 200
    assert heldout_summary(runs[0], cfg.data) == {"val_samples": 500, "monitor_split": "val", "test_samples": 10000}


def test_no_validation_split_keeps_the_training_subset_of_earlier_runs(cifar_root):
    """val_subset 0: the subset runs before the split drew, and the per-epoch curve on the test set."""
    _, labels = load_split("cifar10", cifar_root, train=True)
    train, val = split_training_set(labels, 0, 0, 1000, seed=3)
    assert torch.equal(train, stratified_subset(labels, 1000, seed=3)) and len(val) == 0
    data = load_data(load_config(None, [f"data.root={cifar_root}", "data.train_subset=300",
                                        "data.val_subset=0"]).data, seed=0)
    assert data.monitor_split == "test" and data.heldout_count("val") == 0
    # a run saved before the key existed resumes without a split; a new one gets the default
    saved = load_config(None, []).to_dict()
    del saved["data"]["val_subset"]
    assert config_from_dict(saved).data.val_subset == 0
    assert load_config(None, []).data.val_subset == 5000
    with pytest.raises(UserError, match="'data.val_subset' \\(50000\\) leaves none of the 50000"):
        split_training_set(labels, 50000, 0, 0, seed=0)


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


def _write_image_tree(root, classes=("n01", "n02"), per_class=3, splits=("train", "val")):
    """A tiny ImageNet-format tree of random JPEGs: root/<split>/<class>/<i>.jpg."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in splits:
        for cls in classes:
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")


def test_imagenet_folder_reads_through_torchvision(tmp_path):
    _write_image_tree(tmp_path)
    cfg = load_config(None, ["data.dataset=imagenet", "model.arch=resnet50", f"data.root={tmp_path}",
                             "data.workers=0", "data.val_subset=2"])
    data = load_data(cfg.data, seed=0)
    assert data.num_classes == 2 and data.n_train == 4
    x, y, idx = next(data.train_batches(4, seed=0, epoch=0, augment=True, device="cpu"))
    assert x.shape == (4, 3, 224, 224) and len(idx) == 4
    assert not set(data.train_idx.tolist()) & set(data.val_idx.tolist())  # val carved from train/
    none, labels, same = next(data.train_batches(4, seed=0, epoch=0, augment=True, device="cpu", images=False))
    assert none is None and torch.equal(labels, y) and torch.equal(torch.as_tensor(same), torch.as_tensor(idx))
    test = list(data.heldout_batches("test", 4, device="cpu"))
    assert sum(len(y) for _, y in test) == 6  # val/ is the test split
    (vx, vy), = list(data.heldout_batches("val", 4, device="cpu"))
    assert vx.shape == (2, 3, 224, 224) and sorted(vy.tolist()) == [0, 1]
    small = load_data(load_config(None, ["data.dataset=imagenet", "model.arch=resnet50", f"data.root={tmp_path}",
                                         "data.workers=0", "data.val_subset=2", "data.image_size=64"]).data, seed=0)
    assert next(small.train_batches(2, seed=0, epoch=0, augment=True, device="cpu"))[0].shape == (2, 3, 64, 64)
    assert next(small.heldout_batches("val", 2, device="cpu"))[0].shape == (2, 3, 64, 64)


def test_imagenette_is_ready_with_its_published_counts(imagenette_root):
    counts = check_image_folders(imagenette_root)
    assert counts.images == {"train": 9469, "val": 3925} and len(counts.classes) == 10
    assert counts.classes[0] == "n01440764"  # tench, ImageNet's class 0


def test_image_folder_archive_is_unpacked_from_under_one_folder_and_checked(tmp_path):
    _write_image_tree(tmp_path / "src" / "tiny-imagenet", classes=("n01", "n02", "n03"), per_class=2)
    archive = tmp_path / "tiny.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "tiny-imagenet", arcname="tiny-imagenet")
    dest, counts = prepare_image_folders(tmp_path / "dest", archive)
    assert counts.images == {"train": 6, "val": 6} and counts.classes == ["n01", "n02", "n03"]
    assert sorted(p.name for p in dest.iterdir()) == ["train", "val"]  # no staging folder left
    again = prepare_image_folders(dest, tmp_path / "no-such-archive.tar.gz")[1]  # ready: only counted
    assert again == counts


@pytest.mark.parametrize("damage, message", [
    (lambda root: shutil.rmtree(root / "val"), "ImageNet folder bad.tar/val not found"),
    (lambda root: (root / "train" / "loose.jpg").write_bytes(b"x"), "holds files outside class folders"),
    (lambda root: [p.unlink() for p in (root / "val" / "n02").iterdir()], "class folders without images: n02"),
    (lambda root: shutil.rmtree(root / "val" / "n02"), "hold different classes"),
])
def test_wrong_image_folder_layouts_are_named_and_dest_is_left_alone(tmp_path, damage, message):
    _write_image_tree(tmp_path / "tree")
    damage(tmp_path / "tree")
    archive = tmp_path / "bad.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(tmp_path / "tree", arcname=".")
    with pytest.raises(UserError, match=message):
        prepare_image_folders(tmp_path / "dest", archive)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar", "tree"]  # no DEST, no staging copy


def test_archive_without_an_image_folder_tree_is_a_clear_error(tmp_path):
    archive = tmp_path / "flat.tar"
    (tmp_path / "one.jpg").write_bytes(b"x")
    with tarfile.open(archive, "w") as tar:
        tar.add(tmp_path / "one.jpg", arcname="one.jpg")
    with pytest.raises(UserError, match="archive holds no train/<class>/"):
        prepare_image_folders(tmp_path / "dest", archive)
