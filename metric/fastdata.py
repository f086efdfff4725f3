"""The in-memory fast path of the metric trainer: decode once, augment whole batches on the device.

For a small dataset whose images are already in memory (``omniglot``, ``digits``) and the mild
from-scratch augmentation (``--augment mild``), per-image PIL work in worker processes costs more
than the Conv-4 it feeds. ``--tensor-cache`` (default ``auto``: on exactly then) replaces it:

* every training image is resized once to ``image_size`` x ``image_size`` and kept as a uint8
  tensor ``(N, C, S, S)`` (on the training device);
* each batch is gathered by index and augmented at once by :class:`TensorMildAugment`, whose random
  parameters come from a generator seeded by the batch's own augmentation seed
  (:class:`metric.sampler.MPerClassBatches`), so a resumed run sees the same augmentations;
* the evaluation images (training split for the probe and staleness, query, gallery) go through the
  evaluation transform (resize of the shorter side to ``floor(S / 0.875)``, centre crop ``S``, as
  timm's) once, batched, and are kept as uint8 tensors.

Image files (``--dataset folder``, ``sop``, ``cub``, ...) take the same path when their decoded copies fit
``--tensor-cache-max-mb`` (default :data:`DEFAULT_MAX_MB`): each file is decoded once with PIL (as the
per-image path opens it: RGB, a box crop for ``(path, box)`` items; kept as one channel when the three
are equal), resized for training (``S`` x ``S``, bilinear, antialiased: a non-square image is squeezed,
so its crops are drawn in that square frame) and for evaluation (:func:`eval_resize`, which keeps the
aspect ratio). Above the limit ``auto`` loads them per image with PIL and says so in one line; ``on`` is
refused. With ``--tensor-cache-dir DIR`` the decoded copies are also kept on disk (one file per image
root and size, :class:`DecodedFiles`), each entry keyed by the file's path, size and modification time,
so a later run decodes only files that were added or changed; without it they live in memory for the
run only. Equal-sized files give the very tensors of the in-memory path (tests), so a folder of the
embedded Omniglot PNGs trains exactly as ``--dataset omniglot``.

The augmentation is torchvision's ``RandomResizedCrop(S, scale=(crop_min_scale, 1))`` ->
``RandomAffine(10, translate=(0.05, 0.05))`` -> ``RandomHorizontalFlip(hflip)`` -> ``Normalize`` ->
``RandomErasing(re_prob)`` with every parameter drawn by torchvision's rules, applied through one
sampling grid (:func:`xbn_queue.training.augment.crop_affine_grid`): the crop is taken from the
image already resized to ``S`` (bilinear, antialiased; not from the original pixels) and resampled
bilinearly once, where the per-image pipeline crops the original with PIL's bicubic filter and rotates
with nearest neighbour. On Omniglot (105 px -> 32 px) the two differ by a mean of 0.13-0.14 (max
0.65) in [0, 1] over the non-background pixels for the same crop, angle and shift
(``benchmarks/fastdata_vs_pil.py``, docs/metric.md); each operation alone equals torchvision's on the
32-px image (tests).
"""

from __future__ import annotations

import hashlib
import math
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from xbn_queue.training.augment import crop_affine_grid, erase, sample_crops, sample_erasing
from xbn_queue.training.cli import UsageError

from .data import BadImageError, RetrievalData, Split, open_image

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "TensorMildAugment", "TensorCache", "CachedSplit", "use_tensor_cache",
           "tensor_cache_plan", "equal_sized_in_memory", "image_files", "runs_cached", "DEFAULT_MAX_MB",
           "DecodedFiles", "decode_files", "DecodedFileSplit", "check_cache_dir", "eval_resize", "to_uint8_batch", "cached_batches"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: timm's default evaluation crop: resize the shorter side to ``floor(S / 0.875)``, then centre-crop ``S``.
EVAL_CROP_PCT = 0.875


def normalize(x_u8: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """``(B, C, H, W)`` uint8 (``C`` 1 or 3) -> ``(B, 3, H, W)`` float32 ``(x / 255 - mean) / std``."""
    x = x_u8.float().div_(255.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


class TensorMildAugment:
    """The ``--augment mild`` pipeline on a whole uint8 batch (see the module docstring).

    Args:
        size: output side ``S``.
        crop_min_scale: lower bound of the random-resized-crop area.
        degrees: rotation range +-``degrees``.
        translate: fraction of ``S`` of the largest shift (torchvision rounds it to whole pixels).
        hflip: probability of a horizontal flip.
        re_prob: probability of random erasing (value 0, on the normalised image).
        mean, std: normalisation.
    """

    def __init__(self, size: int, crop_min_scale: float, degrees: float = 10.0, translate: float = 0.05,
                 hflip: float = 0.0, re_prob: float = 0.0, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        self.size, self.scale = int(size), (float(crop_min_scale), 1.0)
        self.degrees, self.translate, self.hflip, self.re_prob = float(degrees), float(translate), float(hflip), float(re_prob)
        self.mean, self.std = tuple(mean), tuple(std)

    def sample_params(self, batch: int, height: int, width: int, generator: Optional[torch.Generator] = None) -> Dict[str, Tensor]:
        """Every random parameter of a batch, drawn on the CPU by torchvision's rules.

        Returns:
            ``crop`` (B, 4) top/left/h/w, ``angle`` (B,) degrees, ``translate`` (B, 2) whole output
            pixels, ``flip`` (B,) bool, ``erase`` (B, 4) top/left/h/w (h = w = 0: none).
        """
        g, S = generator, self.size
        crop = sample_crops(batch, height, width, self.scale, generator=g)
        angle = torch.empty(batch).uniform_(-self.degrees, self.degrees, generator=g)
        max_d = self.translate * S
        shift = torch.round(torch.empty(batch, 2).uniform_(-max_d, max_d, generator=g))
        flip = torch.rand(batch, generator=g) < self.hflip
        boxes = sample_erasing(batch, S, S, self.re_prob, generator=g)
        return {"crop": crop, "angle": angle, "translate": shift, "flip": flip, "erase": boxes}

    def apply(self, images: Tensor, params: Dict[str, Tensor]) -> Tensor:
        """``(B, C, H, W)`` uint8 on any device -> ``(B, 3, S, S)`` float32, normalised, on that device."""
        dev = images.device
        p = {k: v.to(dev, non_blocking=True) for k, v in params.items()}
        grid, valid = crop_affine_grid(p["crop"], p["angle"], p["translate"], p["flip"], images.shape[-2:], self.size)
        x = F.grid_sample(images.float().div_(255.0), grid, mode="bilinear", padding_mode="border", align_corners=False)
        x = (x * valid).clamp_(0.0, 1.0)  # torchvision fills outside the rotated crop with 0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        m = torch.tensor(self.mean, device=dev).view(1, 3, 1, 1)
        s = torch.tensor(self.std, device=dev).view(1, 3, 1, 1)
        x = (x - m) / s
        return erase(x, p["erase"]) if self.re_prob > 0 else x

    def __call__(self, images: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        params = self.sample_params(images.shape[0], images.shape[-2], images.shape[-1], generator)
        return self.apply(images, params)


def to_uint8_batch(items: Sequence[np.ndarray]) -> Tensor:
    """Equal-sized in-memory images (``(H, W)`` gray or ``(H, W, 3)``) -> ``(N, C, H, W)`` uint8."""
    arr = np.stack([np.asarray(a, dtype=np.uint8) for a in items])
    t = torch.from_numpy(arr)
    return t.unsqueeze(1) if t.dim() == 3 else t.permute(0, 3, 1, 2).contiguous()


def _resize(x: Tensor, size: Tuple[int, int], mode: str) -> Tensor:
    """uint8 ``(N, C, H, W)`` -> uint8 ``(N, C, *size)`` with antialiasing (PIL-like), in chunks."""
    out = []
    for chunk in x.split(1024):
        y = F.interpolate(chunk.float(), size=size, mode=mode, antialias=True, align_corners=False)
        out.append(y.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out) if out else x.new_zeros((0, x.shape[1], *size))


def eval_resize(x: Tensor, size: int) -> Tensor:
    """The evaluation geometry on a uint8 batch: shorter side to ``floor(S / 0.875)`` (bicubic), centre crop ``S``."""
    H, W = x.shape[-2:]
    short = int(math.floor(size / EVAL_CROP_PCT))
    nh, nw = (short, max(short, int(short * W / H))) if H <= W else (max(short, int(short * H / W)), short)
    y = _resize(x, (nh, nw), "bicubic")
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return y[..., top:top + size, left:left + size].contiguous()


#: ``--tensor-cache-max-mb``'s default: image files whose decoded copies would take more are loaded per image.
DEFAULT_MAX_MB = 1024
#: The layout of a ``--tensor-cache-dir`` file (a file of another version is decoded again and replaced).
CACHE_VERSION = 1
#: Files decoded and resized together (bounds the memory of the full-size images held at once).
DECODE_CHUNK = 256

Item = Union[str, Tuple[str, Tuple[float, float, float, float]], np.ndarray]


def equal_sized_in_memory(items: Sequence[object]) -> bool:
    """Whether every item is an in-memory image array (``digits``, ``omniglot``) of one shape."""
    return bool(items) and all(isinstance(i, np.ndarray) for i in items) and len({np.shape(i) for i in items}) == 1


def image_files(items: Sequence[object]) -> bool:
    """Whether every item is an image file: a path, or a ``(path, box)`` crop (DeepFashion2)."""
    return bool(items) and all(isinstance(i, (str, os.PathLike)) or (isinstance(i, tuple) and len(i) == 2)
                               for i in items)


def decoded_mib(n_files: int, image_size: int) -> float:
    """MiB that the decoded copies of ``n_files`` image files take at most: two ``(3, S, S)`` uint8 copies each."""
    return n_files * 2 * 3 * image_size ** 2 / 2 ** 20


def runs_cached(tensor_cache: str, augment: str, items: Sequence[object]) -> bool:
    """Whether a run with these options evaluated in-memory ``items`` through the cache (so embedding them again must too)."""
    return tensor_cache != "off" and (tensor_cache == "on" or augment == "mild") and equal_sized_in_memory(items)


def tensor_cache_plan(mode: str, augment: str, data: RetrievalData, image_size: Optional[int] = None,
                      max_mb: float = DEFAULT_MAX_MB) -> Tuple[bool, str]:
    """Whether a run takes the fast path, and the line that says why not when image files are too many.

    ``off``: never. ``auto``: with ``--augment mild``, for equal-sized in-memory images, and for image files
    (when ``image_size`` is given) whose copies (:func:`decoded_mib` of the distinct files) fit ``max_mb``.
    ``on``: the same data with any augmentation (the batched mild augmentation replaces it).

    Returns:
        ``(use, note)``: ``note`` is one line for the log when ``auto`` would cache image files but they take
        more than ``max_mb`` ("" otherwise).

    Raises:
        UsageError: ``on`` with data the cache cannot hold (naming ``--tensor-cache-max-mb`` when it is the size).
    """
    if mode == "off":
        return False, ""
    wanted = mode == "on" or augment == "mild"
    splits = [data.train, data.query] + ([] if data.query_is_gallery else [data.gallery])
    items = [i for s in splits for i in s.items]
    nonempty = all(len(s) for s in splits)
    if nonempty and equal_sized_in_memory(items):
        return wanted, ""
    if nonempty and image_size is not None and image_files(items):
        n = len({_key(i) for i in items})
        need = decoded_mib(n, image_size)
        if need <= max_mb:
            return wanted, ""
        why = f"{n:,} image files decoded at {image_size} px take {need:,.0f} MiB, more than --tensor-cache-max-mb {max_mb:g}"
        if mode == "on":
            raise UsageError(f"--tensor-cache on: {why}; raise --tensor-cache-max-mb or use --tensor-cache auto")
        return False, (f"--tensor-cache auto: {why}; loading them per image with PIL" if wanted else "")
    if mode == "on":
        raise UsageError("--tensor-cache on: needs equal-sized in-memory images (--dataset omniglot or digits) or "
                         "image files; use --tensor-cache auto")
    return False, ""


def use_tensor_cache(mode: str, augment: str, data: RetrievalData, image_size: Optional[int] = None,
                     max_mb: float = DEFAULT_MAX_MB) -> bool:
    """Whether the fast path applies (:func:`tensor_cache_plan`; image files only when ``image_size`` is given)."""
    return tensor_cache_plan(mode, augment, data, image_size, max_mb)[0]


def check_cache_dir(value: str) -> None:
    """``--tensor-cache-dir``: an existing writable folder, or one that can be made (nothing is created here).

    Raises:
        UsageError: a file, or a folder that cannot be written or made.
    """
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"--tensor-cache-dir {value}: is a file, expected a folder")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"--tensor-cache-dir {value}: {parent} is a file, so the folder cannot be made")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--tensor-cache-dir {value}: {parent} is not writable")


# ------------------------------------------------------------------------------------- image files
def _path(item: Item) -> str:
    return os.path.abspath(item[0] if isinstance(item, tuple) else item)


def _key(item: Item) -> str:
    """The cache key of a file item: its absolute path (and the crop box of a ``(path, box)`` item)."""
    if isinstance(item, tuple):
        return f"{_path(item)} box={tuple(float(v) for v in item[1])}"
    return _path(item)


def _stat(path: str) -> Optional[Tuple[int, int]]:
    """``(size in bytes, mtime in ns)`` of a file, ``None`` when it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return int(st.st_size), int(st.st_mtime_ns)


@dataclass
class DecodedFiles:
    """Image files decoded and resized once (:func:`decode_files`).

    Attributes:
        train: key -> ``(C, S, S)`` uint8, the whole image resized to ``S`` x ``S`` (bilinear, antialiased);
            ``C`` = 1 when the file's RGB channels are equal, else 3.
        eval: key -> ``(C, S, S)`` uint8, :func:`eval_resize` of the image.
        bad: keys of unreadable files (``--skip-bad-images``; zeros in ``train`` and ``eval``).
        decoded, reused: files decoded now, files taken from the disk cache.
        file: the ``--tensor-cache-dir`` file, or ``None``.
        note: why that file could not be read or written ("" when it could).
    """

    train: Dict[str, Tensor]
    eval: Dict[str, Tensor]
    bad: set = field(default_factory=set)
    decoded: int = 0
    reused: int = 0
    file: Optional[Path] = None
    note: str = ""

    def summary(self) -> str:
        """One line for the log: how many files were decoded, reused, unreadable, and where they are kept."""
        where = f"{self.reused:,} reused from {self.file}" if self.file is not None else "kept in memory for this run"
        bad = f", {len(self.bad):,} unreadable" if self.bad else ""
        return (f"tensor cache: {self.decoded:,} image files decoded ({where}{bad})"
                + (f"; {self.note}" if self.note else ""))


def _decode_chunk(items: Sequence[Item], size: int, skip_bad: bool, out: DecodedFiles) -> None:
    """Decode ``items`` (PIL, as the per-image path opens them), resize each shape group at once, into ``out``."""
    images: Dict[str, Tensor] = {}
    for item in items:
        try:
            a = np.array(open_image(item), dtype=np.uint8)  # (H, W, 3), writable
        except BadImageError:
            if not skip_bad:
                raise
            out.bad.add(_key(item))
            out.train[_key(item)] = out.eval[_key(item)] = torch.zeros(1, size, size, dtype=torch.uint8)
            continue
        gray = bool((a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all())
        images[_key(item)] = torch.from_numpy(np.ascontiguousarray(a[..., :1] if gray else a)).permute(2, 0, 1)
    groups: Dict[Tuple[int, ...], List[str]] = {}
    for k, t in images.items():
        groups.setdefault(tuple(t.shape), []).append(k)
    for keys in groups.values():
        x = torch.stack([images[k] for k in keys])  # (n, C, H, W)
        tr, ev = _resize(x, (size, size), "bilinear"), eval_resize(x, size)  # (n, C, S, S) each
        for j, k in enumerate(keys):
            out.train[k], out.eval[k] = tr[j], ev[j]


def cache_file(cache_dir: Union[str, Path], items: Sequence[Item], image_size: int) -> Path:
    """The ``--tensor-cache-dir`` file of these items: one per common folder of the files and image size."""
    root = os.path.commonpath([_path(i) for i in items])
    digest = hashlib.sha1(f"{root}\0{image_size}\0{CACHE_VERSION}".encode()).hexdigest()[:12]
    return Path(cache_dir).expanduser() / f"{Path(root).name or 'root'}-{image_size}px-{digest}.pt"


def _read_cache(file: Path, size: int) -> Tuple[Dict[str, Tuple[Any, ...]], str]:
    """``({key: (path, stat, train, eval)}, note)`` from a cache file; an unreadable or other file gives ``{}``."""
    try:
        blob = torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return {}, ""
    except Exception as err:  # a truncated or foreign file: decode again, replace it
        return {}, f"could not read {file} ({type(err).__name__}); decoding again"
    if not isinstance(blob, dict) or blob.get("version") != CACHE_VERSION or blob.get("image_size") != size:
        return {}, f"{file} was written by another version; decoding again"
    out = {}
    for i, (k, p) in enumerate(zip(blob["keys"], blob["paths"])):
        c = 1 if bool(blob["gray"][i]) else 3
        out[k] = (p, (int(blob["stat"][i, 0]), int(blob["stat"][i, 1])), blob["train"][i, :c], blob["eval"][i, :c])
    return out, ""


def _write_cache(file: Path, entries: Dict[str, Tuple[Any, ...]], size: int) -> str:
    """Write ``{key: (path, stat, train, eval)}`` to ``file`` atomically (a unique temporary file, then
    ``os.replace``), so that concurrent runs and ranks only ever read a whole file. Returns a note on failure."""
    if not entries:
        return ""
    rows = list(entries.values())
    c = max(r[2].shape[0] for r in rows)
    blob = {"version": CACHE_VERSION, "image_size": size, "keys": list(entries), "paths": [r[0] for r in rows],
            "stat": torch.tensor([r[1] for r in rows], dtype=torch.int64).view(-1, 2),
            "gray": torch.tensor([r[2].shape[0] == 1 for r in rows]),
            "train": torch.stack([r[2].expand(c, -1, -1) for r in rows]),  # (N, C, S, S)
            "eval": torch.stack([r[3].expand(c, -1, -1) for r in rows])}
    tmp = file.with_name(f".{file.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        torch.save(blob, tmp)
        os.replace(tmp, file)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        return f"could not write {file} ({err.strerror or err})"
    return ""


def decode_files(items: Sequence[Item], image_size: int, cache_dir: Optional[Union[str, Path]] = None,
                 write: bool = True, skip_bad: bool = False) -> DecodedFiles:
    """Decode image files once, reusing (and updating) a ``--tensor-cache-dir`` file.

    An entry of the file is reused only when its file has the same path, size and modification time;
    edited or added files are decoded, entries of removed files dropped. Entries of other files under the
    same folder (another split or subset) are kept while those files are unchanged.

    Args:
        items: paths or ``(path, box)`` crops (duplicates are decoded once).
        image_size: ``S``.
        cache_dir: the folder of the cache files, or ``None`` (decode everything, keep nothing on disk).
        write: update the file (one rank of a distributed run writes; every rank reads).
        skip_bad: unreadable files become zeros in :attr:`DecodedFiles.bad` instead of raising.

    Raises:
        BadImageError: an unreadable file without ``skip_bad`` (naming it).
    """
    unique = list({_key(i): i for i in items}.items())
    out = DecodedFiles({}, {})
    stats = {k: _stat(_path(i)) for k, i in unique}
    old: Dict[str, Tuple[Any, ...]] = {}
    if cache_dir is not None:
        out.file = cache_file(cache_dir, [i for _, i in unique], image_size)
        old, out.note = _read_cache(out.file, image_size)
    todo = []
    for k, item in unique:
        if k in old and stats[k] is not None and old[k][1] == stats[k]:
            out.train[k], out.eval[k] = old[k][2], old[k][3]
        else:
            todo.append(item)
    for start in range(0, len(todo), DECODE_CHUNK):
        _decode_chunk(todo[start:start + DECODE_CHUNK], image_size, skip_bad, out)
    out.decoded, out.reused = len(todo), len(unique) - len(todo)
    if out.file is not None and write:
        keep = {k: r for k, r in old.items() if k not in stats and _stat(r[0]) == r[1]}  # other files, unchanged
        keep.update({k: (_path(i), stats[k], out.train[k], out.eval[k]) for k, i in unique
                     if k not in out.bad and stats[k] is not None})
        if {k: r[1] for k, r in keep.items()} != {k: r[1] for k, r in old.items()}:
            out.note = _write_cache(out.file, keep, image_size) or out.note
    return out


# ------------------------------------------------------------------------------------- the cache
class CachedSplit(Dataset):
    """A split's evaluation images as a dataset of ``(image (3, S, S) float, label, index, ok)``.

    Drop-in for :class:`metric.data.ImageDataset` (evaluation transform) where the images are cached;
    ``ok`` (N,) bool marks the readable ones (all when not given).
    """

    def __init__(self, split: Split, images_u8: Tensor, ok: Optional[Tensor] = None) -> None:
        self.split, self.images = split, images_u8
        self.ok = torch.ones(len(split), dtype=torch.bool) if ok is None else ok

    def __len__(self) -> int:
        return len(self.split)

    def __getitems__(self, keys: List[int]) -> List[Tuple[Tensor, int, int, bool]]:
        idx = torch.as_tensor([int(k) for k in keys], dtype=torch.long)
        x = normalize(self.images.index_select(0, idx.to(self.images.device)))
        return [(x[j], int(self.split.labels[k]), int(k), bool(self.ok[k])) for j, k in enumerate(keys)]

    def __getitem__(self, key: int) -> Tuple[Tensor, int, int, bool]:
        return self.__getitems__([int(key)])[0]

    def batch(self, indices: Tensor) -> Tensor:
        """``(n,)`` indices -> ``(n, 3, S, S)`` normalised float images on the cache's device."""
        return normalize(self.images.index_select(0, indices.to(self.images.device)))


class DecodedFileSplit(Dataset):
    """Image files as a run's tensor cache evaluated them, decoded one by one: ``(image (3, S, S), label, index, ok)``.

    Each file is opened and resized exactly as :func:`decode_files` does (its :func:`eval_resize` copy), so a
    model trained and evaluated on the cache embeds new files (``xbn-metric embed``) as it evaluated its
    own; unreadable files give zeros and ``ok=False``.
    """

    def __init__(self, split: Split, image_size: int) -> None:
        self.split, self.size = split, int(image_size)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: int) -> Tuple[Tensor, int, int, bool]:
        item, out = self.split.items[int(key)], DecodedFiles({}, {})
        _decode_chunk([item], self.size, True, out)
        return normalize(out.eval[_key(item)][None])[0], int(self.split.labels[key]), int(key), _key(item) not in out.bad


@dataclass
class TensorCache:
    """The decoded images of a run: ``train`` (augmentation source) and the evaluation sets.

    Attributes:
        train: ``(N, C, S, S)`` uint8, every training image resized to the input size.
        train_eval, query, gallery: :class:`CachedSplit` of the evaluation-transformed images.
        train_ok: ``(N,)`` bool, the readable training images (all for in-memory data).
        files: how image files were decoded (``None`` for in-memory data).
    """

    train: Tensor
    train_eval: CachedSplit
    query: CachedSplit
    gallery: CachedSplit
    train_ok: Optional[Tensor] = None
    files: Optional[DecodedFiles] = None

    @classmethod
    def build(cls, data: RetrievalData, image_size: int, device: torch.device,
              cache_dir: Optional[Union[str, Path]] = None, write: bool = True,
              skip_bad: bool = False) -> "TensorCache":
        """Decode and resize every image once (a few seconds for 10^4 small images).

        Image files go through :func:`decode_files` (``cache_dir``, ``write``, ``skip_bad``: see there).
        """
        if not equal_sized_in_memory(data.train.items):
            items = data.train.items + data.query.items + ([] if data.query_is_gallery else data.gallery.items)
            files = decode_files(items, image_size, cache_dir, write, skip_bad)
            cache = cls.from_files(data, files, device)
            files.train.clear()  # the per-file copies, now stacked (the cache held both only while stacking)
            files.eval.clear()
            return cache
        raw_train = to_uint8_batch(data.train.items)
        train = _resize(raw_train, (image_size, image_size), "bilinear").to(device)
        train_eval = CachedSplit(data.train, eval_resize(raw_train, image_size).to(device))
        query = CachedSplit(data.query, eval_resize(to_uint8_batch(data.query.items), image_size).to(device))
        gallery = query if data.query_is_gallery else CachedSplit(
            data.gallery, eval_resize(to_uint8_batch(data.gallery.items), image_size).to(device))
        return cls(train, train_eval, query, gallery)

    @classmethod
    def from_files(cls, data: RetrievalData, files: DecodedFiles, device: torch.device) -> "TensorCache":
        """The splits' tensors from decoded files: one channel when every file is gray, else three."""
        c = 3 if any(t.shape[0] == 3 for t in files.train.values()) else 1

        def stack(split: Split, copies: Dict[str, Tensor]) -> Tensor:  # (N, C, S, S) uint8 on the device
            return torch.stack([copies[_key(i)].expand(c, -1, -1) for i in split.items]).to(device)

        def ok(split: Split) -> Tensor:  # (N,) bool
            return torch.tensor([_key(i) not in files.bad for i in split.items], dtype=torch.bool)

        query = CachedSplit(data.query, stack(data.query, files.eval), ok(data.query))
        gallery = query if data.query_is_gallery else CachedSplit(data.gallery, stack(data.gallery, files.eval),
                                                                  ok(data.gallery))
        return cls(stack(data.train, files.train), CachedSplit(data.train, stack(data.train, files.eval), ok(data.train)),
                   query, gallery, train_ok=ok(data.train), files=files)


def cached_batches(cache: TensorCache, labels: np.ndarray, batches: Iterable[List[Tuple[int, int]]],
                   augment: TensorMildAugment) -> Iterator[Tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Augmented training batches from the cache, like the per-image ``DataLoader``.

    Args:
        cache: the run's cache.
        labels: (N,) training labels.
        batches: lists of ``(index, augmentation_seed)`` (:class:`metric.sampler.MPerClassBatches`).
        augment: the batched augmentation; its generator is seeded by the batch's first seed.

    Yields:
        ``(x (B, 3, S, S) float on the cache's device, labels (B,), indices (B,), ok (B,))``, the last three
        int64 / bool on the CPU, as the ``DataLoader`` gives them (``ok``: readable, see ``--skip-bad-images``).
    """
    lab = torch.as_tensor(labels, dtype=torch.long)
    ok = cache.train_ok if cache.train_ok is not None else torch.ones(len(lab), dtype=torch.bool)
    for batch in batches:
        idx = torch.as_tensor([int(i) for i, _ in batch], dtype=torch.long)
        g = torch.Generator().manual_seed(int(batch[0][1]))
        x = augment(cache.train.index_select(0, idx.to(cache.train.device)), g)
        yield x, lab[idx], idx, ok[idx]
