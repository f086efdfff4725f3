"""The embedding store on disk: its three files, opening one (checked), writing one (atomically).

The format is in :mod:`metric.retrieval`'s docstring; :func:`metric.retrieval.embed` makes stores.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np

from xbn_queue.training.cli import UsageError

from .checkpoint import PROG, LoadedModel, PathLike

__all__ = ["Store", "open_store", "is_store", "write_store", "check_same_model", "STORE_FILES", "STORE_FORMAT"]

EMBEDDINGS, ITEMS, META = "embeddings.npy", "items.csv", "store.json"
STORE_FILES = (EMBEDDINGS, ITEMS, META)
STORE_FORMAT = 1


@dataclasses.dataclass
class Store:
    """An embedding store opened for reading.

    Attributes:
        path: The store folder.
        embeddings: (N, D) float32, memory-mapped.
        items: N item keys.
        labels: N label strings (``""``: unknown).
        meta: The content of ``store.json``.
    """

    path: Path
    embeddings: np.ndarray
    items: List[str]
    labels: List[str]
    meta: Dict[str, Any]

    def __len__(self) -> int:
        return len(self.items)

    @property
    def dim(self) -> int:
        return int(self.meta["embedding_dim"])

    @property
    def has_labels(self) -> bool:
        return any(self.labels)


def is_store(path: PathLike) -> bool:
    """True when ``path`` is a folder with a ``store.json``."""
    return (Path(path) / META).is_file()


def open_store(path: PathLike, option: str = "STORE") -> Store:
    """Open a store and check that its three files agree.

    Raises:
        UsageError: not a store, or files that do not agree (naming the file).
    """
    p = Path(path)
    if not is_store(p):
        raise UsageError(f"{option} {p}: not an embedding store (no {META}; make one with {PROG} embed)")
    try:
        meta = json.loads((p / META).read_text())
        emb = np.load(p / EMBEDDINGS, mmap_mode="r")
        with open(p / ITEMS, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, ValueError) as err:
        raise UsageError(f"{option} {p}: unreadable store ({type(err).__name__}: {err})") from None
    if not isinstance(meta, dict) or meta.get("format") != STORE_FORMAT or "embedding_dim" not in meta:
        raise UsageError(f"{p / META}: not a format-{STORE_FORMAT} {PROG} store")
    if emb.dtype != np.float32 or emb.ndim != 2 or emb.shape[1] != meta["embedding_dim"] or emb.shape[0] != meta["count"]:
        raise UsageError(f"{p / EMBEDDINGS}: holds {emb.dtype} {tuple(emb.shape)}, but {META} says float32 "
                         f"({meta['count']}, {meta['embedding_dim']})")
    if len(rows) != emb.shape[0]:
        raise UsageError(f"{p / ITEMS}: lists {len(rows)} items for {emb.shape[0]} embeddings")
    return Store(p, emb, [r["item"] for r in rows], [r["label"] for r in rows], meta)


def write_store(out: Path, emb: np.ndarray, keys: Sequence[str], labels: Sequence[str], meta: Dict[str, Any]) -> None:
    """Write the three files (each through a temporary name, then renamed)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (EMBEDDINGS + ".tmp.npy")
    np.save(tmp, np.ascontiguousarray(emb, dtype=np.float32))
    os.replace(tmp, out / EMBEDDINGS)
    tmp = out / (ITEMS + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["row", "item", "label"])
        w.writerows([i, k, lab] for i, (k, lab) in enumerate(zip(keys, labels)))
    os.replace(tmp, out / ITEMS)
    tmp = out / (META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out / META)


def check_same_model(store: Store, lm: LoadedModel, option: str) -> None:
    """Refuse a store whose embeddings come from another checkpoint or have another dimension.

    Raises:
        UsageError: naming ``option`` and the store.
    """
    if store.dim != int(lm.config.embedding_dim):
        raise UsageError(f"{option} {store.path}: a store of dimension {store.dim}, but the model {lm.checkpoint} "
                         f"embeds in dimension {lm.config.embedding_dim}")
    if store.meta.get("checkpoint_sha256") != lm.sha256:
        raise UsageError(f"{option} {store.path}: built by another model (checkpoint SHA-256 "
                         f"{str(store.meta.get('checkpoint_sha256'))[:12]}..., not {lm.checkpoint} {lm.sha256[:12]}...)")
