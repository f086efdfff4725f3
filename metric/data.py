"""Datasets of the metric trainer: SOP, In-shop, DeepFashion2, CUB-200-2011, Cars196, an image folder, Omniglot and sklearn's digits.

Every loader returns a :class:`RetrievalData`: a training split, a query split and a gallery split
(each a :class:`Split` of items and int64 labels) and ``query_is_gallery`` (leave-one-out protocol:
each query retrieves among all *other* test items). Items are image paths, ``(path, box)`` pairs
(DeepFashion2 crops) or in-memory uint8 arrays (digits).

Protocols (``../shared/FORMATS.md``):

* ``sop``: ``Ebay_train.txt`` / ``Ebay_test.txt`` (header ``image_id class_id super_class_id path``);
  test set queried leave-one-out.
* ``inshop``: ``Eval/list_eval_partition.txt`` (or at the root): line 1 the image count, line 2 the
  header ``image_name item_id evaluation_status``; ``query`` items retrieve from ``gallery`` items.
* ``deepfashion2``: ``train|validation/annos/*.json`` beside ``image/*.jpg``; one sample per item,
  cropped by its ``bounding_box``, label ``(pair_id, category_id, style)``, ``style == 0`` left out;
  validation: ``user`` items are queries, ``shop`` items the gallery.
* ``folder``: one sub-folder per class. With ``train/`` and ``test/`` sub-folders they are used as
  given (``--split instance`` or ``auto``), or, with ``--split class``, the classes are split by the
  rule below and training images come from ``train/``, test images from ``test/``. Without them:
  ``--split class``/``auto`` splits the classes, ``--split instance`` splits each class's images.
  Items are the file paths; the trainer decodes them once into its tensor cache when they fit
  ``--tensor-cache-max-mb`` (:mod:`metric.fastdata`), else per image (:class:`ImageDataset`).
* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download).
  ``--split instance``/``auto`` splits each digit's images by the rule below (train and test on all
  ten digits, test leave-one-out); ``--split class`` trains on digits 0-4 and tests on 5-9 (zero-shot).
* ``cub`` / ``cars196``: CUB-200-2011 and Cars196 as ``pytorch_metric_learning.datasets.CUB`` /
  ``Cars196`` read and split them (CUB classes 1-100 train, 101-200 retrieved; Cars196 classes 1-98
  train, 99-196 retrieved; :mod:`metric.datasets.pml`); test leave-one-out.
* ``omniglot``: handwritten characters split by alphabet (:func:`load_omniglot`): the embedded
  ``images_background_small1`` subset (no download), or the full dataset's standard split under
  ``--data-root``; test leave-one-out. ``rotations=4`` makes every character rotated by 90, 180 and
  270 degrees a class of its own (:func:`rotated_classes`), in training and in retrieval.

Seeded split rule (``split_seed``, ``train_fraction``): class split = the classes sorted by name,
permuted by ``numpy.random.default_rng(split_seed)``, the first ``round(train_fraction * C)`` (at
least 1, at most C - 1) train; instance split = each class's items sorted by path/index, permuted by
``default_rng(split_seed + class position)``, the first ``round(train_fraction * n)`` train (at least
one item on each side when the class has two or more). Test sets are queried leave-one-out.

Malformed inputs raise :class:`DataFormatError` naming the file (and line).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from xbn_queue.training.images import IMAGE_EXTENSIONS, BadImageError, digits_uint8

from .datasets.types import DataFormatError, Item, RetrievalData, Split

__all__ = [
    "DataFormatError",
    "BadImageError",
    "Split",
    "RetrievalData",
    "DATASETS",
    "load_dataset",
    "load_sop",
    "load_inshop",
    "load_deepfashion2",
    "load_folder",
    "load_digits",
    "load_omniglot",
    "rotated_classes",
    "download_omniglot",
    "ImageDataset",
]

def _encode(raw: Sequence[Hashable], mapping: Optional[Dict[Hashable, int]] = None) -> np.ndarray:
    """Map raw labels to consecutive int64 codes (a shared ``mapping`` is extended in place)."""
    mapping = {} if mapping is None else mapping
    out = np.empty(len(raw), dtype=np.int64)
    for i, r in enumerate(raw):
        if r not in mapping:
            mapping[r] = len(mapping)
        out[i] = mapping[r]
    return out


def _require_root(root: Optional[Union[str, Path]], dataset: str) -> Path:
    if root is None or str(root) == "":
        raise DataFormatError(f"--data-root is required for --dataset {dataset}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataFormatError(f"{dataset}: data root {str(path)!r} does not exist or is not a directory")
    return path


def _check_image(root: Path, rel: str, listfile: Path, lineno: int) -> str:
    path = root / rel
    if not path.is_file():
        raise DataFormatError(f"{listfile}:{lineno}: image {rel!r} is listed but missing ({path})")
    return str(path)


# --------------------------------------------------------------------------------------------- SOP
def _read_sop_list(root: Path, name: str, check_files: bool) -> Tuple[List[str], List[int]]:
    listfile = root / name
    if not listfile.is_file():
        raise DataFormatError(f"sop: list file {str(listfile)!r} not found (expected Ebay_train.txt / Ebay_test.txt in the root)")
    paths: List[str] = []
    labels: List[int] = []
    with open(listfile, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.split()
            if lineno == 1:
                if fields != ["image_id", "class_id", "super_class_id", "path"]:
                    raise DataFormatError(
                        f"{listfile}:1: bad header {line.strip()!r}, expected 'image_id class_id super_class_id path'"
                    )
                continue
            if not fields:
                continue
            if len(fields) != 4:
                raise DataFormatError(f"{listfile}:{lineno}: expected 4 fields (image_id class_id super_class_id path), got {len(fields)}: {line.strip()!r}")
            try:
                class_id = int(fields[1])
                int(fields[0]), int(fields[2])
            except ValueError:
                raise DataFormatError(f"{listfile}:{lineno}: image_id, class_id and super_class_id must be integers: {line.strip()!r}") from None
            rel = fields[3]
            paths.append(_check_image(root, rel, listfile, lineno) if check_files else str(root / rel))
            labels.append(class_id)
    if not paths:
        raise DataFormatError(f"{listfile}: no images listed")
    return paths, labels


def load_sop(root: Union[str, Path], check_files: bool = True) -> RetrievalData:
    """Stanford Online Products: train on ``Ebay_train.txt``, test leave-one-out on ``Ebay_test.txt``.

    Raises:
        DataFormatError: missing root or list file, bad header, short line, non-integer ids, missing image.
    """
    root = _require_root(root, "sop")
    tr_p, tr_l = _read_sop_list(root, "Ebay_train.txt", check_files)
    te_p, te_l = _read_sop_list(root, "Ebay_test.txt", check_files)
    test = Split(te_p, _encode(te_l))
    return RetrievalData("sop", Split(tr_p, _encode(tr_l)), test, test, True, {"protocol": "test set leave-one-out"})


# ------------------------------------------------------------------------------------------ In-shop
def load_inshop(root: Union[str, Path], check_files: bool = True) -> RetrievalData:
    """In-shop Clothes Retrieval: ``train`` images train; ``query`` images retrieve from ``gallery``.

    Raises:
        DataFormatError: missing root or partition file, bad count or header line, short line, unknown
            status, missing image.
    """
    root = _require_root(root, "inshop")
    candidates = [root / "Eval" / "list_eval_partition.txt", root / "list_eval_partition.txt"]
    listfile = next((c for c in candidates if c.is_file()), None)
    if listfile is None:
        raise DataFormatError(f"inshop: partition file not found: looked for {', '.join(str(c) for c in candidates)}")
    parts: Dict[str, Tuple[List[str], List[str]]] = {s: ([], []) for s in ("train", "query", "gallery")}
    declared = None
    n_rows = 0
    with open(listfile, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.split()
            if lineno == 1:
                try:
                    declared = int(line.strip())
                except ValueError:
                    raise DataFormatError(f"{listfile}:1: expected the image count, got {line.strip()!r}") from None
                continue
            if lineno == 2:
                if fields != ["image_name", "item_id", "evaluation_status"]:
                    raise DataFormatError(f"{listfile}:2: bad header {line.strip()!r}, expected 'image_name item_id evaluation_status'")
                continue
            if not fields:
                continue
            if len(fields) != 3:
                raise DataFormatError(f"{listfile}:{lineno}: expected 3 fields (image_name item_id evaluation_status), got {len(fields)}: {line.strip()!r}")
            rel, item, status = fields
            if status not in parts:
                raise DataFormatError(f"{listfile}:{lineno}: unknown evaluation_status {status!r} (train, query or gallery)")
            path = _check_image(root, rel, listfile, lineno) if check_files else str(root / rel)
            parts[status][0].append(path)
            parts[status][1].append(item)
            n_rows += 1
    if declared is None:
        raise DataFormatError(f"{listfile}: empty file")
    if declared != n_rows:
        raise DataFormatError(f"{listfile}:1: declares {declared} images but lists {n_rows}")
    for status, (p, _) in parts.items():
        if not p:
            raise DataFormatError(f"{listfile}: no '{status}' images")
    mapping: Dict[Hashable, int] = {}
    query = Split(parts["query"][0], _encode(parts["query"][1], mapping))
    gallery = Split(parts["gallery"][0], _encode(parts["gallery"][1], mapping))
    train = Split(parts["train"][0], _encode(parts["train"][1]))
    return RetrievalData("inshop", train, query, gallery, False, {"protocol": "query vs gallery by item_id"})


# ------------------------------------------------------------------------------------ DeepFashion2
def _df2_part(root: Path, part: str, check_files: bool):
    annos = root / part / "annos"
    images = root / part / "image"
    if not annos.is_dir():
        raise DataFormatError(f"deepfashion2: annotation folder {str(annos)!r} not found")
    files = sorted(annos.glob("*.json"))
    if not files:
        raise DataFormatError(f"deepfashion2: no annotation files in {str(annos)!r}")
    items: List[Item] = []
    labels: List[Tuple[int, int, int]] = []
    sources: List[str] = []
    for af in files:
        try:
            with open(af, encoding="utf-8") as f:
                ann = json.load(f)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{af}:{err.lineno}: invalid JSON: {err.msg}") from None
        if not isinstance(ann, dict):
            raise DataFormatError(f"{af}: expected a JSON object")
        source = ann.get("source")
        if source not in ("user", "shop"):
            raise DataFormatError(f"{af}: 'source' must be 'user' or 'shop', got {source!r}")
        if "pair_id" not in ann:
            raise DataFormatError(f"{af}: missing 'pair_id'")
        image = images / (af.stem + ".jpg")
        keys = sorted((k for k in ann if re.fullmatch(r"item\d+", k)), key=lambda k: int(k[4:]))
        for key in keys:
            it = ann[key]
            missing = [k for k in ("category_id", "style", "bounding_box") if not isinstance(it, dict) or k not in it]
            if missing:
                raise DataFormatError(f"{af}: {key} lacks {', '.join(missing)}")
            box = it["bounding_box"]
            if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
                raise DataFormatError(f"{af}: {key}.bounding_box must be [x1, y1, x2, y2], got {box!r}")
            if box[2] <= box[0] or box[3] <= box[1]:
                raise DataFormatError(f"{af}: {key}.bounding_box {box} is empty")
            if int(it["style"]) == 0:
                continue
            if check_files and not image.is_file():
                raise DataFormatError(f"{af}: image {str(image)!r} not found")
            items.append((str(image), tuple(float(v) for v in box)))
            labels.append((int(ann["pair_id"]), int(it["category_id"]), int(it["style"])))
            sources.append(source)
    return items, labels, sources


def load_deepfashion2(root: Union[str, Path], check_files: bool = True) -> RetrievalData:
    """DeepFashion2 consumer-to-shop: items cropped by their boxes, label (pair_id, category_id, style).

    Training uses every ``train`` item with style > 0 (user and shop); evaluation uses ``validation``:
    user items are queries, shop items the gallery.

    Raises:
        DataFormatError: missing folders, invalid JSON (file and line), missing keys, bad boxes,
            missing images.
    """
    root = _require_root(root, "deepfashion2")
    tr_items, tr_labels, _ = _df2_part(root, "train", check_files)
    va_items, va_labels, va_src = _df2_part(root, "validation", check_files)
    mapping: Dict[Hashable, int] = {}
    q = [i for i, s in enumerate(va_src) if s == "user"]
    g = [i for i, s in enumerate(va_src) if s == "shop"]
    if not q or not g:
        raise DataFormatError(f"deepfashion2: {root / 'validation'} needs both user (query) and shop (gallery) items with style > 0")
    query = Split([va_items[i] for i in q], _encode([va_labels[i] for i in q], mapping))
    gallery = Split([va_items[i] for i in g], _encode([va_labels[i] for i in g], mapping))
    train = Split(tr_items, _encode(tr_labels))
    return RetrievalData("deepfashion2", train, query, gallery, False,
                         {"protocol": "validation: user queries vs shop gallery, label (pair_id, category_id, style)"})


# ------------------------------------------------------------------------------------------ folder
def _class_folders(root: Path, max_per_class: Optional[int] = None) -> Dict[str, List[str]]:
    out: Dict[str, List[str]] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(str(f) for f in d.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        if files:
            out[d.name] = files[:max_per_class]
    return out


def _class_split(names: Sequence[str], fraction: float, seed: int) -> Tuple[List[str], List[str]]:
    names = sorted(names)
    if len(names) < 2:
        raise DataFormatError(f"a class split needs at least 2 classes, got {len(names)}")
    perm = np.random.default_rng(seed).permutation(len(names))
    n_train = min(max(int(round(fraction * len(names))), 1), len(names) - 1)
    return sorted(names[i] for i in perm[:n_train]), sorted(names[i] for i in perm[n_train:])


def _instance_split(n: int, fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    n_train = int(round(fraction * n))
    if n >= 2:
        n_train = min(max(n_train, 1), n - 1)
    return np.sort(perm[:n_train]), np.sort(perm[n_train:])


def load_folder(root: Union[str, Path], split: str = "auto", train_fraction: float = 0.5, split_seed: int = 0,
                max_per_class: Optional[int] = None) -> RetrievalData:
    """A user's image folders, one per class (see the module docstring for the split rules).

    ``max_per_class``: keep only the first N images (by file name) of each class folder, in
    ``train/`` and ``test/`` each when they exist (a quick subset of a large set).

    Raises:
        DataFormatError: missing root, no class folders with images, or too few classes to split.
    """
    root = _require_root(root, "folder")
    if split not in ("auto", "class", "instance"):
        raise ValueError(f"split must be auto, class or instance, got {split!r}")
    if (root / "train").is_dir() and (root / "test").is_dir():
        tr = _class_folders(root / "train", max_per_class)
        te = _class_folders(root / "test", max_per_class)
        if not tr or not te:
            raise DataFormatError(f"folder: {root / 'train'} and {root / 'test'} must each hold class folders with images")
        if split == "class":
            train_cls, test_cls = _class_split(sorted(set(tr) | set(te)), train_fraction, split_seed)
            tr = {c: tr[c] for c in train_cls if c in tr}
            te = {c: te[c] for c in test_cls if c in te}
            if not tr or not te:
                raise DataFormatError(f"folder: the class split of {root} left no training or no test images")
            info = {"protocol": "class-disjoint split of train/ and test/ folders, test leave-one-out",
                    "train_classes": sorted(tr), "test_classes": sorted(te)}
        else:
            info = {"protocol": "train/ and test/ folders as given, test leave-one-out"}
        tr_items = [p for c in sorted(tr) for p in tr[c]]
        tr_raw = [c for c in sorted(tr) for _ in tr[c]]
        te_items = [p for c in sorted(te) for p in te[c]]
        te_raw = [c for c in sorted(te) for _ in te[c]]
    else:
        classes = _class_folders(root, max_per_class)
        if not classes:
            raise DataFormatError(f"folder: no class folders with images ({', '.join(IMAGE_EXTENSIONS)}) in {root}")
        if split in ("auto", "class"):
            train_cls, test_cls = _class_split(list(classes), train_fraction, split_seed)
            tr_items = [p for c in train_cls for p in classes[c]]
            tr_raw = [c for c in train_cls for _ in classes[c]]
            te_items = [p for c in test_cls for p in classes[c]]
            te_raw = [c for c in test_cls for _ in classes[c]]
            info = {"protocol": "seeded class-disjoint split, test leave-one-out", "train_classes": train_cls, "test_classes": test_cls}
        else:
            tr_items, tr_raw, te_items, te_raw = [], [], [], []
            for pos, c in enumerate(sorted(classes)):
                a, b = _instance_split(len(classes[c]), train_fraction, split_seed + pos)
                tr_items += [classes[c][i] for i in a]
                tr_raw += [c] * len(a)
                te_items += [classes[c][i] for i in b]
                te_raw += [c] * len(b)
            info = {"protocol": "seeded per-class instance split, test leave-one-out"}
    mapping: Dict[Hashable, int] = {}
    train = Split(tr_items, _encode(tr_raw, mapping))
    test = Split(te_items, _encode(te_raw, mapping))
    if len(train) == 0 or len(test) == 0:
        raise DataFormatError(f"folder: the split of {root} left no training or no test images")
    return RetrievalData("folder", train, test, test, True, info)


# ------------------------------------------------------------------------------------------ digits
def load_digits(split: str = "auto", train_fraction: float = 0.5, split_seed: int = 0) -> RetrievalData:
    """scikit-learn's bundled 8x8 digits as uint8 grayscale images (values 0..16 scaled to 0..255).

    ``split="auto"``/``"instance"``: every digit in both, each digit's images split by the seeded rule.
    ``split="class"``: train on digits 0-4, test on 5-9 (zero-shot).
    Test sets are queried leave-one-out.
    """
    images, target = digits_uint8()  # (1797, 8, 8) uint8, (1797,)
    if split == "class":
        tr = np.flatnonzero(target < 5)
        te = np.flatnonzero(target >= 5)
        info = {"protocol": "class-disjoint: train digits 0-4, test digits 5-9 leave-one-out"}
    elif split in ("auto", "instance"):
        tr_l, te_l = [], []
        for digit in range(10):
            idx = np.flatnonzero(target == digit)
            a, b = _instance_split(len(idx), train_fraction, split_seed + digit)
            tr_l.append(idx[a])
            te_l.append(idx[b])
        tr, te = np.concatenate(tr_l), np.concatenate(te_l)
        info = {"protocol": "seeded per-digit instance split, test leave-one-out"}
    else:
        raise ValueError(f"split must be auto, class or instance, got {split!r}")
    train = Split([images[i] for i in tr], target[tr].copy())
    test = Split([images[i] for i in te], target[te].copy())
    return RetrievalData("digits", train, test, test, True, info)


# ---------------------------------------------------------------------------------------- omniglot
#: The embedded subset (MIT licence and attribution beside it).
OMNIGLOT_EMBEDDED = Path(__file__).resolve().parent / "datasets" / "omniglot" / "images_background_small1.zip"
#: Alphabets of the embedded subset that train; the others are retrieved (characters never seen in training).
OMNIGLOT_EMBEDDED_TRAIN = ("Balinese", "Greek", "Korean")


def _decode_gray(data: bytes, name: str) -> np.ndarray:
    """PNG bytes -> ``(H, W)`` uint8 with bright strokes on a black background (Omniglot is black on white)."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return 255 - np.asarray(im.convert("L"), dtype=np.uint8)
    except Exception as err:  # PIL raises several types
        raise DataFormatError(f"omniglot: cannot read image {name}: {err}") from None


def _omniglot_zip(path: Path) -> Dict[str, Dict[str, List[np.ndarray]]]:
    """``{alphabet: {character: [images]}}`` from a zip laid out as ``<top>/<Alphabet>/<character>/<image>.png``."""
    import zipfile

    out: Dict[str, Dict[str, List[np.ndarray]]] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for name in sorted(n for n in zf.namelist() if n.lower().endswith(".png")):
                parts = name.split("/")
                if len(parts) < 4:
                    continue
                alphabet, char = parts[-3], parts[-2]
                out.setdefault(alphabet, {}).setdefault(char, []).append(_decode_gray(zf.read(name), f"{path}:{name}"))
    except (zipfile.BadZipFile, OSError) as err:
        raise DataFormatError(f"omniglot: {path} is not a readable zip archive ({err})") from None
    if not out:
        raise DataFormatError(f"omniglot: {path} holds no <Alphabet>/<character>/<image>.png images")
    return out


def _omniglot_folder(path: Path) -> Dict[str, Dict[str, List[np.ndarray]]]:
    """``{alphabet: {character: [images]}}`` from a folder laid out as ``<Alphabet>/<character>/<image>.png``."""
    out: Dict[str, Dict[str, List[np.ndarray]]] = {}
    for png in sorted(path.glob("*/*/*.png")):
        alphabet, char = png.parent.parent.name, png.parent.name
        out.setdefault(alphabet, {}).setdefault(char, []).append(_decode_gray(png.read_bytes(), str(png)))
    if not out:
        raise DataFormatError(f"omniglot: {path} holds no <Alphabet>/<character>/<image>.png images")
    return out


def _omniglot_split(tree: Dict[str, Dict[str, List[np.ndarray]]], alphabets: Sequence[str], mapping: Dict[Hashable, int]) -> Split:
    items: List[Item] = []
    raw: List[Hashable] = []
    for a in sorted(alphabets):
        for c in sorted(tree[a]):
            items += tree[a][c]
            raw += [(a, c)] * len(tree[a][c])
    return Split(items, _encode(raw, mapping))


def _find_standard(root: Path, kind: str) -> List[Path]:
    """The ``images_<kind>*`` folders of the full dataset's layout (also below torchvision's ``omniglot-py/``)."""
    found = []
    for base in (root, root / "omniglot-py"):
        found += sorted(p for p in base.glob(f"images_{kind}*") if p.is_dir())
    return found


#: ``--omniglot-rotations``: 1 (the characters as drawn) or 4 (each rotation by 90 degrees a new class).
OMNIGLOT_ROTATIONS = (1, 4)


def rotated_classes(split: Split, rotations: int, num_labels: int) -> Split:
    """``split`` with each image also rotated by 90, 180, ... degrees, every rotation of a class a class of its own.

    The practice of the few-shot literature on Omniglot (Vinyals et al., 2016; Santoro et al., 2016):
    a character turned by 90 degrees is another character, so ``rotations=4`` gives four times the
    classes from the same images. The rotations are counter-clockwise (:func:`numpy.rot90`, as
    ``torch.rot90(image, k)``).

    Args:
        split: N items, ``(H, W)`` uint8 arrays, with their labels in ``[0, num_labels)``.
        rotations: 1 (``split`` as it is) or 4.
        num_labels: L, the number of labels of every split of the dataset (so the rotated classes of
            the training and the evaluation split stay apart).

    Returns:
        ``rotations x N`` items: the N originals first (same order, same labels), then rotation ``k``
        of item ``i`` at position ``k * N + i`` with label ``label_i + k * L``.

    Raises:
        ValueError: ``rotations`` not in :data:`OMNIGLOT_ROTATIONS`.
    """
    if rotations not in OMNIGLOT_ROTATIONS:
        raise ValueError(f"rotations must be one of {OMNIGLOT_ROTATIONS}, got {rotations!r}")
    items: List[Item] = list(split.items)
    labels = [np.asarray(split.labels, dtype=np.int64)]
    for k in range(1, rotations):
        items += [np.ascontiguousarray(np.rot90(img, k)) for img in split.items]
        labels.append(labels[0] + k * num_labels)
    return Split(items, np.concatenate(labels))


def download_omniglot(root: Path) -> None:
    """Fetch the full Omniglot into ``root/omniglot-py/`` with ``torchvision.datasets.Omniglot``.

    When a download fails (no network, a corrupt file), every folder and file this call created is
    removed again (nothing that was there before is touched) and the error says which file could not
    be fetched and how to lay out a copy made by hand.

    Raises:
        DataFormatError: the download failed (one line: the URL, the reason, the manual layout).
    """
    import shutil

    from torchvision.datasets import Omniglot

    from xbn_queue.training.cli import one_line

    top = root.absolute()
    while not top.parent.exists() and top != top.parent:  # the highest folder this call will create
        top = top.parent
    made_top = not top.exists()
    folder = root / "omniglot-py"
    had_folder = folder.exists()
    before = set(folder.rglob("*")) if had_folder else set()
    url = ""
    try:
        root.mkdir(parents=True, exist_ok=True)
        for background in (True, False):
            url = f"{Omniglot.download_url_prefix}/images_{'background' if background else 'evaluation'}.zip"
            Omniglot(str(root), background=background, download=True)
    except BaseException as err:
        if made_top:
            shutil.rmtree(top, ignore_errors=True)
        elif not had_folder:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            for p in sorted(set(folder.rglob("*")) - before, key=lambda q: len(q.parts), reverse=True):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
        if not isinstance(err, Exception):
            raise
        raise DataFormatError(
            f"--download: could not fetch {url} ({one_line(err)}); nothing was kept. To install Omniglot by hand, "
            f"fetch images_background.zip and images_evaluation.zip from {Omniglot.download_url_prefix}/ and unzip "
            f"both into {folder}/ (giving images_background/<Alphabet>/<character>/<image>.png and "
            "images_evaluation/...), then run without --download") from None


def load_omniglot(root: Optional[Union[str, Path]] = None, download: bool = False, rotations: int = 1) -> RetrievalData:
    """Omniglot (Lake et al., 2015) split by alphabet: retrieval of characters never seen in training.

    Without ``root``: the embedded ``images_background_small1`` subset (2,720 images, no download);
    Balinese, Greek and Korean train (88 characters), Early_Aramaic and Latin are retrieved (48
    characters, leave-one-out). With ``root`` holding the full dataset's ``images_background*/`` and
    ``images_evaluation*/`` folders (directly or below ``omniglot-py/``, torchvision's layout): the
    standard split, background alphabets train (964 characters) and evaluation alphabets are
    retrieved (659 characters). ``download=True`` first fetches that full set into ``root`` with
    ``torchvision.datasets.Omniglot``.

    Images are kept in memory as ``(105, 105)`` uint8 arrays, inverted to bright strokes on black so
    that the zero fill of crops and rotations is background. A character's label is
    ``(alphabet, character)``. ``rotations=4``: every character also rotated by 90, 180 and 270
    degrees, each a class of its own, in both splits (:func:`rotated_classes`; ``info["rotations"]``).

    Raises:
        DataFormatError: a missing, unreadable or empty zip or folder, ``download`` without ``root``, or a
            download that failed (:func:`download_omniglot`).
        ValueError: ``rotations`` not 1 or 4.
    """
    if rotations not in OMNIGLOT_ROTATIONS:
        raise ValueError(f"omniglot: rotations must be one of {OMNIGLOT_ROTATIONS}, got {rotations!r}")
    if download:
        if root is None or str(root) == "":
            raise DataFormatError("--download needs --data-root DIR (where the full Omniglot is stored)")
        download_omniglot(Path(root).expanduser())
    mapping: Dict[Hashable, int] = {}
    if root is None or str(root) == "":
        if not OMNIGLOT_EMBEDDED.is_file():
            raise DataFormatError(f"omniglot: the embedded subset {OMNIGLOT_EMBEDDED} is missing (reinstall xbn-queue)")
        tree = _omniglot_zip(OMNIGLOT_EMBEDDED)
        missing = [a for a in OMNIGLOT_EMBEDDED_TRAIN if a not in tree]
        test_alphabets = [a for a in tree if a not in OMNIGLOT_EMBEDDED_TRAIN]
        if missing or not test_alphabets:
            raise DataFormatError(f"omniglot: {OMNIGLOT_EMBEDDED} lacks the alphabets of the embedded split "
                                  f"({', '.join(missing) or 'no retrieval alphabet'})")
        train = _omniglot_split(tree, OMNIGLOT_EMBEDDED_TRAIN, mapping)
        test = _omniglot_split(tree, test_alphabets, mapping)
        info = {"protocol": "embedded images_background_small1 split by alphabet, retrieval leave-one-out",
                "train_alphabets": sorted(OMNIGLOT_EMBEDDED_TRAIN), "test_alphabets": sorted(test_alphabets)}
        return _with_rotations(RetrievalData("omniglot", train, test, test, True, info), rotations, len(mapping))
    path = _require_root(root, "omniglot")
    background, evaluation = _find_standard(path, "background"), _find_standard(path, "evaluation")
    if not background or not evaluation:
        raise DataFormatError(f"omniglot: {path} must hold images_background*/ and images_evaluation*/ folders "
                              "(the full dataset's layout; --download fetches it)")
    trees = [{}, {}]  # type: List[Dict[str, Dict[str, List[np.ndarray]]]]
    for tree, folders in zip(trees, (background, evaluation)):
        for folder in folders:
            for a, chars in _omniglot_folder(folder).items():
                tree.setdefault(a, {}).update(chars)
    train = _omniglot_split(trees[0], list(trees[0]), mapping)
    test = _omniglot_split(trees[1], list(trees[1]), mapping)
    info = {"protocol": "standard split: background alphabets train, evaluation alphabets retrieved leave-one-out",
            "train_alphabets": sorted(trees[0]), "test_alphabets": sorted(trees[1])}
    return _with_rotations(RetrievalData("omniglot", train, test, test, True, info), rotations, len(mapping))


def _with_rotations(data: RetrievalData, rotations: int, num_labels: int) -> RetrievalData:
    """Omniglot with every rotation of a character a class (``rotations > 1``), in training and retrieval."""
    if rotations == 1:
        return data
    test = rotated_classes(data.query, rotations, num_labels)  # query is gallery (leave-one-out)
    info = dict(data.info, rotations=rotations,
                protocol=data.info["protocol"] + f"; each character rotated by 90-degree steps, {rotations} classes per character")
    return RetrievalData(data.name, rotated_classes(data.train, rotations, num_labels), test, test, True, info)


DATASETS = ("sop", "inshop", "deepfashion2", "folder", "digits", "omniglot", "cub", "cars196")


def load_dataset(name: str, root: Optional[Union[str, Path]] = None, split: str = "auto",
                 train_fraction: float = 0.5, split_seed: int = 0, check_files: bool = True,
                 max_per_class: Optional[int] = None, download: bool = False,
                 omniglot_rotations: int = 1) -> RetrievalData:
    """Load one of :data:`DATASETS` (``max_per_class``: folder only, see :func:`load_folder`;
    ``download``: omniglot, cub and cars196; ``omniglot_rotations``: omniglot only, see :func:`load_omniglot`;
    ``cub`` and ``cars196``: :func:`metric.datasets.pml.load_pml_benchmark`).

    Raises:
        ValueError: unknown dataset name.
        DataFormatError: see the individual loaders.
    """
    if name == "sop":
        return load_sop(root, check_files)
    if name == "inshop":
        return load_inshop(root, check_files)
    if name == "deepfashion2":
        return load_deepfashion2(root, check_files)
    if name == "folder":
        return load_folder(root, split, train_fraction, split_seed, max_per_class)
    if name == "digits":
        return load_digits(split, train_fraction, split_seed)
    if name == "omniglot":
        return load_omniglot(root, download, omniglot_rotations)
    if name in ("cub", "cars196"):
        from .datasets.pml import load_pml_benchmark

        return load_pml_benchmark(name, root, download, check_files)
    raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")


# ------------------------------------------------------------------------------- torch dataset
def open_image(item: Item):
    """Open an item as an RGB PIL image (cropped for ``(path, box)`` items).

    Raises:
        BadImageError: naming the file when it cannot be read.
    """
    from PIL import Image

    if isinstance(item, np.ndarray):
        return Image.fromarray(item).convert("RGB")
    path, box = (item, None) if isinstance(item, str) else item
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except Exception as err:  # PIL raises several types (UnidentifiedImageError, OSError, ...)
        raise BadImageError(f"cannot read image {path}: {err}") from None
    if box is not None:
        x1, y1, x2, y2 = box
        w, h = im.size
        x1, y1 = max(0.0, min(x1, w - 1)), max(0.0, min(y1, h - 1))
        x2, y2 = max(x1 + 1, min(x2, w)), max(y1 + 1, min(y2, h))
        im = im.crop((int(x1), int(y1), int(round(x2)), int(round(y2))))
    return im


class ImageDataset(Dataset):
    """A :class:`Split` as a torch dataset of ``(image, label, index, ok)``.

    Indices may be plain ints or ``(index, seed)`` pairs: with a seed, the transform runs under
    ``random`` / ``numpy`` / torch generators seeded by it (and the caller's generator states are
    restored afterwards), so an augmentation depends only on the seed, not on worker processes or on
    where a resumed run restarted.

    Args:
        split: the items and labels.
        transform: PIL image -> tensor.
        skip_bad_images: on an unreadable image return a zero image with ``ok=False`` instead of raising
            :class:`BadImageError` (the caller reports it, once per file).
        cache: keep transformed items in memory (for a deterministic transform on small in-memory
            data, e.g. the evaluation sets of ``digits``).
    """

    def __init__(self, split: Split, transform: Callable, skip_bad_images: bool = False, cache: bool = False) -> None:
        self.split = split
        self.transform = transform
        self.skip_bad_images = skip_bad_images
        self.cache: Optional[Dict[int, Tuple[torch.Tensor, bool]]] = {} if cache else None
        self._zero: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.split)

    def _load(self, index: int):
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        item = self.split.items[index]
        try:
            out = self.transform(open_image(item)), True
        except BadImageError as err:
            if not self.skip_bad_images:
                raise
            out = None, False  # the trainer warns once per file, naming it (the program, not a raw warning)
        if self.cache is not None:
            self.cache[index] = out
        return out

    def _finish(self, index: int, img, ok: bool):
        if img is None:
            if self._zero is None:
                ref = self.transform(open_image(np.zeros((8, 8, 3), dtype=np.uint8)))
                self._zero = torch.zeros_like(ref)
            img = self._zero
        return img, int(self.split.labels[index]), index, ok

    def __getitems__(self, keys: List[Any]) -> List[Tuple[torch.Tensor, int, int, bool]]:
        """A batch of items; with ``(index, seed)`` keys the generator states are saved/restored once."""
        import random

        if not any(isinstance(k, tuple) for k in keys):
            return [self[k] for k in keys]
        py_state, np_state, th_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            out = []
            for key in keys:
                index, seed = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), None)
                if seed is not None:
                    random.seed(seed)
                    np.random.seed(seed % 2**32)
                    torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed also queues CUDA seeding (slow)
                out.append(self._finish(index, *self._load(index)))
            return out
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            torch.set_rng_state(th_state)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            return self.__getitems__([key])[0]
        index = int(key)
        return self._finish(index, *self._load(index))
