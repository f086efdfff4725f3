"""Use a trained run: embed images into a store, search it with faiss, predict classes by k-NN vote.

A **store** is a folder that other tools can read without this package:

* ``embeddings.npy``: (N, D) float32, row i = item i (``numpy.load(path, mmap_mode="r")`` maps it);
* ``items.csv``: header ``row,item,label``; ``item`` is the image's path relative to the store's
  data root (``path#x1,y1,x2,y2`` for a crop, ``digits/<split>/<position>`` for the bundled digits),
  ``label`` the class name or id (empty when unknown);
* ``store.json``: the run folder, the checkpoint and its SHA-256, the embedding dimension, the row
  count, where the images came from (dataset, data root, split) and a random store id;
* ``index-<kind>.faiss`` + ``index-<kind>.json``: a faiss index of the rows (built by the first
  search with that kind, reused afterwards, extended by ``embed --update``); the JSON names the store
  id and the row count it was built for, so an index that does not match its store is refused.

Similarity: the inner product of the stored embeddings, the same one the trainer evaluates with
(:mod:`metric.evaluate`); for the default ``--embedding-norm l2`` the embeddings are unit vectors and
this is the cosine similarity. Index kinds: ``flat`` (exact, the default), ``ivf`` (inverted lists,
``nlist = 4 sqrt(N)`` clusters, ``nprobe`` of them searched) and ``hnsw`` (graph, 32 links per node,
``ef_search`` candidates); their recall and speed at SOP scale are in ``BENCHMARKS.md``. With
``faiss-gpu`` and a CUDA device the flat and IVF indexes are searched on the GPU.

k policy: ``k`` must be >= 1; a ``k`` larger than the gallery (less the query itself when a store
searches itself, leave-one-out) is clamped to the gallery's size with a note on stderr.

k-NN vote (``predict``): each of the k neighbours with a label votes for it; the prediction is the
label with the most votes, a tie going to the label of the better-ranked neighbour; the confidence
is votes / (neighbours with a label).

Top-1 accuracy (labelled queries, labelled gallery): computed by the rules of Recall@1 in
:mod:`metric.evaluate`, so that a store searching itself reports the run's Recall@1. Only queries
with at least one gallery item of their label (leaving the query itself out) count; the others are
reported as ``queries_without_positive``. Ties count against the query: a hit needs every gallery
item with the top similarity to share the query's label (faiss's order among equal similarities
does not decide it; when all k neighbours tie, the query is searched again with a larger k until
the tie ends). With the exact ``flat`` index this equals Recall@1 up to the float rounding of
similarities that differ in the last bits; ``ivf`` / ``hnsw`` may miss the best neighbour. The k-NN
vote's accuracy is over every labelled query (one whose label the gallery lacks is a miss).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from xbn_queue.training.cli import UsageError, warn

__all__ = ["LoadedModel", "Store", "SearchResult", "load_run_model", "checkpoint_of", "open_store", "list_items", "split_rule",
           "embed", "embed_images", "build_index", "load_index", "search", "knn_vote", "search_store",
           "faiss_retrieval_metrics", "embed_main", "search_main", "STORE_FILES", "INDEX_KINDS"]

PROG = "xbn-metric"
EMBEDDINGS, ITEMS, META = "embeddings.npy", "items.csv", "store.json"
STORE_FILES = (EMBEDDINGS, ITEMS, META)
INDEX_KINDS = ("flat", "ivf", "hnsw")
STORE_FORMAT = 1
#: ``--split`` of ``embed``: which part of a dataset to embed.
EMBED_SPLITS = ("test", "query", "gallery", "train", "all")
PathLike = Union[str, os.PathLike]


def _faiss():
    from xbn_queue.training._optional import require

    return require("faiss", "searching with faiss")


# ------------------------------------------------------------------------------------------ model
@dataclasses.dataclass
class LoadedModel:
    """A run's embedding model rebuilt from its checkpoint.

    Attributes:
        model: The :class:`~metric.model.MetricModel` in eval mode, on ``device``.
        config: The run's resolved :class:`~metric.config.MetricConfig` (as saved in the checkpoint).
        checkpoint: The checkpoint file.
        sha256: SHA-256 of the checkpoint file (hex).
        transform: The run's evaluation transform (PIL image -> (3, H, W) tensor).
        device: Where the model lives.
    """

    model: nn.Module
    config: Any
    checkpoint: Path
    sha256: str
    transform: Any
    device: torch.device


def checkpoint_of(run: PathLike) -> Path:
    """The checkpoint a ``RUN`` argument means: ``RUN/best.pt`` for a run folder, else ``RUN`` itself.

    Raises:
        FileNotFoundError: naming the missing file.
    """
    p = Path(run)
    ckpt = p / "best.pt" if p.is_dir() else p
    if not ckpt.is_file():
        raise FileNotFoundError(f"{ckpt}: no such checkpoint" + (" (the run has no best.pt yet)" if p.is_dir() else ""))
    return ckpt


def file_sha256(path: PathLike) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is available")
    return torch.device(device)


def load_run_model(run: PathLike, device: str = "auto") -> LoadedModel:
    """Rebuild a run's embedding model from its checkpoint, without any hub access.

    The architecture comes from the configuration saved with the checkpoint (the run's ``config.yaml``);
    the weights, including a pretrained backbone's, from the checkpoint itself.

    Args:
        run: A run folder (its ``best.pt`` is used) or a checkpoint file.
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.

    Raises:
        FileNotFoundError: no checkpoint there.
        CheckpointError: the file is not an ``xbn-metric`` checkpoint or its weights do not load.
    """
    from xbn_queue.training.checkpoint import CheckpointError, load_checkpoint
    from xbn_queue.training.config import config_from_dict

    from .config import MetricConfig
    from .model import build_model
    from .train import build_transforms

    path = checkpoint_of(run)
    ckpt = load_checkpoint(path, map_location="cpu", kind=PROG, required_keys=("config", "model"))
    try:
        cfg = config_from_dict(MetricConfig, ckpt["config"], source=str(path))
        model = build_model(cfg.backbone, cfg.embedding_dim, cfg.embedding_norm, False, None, cfg.width,
                            cfg.image_size, cfg.head)
        model.load_state_dict(ckpt["model"])
    except (ValueError, RuntimeError, KeyError, TypeError) as err:
        from xbn_queue.training.cli import one_line

        raise CheckpointError(f"{path} is not a readable {PROG} checkpoint (the model does not load: "
                              f"{one_line(err)[:160]})") from None
    dev = _device(device)
    return LoadedModel(model.to(dev).eval(), cfg, path, file_sha256(path), build_transforms(cfg)[1], dev)


# ------------------------------------------------------------------------------------------ items
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
    from .data import IMAGE_EXTENSIONS, load_dataset

    if dataset == "images":
        root = Path(data_root or "")
        if not data_root or not root.is_dir():
            raise UsageError(f"{option} {data_root}: not a folder (needed with --dataset images)")
        files = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise UsageError(f"{option} {root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in the folder or below")
        keys = [f.relative_to(root).as_posix() for f in files]
        labels = [k.split("/")[0] if "/" in k else "" for k in keys]
        return keys, labels, [str(f) for f in files]
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


# ------------------------------------------------------------------------------------------ store
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


def _write_store(out: Path, emb: np.ndarray, keys: Sequence[str], labels: Sequence[str], meta: Dict[str, Any]) -> None:
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


def _autocast(device: torch.device):
    from xbn_queue.training.precision import autocast

    return autocast(True, device)  # the trainers' AMP rule, always on for embedding on a GPU


@torch.no_grad()
def embed_images(lm: LoadedModel, items: Sequence[Any], batch_size: int = 256, workers: int = 0,
                 skip_bad_images: bool = False, progress: Optional[bool] = None, names: Optional[Sequence[str]] = None,
                 desc: str = "embed") -> Tuple[np.ndarray, List[int]]:
    """Embed images with the run's evaluation transform, in batches (AMP on a GPU).

    Args:
        lm: The model (:func:`load_run_model`).
        items: N items for :func:`metric.data.open_image` (paths, ``(path, box)``, uint8 arrays).
        batch_size: Images per batch.
        workers: Data loader worker processes.
        skip_bad_images: Leave out unreadable images (warned about, one line each) instead of stopping.
        progress: A bar (``None``: only on a terminal).
        names: N names used in messages (default: the items).
        desc: The progress bar's label.

    Returns:
        ``(embeddings (N', D) float32, kept)``: the rows of the readable images and their positions in
        ``items`` (N' = N unless images were skipped).

    Raises:
        BadImageError: an unreadable image, without ``skip_bad_images`` (naming it).
    """
    from xbn_queue.training.progress import progress as bar

    from .data import BadImageError, ImageDataset, Split
    from .fastdata import CachedSplit, eval_resize, runs_cached, to_uint8_batch

    split = Split(list(items), np.zeros(len(items), dtype=np.int64))
    cfg = lm.config
    if runs_cached(getattr(cfg, "tensor_cache", "auto"), cfg.augment, split.items):
        # the run evaluated these in-memory images through its tensor cache: the same preprocessing here
        ds = CachedSplit(split, eval_resize(to_uint8_batch(split.items), int(cfg.image_size)))
    else:
        ds = ImageDataset(split, lm.transform, skip_bad_images=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         pin_memory=lm.device.type == "cuda")
    feats: List[Tensor] = []
    kept: List[int] = []
    for x, _, idx, ok in bar(loader, desc=desc, enabled=progress, leave=False):
        for i in idx[~ok].tolist():
            name = names[i] if names is not None else items[i]
            if not skip_bad_images:
                raise BadImageError(f"cannot read image {name} (leave such images out with --skip-bad-images)")
            warn(PROG, f"skipping unreadable image {name} (--skip-bad-images)")
        if not bool(ok.any()):
            continue
        with _autocast(lm.device):
            z = lm.model(x[ok].to(lm.device, non_blocking=True))  # (b, D)
        feats.append(z.float().cpu())
        kept += idx[ok].tolist()
    d = int(lm.config.embedding_dim)
    emb = torch.cat(feats).numpy() if feats else np.zeros((0, d), dtype=np.float32)
    return np.ascontiguousarray(emb, dtype=np.float32), kept


def embed(run: PathLike, out: PathLike, data_root: Optional[PathLike] = None, dataset: Optional[str] = None,
          split: Optional[str] = None, update: bool = False, overwrite: bool = False, batch_size: Optional[int] = None,
          workers: Optional[int] = None, device: str = "auto", skip_bad_images: bool = False,
          progress: Optional[bool] = None) -> Dict[str, Any]:
    """Embed every image of a dataset or folder with a run's model and write a store (see the module docstring).

    Every check (the run, the data, every image, an existing store and its indexes) passes before
    anything is written.

    Args:
        run: A run folder (``best.pt``) or a checkpoint file.
        out: The store folder.
        data_root: The images' folder (default: the run's ``--data-root``).
        dataset: ``images`` or a dataset of the trainer (default: the run's).
        split: Which part of a dataset (:func:`list_items`; default ``test``); not for ``images``.
        update: Embed only the images not in the store yet and append them (the store must have been
            built by the same checkpoint from the same data); indexes saved beside it are extended.
        overwrite: Replace a store that ``out`` holds.
        batch_size: Images per batch (default: the run's ``--eval-batch-size``).
        workers: Data loader workers (default: the run's ``--workers``).
        device: ``auto``, ``cpu`` or ``cuda``.
        skip_bad_images: Leave out unreadable images instead of stopping.
        progress: A progress bar (``None``: only on a terminal).

    Returns:
        ``{"store": path, "count": rows in the store, "added": rows embedded now, "skipped": [names]}``.

    Raises:
        UsageError: ``out`` holds a store without ``--update`` / ``--overwrite`` (or a store of another
            model, dimension or data with ``--update``), no images, an index that does not match.
        BadImageError: an unreadable image without ``skip_bad_images``.
    """
    out = Path(out)
    if update and overwrite:
        raise UsageError("--update and --overwrite exclude each other: extend the store, or replace it")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    old: Optional[Store] = None
    if update:
        if not is_store(out):
            raise UsageError(f"--update: {out} holds no store yet; embed without --update first")
        old = open_store(out, "--out")
    elif is_store(out) and not overwrite:
        raise UsageError(f"--out {out} already holds a store: add new images with --update, replace it with "
                         "--overwrite, or choose another folder")
    if split is not None and (dataset or (old.meta["dataset"] if old else None)) == "images":
        raise UsageError(f"--split {split}: applies to the datasets, not to --dataset images (every image is embedded)")
    lm = load_run_model(run, device)
    cfg = lm.config
    dataset = dataset or (old.meta["dataset"] if old else cfg.dataset)
    split = split or (old.meta.get("split") if old else None) or "test"
    root = data_root if data_root is not None else (old.meta.get("data_root") if old else cfg.data_root)
    root = str(Path(root).resolve()) if root else None
    if old is not None:
        _check_same_model(old, lm, "--out")
        for key, value in (("dataset", dataset), ("data_root", root), ("split", None if dataset == "images" else split)):
            if old.meta.get(key) != value:
                raise UsageError(f"--update: the store {out} was built from {key} {old.meta.get(key)}, not {value}")
    rule = old.meta.get("split_rule") if old is not None else split_rule(cfg, dataset)
    keys, labels, items = list_items(dataset, root, split, rule)
    todo = list(range(len(keys)))
    if old is not None:
        known = set(old.items) | set(old.meta.get("skipped", []))
        todo = [i for i, k in enumerate(keys) if k not in known]
        if not todo:
            print(f"[{PROG}] {out}: no new images ({len(old)} in the store); nothing written", file=sys.stderr)
            return {"store": str(out), "count": len(old), "added": 0, "skipped": []}
        indexes = [_check_index(old, kind) for kind in INDEX_KINDS if (out / f"index-{kind}.faiss").exists()]
    emb, kept = embed_images(lm, [items[i] for i in todo], batch_size or cfg.eval_batch_size,
                             cfg.workers if workers is None else workers, skip_bad_images, progress,
                             names=[keys[i] for i in todo])
    skipped = [keys[todo[j]] for j in sorted(set(range(len(todo))) - set(kept))]
    new_keys = [keys[todo[j]] for j in kept]
    new_labels = [labels[todo[j]] for j in kept]
    if old is None and not new_keys:
        raise UsageError(f"--data-root {root}: none of the {len(keys)} images could be read")
    with _lock_store(out, old, overwrite):
        _write_embedded(out, run, lm, old, emb, new_keys, new_labels, skipped, dataset, root, split, rule, overwrite,
                        indexes if old is not None else [])
    count = len(new_keys) + (len(old) if old is not None else 0)
    print(f"[{PROG}] {out}: {len(new_keys)} image(s) embedded" + (f", {len(skipped)} skipped" if skipped else "")
          + f"; {count} rows of dimension {cfg.embedding_dim}", file=sys.stderr)
    return {"store": str(out), "count": count, "added": len(new_keys), "skipped": skipped}


def _lock_store(out: Path, old: Optional[Store], overwrite: bool):
    """Lock the store folder before its first write, and check it again under the lock.

    Raises:
        UsageError: another process writes into it (naming it), it holds a store now (without ``--overwrite``),
            or the store ``--update`` read has changed since.
    """
    from xbn_queue.training.cli import FolderLock

    lock = FolderLock(out, "--out", what=f"an {PROG} embed", prog=PROG).acquire()
    try:
        if old is None and is_store(out) and not overwrite:
            raise UsageError(f"--out {out} already holds a store: add new images with --update, replace it with "
                             "--overwrite, or choose another folder")
        if old is not None:
            now = json.loads((out / META).read_text()) if is_store(out) else {}
            if any(now.get(k) != old.meta.get(k) for k in ("id", "count", "updated")):
                raise UsageError(f"--update: the store {out} changed while its new images were embedded (another "
                                 "process wrote into it); run --update again")
    except BaseException:
        lock.release()
        raise
    return lock


def _write_embedded(out: Path, run: PathLike, lm: LoadedModel, old: Optional[Store], emb: np.ndarray,
                    new_keys: List[str], new_labels: List[str], skipped: List[str], dataset: str, root: Optional[str],
                    split: str, rule: Any, overwrite: bool, indexes: list) -> None:
    """Write a new store, or append to ``old`` (extending the indexes saved beside it)."""
    cfg = lm.config
    now = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    if old is None:
        meta = {"format": STORE_FORMAT, "kind": f"{PROG} embedding store", "id": uuid.uuid4().hex,
                "run": str(Path(run).resolve()), "checkpoint": str(lm.checkpoint.resolve()),
                "checkpoint_sha256": lm.sha256, "embedding_dim": int(cfg.embedding_dim), "count": len(new_keys),
                "dtype": "float32", "embedding_norm": cfg.embedding_norm,
                "similarity": "inner product" + (" (cosine: unit rows)" if cfg.embedding_norm == "l2" else ""),
                "dataset": dataset, "data_root": root, "split": None if dataset == "images" else split, "split_rule": rule,
                "run_dataset": cfg.dataset, "image_size": cfg.image_size, "skipped": skipped, "created": now,
                "updated": now}
        if overwrite and out.is_dir():
            for f in out.glob("index-*"):
                f.unlink()
        _write_store(out, emb, new_keys, new_labels, meta)
    else:
        meta = dict(old.meta, count=len(old) + len(new_keys), updated=now,
                    skipped=sorted(set(old.meta.get("skipped", [])) | set(skipped)))
        all_emb = np.concatenate([np.asarray(old.embeddings), emb])
        for kind, index in indexes:  # extend each index saved beside the store, then save it with the store
            index.add(emb)
            _save_index(out, kind, index, meta)
        _write_store(out, all_emb, old.items + new_keys, old.labels + new_labels, meta)


def _check_same_model(store: Store, lm: LoadedModel, option: str) -> None:
    """Refuse a store whose embeddings come from another checkpoint or have another dimension."""
    if store.dim != int(lm.config.embedding_dim):
        raise UsageError(f"{option} {store.path}: a store of dimension {store.dim}, but the model {lm.checkpoint} "
                         f"embeds in dimension {lm.config.embedding_dim}")
    if store.meta.get("checkpoint_sha256") != lm.sha256:
        raise UsageError(f"{option} {store.path}: built by another model (checkpoint SHA-256 "
                         f"{str(store.meta.get('checkpoint_sha256'))[:12]}..., not {lm.checkpoint} {lm.sha256[:12]}...)")


# ------------------------------------------------------------------------------------------ index
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
    faiss = _faiss()
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


def _save_index(store_path: Path, kind: str, index, meta: Dict[str, Any]) -> None:
    faiss = _faiss()
    path, side = _index_paths(store_path, kind)
    tmp = path.with_suffix(".faiss.tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)
    side.write_text(json.dumps({"kind": kind, "store_id": meta["id"], "count": int(index.ntotal),
                                "embedding_dim": int(index.d)}, indent=2) + "\n")


def _check_index(store: Store, kind: str) -> Tuple[str, Any]:
    """Read ``index-<kind>.faiss`` and check that it indexes exactly this store's rows.

    Raises:
        UsageError: naming the index file, when it is unreadable or built for other rows.
    """
    faiss = _faiss()
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


def load_index(store: Store, kind: str = "flat", save: bool = True):
    """The store's index of ``kind``: read from beside the store when there, else built (and saved).

    Raises:
        UsageError: an index file that does not match its store, or an unknown kind.
    """
    if kind not in INDEX_KINDS:
        raise UsageError(f"--index {kind}: expected one of {', '.join(INDEX_KINDS)}")
    if _index_paths(store.path, kind)[0].exists():
        return _check_index(store, kind)[1]
    index = build_index(np.asarray(store.embeddings), kind)
    if save:
        _save_index(store.path, kind, index, store.meta)
    return index


def _on_gpu(index):
    """The index moved to the GPU when faiss has GPU support and a CUDA device is present (HNSW stays)."""
    faiss = _faiss()
    if not hasattr(faiss, "StandardGpuResources") or not torch.cuda.is_available() or isinstance(index, faiss.IndexHNSW):
        return index
    try:
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    except (RuntimeError, AttributeError):  # an index type without a GPU version
        return index


# ----------------------------------------------------------------------------------------- search
@dataclasses.dataclass
class SearchResult:
    """Neighbours of each query, best first.

    Attributes:
        rows: (Q, k) int64 gallery rows (-1 where an approximate index found fewer than k).
        scores: (Q, k) float32 similarities (``-inf`` where ``rows`` is -1).
        k: Neighbours per query after clamping.
    """

    rows: np.ndarray
    scores: np.ndarray
    k: int


def search(index, queries: np.ndarray, k: int, exclude: Optional[np.ndarray] = None, nprobe: int = 16,
           ef_search: int = 64) -> SearchResult:
    """The ``k`` most similar gallery rows of each query (inner product), optionally leaving one row out.

    Args:
        index: A faiss index of the gallery (:func:`load_index`, :func:`build_index`).
        queries: (Q, D) float32.
        k: Neighbours per query, >= 1; clamped to the gallery's size (less one with ``exclude``).
        exclude: (Q,) gallery row to leave out of each query's list (leave-one-out: the query itself).
        nprobe: IVF clusters searched.
        ef_search: HNSW candidate list size.

    Raises:
        UsageError: ``k < 1``, or queries of another dimension.
    """
    faiss = _faiss()
    if k < 1:
        raise UsageError(f"--k {k}: expected an integer >= 1")
    q = np.ascontiguousarray(queries, dtype=np.float32)  # (Q, D)
    if q.ndim != 2 or q.shape[1] != index.d:
        raise UsageError(f"queries of shape {tuple(q.shape)}: expected (Q, {index.d})")
    avail = int(index.ntotal) - (1 if exclude is not None else 0)
    k = max(min(k, avail), 0)
    if k == 0:
        return SearchResult(np.zeros((len(q), 0), np.int64), np.zeros((len(q), 0), np.float32), 0)
    if isinstance(index, faiss.IndexIVF) or hasattr(index, "nprobe"):
        index.nprobe = nprobe
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = max(ef_search, k + 1)
    kk = k + (1 if exclude is not None else 0)
    scores, rows = _on_gpu(index).search(q, kk)  # (Q, kk), (Q, kk)
    if exclude is not None:
        drop = rows == exclude[:, None]  # (Q, kk) the excluded row, at most once per line
        drop[~drop.any(1), -1] = True  # not found among the kk: drop the last instead
        keep = ~drop
        rows = rows[keep].reshape(len(q), k)
        scores = scores[keep].reshape(len(q), k)
    scores = np.where(rows < 0, -np.inf, scores).astype(np.float32)
    return SearchResult(rows.astype(np.int64), scores, k)


def knn_vote(labels: Sequence[str]) -> Tuple[Optional[str], float, int]:
    """The k-NN vote over neighbours' labels, best-ranked first (see the module docstring).

    Args:
        labels: The k neighbours' labels in rank order (``""``: unknown, not voting).

    Returns:
        ``(label or None, confidence in [0, 1], votes)``.
    """
    votes: Dict[str, int] = {}
    first: Dict[str, int] = {}
    for rank, lab in enumerate(labels):
        if lab:
            votes[lab] = votes.get(lab, 0) + 1
            first.setdefault(lab, rank)
    if not votes:
        return None, 0.0, 0
    best = min(votes, key=lambda lab: (-votes[lab], first[lab]))
    return best, votes[best] / sum(votes.values()), votes[best]


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UsageError(f"--k {k}: expected an integer >= 1")


def search_store(store: PathLike, query: PathLike, k: int = 10, index: str = "flat", predict: bool = False,
                 run: Optional[PathLike] = None, out: Optional[PathLike] = None, html: Optional[PathLike] = None,
                 sheet: Optional[PathLike] = None, show: int = 20, overwrite: bool = False, nprobe: int = 16,
                 ef_search: int = 64, device: str = "auto", skip_bad_images: bool = False,
                 progress: Optional[bool] = None, quiet: bool = False) -> Dict[str, Any]:
    """Search a store with query images (or another store), optionally predicting classes; write the results.

    Args:
        store: The gallery store.
        query: An image file, a folder of images (searched recursively; the first sub-folder's name is
            the label), or a store (its embeddings are the queries; the gallery store itself means
            leave-one-out: each row's own entry is left out).
        k: Neighbours per query (>= 1; clamped to the gallery with a note).
        index: ``flat``, ``ivf`` or ``hnsw``; built on first use and saved beside the store.
        predict: Add the k-NN vote (needs gallery labels).
        run: The model for query images (default: the checkpoint the store records; it must have the
            recorded SHA-256).
        out: ``results.json`` or ``results.csv``.
        html: A self-contained HTML page of ``show`` queries (evenly spaced over all) and their neighbours.
        sheet: A PNG contact sheet of the same.
        show: Queries shown in ``html`` / ``sheet``.
        overwrite: Replace existing ``out`` / ``html`` / ``sheet`` files.
        nprobe, ef_search: See :func:`search`.
        device: For embedding query images.
        skip_bad_images: Leave out unreadable query images.
        progress: A progress bar while embedding (``None``: on a terminal).
        quiet: Do not print the neighbours to stdout.

    Returns:
        ``{"k", "index", "results": [{"query", "query_label", "neighbours": [{"rank", "item", "label",
        "score"}], "prediction"?: {"label", "confidence", "votes"}}], "top1_accuracy"?,
        "queries_without_positive"?, "knn_accuracy"?}`` (when the gallery has labels and some query a
        known label: ``top1_accuracy`` by the rules of Recall@1, over the labelled queries with a
        positive, ties against the query, see the module docstring; ``knn_accuracy`` over every
        labelled query).

    Raises:
        UsageError: bad ``k``, a query store or model of another model or dimension, an index that does
            not match, ``--predict`` without gallery labels, an output file that exists, no query images.
        BadImageError: an unreadable query image without ``skip_bad_images``.
    """
    _check_k(k)
    outputs = {"--out": out, "--html": html, "--sheet": sheet}
    if out is not None and Path(out).suffix.lower() not in (".json", ".csv"):
        raise UsageError(f"--out {out}: expected a .json or .csv file")
    if html is not None and Path(html).suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"--html {html}: expected an .html file")
    if sheet is not None and Path(sheet).suffix.lower() != ".png":
        raise UsageError(f"--sheet {sheet}: expected a .png file")
    for opt, path in outputs.items():
        if path is not None and Path(path).exists() and not overwrite:
            raise UsageError(f"{opt} {path}: exists; replace it with --overwrite or choose another name")
    if show < 1:
        raise UsageError(f"--show {show}: expected an integer >= 1")
    if index not in INDEX_KINDS:
        raise UsageError(f"--index {index}: expected one of {', '.join(INDEX_KINDS)}")
    gallery = open_store(store)
    if predict and not gallery.has_labels:
        raise UsageError(f"--predict: the store {gallery.path} has no labels to vote with")
    exclude = None
    if is_store(query):
        qs = open_store(query, "--query")
        if qs.dim != gallery.dim:
            raise UsageError(f"--query {query}: a store of dimension {qs.dim}, the gallery {gallery.path} has {gallery.dim}")
        if qs.meta.get("checkpoint_sha256") != gallery.meta.get("checkpoint_sha256"):
            raise UsageError(f"--query {query}: built by another model than the gallery {gallery.path} "
                             "(their checkpoints' SHA-256 differ)")
        q_emb, q_keys, q_labels = np.asarray(qs.embeddings), qs.items, qs.labels
        if qs.meta["id"] == gallery.meta["id"]:
            exclude = np.arange(len(gallery), dtype=np.int64)
        q_open = _opener(qs)
    else:
        lm = load_run_model(run if run is not None else gallery.meta["checkpoint"], device)
        _check_same_model(gallery, lm, "STORE")
        qp = Path(query)
        if qp.is_dir():
            q_keys, q_labels, q_items = list_items("images", qp, option="--query")
        elif qp.is_file():
            q_keys, q_labels, q_items = [qp.name], [""], [str(qp)]
        else:
            raise FileNotFoundError(f"--query {query}: no such image, folder or store")
        q_emb, kept = embed_images(lm, q_items, lm.config.eval_batch_size, 0, skip_bad_images, progress, names=q_keys,
                                   desc="queries")
        q_keys, q_labels = [q_keys[i] for i in kept], [q_labels[i] for i in kept]
        if not q_keys:
            raise UsageError(f"--query {query}: no readable image")
        q_paths = {k: q_items[i] for k, i in zip(q_keys, kept)}
        q_open = lambda key: _open_path(q_paths[key])  # noqa: E731
    avail = len(gallery) - (1 if exclude is not None else 0)
    if k > avail:
        warn(PROG, f"--k {k} is more than the {avail} gallery items" + (" (leave-one-out)" if exclude is not None else "")
             + f": using --k {avail}")
    idx = load_index(gallery, index)
    res = search(idx, q_emb, k, exclude, nprobe=nprobe, ef_search=ef_search)
    results = []
    top1 = knn = n_known = n_pos = 0
    label_count: Dict[str, int] = {}
    for lab in gallery.labels:
        label_count[lab] = label_count.get(lab, 0) + 1
    for qi, (key, qlab) in enumerate(zip(q_keys, q_labels)):
        nbrs = [{"rank": r + 1, "item": gallery.items[g], "label": gallery.labels[g], "score": float(s)}
                for r, (g, s) in enumerate(zip(res.rows[qi].tolist(), res.scores[qi].tolist())) if g >= 0]
        entry: Dict[str, Any] = {"query": key, "query_label": qlab or None, "neighbours": nbrs}
        if predict:
            lab, conf, votes = knn_vote([n["label"] for n in nbrs])
            entry["prediction"] = {"label": lab, "confidence": conf, "votes": votes}
        if qlab and gallery.has_labels:
            n_known += 1
            knn += predict and entry["prediction"]["label"] == qlab
            if label_count.get(qlab, 0) - (1 if exclude is not None else 0) > 0:  # has a positive, as Recall@1 asks
                n_pos += 1
                top1 += _top1_hit(idx, q_emb, qi, res, exclude, gallery.labels, qlab, avail, nprobe, ef_search)
        results.append(entry)
    summary: Dict[str, Any] = {"store": str(gallery.path), "query": str(query), "k": res.k, "index": index,
                               "similarity": gallery.meta.get("similarity"), "leave_one_out": exclude is not None,
                               "results": results}
    if n_known:
        summary["top1_accuracy"] = top1 / n_pos if n_pos else float("nan")
        summary["queries_without_positive"] = n_known - n_pos
        line = (f"[{PROG}] {n_known} labelled queries: top-1 neighbour of the same label (Recall@1: over the {n_pos} "
                f"with a positive, ties against the query) {100 * top1 / max(n_pos, 1):.2f}%")
        if predict:
            summary["knn_accuracy"] = knn / n_known
            line += f", k-NN vote (k={res.k}) accuracy {100 * knn / n_known:.2f}%"
        print(line, file=sys.stderr)
    if out is not None:
        _write_results(Path(out), summary)
    if html is not None or sheet is not None:
        from .visualize import write_html, write_sheet

        picks = sorted(set(np.linspace(0, len(results) - 1, min(show, len(results))).round().astype(int).tolist()))
        shown = [results[i] for i in picks]  # evenly spaced over the queries: many classes, not the first one
        if html is not None:
            write_html(Path(html), shown, q_open, _opener(gallery))
        if sheet is not None:
            write_sheet(Path(sheet), shown, q_open, _opener(gallery))
    if not quiet and out is None:
        for entry in results:
            pred = entry.get("prediction")
            print(entry["query"] + (f"  -> {pred['label']} ({pred['confidence']:.2f})" if pred else ""))
            for n in entry["neighbours"]:
                print(f"  {n['rank']:>3}  {n['score']:+.4f}  {n['item']}" + (f"  [{n['label']}]" if n["label"] else ""))
    return summary


def _top1_hit(index, q_emb: np.ndarray, qi: int, res: SearchResult, exclude: Optional[np.ndarray],
              labels: Sequence[str], qlab: str, avail: int, nprobe: int, ef_search: int) -> bool:
    """Whether query ``qi`` is a Recall@1 hit: every gallery item at the top similarity has its label.

    A tie between a positive and a negative at the top counts against the query, as in
    :mod:`metric.evaluate`. When all returned neighbours share the top similarity the tie may go on
    past them, so the query is searched again with twice the k until it ends (or the gallery does).
    """
    rows, scores = res.rows[qi], res.scores[qi]  # (k,), (k,)
    k = res.k
    while k > 0 and k < avail and bool(np.all(scores == scores[0])):
        k = min(2 * k, avail)
        again = search(index, q_emb[qi : qi + 1], k, None if exclude is None else exclude[qi : qi + 1],
                       nprobe=nprobe, ef_search=ef_search)
        rows, scores = again.rows[0], again.scores[0]
    if k == 0 or rows[0] < 0:
        return False
    top = rows[(scores == scores[0]) & (rows >= 0)]  # gallery rows at the top similarity
    return all(labels[g] == qlab for g in top.tolist())


def _write_results(path: Path, summary: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps(summary, indent=1) + "\n")
        return
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["query", "query_label", "rank", "item", "label", "score", "predicted", "confidence"])
        for e in summary["results"]:
            pred = e.get("prediction") or {}
            for n in e["neighbours"]:
                w.writerow([e["query"], e["query_label"] or "", n["rank"], n["item"], n["label"], f"{n['score']:.6f}",
                            pred.get("label") or "", f"{pred['confidence']:.4f}" if pred else ""])


def _open_path(item: Any):
    from .data import open_image

    return open_image(item)


def _opener(store: Store):
    """``key -> PIL image`` for a store's items (in-memory images, e.g. digits, reloaded by part and position)."""
    dataset, root = store.meta["dataset"], store.meta.get("data_root")
    parts: Dict[str, List[Any]] = {}

    def open_key(key: str):
        head, part, pos = (key.split("/") + ["", ""])[:3] if key.count("/") == 2 else ("", "", "")
        if head == dataset and dataset != "images" and pos.isdigit():
            if part not in parts:
                parts[part] = list_items(dataset, root, part, store.meta.get("split_rule"))[2]
            return _open_path(parts[part][int(pos)])
        path, _, box = key.partition("#")
        item: Any = str(Path(root or "") / path)
        if box:
            item = (item, tuple(float(v) for v in box.split(",")))
        return _open_path(item)

    return open_key


# --------------------------------------------------------------------------------- evaluation
def faiss_retrieval_metrics(query: Tensor, query_labels: Tensor, gallery: Optional[Tensor] = None,
                            gallery_labels: Optional[Tensor] = None, ks: Sequence[int] = (1, 10, 100, 1000),
                            query_is_gallery: bool = False, chunk_size: int = 2048,
                            map_at_r: bool = True) -> Dict[str, float]:
    """Recall@K, MAP@R and R-Precision through an exact faiss search: the same definitions and tie rule as
    :func:`metric.evaluate.retrieval_metrics` (same arguments, same result keys).

    Each query's ``max(max(ks), R_max)`` nearest gallery items (plus itself in leave-one-out) come
    from ``IndexFlatIP``; within a run of equal similarities negatives are put before positives
    (ties count against the query). The two can differ only where the similarities themselves do:
    faiss's float32 matrix product rounds a similarity differently from torch's (by up to ~4e-7 for
    unit vectors), which can swap two items whose similarities are that close, and a tie that
    straddles the end of the list. On trained embeddings Recall@K agrees exactly and MAP@R to 1e-5
    (``tests/metric/test_faiss_eval.py``).

    Returns:
        ``{"recall@K", "map@r", "r_precision", "num_queries", "queries_without_positive"}``.

    Raises:
        ValueError: as :func:`metric.evaluate.retrieval_metrics` (shapes, non-finite features).
    """
    from .evaluate import check_retrieval_inputs

    gallery, gallery_labels, query_is_gallery, ks = check_retrieval_inputs(query, query_labels, gallery, gallery_labels,
                                                                           ks, query_is_gallery)
    xq = query.detach().float().cpu().numpy()  # (Q, D)
    xg = gallery.detach().float().cpu().numpy()  # (G, D)
    if not (np.isfinite(xq).all() and np.isfinite(xg).all()):
        raise ValueError("retrieval_metrics: features contain NaN or Inf")
    lq = query_labels.detach().cpu().numpy().astype(np.int64)  # (Q,)
    lg = gallery_labels.detach().cpu().numpy().astype(np.int64)  # (G,)
    n_q, n_g = len(xq), len(xg)
    uniq, counts = np.unique(lg, return_counts=True)
    pos = dict(zip(uniq.tolist(), counts.tolist()))
    n_pos = np.array([pos.get(int(c), 0) for c in lq], dtype=np.int64) - int(query_is_gallery)  # (Q,) R
    has_pos = n_pos > 0
    r_max = int(n_pos.max()) if n_q else 0
    depth = min(n_g - int(query_is_gallery), max(ks[-1], r_max))
    index = build_index(xg, "flat")
    hits = {k: 0 for k in ks}
    map_sum = rp_sum = 0.0
    for s in range(0, n_q, chunk_size):
        e = min(s + chunk_size, n_q)
        res = search(index, xq[s:e], max(depth, 1), np.arange(s, e) if query_is_gallery else None)
        rel = lg[res.rows] == lq[s:e, None]  # (c, depth) relevant
        order = np.lexsort((rel, -res.scores), axis=1)  # per row: score descending, negatives first among ties
        rel = np.take_along_axis(rel, order, axis=1)  # (c, depth) pessimistic ranking
        first = np.where(rel.any(1), rel.argmax(1), n_g)  # (c,) 0-based rank of the first positive
        ok = has_pos[s:e]
        for k in ks:
            hits[k] += int(((first < k) & ok).sum())
        if map_at_r:
            r = n_pos[s:e]  # (c,)
            ranks = np.arange(1, rel.shape[1] + 1)  # (depth,)
            prec = np.cumsum(rel, axis=1) / ranks  # (c, depth) P(i)
            use = rel & (ranks[None, :] <= r[:, None])  # (c, depth) rel(i), i <= R
            ap = (prec * use).sum(1)  # (c,)
            map_sum += float(np.where(ok, ap / np.maximum(r, 1), 0.0).sum())
            rp_sum += float(np.where(ok, use.sum(1) / np.maximum(r, 1), 0.0).sum())  # positives among the first R
    n_valid = int(has_pos.sum())
    out: Dict[str, float] = {f"recall@{k}": hits[k] / n_valid if n_valid else float("nan") for k in ks}
    if map_at_r:
        out["map@r"] = map_sum / n_valid if n_valid else float("nan")
        out["r_precision"] = rp_sum / n_valid if n_valid else float("nan")
    out["num_queries"] = n_valid
    out["queries_without_positive"] = n_q - n_valid
    return out


# --------------------------------------------------------------------------------------- commands
EMBED_DESCRIPTION = f"""Embed every image of a dataset or folder with a trained run's model and write an embedding store
(OUT/embeddings.npy: (N, D) float32, memory-mappable; OUT/items.csv: row,item,label; OUT/store.json: the
run, the checkpoint's SHA-256, the dimension, the source). The model is rebuilt from the checkpoint's own
configuration (no hub access) and uses the run's evaluation transform; batches run on the GPU with AMP when
there is one. --update embeds only the images not in the store yet (and extends the indexes saved beside it).
Exit status: 0 done; 2 bad input (one line, nothing written)."""

SEARCH_DESCRIPTION = f"""Find the nearest gallery images of each query in an embedding store, by the similarity the run was
evaluated with (inner product; cosine for L2-normalised embeddings), with faiss. The index is built on
first use, saved beside the store (index-<kind>.faiss) and reused. --k must be >= 1; a --k larger than the
gallery is clamped to it with a note. --query may be an image, a folder of images (sub-folder names are
labels), or a store: the gallery store itself searches it leave-one-out (each item's own entry left out).
Exit status: 0 done; 2 bad input (one line, nothing written)."""


def _device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the model runs (default: auto)")
    p.add_argument("--skip-bad-images", action="store_true", help="warn about and leave out unreadable images instead of stopping")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: only on a terminal)")


def embed_main(argv: List[str]) -> int:
    """``xbn-metric embed RUN --out DIR [...]``; returns the exit status."""
    from xbn_queue.training.config import _OneLineParser

    from .data import DATASETS

    p = _OneLineParser(prog=f"{PROG} embed", description=EMBED_DESCRIPTION)
    p.add_argument("run", metavar="RUN", help="run folder (its best.pt) or checkpoint file")
    p.add_argument("--out", required=True, help="the store folder")
    p.add_argument("--data-root", help="the images' folder (default: the run's --data-root)")
    p.add_argument("--dataset", choices=["images", *DATASETS],
                   help="images (every image file under --data-root; a first-level sub-folder is the label) or a "
                        "dataset of the trainer (default: the run's)")
    p.add_argument("--split", choices=EMBED_SPLITS,
                   help="part of a dataset, split by the run's own rule: test (its held-out images, default), "
                        "query, gallery, train or all")
    p.add_argument("--update", action="store_true", help="embed only images not in the store yet, and append them")
    p.add_argument("--overwrite", action="store_true", help="replace the store --out holds")
    p.add_argument("--batch-size", type=int, help="images per batch (default: the run's --eval-batch-size)")
    p.add_argument("--workers", type=int, help="data loader workers (default: the run's)")
    _device_arg(p)
    a = p.parse_args(argv[1:])
    for opt, v in (("--batch-size", a.batch_size), ("--workers", a.workers)):
        if v is not None and v < (1 if opt == "--batch-size" else 0):
            raise UsageError(f"{opt} {v}: expected an integer >= {1 if opt == '--batch-size' else 0}")
    embed(a.run, a.out, a.data_root, a.dataset, a.split, a.update, a.overwrite, a.batch_size, a.workers, a.device,
          a.skip_bad_images, a.progress)
    return 0


def search_main(argv: List[str]) -> int:
    """``xbn-metric search STORE --query IMG_OR_DIR [...]``; returns the exit status."""
    from xbn_queue.training.config import _OneLineParser

    p = _OneLineParser(prog=f"{PROG} search", description=SEARCH_DESCRIPTION)
    p.add_argument("store", metavar="STORE", help="the gallery store (made by embed)")
    p.add_argument("--query", required=True, help="an image, a folder of images, or a store")
    p.add_argument("--k", type=int, default=10, help="neighbours per query (default: 10) [valid: >= 1]")
    p.add_argument("--index", default="flat", choices=INDEX_KINDS,
                   help="flat (exact, default), ivf or hnsw (approximate, for large galleries; see BENCHMARKS.md)")
    p.add_argument("--nprobe", type=int, default=16, help="ivf: clusters searched (default: 16)")
    p.add_argument("--ef-search", type=int, default=64, help="hnsw: candidate list size (default: 64)")
    p.add_argument("--predict", action="store_true", help="add a k-NN class vote and its confidence (gallery labels needed)")
    p.add_argument("--out", help="write the results to a .json or .csv file (default: print them)")
    p.add_argument("--html", metavar="PAGE", help="a self-contained .html page of queries and neighbours")
    p.add_argument("--sheet", metavar="PNG", help="a .png contact sheet of queries and neighbours")
    p.add_argument("--show", type=int, default=20, help="queries shown in --html / --sheet, evenly spaced over all queries (default: 20)")
    p.add_argument("--run", help="model for query images (default: the checkpoint the store records)")
    p.add_argument("--overwrite", action="store_true", help="replace existing --out / --html / --sheet files")
    _device_arg(p)
    a = p.parse_args(argv[1:])
    for opt, v in (("--nprobe", a.nprobe), ("--ef-search", a.ef_search)):
        if v < 1:
            raise UsageError(f"{opt} {v}: expected an integer >= 1")
    search_store(a.store, a.query, a.k, a.index, a.predict, a.run, a.out, a.html, a.sheet, a.show, a.overwrite,
                 a.nprobe, a.ef_search, a.device, a.skip_bad_images, a.progress)
    return 0
