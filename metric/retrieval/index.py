"""The faiss indexes of a store: building one of each kind, saving it beside the store, reading it back checked."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np

from xbn_queue.training.cli import UsageError

from .store import Store

__all__ = ["build_index", "load_index", "check_index", "save_index", "INDEX_KINDS"]

INDEX_KINDS = ("flat", "ivf", "hnsw")


def require_faiss():
    """The faiss module (an ImportError naming the ``xbn-queue[retrieval]`` extra when it is missing)."""
    from xbn_queue.training._optional import require

    return require("faiss", "searching with faiss")


def build_index(embeddings: np.ndarray, kind: str = "flat", nlist: Optional[int] = None, hnsw_m: int = 32,
                seed: int = 0):
    """A faiss inner-product index of ``embeddings``.

    Args:
        embeddings: (N, D) float32.
        kind: ``flat`` (exact), ``ivf`` (``IndexIVFFlat``, trained by k-means on the rows) or ``hnsw``
            (``IndexHNSWFlat``).
        nlist: IVF clusters (default ``round(4 sqrt(N))``, at most N / 39 so that k-means has 39 rows per
            cluster, at least 1).
        hnsw_m: HNSW links per node.
        seed: k-means seed of IVF.

    Raises:
        UsageError: an unknown kind.
    """
    faiss = require_faiss()
    x = np.ascontiguousarray(embeddings, dtype=np.float32)  # (N, D)
    n, d = x.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = nlist or max(1, min(int(round(4 * np.sqrt(n))), n // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.train(x)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
    else:
        raise UsageError(f"--index {kind}: expected one of {', '.join(INDEX_KINDS)}")
    index.add(x)
    return index


def _index_paths(store_path: Path, kind: str) -> Tuple[Path, Path]:
    return store_path / f"index-{kind}.faiss", store_path / f"index-{kind}.json"


def save_index(store_path: Path, kind: str, index, meta: Dict[str, Any]) -> None:
    """Write ``index-<kind>.faiss`` (through a temporary name) and its ``.json`` naming the store id and row count."""
    faiss = require_faiss()
    path, side = _index_paths(store_path, kind)
    tmp = path.with_suffix(".faiss.tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)
    side.write_text(json.dumps({"kind": kind, "store_id": meta["id"], "count": int(index.ntotal),
                                "embedding_dim": int(index.d)}, indent=2) + "\n")


def check_index(store: Store, kind: str) -> Tuple[str, Any]:
    """Read ``index-<kind>.faiss`` and check that it indexes exactly this store's rows.

    Returns:
        ``(kind, index)``.

    Raises:
        UsageError: naming the index file, when it is unreadable or built for other rows.
    """
    faiss = require_faiss()
    path, side = _index_paths(store.path, kind)
    try:
        info = json.loads(side.read_text())
        index = faiss.read_index(str(path))
    except (OSError, ValueError, RuntimeError) as err:
        raise UsageError(f"index file {path}: unreadable ({type(err).__name__}); delete it to rebuild it") from None
    if (info.get("store_id") != store.meta["id"] or int(index.ntotal) != len(store) or int(index.d) != store.dim
            or info.get("count") != len(store)):
        raise UsageError(f"index file {path} does not match its store ({int(index.ntotal)} vectors of dimension "
                         f"{int(index.d)} for store {info.get('store_id', '?')[:8]}, the store has {len(store)} rows of "
                         f"dimension {store.dim}, id {store.meta['id'][:8]}); delete it to rebuild it")
    return kind, index


def saved_indexes(store: Store) -> list:
    """``[(kind, index)]`` of every index saved beside the store, each checked (:func:`check_index`)."""
    return [check_index(store, kind) for kind in INDEX_KINDS if _index_paths(store.path, kind)[0].exists()]


def load_index(store: Store, kind: str = "flat", save: bool = True):
    """The store's index of ``kind``: read from beside the store when there, else built (and saved).

    Raises:
        UsageError: an index file that does not match its store, or an unknown kind.
    """
    if kind not in INDEX_KINDS:
        raise UsageError(f"--index {kind}: expected one of {', '.join(INDEX_KINDS)}")
    if _index_paths(store.path, kind)[0].exists():
        return check_index(store, kind)[1]
    index = build_index(np.asarray(store.embeddings), kind)
    if save:
        save_index(store.path, kind, index, store.meta)
    return index
