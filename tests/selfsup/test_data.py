import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.data import (
    BadImageError,
    EpochBatches,
    TwoViewDataset,
    load_dataset,
    pil_batch_loader,
    stratified_subset,
)
from selfsup.augment import pil_train_transform


def make_folder(root, per_class=4, classes=("cat", "dog", "ship"), size=20):
    """A folder dataset in the CIFAR-10 JPEG copy's layout: train/<class>/NNNN.jpg, test/<class>/NNNN.jpg."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", 2)):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f"{i:04d}.jpg")
    return root


def test_folder_dataset_reads_layout_and_resizes(tmp_path):
    make_folder(tmp_path)
    data = load_dataset("folder", str(tmp_path), image_size=16)
    assert data.classes == ["cat", "dog", "ship"]
    assert data.train_images.shape == (12, 16, 16, 3) and data.train_images.dtype == np.uint8
    assert data.test_images.shape == (6, 16, 16, 3)
    assert data.train_labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert data.bad_images == []


def test_unreadable_image_is_named_or_skipped_and_counted(tmp_path, capsys):
    make_folder(tmp_path)
    bad = tmp_path / "train" / "dog" / "0002.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(BadImageError, match="cannot read image .*dog/0002.jpg"):
        load_dataset("folder", str(tmp_path), image_size=16)
    capsys.readouterr()
    data = load_dataset("folder", str(tmp_path), image_size=16, skip_bad_images=True)
    err = capsys.readouterr().err
    assert err.count("skipping unreadable image") == 1 and f"image {bad} " in err  # the program warns once, naming the file
    assert data.bad_images == [str(bad)]
    assert len(data.train_images) == 11


def test_missing_folder_and_offline_cifar_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist; expected .*train/<class>/\*"):
        load_dataset("folder", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"cifar10 not found: expected .*cifar-10-batches-py.*--download"):
        load_dataset("cifar10", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"cifar100 not found: expected .*cifar-100-python"):
        load_dataset("cifar100", str(tmp_path))
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        load_dataset("mnist", str(tmp_path))


def test_cifar_reads_torchvision_python_format(tmp_path, monkeypatch):
    """A tiny file tree in torchvision's cifar-10-batches-py format (pickled dicts, uint8 rows)."""
    import pickle

    from torchvision.datasets import CIFAR10

    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name, _ in CIFAR10.train_list + CIFAR10.test_list:
        with open(base / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    import torchvision.datasets.cifar as tv_cifar

    # our files do not have the official checksums
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)
    data = load_dataset("cifar10", str(tmp_path))
    assert data.train_images.shape == (20, 32, 32, 3) and data.test_images.shape == (4, 32, 32, 3)
    assert data.num_classes == 10


def test_digits_and_stratified_subset():
    data = load_dataset("digits", "", image_size=16, train_subset=200, test_subset=50)
    assert data.train_images.shape == (200, 16, 16, 3) and data.test_images.shape == (50, 16, 16, 3)
    counts = np.bincount(data.train_labels, minlength=10)
    assert counts.min() >= 18 and counts.max() <= 22  # proportional to the (nearly balanced) classes
    labels = np.repeat(np.arange(4), [10, 20, 30, 40])
    sub = stratified_subset(labels, 50)
    assert np.bincount(labels[sub]).tolist() == [5, 10, 15, 20]
    assert np.array_equal(sub, stratified_subset(labels, 50))  # fixed choice
    assert np.array_equal(stratified_subset(labels, 0), np.arange(100))


def test_epoch_batches_are_disjoint_across_ranks_and_reproducible():
    s0 = EpochBatches(103, 8, seed=3, rank=0, world_size=2)
    s1 = EpochBatches(103, 8, seed=3, rank=1, world_size=2)
    assert s0.steps_per_epoch == 6
    b0, b1 = s0.batches(4), s1.batches(4)
    assert b0.shape == (6, 8)
    assert not set(b0.flatten().tolist()) & set(b1.flatten().tolist())
    assert torch.equal(b0, EpochBatches(103, 8, seed=3, rank=0, world_size=2).batches(4))
    assert not torch.equal(b0, s0.batches(5))
    with pytest.raises(ValueError, match="fewer than one batch"):
        EpochBatches(10, 8, seed=0, world_size=2)


def test_pil_views_depend_only_on_seed_epoch_index_not_on_workers():
    images = np.random.default_rng(0).integers(0, 255, (6, 16, 16, 3), dtype=np.uint8)
    ds = TwoViewDataset(images, pil_train_transform(16), seed=1)
    batches = torch.tensor([[4, 1, 2], [0, 5, 3]])
    direct = [torch.stack([ds[(int(i), 7)][1] for i in row]) for row in batches]
    torch.manual_seed(123)  # the global RNG does not matter
    loaded = [b[1] for b in pil_batch_loader(ds, batches, epoch=7, workers=0, pin_memory=False)]
    for a, b in zip(direct, loaded):
        torch.testing.assert_close(a, b)
    _, v0, v1 = ds[(4, 7)]
    assert not torch.equal(v0, v1)  # two different views
    assert not torch.equal(ds[(4, 8)][1], v0)  # another epoch, another view
