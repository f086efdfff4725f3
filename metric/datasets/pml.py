"""CUB-200-2011 and Cars196 through pytorch-metric-learning's dataset classes.

The file lists, the labels and the class splits are those of ``pytorch_metric_learning.datasets.CUB``
and ``pytorch_metric_learning.datasets.Cars196`` (read, not re-implemented: this module calls the
classes and takes their ``paths`` and ``labels``); the images then go through the trainer's own
image pipeline (:class:`metric.data.ImageDataset`). The training split is PML's ``split="train"``,
the retrieval split PML's ``split="test"``, queried leave-one-out (each test image retrieves among all
other test images), the protocol of the metric-learning literature on both sets.

On-disk layouts (what the PML classes read, under ``--data-root DIR``):

* ``cub``: ``DIR/CUB_200_2011/images.txt`` (``<image_id> <class folder>/<file>.jpg``),
  ``DIR/CUB_200_2011/image_class_labels.txt`` (``<image_id> <class_id>``, the same ids in the same
  order) and ``DIR/CUB_200_2011/images/<class folder>/<file>.jpg``; the official
  ``CUB_200_2011.tgz`` unpacked into ``DIR``. Classes 1-100 train (5,864 images), 101-200 are
  retrieved (5,924 images).
* ``cars196``: ``DIR/names.csv`` (one class name a line, line i = class i),
  ``DIR/anno_train.csv`` and ``DIR/anno_test.csv`` (``<file>,x1,y1,x2,y2,<class>``, no header) and
  ``DIR/car_data/car_data/{train,test}/<class name with '/' as '-'>/<file>``; the Kaggle archive
  ``stanford-car-dataset-by-classes-folder`` unpacked into ``DIR``. PML pools the two csv files and
  splits by class: classes 1-98 train (8,054 images), 99-196 are retrieved (8,131 images). The boxes
  are not used (whole images, as PML gives them).

``download=True`` calls the PML class with ``download=True``: PML fetches its archive into a new or
empty ``DIR`` (and does nothing in a folder that already holds files). A failed download removes
every file and folder it created and says how to lay out the data by hand.

Every problem is a :class:`metric.data.DataFormatError` of one line naming the file.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from .types import DataFormatError, RetrievalData, Split

__all__ = ["PMLBenchmark", "BENCHMARKS", "load_pml_benchmark", "download_pml_benchmark", "pml_class"]


@dataclass(frozen=True)
class PMLBenchmark:
    """What this module knows of one PML dataset class (the rest comes from the class itself).

    Attributes:
        name: the ``--dataset`` name.
        title: the dataset's usual name.
        class_name: the class in ``pytorch_metric_learning.datasets``.
        required: the metadata files the class reads, relative to the data root.
        train_classes: the class ids PML's ``split="train"`` keeps (printed in messages and docs).
        test_classes: the class ids of ``split="test"``.
        full_sizes: (training images, retrieval images) of the full dataset, for the recipe line's estimate.
        manual: how to lay out the data by hand (the download error says it).
    """

    name: str
    title: str
    class_name: str
    required: Tuple[str, ...]
    train_classes: str
    test_classes: str
    full_sizes: Tuple[int, int]
    manual: str


BENCHMARKS: Dict[str, PMLBenchmark] = {
    "cub": PMLBenchmark(
        "cub", "CUB-200-2011", "CUB",
        ("CUB_200_2011/images.txt", "CUB_200_2011/image_class_labels.txt"),
        "1-100", "101-200", (5864, 5924),
        "extract CUB_200_2011.tgz into {root}/ (giving {root}/CUB_200_2011/images.txt, image_class_labels.txt "
        "and images/<class>/<image>.jpg)"),
    "cars196": PMLBenchmark(
        "cars196", "Cars196 (Stanford Cars)", "Cars196",
        ("names.csv", "anno_train.csv", "anno_test.csv"),
        "1-98", "99-196", (8054, 8131),
        "unzip Kaggle's stanford-car-dataset-by-classes-folder archive into {root}/ (giving {root}/names.csv, "
        "anno_train.csv, anno_test.csv and car_data/car_data/{{train,test}}/<class name>/<image>.jpg)"),
}


def pml_class(name: str):
    """The ``pytorch_metric_learning.datasets`` class of ``name`` (``cub`` -> ``CUB``, ``cars196`` -> ``Cars196``)."""
    from pytorch_metric_learning import datasets

    return getattr(datasets, BENCHMARKS[name].class_name)


def _error(message: str):
    return DataFormatError(message)


def _remove_new(root: Path, top: Path, made_top: bool, before: set) -> None:
    """Remove what a failed download created: the highest new folder, or the new entries of ``root``."""
    if made_top:
        shutil.rmtree(top, ignore_errors=True)
    else:
        for p in sorted(set(root.rglob("*")) - before, key=lambda q: len(q.parts), reverse=True):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def download_pml_benchmark(name: str, root: Union[str, Path]) -> None:
    """Fetch ``name`` into ``root`` with its PML class (``download=True``), unless ``root`` already holds files.

    PML downloads only into a folder that does not exist or is empty; a folder with files in it is
    left as it is (the layout check then says what is missing). When the download fails (no network,
    a broken archive, Ctrl-C), every file and folder this call created is removed again and the error
    says which URL could not be fetched and how to lay the data out by hand.

    Raises:
        DataFormatError: the download failed (one line: the URL, the reason, the manual layout).
    """
    from xbn_queue.training.cli import one_line

    spec, cls = BENCHMARKS[name], pml_class(name)
    root = Path(root).expanduser()
    if root.is_dir() and any(root.iterdir()):
        return  # PML's rule: a folder with files is used as it is
    top = root.absolute()
    while not top.parent.exists() and top != top.parent:  # the highest folder this call will create
        top = top.parent
    made_top = not top.exists()
    before = set(root.rglob("*")) if root.exists() else set()
    try:
        cls(str(root), split="train", download=True)
    except BaseException as err:
        _remove_new(root, top, made_top, before)
        if not isinstance(err, Exception):
            raise
        raise _error(f"--download: could not fetch {cls.DOWNLOAD_URL} ({one_line(err)}); nothing was kept. To install "
                     f"{spec.title} by hand, {spec.manual.format(root=root)}, then run without --download") from None


def _check_layout(spec: PMLBenchmark, root: Path, download: bool) -> None:
    for rel in spec.required:
        path = root / rel
        if not path.is_file():
            hint = ("--download fetches it only into a new or empty folder" if download else
                    "--download fetches it")
            raise _error(f"{spec.name}: {path} not found: --data-root must hold the layout of "
                         f"pytorch_metric_learning.datasets.{spec.class_name} ({hint})")


def _pml_split(spec: PMLBenchmark, root: Path, split: str) -> Tuple[List[str], List[int]]:
    """PML's ``paths`` and ``labels`` of one split; a file PML cannot parse is named."""
    cls = pml_class(spec.name)
    try:
        ds = cls(str(root), split=split)
    except (ValueError, IndexError, TypeError) as err:  # a malformed line in one of the metadata files
        files = ", ".join(str(root / r) for r in spec.required)
        raise _error(f"{spec.name}: pytorch_metric_learning.datasets.{spec.class_name} cannot parse its files "
                     f"({files}): {type(err).__name__}: {' '.join(str(err).split())}") from None
    return [str(p) for p in ds.paths], [int(x) for x in ds.labels]


def load_pml_benchmark(name: str, root: Optional[Union[str, Path]], download: bool = False,
                       check_files: bool = True) -> Any:
    """CUB-200-2011 (``cub``) or Cars196 (``cars196``) as PML's classes split them (module docstring).

    Args:
        name: ``cub`` or ``cars196``.
        root: the ``--data-root`` folder (see the module docstring for the layouts).
        download: first fetch the dataset with the PML class (:func:`download_pml_benchmark`).
        check_files: check that every listed image exists (PML itself does not).

    Returns:
        A :class:`metric.data.RetrievalData`: PML's ``split="train"`` to train, PML's ``split="test"``
        retrieved leave-one-out; labels are the class ids in increasing order coded 0, 1, ...
        (``info["class_ids"]`` holds PML's ids of each split).

    Raises:
        DataFormatError: no ``root``, a missing metadata file or image (named), a file PML cannot
            parse, an empty split, or a failed download.
    """
    import numpy as np

    spec = BENCHMARKS[name]
    if root is None or str(root) == "":
        raise _error(f"--data-root is required for --dataset {name}")
    path = Path(root).expanduser()
    if download:
        download_pml_benchmark(name, path)
    if not path.is_dir():
        raise _error(f"{name}: data root {str(path)!r} does not exist or is not a directory")
    _check_layout(spec, path, download)
    splits = {}
    for split in ("train", "test"):
        paths, labels = _pml_split(spec, path, split)
        lists = " / ".join(str(path / r) for r in spec.required)
        if not paths:
            classes = spec.train_classes if split == "train" else spec.test_classes
            raise _error(f"{name}: no image of classes {classes} (PML's split={split!r}) in {lists}")
        if check_files:
            missing = next((p for p in paths if not os.path.isfile(p)), None)
            if missing is not None:
                raise _error(f"{name}: image {missing} is listed (in {lists}) but missing")
        ids, codes = np.unique(np.asarray(labels, dtype=np.int64), return_inverse=True)
        splits[split] = (Split(paths, codes.astype(np.int64)), ids.tolist())
    test = splits["test"][0]
    info = {"protocol": f"pytorch_metric_learning.datasets.{spec.class_name}: classes {spec.train_classes} train, "
                        f"{spec.test_classes} retrieved leave-one-out",
            "class_ids": {"train": splits["train"][1], "test": splits["test"][1]}}
    return RetrievalData(name, splits["train"][0], test, test, True, info)
