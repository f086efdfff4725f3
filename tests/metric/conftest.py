"""Fixture trees in the real on-disk formats (tiny generated images)."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_image(path: Path, seed: int, size=(12, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def make_sop(root: Path, n_train_classes=6, n_test_classes=5, per_class=3) -> Path:
    """SOP layout: Ebay_train.txt / Ebay_test.txt + <super>_final/ images."""
    image_id = 1
    for name, first_class, n_classes in (("Ebay_train.txt", 1, n_train_classes), ("Ebay_test.txt", 1 + n_train_classes, n_test_classes)):
        lines = ["image_id class_id super_class_id path"]
        for c in range(first_class, first_class + n_classes):
            sup = 1 + c % 2
            folder = ["bicycle_final", "chair_final"][sup - 1]
            for k in range(per_class):
                rel = f"{folder}/{c:06d}_{k}.JPG"
                write_image(root / rel, image_id)
                lines.append(f"{image_id} {c} {sup} {rel}")
                image_id += 1
        (root / name).write_text("\n".join(lines) + "\n")
    return root


def make_inshop(root: Path, at_root=False) -> Path:
    rows = []
    for item in range(1, 5):  # train items
        for k in range(3):
            rows.append((f"img/WOMEN/Dresses/id_{item:08d}/{k:02d}_1_front.jpg", f"id_{item:08d}", "train"))
    for item in range(5, 9):  # test items: 1 query + 2 gallery each
        rows.append((f"img/MEN/Tees/id_{item:08d}/00_1_front.jpg", f"id_{item:08d}", "query"))
        for k in (1, 2):
            rows.append((f"img/MEN/Tees/id_{item:08d}/{k:02d}_2_side.jpg", f"id_{item:08d}", "gallery"))
    for i, (rel, _, _) in enumerate(rows):
        write_image(root / rel, 100 + i)
    listfile = root / "list_eval_partition.txt" if at_root else root / "Eval" / "list_eval_partition.txt"
    listfile.parent.mkdir(parents=True, exist_ok=True)
    text = f"{len(rows)}\nimage_name item_id evaluation_status\n" + "".join(f"{r:<60}{i:<20}{s}\n" for r, i, s in rows)
    listfile.write_text(text)
    return root


def make_deepfashion2(root: Path) -> Path:
    """train/ and validation/ with annos/NNNNNN.json + image/NNNNNN.jpg; items with styles 0/1/2."""
    n = 0
    for part, pairs in (("train", (1, 2, 3)), ("validation", (7, 8))):
        for pair in pairs:
            for source in ("user", "shop", "shop"):
                n += 1
                write_image(root / part / "image" / f"{n:06d}.jpg", n, size=(40, 30))
                ann = {"source": source, "pair_id": pair,
                       "item1": {"category_id": 1, "category_name": "short sleeve top", "style": 1,
                                 "bounding_box": [2, 3, 20, 25], "landmarks": [], "segmentation": [],
                                 "scale": 1, "occlusion": 1, "zoom_in": 1, "viewpoint": 2},
                       "item2": {"category_id": 8, "category_name": "trousers", "style": 0,
                                 "bounding_box": [5, 5, 30, 28]}}
                if pair % 2 == 1:
                    ann["item3"] = {"category_id": 8, "category_name": "trousers", "style": 2,
                                    "bounding_box": [10, 1, 35, 29]}
                (root / part / "annos").mkdir(parents=True, exist_ok=True)
                (root / part / "annos" / f"{n:06d}.json").write_text(json.dumps(ann, indent=1))
    return root


def make_folder(root: Path, classes=("ant", "bee", "cat", "dog", "eel", "fox"), per_class=4, with_train_test=False) -> Path:
    seed = 0
    subs = ["train", "test"] if with_train_test else [""]
    for sub in subs:
        for c in classes:
            for k in range(per_class):
                seed += 1
                write_image(root / sub / c / f"{k:03d}.png", seed, size=(16, 16))
    return root


@pytest.fixture
def sop_root(tmp_path):
    return make_sop(tmp_path / "sop")


@pytest.fixture
def inshop_root(tmp_path):
    return make_inshop(tmp_path / "inshop")


@pytest.fixture
def df2_root(tmp_path):
    return make_deepfashion2(tmp_path / "df2")


@pytest.fixture
def folder_root(tmp_path):
    return make_folder(tmp_path / "folder")


#: The trained digits run shared by the retrieval tests: two short epochs, the test half queried leave-one-out.
TRAINED_RUN = dict(train_fraction=0.5, epochs=2, warmup_epochs=0, drift_every=0)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """``(run folder, train() result)`` of a digits run trained for a few seconds (:data:`TRAINED_RUN`)."""
    from metric.config import resolve_config
    from metric.train import train

    from .helpers import tiny_cfg

    out = tmp_path_factory.mktemp("trained-run")
    return out, train(resolve_config(tiny_cfg(out, **TRAINED_RUN)))
