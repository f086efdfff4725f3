"""Datasets of the MoCo trainer: CIFAR-10/100, image folders, scikit-learn's digits.

Every dataset is decoded once into memory as ``uint8`` arrays of shape ``(N, H, W, 3)`` at
``image_size`` (CIFAR: 50,000 x 32 x 32 x 3 = 150 MB). That keeps epochs cheap on CPU and lets the
GPU augmentation pipeline (:mod:`selfsup.augment`) index whole batches straight from one tensor.

Sampling is a pure function of ``(seed, epoch, rank, world_size)`` (:class:`EpochBatches`) and the
PIL augmentation of sample ``i`` in epoch ``e`` is seeded by ``(seed, e, i)``; this is what makes a
resumed run continue bit-for-bit, with any number of DataLoader workers.
"""

import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from xbn_queue.training.images import IMAGE_EXTENSIONS, BadImageError, digits_uint8

log = logging.getLogger(__name__)


@dataclass
class ImageData:
    """A dataset decoded into memory.

    Attributes:
        train_images: ``(N, H, W, 3)`` uint8.
        train_labels: ``(N,)`` int64 (used only by the k-NN monitor).
        test_images: ``(M, H, W, 3)`` uint8.
        test_labels: ``(M,)`` int64.
        classes: class names, index = label.
        bad_images: paths that could not be read and were skipped (``--skip-bad-images``).
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: List[str]
    bad_images: List[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# ----------------------------------------------------------------------------------------------
# loaders


def _resize_array(images: np.ndarray, size: int) -> np.ndarray:
    """Resizes ``(N, H, W, 3)`` uint8 images to ``(N, size, size, 3)`` with PIL bilinear."""
    if images.shape[1] == size and images.shape[2] == size:
        return images
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        out[i] = np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))
    return out


def _load_cifar(name: str, root: str, download: bool) -> ImageData:
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    tarball = "cifar-10-python.tar.gz" if name == "cifar10" else "cifar-100-python.tar.gz"
    try:
        train = cls(root, train=True, download=download)
        test = cls(root, train=False, download=download)
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
        raise FileNotFoundError(
            f"{name} not found: expected torchvision's python version in "
            f"{os.path.join(os.path.abspath(root), folder)}. Pass --download on a machine with "
            f"internet access (or download https://www.cs.toronto.edu/~kriz/{tarball} "
            f"and extract it into {os.path.abspath(root)}), or point --dataset folder --data-root at "
            f"a copy laid out as train/<class>/*.jpg and test/<class>/*.jpg. ({exc})"
        ) from exc
    return ImageData(
        train_images=np.ascontiguousarray(train.data),
        train_labels=np.asarray(train.targets, dtype=np.int64),
        test_images=np.ascontiguousarray(test.data),
        test_labels=np.asarray(test.targets, dtype=np.int64),
        classes=list(train.classes),
    )


def _read_image(path: str, size: int) -> np.ndarray:
    """Decodes one image to ``(size, size, 3)`` uint8 RGB.

    Raises:
        BadImageError: naming ``path`` when the file cannot be decoded.
    """
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except Exception as exc:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError ...)
        raise BadImageError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc


def list_folder_split(root: str, split: str, classes: Optional[Sequence[str]] = None) -> Tuple[List[str], List[int], List[str]]:
    """Lists ``root/split/<class>/*`` images.

    Returns:
        ``(paths, labels, classes)`` with classes sorted by name (or the given ``classes``).

    Raises:
        FileNotFoundError: when ``root/split`` is missing or holds no class folder.
    """
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise FileNotFoundError(
            f"folder dataset: {split_dir} does not exist; expected {Path(root)}/train/<class>/* and "
            f"{Path(root)}/test/<class>/* (for the CIFAR-10 JPEG copy: "
            f"mkdir -p {root} && tar xzf cifar10-jpeg.tar.gz -C {root})"
        )
    if classes is None:
        classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    if not classes:
        raise FileNotFoundError(f"folder dataset: no class folders in {split_dir}")
    paths: List[str] = []
    labels: List[int] = []
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue
        for p in sorted(class_dir.iterdir()):
            if p.suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(str(p))
                labels.append(label)
    if not paths:
        raise FileNotFoundError(f"folder dataset: no images ({', '.join(IMAGE_EXTENSIONS)}) under {split_dir}")
    return paths, labels, list(classes)


def _read_images(paths: Sequence[str], labels: Sequence[int], size: int, skip_bad: bool) -> Tuple[np.ndarray, np.ndarray, List[str]]:
    reasons: Dict[str, str] = {}

    def read(path: str) -> Optional[np.ndarray]:
        try:
            return _read_image(path, size)
        except BadImageError as exc:
            if not skip_bad:
                raise
            reasons[path] = str(exc)
            return None

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        arrays = list(pool.map(read, paths))
    keep = [i for i, a in enumerate(arrays) if a is not None]
    bad = [paths[i] for i, a in enumerate(arrays) if a is None]
    for path in bad:  # once per file, from the main thread, naming the file
        print(f"[xbn-selfsup] warning: skipping unreadable image {path} (--skip-bad-images): {reasons[path]}",
              file=sys.stderr, flush=True)
    if not keep:
        raise BadImageError(f"none of the {len(paths)} images could be read (first: {paths[0]})")
    images = np.stack([arrays[i] for i in keep])
    return images, np.asarray([labels[i] for i in keep], dtype=np.int64), bad


def _load_folder(root: str, size: int, skip_bad: bool, train_subset: int = 0, test_subset: int = 0) -> ImageData:
    train_paths, train_labels, classes = list_folder_split(root, "train")
    test_paths, test_labels, _ = list_folder_split(root, "test", classes)
    # choose subsets before decoding (same choice as subsetting the decoded arrays)
    keep = stratified_subset(np.asarray(train_labels), train_subset)
    train_paths, train_labels = [train_paths[i] for i in keep], [train_labels[i] for i in keep]
    keep = stratified_subset(np.asarray(test_labels), test_subset)
    test_paths, test_labels = [test_paths[i] for i in keep], [test_labels[i] for i in keep]
    tr_img, tr_lab, bad_tr = _read_images(train_paths, train_labels, size, skip_bad)
    te_img, te_lab, bad_te = _read_images(test_paths, test_labels, size, skip_bad)
    return ImageData(tr_img, tr_lab, te_img, te_lab, classes, bad_tr + bad_te)


def _load_digits(size: int) -> ImageData:
    images, labels = digits_uint8()  # (1797, 8, 8) uint8, (1797,)
    images = np.repeat(images[..., None], 3, axis=-1)  # (1797, 8, 8, 3)
    images = _resize_array(images, size)
    # fixed split: every 5th image is a test image
    is_test = np.arange(len(labels)) % 5 == 0
    return ImageData(
        images[~is_test], labels[~is_test], images[is_test], labels[is_test], [str(c) for c in range(10)]
    )


def stratified_subset(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Indices of a class-stratified subset of size ``n`` (sorted, fixed by ``seed``).

    Args:
        labels: ``(N,)`` integer labels.
        n: subset size; ``0`` or ``>= N`` returns all indices.
        seed: the subset's own seed (independent of the training seed so runs compare on the same images).

    Returns:
        ``(min(n, N),)`` int64 indices in increasing order.
    """
    N = len(labels)
    if n <= 0 or n >= N:
        return np.arange(N, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(N)
    counts = np.bincount(labels)
    rank_in_class = np.empty(N, dtype=np.float64)
    seen = np.zeros_like(counts)
    for i in order:  # position of each sample within its class, in shuffled order
        c = labels[i]
        rank_in_class[i] = (seen[c] + 0.5) / counts[c]
        seen[c] += 1
    chosen = np.argsort(rank_in_class, kind="stable")[:n]
    return np.sort(chosen).astype(np.int64)


def load_dataset(
    name: str,
    root: str,
    download: bool = False,
    image_size: int = 32,
    skip_bad_images: bool = False,
    train_subset: int = 0,
    test_subset: int = 0,
) -> ImageData:
    """Loads a dataset into memory at ``image_size``.

    Args:
        name: ``cifar10`` | ``cifar100`` | ``folder`` | ``digits``.
        root: dataset root (cifar: torchvision's folder; folder: holds ``train/`` and ``test/``).
        download: allow torchvision to download CIFAR.
        image_size: side of the square images returned.
        skip_bad_images: skip unreadable files (listed in ``bad_images``) instead of raising.
        train_subset: keep only this many training images (class-stratified; 0 = all).
        test_subset: keep only this many test images (class-stratified; 0 = all).

    Returns:
        The decoded :class:`ImageData`.

    Raises:
        FileNotFoundError: the data is not where it is expected (the message says where and how to get it).
        BadImageError: an image cannot be read and ``skip_bad_images`` is false.
        ValueError: unknown ``name``.
    """
    if name in ("cifar10", "cifar100"):
        data = _load_cifar(name, root, download)
        data.train_images = _resize_array(data.train_images, image_size)
        data.test_images = _resize_array(data.test_images, image_size)
    elif name == "folder":
        data = _load_folder(root, image_size, skip_bad_images, train_subset, test_subset)
        return data
    elif name == "digits":
        data = _load_digits(image_size)
    else:
        raise ValueError(f"unknown dataset {name!r}; expected one of cifar10, cifar100, folder, digits")
    tr = stratified_subset(data.train_labels, train_subset)
    te = stratified_subset(data.test_labels, test_subset)
    data.train_images, data.train_labels = data.train_images[tr], data.train_labels[tr]
    data.test_images, data.test_labels = data.test_images[te], data.test_labels[te]
    return data


# ----------------------------------------------------------------------------------------------
# sampling and datasets


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for the augmentation of sample ``index`` in ``epoch`` (pure function)."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index]).generate_state(1, dtype=np.uint64)
    return int(state[0]) & ((1 << 63) - 1)


class EpochBatches:
    """Batches of one rank for one epoch, a pure function of ``(seed, epoch, rank, world_size)``.

    Like ``DistributedSampler`` with ``drop_last``: the epoch's permutation is cut to a multiple of
    ``world_size``, rank ``r`` takes every ``world_size``-th index starting at ``r``, and its share
    is cut into ``steps_per_epoch`` full batches.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.steps_per_epoch = (num_samples // world_size) // batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"{num_samples} training images are fewer than one batch of {batch_size} per process "
                f"x {world_size} processes; lower --batch-size"
            )

    def batches(self, epoch: int) -> torch.Tensor:
        """Returns ``(steps_per_epoch, batch_size)`` int64 sample indices of this rank."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.num_samples, generator=g)
        per_rank = self.num_samples // self.world_size
        mine = perm[self.rank : per_rank * self.world_size : self.world_size]
        used = self.steps_per_epoch * self.batch_size
        return mine[:used].view(self.steps_per_epoch, self.batch_size)


class TwoViewDataset(torch.utils.data.Dataset):
    """Two augmented views of in-memory images, seeded per ``(seed, epoch, index)``.

    Indexed with ``(index, epoch)`` pairs (see :func:`pil_batch_loader`); returns
    ``(index, view0, view1)`` where the views are ``(3, S, S)`` float tensors.
    """

    def __init__(self, images: np.ndarray, transform: Callable, seed: int) -> None:
        self.images = images
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: Tuple[int, int]):
        index, epoch = key
        img = Image.fromarray(self.images[index])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            v0 = self.transform(img)
            v1 = self.transform(img)
        return index, v0, v1


class EvalDataset(torch.utils.data.Dataset):
    """Un-augmented images as ``(3, S, S)`` uint8 tensors with their labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2)  # (N, 3, H, W) uint8 view
        self.labels = torch.from_numpy(labels)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]


def pil_batch_loader(dataset: TwoViewDataset, batches: torch.Tensor, epoch: int, workers: int, pin_memory: bool):
    """A DataLoader over the given batches of one epoch (from any start step) for the PIL pipeline.

    Args:
        dataset: the two-view dataset.
        batches: ``(steps, B)`` sample indices (already cut at the resume position).
        epoch: the epoch, part of every sample's augmentation seed.
        workers: DataLoader worker processes.
        pin_memory: pin batches (CUDA).
    """
    batch_lists = [[(int(i), epoch) for i in row] for row in batches]
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batch_lists,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
