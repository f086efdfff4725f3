"""Loaders on fixture trees in the real formats: samples, labels, query/gallery split, error paths."""

from pathlib import Path

import numpy as np
import pytest
import torch

from metric.data import (BadImageError, DataFormatError, ImageDataset, load_deepfashion2, load_digits,
                         load_folder, load_inshop, load_sop)

from .conftest import make_folder, make_inshop


def test_sop(sop_root):
    d = load_sop(sop_root)
    assert len(d.train) == 18 and len(d.query) == 15
    assert d.query_is_gallery and d.query is d.gallery
    assert d.train.num_classes == 6 and d.query.num_classes == 5
    # consecutive labels, three images per class, in file order
    assert d.train.labels.tolist() == [c for c in range(6) for _ in range(3)]
    assert d.train.items[0].endswith("chair_final/000001_0.JPG")
    assert Path(d.query.items[0]).name == "000007_0.JPG"


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.replace("image_id class_id", "id class"), r"Ebay_train.txt:1: bad header"),
    (lambda t: t.replace("4 2 1 bicycle_final/000002_0.JPG", "4 2 bicycle_final/000002_0.JPG"), r"Ebay_train.txt:5: expected 4 fields"),
    (lambda t: t.replace("4 2 1 bicycle_final/000002_0.JPG", "4 x 1 bicycle_final/000002_0.JPG"), r"Ebay_train.txt:5: .*integers"),
    (lambda t: t.replace("000002_0.JPG", "missing.JPG"), r"Ebay_train.txt:5: image .bicycle_final/missing.JPG' is listed but missing"),
])
def test_sop_errors(sop_root, edit, match):
    f = sop_root / "Ebay_train.txt"
    f.write_text(edit(f.read_text()))
    with pytest.raises(DataFormatError, match=match):
        load_sop(sop_root)


def test_sop_missing_root_and_list(tmp_path, sop_root):
    with pytest.raises(DataFormatError, match="does not exist"):
        load_sop(tmp_path / "nope")
    with pytest.raises(DataFormatError, match="required"):
        load_sop(None)
    (sop_root / "Ebay_test.txt").unlink()
    with pytest.raises(DataFormatError, match="Ebay_test.txt.* not found"):
        load_sop(sop_root)


@pytest.mark.parametrize("at_root", [False, True])
def test_inshop(tmp_path, at_root):
    d = load_inshop(make_inshop(tmp_path / "i", at_root=at_root))
    assert not d.query_is_gallery
    assert len(d.train) == 12 and len(d.query) == 4 and len(d.gallery) == 8
    # query and gallery share the label coding: each query has exactly its two gallery images
    for lq in d.query.labels:
        assert (d.gallery.labels == lq).sum() == 2
    assert "id_00000005" in d.query.items[0]


@pytest.mark.parametrize("edit, match", [
    (lambda t: "abc\n" + t.split("\n", 1)[1], r"list_eval_partition.txt:1: expected the image count"),
    (lambda t: "99\n" + t.split("\n", 1)[1], r"list_eval_partition.txt:1: declares 99 images but lists 24"),
    (lambda t: t.replace("image_name item_id", "name item"), r"list_eval_partition.txt:2: bad header"),
    (lambda t: t.replace("id_00000002 ", "", 1), r"list_eval_partition.txt:6: expected 3 fields"),
    (lambda t: t.replace("query", "probe", 1), r"list_eval_partition.txt:15: unknown evaluation_status 'probe'"),
    (lambda t: t.replace("00_1_front.jpg", "zz.jpg", 1), r"list_eval_partition.txt:3: image .*zz.jpg' is listed but missing"),
])
def test_inshop_errors(inshop_root, edit, match):
    f = inshop_root / "Eval" / "list_eval_partition.txt"
    f.write_text(edit(f.read_text()))
    with pytest.raises(DataFormatError, match=match):
        load_inshop(inshop_root)


def test_inshop_missing_partition(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(DataFormatError, match="partition file not found"):
        load_inshop(tmp_path / "x")


def test_deepfashion2(df2_root):
    d = load_deepfashion2(df2_root)
    # train: pairs 1,2,3 x 3 images; item1 (style 1) always, item3 (style 2) for odd pairs, item2 (style 0) never
    assert len(d.train) == 3 * 3 + 2 * 3
    assert d.train.num_classes == 3 + 2
    # validation: pair 7 has item1+item3, pair 8 item1; queries = user items, gallery = shop items
    assert len(d.query) == 3 and len(d.gallery) == 6
    assert not d.query_is_gallery
    path, box = d.query.items[0]
    assert path.endswith("validation/image/000010.jpg") and box == (2.0, 3.0, 20.0, 25.0)
    for lq in d.query.labels:
        assert (d.gallery.labels == lq).sum() == 2  # the two shop images of the same (pair, category, style)
    # crops have the box's size
    ds = ImageDataset(d.query, transform=lambda im: torch.tensor(im.size))
    assert ds[0][0].tolist() == [18, 22]


def test_deepfashion2_errors(df2_root):
    anno = df2_root / "train" / "annos" / "000002.json"
    anno.write_text('{"source": "user",\n "pair_id": 1,\n "item1": {oops}}')
    with pytest.raises(DataFormatError, match=r"000002.json:3: invalid JSON"):
        load_deepfashion2(df2_root)
    anno.write_text('{"source": "user", "pair_id": 1, "item1": {"category_id": 1, "style": 1}}')
    with pytest.raises(DataFormatError, match=r"000002.json: item1 lacks bounding_box"):
        load_deepfashion2(df2_root)
    anno.write_text('{"source": "user", "pair_id": 1, "item1": {"category_id": 1, "style": 1, "bounding_box": [1, 1, 5, 5]}}')
    (df2_root / "train" / "image" / "000002.jpg").unlink()
    with pytest.raises(DataFormatError, match=r"000002.json: image .*000002.jpg' not found"):
        load_deepfashion2(df2_root)
    with pytest.raises(DataFormatError, match="annotation folder"):
        load_deepfashion2(df2_root / "train")


def test_folder_class_split(folder_root):
    d = load_folder(folder_root, split="auto", train_fraction=0.5, split_seed=0)
    tr, te = d.info["train_classes"], d.info["test_classes"]
    assert len(tr) == 3 and len(te) == 3 and not set(tr) & set(te)
    assert d.query_is_gallery and len(d.train) == 12 and len(d.query) == 12
    # the rule is the documented one: sorted names permuted by default_rng(seed)
    names = sorted(["ant", "bee", "cat", "dog", "eel", "fox"])
    perm = np.random.default_rng(0).permutation(6)
    assert tr == sorted(names[i] for i in perm[:3])
    perm1 = np.random.default_rng(1).permutation(6)  # another seed follows the same rule
    assert load_folder(folder_root, split_seed=1).info["train_classes"] == sorted(names[i] for i in perm1[:3])
    assert load_folder(folder_root, split_seed=0).info == d.info  # deterministic


def test_folder_instance_split_and_train_test(tmp_path, folder_root):
    d = load_folder(folder_root, split="instance", train_fraction=0.5)
    assert len(d.train) == 12 and len(d.query) == 12
    assert d.train.num_classes == 6 and d.query.num_classes == 6
    assert not set(d.train.items) & set(d.query.items)
    tt = make_folder(tmp_path / "tt", with_train_test=True)
    d = load_folder(tt)  # train/ and test/ as given
    assert all("/train/" in p for p in d.train.items) and all("/test/" in p for p in d.query.items)
    assert d.train.num_classes == 6
    d = load_folder(tt, split="class")  # zero-shot: disjoint classes, train from train/, test from test/
    assert not set(d.info["train_classes"]) & set(d.info["test_classes"])
    assert all("/train/" in p for p in d.train.items) and len(d.query) == 12


def test_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFormatError, match="no class folders"):
        load_folder(tmp_path / "empty")
    make_folder(tmp_path / "one", classes=("a",))
    with pytest.raises(DataFormatError, match="at least 2 classes"):
        load_folder(tmp_path / "one")


def test_digits():
    d = load_digits(split="class")
    assert sorted(np.unique(d.train.labels)) == [0, 1, 2, 3, 4]
    assert sorted(np.unique(d.query.labels)) == [5, 6, 7, 8, 9]
    assert len(d.train) + len(d.query) == 1797 and d.query_is_gallery
    assert d.train.items[0].dtype == np.uint8 and d.train.items[0].shape == (8, 8)
    inst = load_digits(split="instance")
    assert inst.train.num_classes == 10 and inst.query.num_classes == 10
    assert abs(len(inst.train) - len(inst.query)) <= 10
    assert load_digits().train.labels.tolist() == inst.train.labels.tolist()  # auto = instance


def test_bad_image_raises_or_is_skipped(folder_root):
    d = load_folder(folder_root, split="instance")
    bad = Path(d.train.items[0])
    bad.write_bytes(b"not an image")
    tf = lambda im: torch.zeros(3, 4, 4)  # noqa: E731
    with pytest.raises(BadImageError, match=str(bad)):
        ImageDataset(d.train, tf)[0]
    img, label, index, ok = ImageDataset(d.train, tf, skip_bad_images=True)[0]  # the trainer warns, once per file
    assert not ok and img.shape == (3, 4, 4) and index == 0
    assert ImageDataset(d.train, tf, skip_bad_images=True)[1][3]


def test_seeded_items_are_reproducible_and_keep_global_rng(folder_root):
    import torchvision.transforms as T

    d = load_folder(folder_root, split="instance")
    tf = T.Compose([T.RandomResizedCrop(8), T.ToTensor()])
    ds = ImageDataset(d.train, tf)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    a = ds[(3, 1234)][0]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, ds[(3, 1234)][0])
    assert not torch.equal(a, ds[(3, 4321)][0])
