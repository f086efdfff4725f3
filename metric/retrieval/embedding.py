"""``embed``: a run's model over a dataset's or folder's images, into a new store or appended to one."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from xbn_queue.training.cli import UsageError, warn

from .checkpoint import PROG, LoadedModel, PathLike, load_run_model
from .index import save_index, saved_indexes
from .items import list_items, split_rule
from .store import META, STORE_FORMAT, Store, check_same_model, is_store, open_store, write_store

__all__ = ["embed", "embed_images"]


@torch.no_grad()
def embed_images(lm: LoadedModel, items: Sequence[Any], batch_size: int = 256, workers: int = 0,
                 skip_bad_images: bool = False, progress: Optional[bool] = None, names: Optional[Sequence[str]] = None,
                 desc: str = "embed") -> Tuple[np.ndarray, List[int]]:
    """Embed images with the run's evaluation transform, in batches (AMP on a GPU).

    Args:
        lm: The model (:func:`~metric.retrieval.load_run_model`).
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
    from xbn_queue.training.precision import autocast
    from xbn_queue.training.progress import progress as bar

    from ..data import BadImageError

    loader = torch.utils.data.DataLoader(_image_dataset(lm, items), batch_size=batch_size, shuffle=False,
                                         num_workers=workers, pin_memory=lm.device.type == "cuda")
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
        with autocast(True, lm.device):  # the trainers' AMP rule, always on for embedding on a GPU
            z = lm.model(x[ok].to(lm.device, non_blocking=True))  # (b, D)
        feats.append(z.float().cpu())
        kept += idx[ok].tolist()
    d = int(lm.config.embedding_dim)
    emb = torch.cat(feats).numpy() if feats else np.zeros((0, d), dtype=np.float32)
    return np.ascontiguousarray(emb, dtype=np.float32), kept


def _image_dataset(lm: LoadedModel, items: Sequence[Any]):
    """The items as the run evaluated them: through its tensor cache for in-memory images, and for image
    files when the run evaluated through the cache (decoded as the cache decodes files); else its transform."""
    from ..data import ImageDataset, Split
    from ..fastdata import CachedSplit, DecodedFileSplit, eval_resize, image_files, runs_cached, to_uint8_batch

    split = Split(list(items), np.zeros(len(items), dtype=np.int64))
    cfg = lm.config
    if runs_cached(getattr(cfg, "tensor_cache", "auto"), cfg.augment, split.items):
        # the run evaluated these in-memory images through its tensor cache: the same preprocessing here
        return CachedSplit(split, eval_resize(to_uint8_batch(split.items), int(cfg.image_size)))
    if lm.files_cached and image_files(split.items):  # decoded as the run's cache decoded its files
        return DecodedFileSplit(split, int(cfg.image_size))
    return ImageDataset(split, lm.transform, skip_bad_images=True)


@dataclasses.dataclass
class _Source:
    """Where a store's images come from: ``dataset``, its resolved ``root``, ``split`` and split ``rule``."""

    dataset: str
    root: Optional[str]
    split: str
    rule: Optional[Dict[str, Any]]


def embed(run: PathLike, out: PathLike, data_root: Optional[PathLike] = None, dataset: Optional[str] = None,
          split: Optional[str] = None, update: bool = False, overwrite: bool = False, batch_size: Optional[int] = None,
          workers: Optional[int] = None, device: str = "auto", skip_bad_images: bool = False,
          progress: Optional[bool] = None) -> Dict[str, Any]:
    """Embed every image of a dataset or folder with a run's model and write a store (see :mod:`metric.retrieval`).

    Every check (the run, the data, every image, an existing store and its indexes) passes before
    anything is written.

    Args:
        run: A run folder (``best.pt``) or a checkpoint file.
        out: The store folder.
        data_root: The images' folder (default: the run's ``--data-root``).
        dataset: ``images`` or a dataset of the trainer (default: the run's).
        split: Which part of a dataset (:func:`~metric.retrieval.list_items`; default ``test``); not for ``images``.
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
    old = _store_to_extend(out, update, overwrite, dataset, split)
    lm = load_run_model(run, device)
    src = _source(lm, old, data_root, dataset, split)
    keys, labels, items = list_items(src.dataset, src.root, src.split, src.rule)
    known = set(old.items) | set(old.meta.get("skipped", [])) if old is not None else set()
    todo = [i for i, k in enumerate(keys) if k not in known]  # positions of the images to embed now
    if old is not None and not todo:
        print(f"[{PROG}] {out}: no new images ({len(old)} in the store); nothing written", file=sys.stderr)
        return {"store": str(out), "count": len(old), "added": 0, "skipped": []}
    indexes = saved_indexes(old) if old is not None else []
    cfg = lm.config
    emb, kept = embed_images(lm, [items[i] for i in todo], batch_size or cfg.eval_batch_size,
                             cfg.workers if workers is None else workers, skip_bad_images, progress,
                             names=[keys[i] for i in todo])
    skipped = [keys[todo[j]] for j in sorted(set(range(len(todo))) - set(kept))]
    new_keys, new_labels = [keys[todo[j]] for j in kept], [labels[todo[j]] for j in kept]
    if old is None and not new_keys:
        raise UsageError(f"--data-root {src.root}: none of the {len(keys)} images could be read")
    with _lock_store(out, old, overwrite):
        _write_embedded(out, run, lm, old, emb, new_keys, new_labels, skipped, src, overwrite, indexes)
    count = len(new_keys) + (len(old) if old is not None else 0)
    print(f"[{PROG}] {out}: {len(new_keys)} image(s) embedded" + (f", {len(skipped)} skipped" if skipped else "")
          + f"; {count} rows of dimension {cfg.embedding_dim}", file=sys.stderr)
    return {"store": str(out), "count": count, "added": len(new_keys), "skipped": skipped}


def _store_to_extend(out: Path, update: bool, overwrite: bool, dataset: Optional[str],
                     split: Optional[str]) -> Optional[Store]:
    """The checks of ``--out`` / ``--update`` / ``--overwrite`` / ``--split`` before the model is loaded.

    Returns:
        The store ``--update`` extends, else ``None``.

    Raises:
        UsageError: ``--update`` with ``--overwrite``, ``--out`` a file, ``--update`` without a store, a
            store there without ``--update`` / ``--overwrite``, or ``--split`` for an image folder.
    """
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
    return old


def _source(lm: LoadedModel, old: Optional[Store], data_root: Optional[PathLike], dataset: Optional[str],
            split: Optional[str]) -> _Source:
    """Where the images come from: the options, else the store ``--update`` extends, else the run.

    Raises:
        UsageError: with ``--update``, a store of another model or of other images than these.
    """
    cfg = lm.config
    dataset = dataset or (old.meta["dataset"] if old else cfg.dataset)
    split = split or (old.meta.get("split") if old else None) or "test"
    root = data_root if data_root is not None else (old.meta.get("data_root") if old else cfg.data_root)
    root = str(Path(root).resolve()) if root else None
    if old is None:
        return _Source(dataset, root, split, split_rule(cfg, dataset))
    check_same_model(old, lm, "--out")
    for key, value in (("dataset", dataset), ("data_root", root), ("split", None if dataset == "images" else split)):
        if old.meta.get(key) != value:
            raise UsageError(f"--update: the store {old.path} was built from {key} {old.meta.get(key)}, not {value}")
    return _Source(dataset, root, split, old.meta.get("split_rule"))


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
                    new_keys: List[str], new_labels: List[str], skipped: List[str], src: _Source, overwrite: bool,
                    indexes: list) -> None:
    """Write a new store, or append to ``old`` (extending the indexes saved beside it)."""
    cfg = lm.config
    now = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    if old is None:
        meta = {"format": STORE_FORMAT, "kind": f"{PROG} embedding store", "id": uuid.uuid4().hex,
                "run": str(Path(run).resolve()), "checkpoint": str(lm.checkpoint.resolve()),
                "checkpoint_sha256": lm.sha256, "embedding_dim": int(cfg.embedding_dim), "count": len(new_keys),
                "dtype": "float32", "embedding_norm": cfg.embedding_norm,
                "similarity": "inner product" + (" (cosine: unit rows)" if cfg.embedding_norm == "l2" else ""),
                "dataset": src.dataset, "data_root": src.root, "split": None if src.dataset == "images" else src.split,
                "split_rule": src.rule, "run_dataset": cfg.dataset, "image_size": cfg.image_size, "skipped": skipped,
                "created": now, "updated": now}
        if overwrite and out.is_dir():
            for f in out.glob("index-*"):
                f.unlink()
        write_store(out, emb, new_keys, new_labels, meta)
    else:
        meta = dict(old.meta, count=len(old) + len(new_keys), updated=now,
                    skipped=sorted(set(old.meta.get("skipped", [])) | set(skipped)))
        all_emb = np.concatenate([np.asarray(old.embeddings), emb])
        for kind, index in indexes:  # extend each index saved beside the store, then save it with the store
            index.add(emb)
            save_index(out, kind, index, meta)
        write_store(out, all_emb, old.items + new_keys, old.labels + new_labels, meta)

