"""The in-memory fast path: batched augmentation against torchvision's per-image ops, the evaluation
resize against timm's transform, and a cached run that resumes bit-identically."""

import numpy as np
import pytest
import torch
from torchvision.transforms import InterpolationMode as IM
from torchvision.transforms.v2 import functional as TF

from metric.data import load_omniglot, open_image
from metric.fastdata import TensorMildAugment, _resize, eval_resize, normalize, to_uint8_batch, use_tensor_cache
from metric.train import train
from xbn_queue.training.augment import erase, sample_erasing
from xbn_queue.training.checkpoint import load_checkpoint

from .helpers import tiny_cfg

S = 32


@pytest.fixture(scope="module")
def omniglot():
    return load_omniglot()


@pytest.fixture(scope="module")
def batch(omniglot):
    return _resize(to_uint8_batch(omniglot.train.items[::40][:40]), (S, S), "bilinear")  # (40, 1, 32, 32) uint8


def reference(images, p, i):
    """torchvision's per-image pipeline with the same parameters: resized crop -> affine -> flip."""
    t, l, h, w = p["crop"][i].tolist()
    x = images[i:i + 1].double() / 255.0
    y = TF.resized_crop(x, t, l, h, w, [S, S], interpolation=IM.BILINEAR, antialias=False)
    y = TF.affine(y, angle=float(p["angle"][i]), translate=[int(p["translate"][i, 0]), int(p["translate"][i, 1])],
                  scale=1.0, shear=[0.0, 0.0], interpolation=IM.BILINEAR, fill=0.0)
    return TF.horizontal_flip(y) if bool(p["flip"][i]) else y


def neutral(n):
    return {"crop": torch.tensor([[0, 0, S, S]] * n), "angle": torch.zeros(n), "translate": torch.zeros(n, 2),
            "flip": torch.zeros(n, dtype=torch.bool), "erase": torch.zeros(n, 4, dtype=torch.long)}


def _foreground_diff(a, b):
    """|a - b| over the pixels where either image is >= 1/255 (a character is mostly black background)."""
    fg = (a >= 1 / 255) | (b >= 1 / 255)
    return (a - b).abs()[fg]


@pytest.mark.parametrize("part, tol_mean, tol_max", [("none", 1e-6, 1e-6), ("flip", 1e-6, 1e-6), ("translate", 1e-6, 1e-6),
                                                     ("angle", 1e-5, 1e-5),
                                                     ("crop", 2e-3, 0.15)])  # crop: neighbours outside the crop enter at its edge
def test_the_grid_reproduces_each_torchvision_op_on_the_cached_image(batch, part, tol_mean, tol_max):
    """The geometry of one grid_sample: each op alone, on the 32-px cached image, against torchvision's tensor op
    (bilinear, no antialiasing). This is not the PIL pipeline of a non-cached run: see the next test."""
    aug = TensorMildAugment(S, 0.6, hflip=0.5, mean=(0, 0, 0), std=(1, 1, 1))
    drawn = aug.sample_params(len(batch), S, S, torch.Generator().manual_seed(3))
    p = neutral(len(batch))
    if part != "none":
        p[part] = drawn[part]
    if part == "flip":
        assert 0 < int(p["flip"].sum()) < len(batch)
    ours = aug.apply(batch, p)[:, :1].double()  # (B, 1, S, S)
    ref = torch.cat([reference(batch, p, i) for i in range(len(batch))])  # (B, 1, S, S)
    d = _foreground_diff(ours, ref)
    assert d.mean().item() < tol_mean and d.max().item() < tol_max, (part, d.mean().item(), d.max().item())


def _pil_mild(items, crops, angles, shifts):
    """The non-cached --augment mild pipeline of a run (metric.train.build_transforms) with fixed parameters:
    RandomResizedCrop(32, bicubic) of the 105-px original, RandomAffine (nearest, fill 0), ToTensor."""
    from torchvision.transforms import functional as F1

    from metric.train import build_transforms

    from metric.config import MetricConfig, resolve_config

    cfg = resolve_config(MetricConfig(dataset="omniglot"))  # the defaults of --dataset omniglot
    assert (cfg.augment, cfg.image_size, cfg.hflip) == ("mild", S, 0.0)
    tf, _ = build_transforms(cfg)
    kinds = [type(t).__name__ for t in tf.transforms]
    assert kinds[:4] == ["RandomResizedCrop", "RandomAffine", "RandomHorizontalFlip", "ToTensor"]
    rrc, aff = tf.transforms[0], tf.transforms[1]
    out = []
    for item, (t, l, h, w), a, (tx, ty) in zip(items, crops.tolist(), angles.tolist(), shifts.tolist()):
        img = F1.resized_crop(open_image(item), t, l, h, w, [S, S], interpolation=rrc.interpolation)
        img = F1.affine(img, angle=a, translate=[int(tx), int(ty)], scale=1.0, shear=[0.0, 0.0],
                        interpolation=aff.interpolation, fill=aff.fill)
        out.append(F1.to_tensor(img)[:1].double())
    return torch.stack(out)  # (n, 1, S, S)


@pytest.mark.parametrize("area", [0.6, 0.8])
def test_the_cache_against_the_pil_pipeline_of_a_non_cached_run(omniglot, area):
    """docs/metric.md's numbers: the cache (32-px bilinear copy, one grid_sample) against the PIL pipeline on the
    105-px originals, same crop region, angle and shift. benchmarks/fastdata_vs_pil.py measured over 512 images a
    mean |difference| over non-background pixels of 0.14 (60 %) / 0.13 (80 %), max 0.65 / 0.64; a rotation of the
    wrong sign gives 0.27 / 0.25. Bounds: those plus a margin for this smaller sample."""
    items = list(omniglot.train.items[::37][:48])
    n, side = len(items), items[0].shape[0]
    g = torch.Generator().manual_seed(5)
    ratio = torch.exp(torch.empty(n).uniform_(np.log(3 / 4), np.log(4 / 3), generator=g))
    w = torch.round(torch.sqrt(area * side * side * ratio)).clamp(1, side).long()
    h = torch.round(torch.sqrt(area * side * side / ratio)).clamp(1, side).long()
    top = (torch.rand(n, generator=g) * (side - h + 1)).floor().long()
    left = (torch.rand(n, generator=g) * (side - w + 1)).floor().long()
    crops = torch.stack([top, left, h, w], dim=1)  # (n, 4) in 105-px pixels
    angles = torch.empty(n).uniform_(-10.0, 10.0, generator=g)
    shifts = torch.round(torch.empty(n, 2).uniform_(-0.05 * S, 0.05 * S, generator=g))
    ref = _pil_mild(items, crops, angles, shifts)

    cache = _resize(to_uint8_batch(items), (S, S), "bilinear")  # as TensorCache.build
    aug = TensorMildAugment(S, area, mean=(0, 0, 0), std=(1, 1, 1))

    def cached(angle):
        p = {"crop": crops.double() * (S / side), "angle": angle, "translate": shifts,
             "flip": torch.zeros(n, dtype=torch.bool), "erase": torch.zeros(n, 4, dtype=torch.long)}
        return aug.apply(cache, p)[:, :1].double()

    d = _foreground_diff(cached(angles), ref)
    wrong = _foreground_diff(cached(-angles), ref)
    print(f"area {area}: mean {d.mean().item():.4f} max {d.max().item():.3f}; wrong sign {wrong.mean().item():.4f}")
    assert d.mean().item() < 0.16 and d.max().item() < 0.75
    assert wrong.mean().item() > 1.6 * d.mean().item()


def test_parameters_follow_torchvision_ranges():
    aug = TensorMildAugment(S, 0.6, degrees=10, translate=0.05, hflip=0.25, re_prob=0.5)
    p = aug.sample_params(4000, S, S, torch.Generator().manual_seed(0))
    area = (p["crop"][:, 2] * p["crop"][:, 3]).double() / (S * S)
    assert area.min() >= 0.6 - 0.05 and area.max() <= 1.0
    assert p["angle"].abs().max() <= 10 and p["translate"].abs().max() <= round(0.05 * S)
    assert torch.equal(p["translate"], p["translate"].round())  # whole pixels, as torchvision
    assert abs(p["flip"].double().mean().item() - 0.25) < 0.03
    erased = p["erase"][:, 2] > 0
    assert abs(erased.double().mean().item() - 0.5) < 0.03
    e = p["erase"][erased].double()
    assert ((e[:, 2] * e[:, 3]) / (S * S)).min() >= 0.02 - 0.01 and ((e[:, 2] * e[:, 3]) / (S * S)).max() <= 0.33 + 0.02
    assert (e[:, 0] + e[:, 2]).max() <= S and (e[:, 1] + e[:, 3]).max() <= S


def test_erase_against_a_plain_loop():
    x = torch.randn(6, 3, 9, 7, dtype=torch.float64)
    boxes = sample_erasing(6, 9, 7, p=0.7, generator=torch.Generator().manual_seed(1))
    boxes[0] = torch.tensor([1, 2, 3, 4])
    expected = x.clone()
    for i, (t, l, h, w) in enumerate(boxes.tolist()):
        expected[i, :, t:t + h, l:l + w] = 0.0
    torch.testing.assert_close(erase(x, boxes), expected, rtol=0, atol=0)


def test_same_generator_same_batch_on_any_call(batch):
    aug = TensorMildAugment(S, 0.6, re_prob=0.3)
    a = aug(batch, torch.Generator().manual_seed(9))
    b = aug(batch, torch.Generator().manual_seed(9))
    c = aug(batch, torch.Generator().manual_seed(10))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (len(batch), 3, S, S) and a.dtype == torch.float32


def test_eval_resize_matches_timm_transform(omniglot):
    from timm.data import create_transform

    tf = create_transform(input_size=S, is_training=False, interpolation="bicubic")
    items = omniglot.query.items[:50]
    ref = torch.stack([tf(open_image(a)) for a in items])  # PIL: resize 36 (bicubic, antialias), centre crop 32
    ours = normalize(eval_resize(to_uint8_batch(items), S))
    diff = (ours - ref).abs() * 0.226  # back to [0, 1] units
    assert diff.mean().item() < 2e-3 and diff.max().item() < 0.08
    non_square = torch.zeros(2, 3, 40, 60, dtype=torch.uint8)
    assert eval_resize(non_square, S).shape == (2, 3, S, S)


def test_tensor_cache_rules():
    from metric.data import load_digits
    from xbn_queue.training.cli import UsageError

    digits = load_digits()
    assert use_tensor_cache("auto", "mild", digits) and not use_tensor_cache("auto", "timm", digits)
    assert use_tensor_cache("on", "timm", digits) and not use_tensor_cache("off", "mild", digits)
    paths = type(digits)("folder", type(digits.train)(["a.jpg"], np.zeros(1, np.int64)), digits.query, digits.query, True)
    assert not use_tensor_cache("auto", "mild", paths)
    with pytest.raises(UsageError, match="--tensor-cache on: needs equal-sized in-memory images"):
        use_tensor_cache("on", "mild", paths)


def test_cached_run_resumes_bit_identically(tmp_path):
    kw = dict(method="xbn", epochs=2, warmup_epochs=0, augment="mild", crop_min_scale=0.6, tensor_cache="on",
              checkpoint_every=3)
    train(tiny_cfg(tmp_path / "straight", **kw))
    r = train(tiny_cfg(tmp_path / "split", max_steps=7, **kw))
    assert r["stopped"] == "max_steps"
    train(tiny_cfg(tmp_path / "split", resume="auto", **kw))
    # the stop at --max-steps adds an evaluation record; the trained state must not differ at all
    a, b = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(tmp_path / "split" / "last.pt")
    for part in ("model", "memory"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)  # bit-identical
    assert a["state"]["global_step"] == b["state"]["global_step"] == 22


# ------------------------------------------------------------------------------ image files
def _write_pngs(root, arrays):
    """``{relative path: (H, W) or (H, W, 3) uint8}`` -> PNG files under ``root``."""
    from PIL import Image

    for rel, a in arrays.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(root / rel)


def _folder_of(root, omniglot, per_class=3):
    """The first ``per_class`` images of 2 training and 2 test characters of the embedded Omniglot as PNGs in
    ``train/`` and ``test/`` class folders, and the in-memory data of the same images in the same order."""
    from metric.data import RetrievalData, Split

    def part(split, sub):
        items, labels, files = [], [], {}
        for c in np.unique(split.labels)[:2]:
            for k, i in enumerate(np.flatnonzero(split.labels == c)[:per_class]):
                files[f"{sub}/class{int(c):04d}/{k:02d}.png"] = split.items[i]
                items.append(split.items[i])
                labels.append(int(c))
        return files, Split(items, np.asarray(labels))

    tr_files, train = part(omniglot.train, "train")
    te_files, test = part(omniglot.query, "test")
    _write_pngs(root, {**tr_files, **te_files})
    return RetrievalData("omniglot", train, test, test, True)


def test_a_folder_of_the_embedded_pngs_gives_the_in_memory_tensors(tmp_path, omniglot):
    """Equal-sized gray files: the very tensors of the in-memory path (so the run trains the same)."""
    from metric.data import load_folder
    from metric.fastdata import TensorCache

    in_memory = _folder_of(tmp_path / "f", omniglot)
    folder = load_folder(tmp_path / "f")
    assert [len(s) for s in (folder.train, folder.query)] == [len(in_memory.train), len(in_memory.query)] == [6, 6]
    a = TensorCache.build(in_memory, S, torch.device("cpu"))
    b = TensorCache.build(folder, S, torch.device("cpu"))
    assert b.files is not None and b.files.decoded == 12 and b.train.shape == (6, 1, S, S)
    for x, y in ((a.train, b.train), (a.train_eval.images, b.train_eval.images), (a.query.images, b.query.images)):
        assert torch.equal(x, y)


def test_the_folder_cache_equals_decoding_each_file_directly(tmp_path):
    """Files of several sizes and shapes, gray and colour: each cached copy equals that one file decoded with PIL
    and resized alone; a colour file makes every copy 3-channel; a crop item is decoded as its box."""
    from PIL import Image

    from metric.data import RetrievalData, Split
    from metric.fastdata import TensorCache

    rng = np.random.default_rng(0)
    arrays = {"a/0.png": rng.integers(0, 256, (40, 40), dtype=np.uint8),
              "a/1.png": rng.integers(0, 256, (30, 50, 3), dtype=np.uint8),
              "b/0.png": rng.integers(0, 256, (64, 48), dtype=np.uint8),
              "b/1.png": rng.integers(0, 256, (40, 40), dtype=np.uint8)}
    _write_pngs(tmp_path, arrays)
    paths = [str(tmp_path / r) for r in arrays]
    items = paths[:2] + [(paths[2], (4.0, 6.0, 40.0, 50.0))] + paths[3:]
    split = Split(items, np.array([0, 0, 1, 1]))
    cache = TensorCache.build(RetrievalData("folder", split, split, split, True), S, torch.device("cpu"))
    for j, item in enumerate(items):
        im = Image.open(item[0] if isinstance(item, tuple) else item).convert("RGB")
        if isinstance(item, tuple):
            im = im.crop((4, 6, 40, 50))
        x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)[None]  # (1, 3, H, W)
        assert torch.equal(cache.train[j], _resize(x, (S, S), "bilinear")[0]), j
        assert torch.equal(cache.query.images[j], eval_resize(x, S)[0]), j
    assert cache.train.shape == (4, 3, S, S) and bool(cache.train_ok.all())


def _cache_entries(file):
    return torch.load(file, weights_only=True)["keys"]


def test_the_disk_cache_is_reused_and_invalidated_by_size_mtime_additions_and_removals(tmp_path):
    import os

    from metric.fastdata import decode_files

    rng = np.random.default_rng(1)
    _write_pngs(tmp_path / "f", {f"c/{k}.png": rng.integers(0, 256, (20, 20), dtype=np.uint8) for k in range(3)})
    files = [str(tmp_path / "f" / "c" / f"{k}.png") for k in range(3)]
    cache = tmp_path / "cache"
    first = decode_files(files, S, cache)
    assert (first.decoded, first.reused) == (3, 0) and first.file.is_file() and not first.note
    again = decode_files(files, S, cache)
    assert (again.decoded, again.reused) == (0, 3)
    for k in files:
        assert torch.equal(again.train[k], first.train[k]) and torch.equal(again.eval[k], first.eval[k])
    # new bytes (another size) in one file: that file alone is decoded again, and gives the new image
    new = rng.integers(0, 256, (24, 24), dtype=np.uint8)
    _write_pngs(tmp_path / "f", {"c/1.png": new})
    edited = decode_files(files, S, cache)
    assert (edited.decoded, edited.reused) == (1, 2)
    assert torch.equal(edited.train[files[1]], decode_files([files[1]], S).train[files[1]])
    assert not torch.equal(edited.train[files[1]], first.train[files[1]])
    # the same bytes with another modification time: decoded again
    st = os.stat(files[2])
    os.utime(files[2], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert decode_files(files, S, cache).decoded == 1
    # an added file: decoded; a removed file: dropped from the cache file
    _write_pngs(tmp_path / "f", {"c/3.png": new})
    added = decode_files(files + [str(tmp_path / "f" / "c" / "3.png")], S, cache)
    assert (added.decoded, added.reused) == (1, 3)
    os.remove(files[0])
    left = decode_files(files[1:] + [str(tmp_path / "f" / "c" / "3.png")], S, cache)
    assert (left.decoded, left.reused) == (0, 3)
    assert files[0] not in _cache_entries(left.file) and len(_cache_entries(left.file)) == 3
    assert [p.name for p in cache.iterdir()] == [left.file.name]  # no temporary file left behind


def test_a_subset_keeps_the_other_entries_and_a_broken_cache_file_is_replaced(tmp_path):
    from metric.fastdata import decode_files

    rng = np.random.default_rng(2)
    _write_pngs(tmp_path / "f", {f"c/{k}.png": rng.integers(0, 256, (20, 20), dtype=np.uint8) for k in range(4)})
    files = [str(tmp_path / "f" / "c" / f"{k}.png") for k in range(4)]
    decode_files(files, S, tmp_path / "cache")
    sub = decode_files(files[:2], S, tmp_path / "cache")  # e.g. --max-per-class 2: the other two entries stay
    assert (sub.decoded, sub.reused) == (0, 2) and decode_files(files, S, tmp_path / "cache").reused == 4
    sub.file.write_bytes(sub.file.read_bytes()[:100])  # a truncated file (a run killed while copying it, say)
    broken = decode_files(files, S, tmp_path / "cache")
    assert broken.decoded == 4 and "could not read" in broken.note
    assert decode_files(files, S, tmp_path / "cache").reused == 4  # written again, whole
    assert decode_files(files, 16, tmp_path / "cache").decoded == 4  # another image size: its own file


def test_a_failed_write_leaves_the_cache_file_as_it_was(tmp_path, monkeypatch):
    """Writes go to a temporary file that replaces the cache file in one step: a reader (another run, another
    rank) sees the old file or the new one, never a part."""
    from metric import fastdata

    rng = np.random.default_rng(3)
    _write_pngs(tmp_path / "f", {f"c/{k}.png": rng.integers(0, 256, (20, 20), dtype=np.uint8) for k in range(3)})
    files = [str(tmp_path / "f" / "c" / f"{k}.png") for k in range(3)]
    first = fastdata.decode_files(files[:2], S, tmp_path / "cache")
    before = first.file.read_bytes()

    def full_disk(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fastdata.torch, "save", full_disk)
    out = fastdata.decode_files(files, S, tmp_path / "cache")
    assert "could not write" in out.note and "No space left" in out.note and len(out.train) == 3
    assert first.file.read_bytes() == before and [p.name for p in (tmp_path / "cache").iterdir()] == [first.file.name]


def test_unreadable_files_raise_or_are_marked(tmp_path):
    from metric.data import BadImageError, RetrievalData, Split
    from metric.fastdata import TensorCache, decode_files

    rng = np.random.default_rng(4)
    _write_pngs(tmp_path, {f"c/{k}.png": rng.integers(0, 256, (20, 20), dtype=np.uint8) for k in range(3)})
    (tmp_path / "c" / "1.png").write_bytes(b"not a png")
    files = [str(tmp_path / "c" / f"{k}.png") for k in range(3)]
    with pytest.raises(BadImageError, match="1.png"):
        decode_files(files, S)
    split = Split(files, np.zeros(3, np.int64))
    cache = TensorCache.build(RetrievalData("folder", split, split, split, True), S, torch.device("cpu"),
                              cache_dir=tmp_path / "cache", skip_bad=True)
    assert cache.train_ok.tolist() == [True, False, True] and cache.files.bad == {files[1]}
    assert [item[3] for item in cache.query.__getitems__([0, 1, 2])] == [True, False, True]
    assert files[1] not in _cache_entries(cache.files.file)  # tried again next time


def test_the_size_limit_of_image_files(tmp_path):
    """Within --tensor-cache-max-mb: cached; above it auto says why in one line and loads per image, on is refused."""
    from metric.data import load_folder
    from metric.fastdata import decoded_mib, tensor_cache_plan
    from xbn_queue.training.cli import UsageError

    from .conftest import make_folder

    data = load_folder(make_folder(tmp_path / "f"))  # 24 files
    need = decoded_mib(24, 64)
    assert need == pytest.approx(24 * 2 * 3 * 64 * 64 / 2**20)
    assert tensor_cache_plan("auto", "mild", data, 64, max_mb=need) == (True, "")
    assert tensor_cache_plan("auto", "timm", data, 64, max_mb=need) == (False, "")
    assert tensor_cache_plan("on", "timm", data, 64, max_mb=need) == (True, "")
    use, note = tensor_cache_plan("auto", "mild", data, 64, max_mb=need * 0.99)
    assert not use and note.startswith("--tensor-cache auto: 24 image files decoded at 64 px take") and "per image with PIL" in note
    assert tensor_cache_plan("auto", "timm", data, 64, max_mb=0) == (False, "")  # nothing to say: not asked for
    with pytest.raises(UsageError, match="--tensor-cache on: .* more than --tensor-cache-max-mb 0"):
        tensor_cache_plan("on", "mild", data, 64, max_mb=0)


def test_a_folder_run_above_the_limit_says_so_and_loads_per_image(tmp_path, capsys):
    from .conftest import make_folder

    root = make_folder(tmp_path / "f")
    kw = dict(dataset="folder", data_root=str(root), split="instance", train_fraction=0.5, augment="mild",
              backbone="tinycnn", pretrained=False, image_size=16, embedding_dim=32, epochs=1, warmup_epochs=0,
              batch_size=8, m_per_class=2, memory_size="16", workers=0, max_steps=1)
    train(tiny_cfg(tmp_path / "above", tensor_cache_max_mb=0, **kw))
    err = capsys.readouterr().err
    assert "--tensor-cache auto: 24 image files decoded at 16 px take 0 MiB, more than --tensor-cache-max-mb 0; " \
           "loading them per image with PIL" in err and "tensor cache:" not in err
    train(tiny_cfg(tmp_path / "within", tensor_cache_dir=str(tmp_path / "cache"), **kw))
    err = capsys.readouterr().err
    assert "tensor cache: 24 image files decoded (0 reused from" in err and "--tensor-cache-max-mb" not in err
    train(tiny_cfg(tmp_path / "again", tensor_cache_dir=str(tmp_path / "cache"), **kw))
    assert "tensor cache: 0 image files decoded (24 reused from" in capsys.readouterr().err


def _decode_repeatedly(args):
    from metric.fastdata import decode_files

    files, cache, rounds = args
    for _ in range(rounds):
        out = decode_files(files, S, cache)
        assert not out.note, out.note  # never a part of a file
    return out.reused


def test_two_processes_sharing_a_cache_folder_only_ever_read_whole_files(tmp_path):
    """Two processes (two runs, or two ranks) decode overlapping subsets into one cache file at once."""
    import multiprocessing

    from metric.fastdata import decode_files

    rng = np.random.default_rng(5)
    _write_pngs(tmp_path / "f", {f"c/{k}.png": rng.integers(0, 256, (20, 20), dtype=np.uint8) for k in range(8)})
    files = [str(tmp_path / "f" / "c" / f"{k}.png") for k in range(8)]
    with multiprocessing.get_context("fork").Pool(2) as pool:
        pool.map(_decode_repeatedly, [(files[:6], tmp_path / "cache", 50), (files[2:], tmp_path / "cache", 50)])
    final = decode_files(files, S, tmp_path / "cache")
    assert not final.note and final.decoded + final.reused == 8
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [final.file.name]  # no temporary file left


def test_a_folder_run_on_the_disk_cache_resumes_bit_identically(tmp_path):
    """The straight run decodes the files; the interrupted one and its resumption read them back from disk."""
    from .conftest import make_folder

    root = make_folder(tmp_path / "f", classes=tuple("abcdef"), per_class=6)
    kw = dict(dataset="folder", data_root=str(root), split="instance", train_fraction=0.5, augment="mild",
              backbone="tinycnn", pretrained=False, image_size=16, embedding_dim=32, epochs=2, warmup_epochs=0,
              batch_size=8, m_per_class=2, memory_size="16", workers=0, checkpoint_every=2,
              tensor_cache_dir=str(tmp_path / "cache"))
    train(tiny_cfg(tmp_path / "straight", **kw))
    assert train(tiny_cfg(tmp_path / "split", max_steps=3, **kw))["stopped"] == "max_steps"
    train(tiny_cfg(tmp_path / "split", resume="auto", **kw))
    a, b = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(tmp_path / "split" / "last.pt")
    assert a["state"]["global_step"] == b["state"]["global_step"] > 3
    for part in ("model", "memory"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)  # bit-identical


def test_files_embedded_later_are_decoded_as_the_runs_cache_decoded_them(tmp_path, omniglot):
    """xbn-metric embed of image files with a run that evaluated through its tensor cache: each file gives the
    cache's evaluation tensor (here: the in-memory Omniglot images, bit for bit, as PNGs); an unreadable file is
    marked; a run that evaluated through its transform keeps the transform."""
    from types import SimpleNamespace

    from metric.data import ImageDataset, Split
    from metric.fastdata import DecodedFileSplit, TensorCache
    from metric.retrieval.embedding import _image_dataset

    in_memory = _folder_of(tmp_path / "f", omniglot)
    files = sorted(str(p) for p in (tmp_path / "f" / "test").rglob("*.png"))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    split = Split(files + [str(tmp_path / "bad.png")], np.arange(len(files) + 1))
    cached = TensorCache.build(in_memory, S, torch.device("cpu"))
    ds = DecodedFileSplit(split, S)
    for j in range(len(files)):
        x, label, index, ok = ds[j]
        assert torch.equal(x, normalize(cached.query.images[j:j + 1])[0]) and (label, index, ok) == (j, j, True)
    x, _, _, ok = ds[len(files)]
    assert not ok and x.shape == (3, S, S)
    cfg = SimpleNamespace(tensor_cache="auto", augment="mild", image_size=S)
    assert isinstance(_image_dataset(SimpleNamespace(config=cfg, files_cached=True, transform=None), files),
                      DecodedFileSplit)
    assert isinstance(_image_dataset(SimpleNamespace(config=cfg, files_cached=False, transform=None), files),
                      ImageDataset)
