"""Which images a store holds: listing a dataset's or folder's images as item keys, and opening a key again."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from xbn_queue.training.cli import UsageError

from .checkpoint import PathLike
from .store import Store

__all__ = ["list_items", "split_rule", "item_opener", "open_item", "EMBED_SPLITS"]

#: ``--split`` of ``embed``: which part of a dataset to embed.
EMBED_SPLITS = ("test", "query", "gallery", "train", "all")


def _relative(item: Any, root: Optional[Path]) -> str:
    """An item's key: a path relative to ``root`` (posix), with ``#x1,y1,x2,y2`` for a crop."""
    path, box = (item, None) if isinstance(item, str) else item
    p = Path(path)
    if root is not None:
        try:
            p = p.resolve().relative_to(root.resolve())
        except ValueError:
            p = p.resolve()
    key = p.as_posix()
    return key if box is None else key + "#" + ",".join(f"{v:g}" for v in box)


def _folder_items(data_root: Optional[PathLike], option: str) -> Tuple[List[str], List[str], List[Any]]:
    """Every image file under ``data_root``; the label is the first sub-folder's name (``""`` at the top)."""
    from ..data import IMAGE_EXTENSIONS

    root = Path(data_root or "")
    if not data_root or not root.is_dir():
        raise UsageError(f"{option} {data_root}: not a folder (needed with --dataset images)")
    files = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise UsageError(f"{option} {root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in the folder or below")
    keys = [f.relative_to(root).as_posix() for f in files]
    labels = [k.split("/")[0] if "/" in k else "" for k in keys]
    return keys, labels, [str(f) for f in files]


def list_items(dataset: str, data_root: Optional[PathLike], split: str = "test", rule: Optional[Dict[str, Any]] = None,
               option: str = "--data-root"
               ) -> Tuple[List[str], List[str], List[Any]]:
    """The images ``embed`` would embed: their keys, labels and openable items.

    Args:
        dataset: ``images`` (every image file under ``data_root``, recursively; the label is the first
            sub-folder's name, empty for a file at the top) or one of :data:`metric.data.DATASETS`.
        data_root: The folder (not needed for ``digits``).
        split: For a dataset: ``test`` (the evaluation images: query and gallery), ``query``,
            ``gallery``, ``train`` or ``all``, split by ``rule``.
        rule: The split rule, keyword arguments of :func:`metric.data.load_dataset` (``split``,
            ``train_fraction``, ``split_seed``, ``max_per_class``): the run's own for its dataset
            (:func:`split_rule`); ``None``: the loaders' defaults.

    Returns:
        ``(keys, labels, items)``: N keys (unique), N label strings (``""`` unknown), N items for
        :func:`metric.data.open_image`.

    Raises:
        UsageError: an unknown split, a missing folder, or no images.
        DataFormatError: from the dataset's loader.
    """
    from ..data import load_dataset

    if dataset == "images":
        return _folder_items(data_root, option)
    if split not in EMBED_SPLITS:
        raise UsageError(f"--split {split}: expected one of {', '.join(EMBED_SPLITS)}")
    data = load_dataset(dataset, data_root, **(rule or {}))
    test = [("test", data.query)] if data.query_is_gallery else [("query", data.query), ("gallery", data.gallery)]
    parts = {"train": [("train", data.train)], "query": [("query", data.query)], "gallery": [("gallery", data.gallery)],
             "test": test, "all": [("train", data.train), *test]}
    root = Path(data_root) if data_root else None
    keys: List[str] = []
    labels: List[str] = []
    items: List[Any] = []
    for name, part in parts[split]:
        for pos, (item, label) in enumerate(zip(part.items, part.labels)):
            keys.append(f"{dataset}/{name}/{pos}" if isinstance(item, np.ndarray) else _relative(item, root))
            labels.append(str(int(label)))
            items.append(item)
    if not keys:
        raise UsageError(f"--split {split}: no images in that part of {dataset}")
    return keys, labels, items


def split_rule(run_config: Any, dataset: str) -> Optional[Dict[str, Any]]:
    """The run's split rule when ``dataset`` is the run's dataset (so ``test`` is its held-out set), else ``None``."""
    if run_config.dataset != dataset:
        return None
    rule = dict(split=run_config.split, train_fraction=run_config.train_fraction, split_seed=run_config.split_seed,
                max_per_class=run_config.max_per_class)
    rotations = getattr(run_config, "omniglot_rotations", 1)  # a run saved before the option: 1
    return rule if rotations == 1 else dict(rule, omniglot_rotations=rotations)


def open_item(item: Any):
    """An item of :func:`list_items` as a PIL image (:func:`metric.data.open_image`)."""
    from ..data import open_image

    return open_image(item)


def item_opener(store: Store) -> Callable[[str], Any]:
    """``key -> PIL image`` for a store's items (in-memory images, e.g. digits, reloaded by part and position)."""
    dataset, root = store.meta["dataset"], store.meta.get("data_root")
    parts: Dict[str, List[Any]] = {}

    def open_key(key: str):
        head, part, pos = (key.split("/") + ["", ""])[:3] if key.count("/") == 2 else ("", "", "")
        if head == dataset and dataset != "images" and pos.isdigit():
            if part not in parts:
                parts[part] = list_items(dataset, root, part, store.meta.get("split_rule"))[2]
            return open_item(parts[part][int(pos)])
        path, _, box = key.partition("#")
        item: Any = str(Path(root or "") / path)
        if box:
            item = (item, tuple(float(v) for v in box.split(",")))
        return open_item(item)

    return open_key
