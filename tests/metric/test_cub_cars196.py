"""CUB-200-2011 and Cars196 through pytorch-metric-learning's dataset classes (``metric/datasets/pml.py``).

The fixtures are written in exactly the layouts PML's ``CUB`` and ``Cars196`` read (their
``generate_split``): tiny JPEGs, a few classes on both sides of each split boundary. Nothing is ever
downloaded: the download tests refuse every URL, or hand PML an archive made here.
"""

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from metric.data import DataFormatError, load_dataset
from metric.datasets.pml import BENCHMARKS, pml_class
from xbn_queue.training.tracking import read_metrics

from .conftest import write_image
from .helpers import tiny_cfg

#: Class ids of the fixtures: both sides of PML's boundaries (CUB 100 | 101, Cars196 98 | 99).
CUB_CLASSES = (1, 2, 3, 100, 101, 102, 150, 200)
CARS_CLASSES = (1, 2, 3, 98, 99, 100, 174, 196)
#: A real Cars196 name with a '/' (class 174 in names.csv); PML's folder name has '-' instead.
SLASHED = "Ram C/V Cargo Van Minivan 2012"


def make_cub(root: Path, classes=CUB_CLASSES, per_class: int = 4) -> Path:
    """``root/CUB_200_2011/{images.txt, image_class_labels.txt, images/<NNN.Name>/<file>.jpg}`` (+ classes.txt)."""
    base = root / "CUB_200_2011"
    images, labels = [], []
    image_id = 0
    for c in classes:
        folder = f"{c:03d}.Bird_{c}"
        for k in range(per_class):
            image_id += 1
            rel = f"{folder}/Bird_{c}_{k:04d}_{image_id}.jpg"
            write_image(base / "images" / rel, image_id)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c}")
    (base / "images.txt").write_text("\n".join(images) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (base / "classes.txt").write_text("".join(f"{c} {c:03d}.Bird_{c}\n" for c in range(1, 201)))
    return root


def cars_name(c: int) -> str:
    return SLASHED if c == 174 else f"Make{c} Model{c} Sedan 20{c % 13:02d}"


def make_cars(root: Path, classes=CARS_CLASSES, per_class: int = 4) -> Path:
    """``root/{names.csv, anno_train.csv, anno_test.csv, car_data/car_data/{train,test}/<name>/<file>}``.

    As in Kaggle's archive: names.csv has all 196 names, each class has images in both csv files
    (half each), numbered per csv, rows ``file,x1,y1,x2,y2,class`` without a header.
    """
    (root / "names.csv").parent.mkdir(parents=True, exist_ok=True)
    (root / "names.csv").write_text("".join(cars_name(c) + "\n" for c in range(1, 197)))
    n = {"train": 0, "test": 0}
    rows = {"train": [], "test": []}
    for c in classes:
        for k in range(per_class):
            part = "train" if k % 2 == 0 else "test"
            n[part] += 1
            file = f"{n[part]:05d}.jpg"
            write_image(root / "car_data" / "car_data" / part / cars_name(c).replace("/", "-") / file, 1000 * c + k)
            rows[part].append(f"{file},{3 + k},{2 + k},{40 + k},{30 + k},{c}")
    for part in ("train", "test"):
        (root / f"anno_{part}.csv").write_text("\n".join(rows[part]) + "\n")
    return root


MAKERS = {"cub": (make_cub, CUB_CLASSES, 100), "cars196": (make_cars, CARS_CLASSES, 98)}


@pytest.fixture(params=["cub", "cars196"])
def bench(request, tmp_path):
    name = request.param
    make, _, _ = MAKERS[name]
    return name, make(tmp_path / name)


def test_split_files_and_labels_are_pmls(bench):
    """Items, labels and classes are PML's split=train / split=test, with PML's boundary (CUB 100|101, Cars 98|99)."""
    name, root = bench
    _, classes, last_train = MAKERS[name]
    data = load_dataset(name, root)
    assert data.query_is_gallery and data.query is data.gallery
    assert data.info["class_ids"] == {"train": [c for c in classes if c <= last_train],
                                      "test": [c for c in classes if c > last_train]}
    for split, ours in (("train", data.train), ("test", data.query)):
        pml = pml_class(name)(str(root), split=split)
        assert ours.items == [str(p) for p in pml.paths]
        ids = np.asarray(pml.labels)
        assert ours.num_classes == len(set(pml.labels)) == 4 and len(ours) == len(pml) == 16
        # the same partition: equal PML labels <=> equal codes, codes 0..C-1 in class-id order
        assert np.array_equal(ours.labels, np.searchsorted(np.unique(ids), ids))
    assert all(Path(p).is_file() for p in data.train.items + data.query.items)
    if name == "cars196":  # PML's folder for a name with '/', both csv files pooled per class
        slashed = [p for p in data.query.items if "Ram C-V Cargo Van Minivan 2012" in p]
        assert len(slashed) == 4 and {Path(p).parent.parent.name for p in slashed} == {"train", "test"}


def _break(name, root, what):
    spec = BENCHMARKS[name]
    if what == "meta":
        victim = root / spec.required[-1]
        victim.unlink()
        return str(victim)
    if what == "image":
        victim = Path(pml_class(name)(str(root), split="test").paths[-1])
        victim.unlink()
        return str(victim)
    if what == "parse":
        f = root / spec.required[0 if name == "cub" else 1]
        f.write_text(f.read_text().replace(".jpg", ".jpg extra", 1) if name == "cub" else "00001.jpg,1,2,3,4,notanumber\n")
        return "cannot parse"
    raise AssertionError(what)


@pytest.mark.parametrize("what, match", [
    ("meta", r"^{name}: {victim} not found: --data-root must hold the layout of pytorch_metric_learning\.datasets\.\w+ "
             r"\(--download fetches it\)$"),
    ("image", r"^{name}: image {victim} is listed \(in .*\) but missing$"),
    ("parse", r"^{name}: pytorch_metric_learning\.datasets\.\w+ cannot parse its files \(.*\): ValueError: "),
])
def test_a_wrong_layout_names_the_file(bench, what, match):
    import re

    name, root = bench
    victim = _break(name, root, what)
    with pytest.raises(DataFormatError, match=match.format(name=name, victim=re.escape(victim))):
        load_dataset(name, root)


def test_a_split_without_images_and_a_missing_root(tmp_path):
    root = make_cub(tmp_path / "cub", classes=(1, 2, 3))  # no class above 100: nothing to retrieve
    with pytest.raises(DataFormatError, match=r"^cub: no image of classes 101-200 \(PML's split='test'\) in "):
        load_dataset("cub", root)
    with pytest.raises(DataFormatError, match="--data-root is required for --dataset cars196"):
        load_dataset("cars196", None)
    with pytest.raises(DataFormatError, match="does not exist or is not a directory"):
        load_dataset("cars196", tmp_path / "nowhere")


def _main(argv, capsys):
    from metric.cli import main

    code = main(argv)
    err = capsys.readouterr().err
    return code, [ln for ln in err.splitlines() if ln.strip()]


@pytest.mark.parametrize("name", ["cub", "cars196"])
def test_cli_wrong_layout_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, name):
    root = MAKERS[name][0](tmp_path / "data")
    victim = _break(name, root, "meta")
    out = tmp_path / "run"
    code, lines = _main(["--dataset", name, "--data-root", str(root), "--output-dir", str(out), "--backbone", "tinycnn",
                         "--no-pretrained"], capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"xbn-metric: error: {name}: {victim} not found"), lines
    assert not out.exists()


def _no_network(monkeypatch):
    import urllib.error
    import urllib.request

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.mark.parametrize("name, where", [("cub", "new"), ("cub", "empty"), ("cars196", "new")])
def test_download_offline_is_one_line_exit_2_and_leaves_nothing(tmp_path, monkeypatch, capsys, name, where):
    _no_network(monkeypatch)
    root = tmp_path / "data" / name
    if where == "empty":  # an empty folder of the user's: kept, and left empty
        root.mkdir(parents=True)
    before = sorted(tmp_path.rglob("*"))
    out = tmp_path / "run"
    code, lines = _main(["--dataset", name, "--download", "--data-root", str(root), "--output-dir", str(out),
                         "--backbone", "tinycnn", "--no-pretrained"], capsys)
    url = pml_class(name).DOWNLOAD_URL
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"xbn-metric: error: --download: could not fetch {url} (<urlopen error [Errno -2] Name "
                               "or service not known>); nothing was kept. To install ")
    assert str(root / BENCHMARKS[name].required[0]) in lines[0]  # the manual layout names the files
    assert sorted(tmp_path.rglob("*")) == before


def test_download_unpacks_pmls_archive_and_a_broken_one_is_removed(tmp_path, monkeypatch):
    """PML's own download path on an archive made here: a good one loads; one cut short leaves nothing."""
    import pytorch_metric_learning.datasets.cub as pml_cub

    src = make_cub(tmp_path / "src")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src / "CUB_200_2011", arcname="CUB_200_2011")
    archive = buf.getvalue()

    def fetch(url, filename, chunk_size=0):
        assert url == pml_cub.CUB.DOWNLOAD_URL
        Path(filename).write_bytes(archive)

    monkeypatch.setattr(pml_cub, "_urlretrieve", fetch)
    data = load_dataset("cub", tmp_path / "new" / "cub", download=True)
    assert len(data.train) == len(data.query) == 16
    assert not (tmp_path / "new" / "cub" / "CUB_200_2011.tgz").exists()  # PML removes its archive
    data = load_dataset("cub", tmp_path / "new" / "cub", download=True)  # a folder with files: not fetched again
    assert len(data.train) == 16

    monkeypatch.setattr(pml_cub, "_urlretrieve", lambda url, filename: Path(filename).write_bytes(archive[:100]))
    with pytest.raises(DataFormatError, match=r"^--download: could not fetch \S+CUB_200_2011\.tgz \("):
        load_dataset("cub", tmp_path / "cut" / "cub", download=True)
    assert not (tmp_path / "cut").exists()

    full = tmp_path / "mine"
    (full / "notes.txt").parent.mkdir()
    (full / "notes.txt").write_text("mine")  # PML downloads only into a new or empty folder
    with pytest.raises(DataFormatError, match=r"images\.txt not found: .*\(--download fetches it only into a new or "
                                              r"empty folder\)$"):
        load_dataset("cub", full, download=True)
    assert sorted(p.name for p in full.iterdir()) == ["notes.txt"]


def test_download_option_rules(capsys):
    code, lines = _main(["--dataset", "sop", "--download", "--data-root", "x"], capsys)
    assert code == 2 and lines == ["xbn-metric: error: --download: applies to --dataset omniglot, cub, cars196 only, not sop"]
    code, lines = _main(["--dataset", "cars196", "--download"], capsys)
    assert code == 2 and lines == ["xbn-metric: error: --download: needs --data-root DIR, the folder the full cars196 "
                                   "dataset is stored in"]


def test_defaults_are_the_papers_recipe_and_the_line_says_so():
    from metric.config import MetricConfig, resolve_config
    from metric.recipe import recipe_summary

    for name in ("cub", "cars196"):
        cfg = resolve_config(MetricConfig(dataset=name, data_root="x"))
        assert (cfg.backbone, cfg.pretrained, cfg.embedding_dim, cfg.batch_size, cfg.m_per_class, cfg.memory_size,
                cfg.epochs, cfg.lr, cfg.recall_ks) == ("resnet50", True, 512, 64, 4, 0.5, 50, 1e-4, [1, 2, 4, 8])
        line = recipe_summary(cfg)
        assert "recipe: paper (Section 5.1) (backbone resnet50, pretrained, linear head, 512-d)" in line
        assert "batch 64 (16 classes x 4 per class)" in line and "memory 50 % of the training set" in line
        assert f"through pytorch_metric_learning.datasets.{BENCHMARKS[name].class_name}" in line
    cub = recipe_summary(resolve_config(MetricConfig(dataset="cub", data_root="x")))
    # (5864 // 64) * 64 / 2092 = 2.78 s, 5924 / 15187 = 0.39 s (shared/GPU.md's ResNet-50 figures)
    assert ("expected GPU time per epoch on the full set about 2.8 s training + 0.4 s retrieval on one H200 (an "
            "estimate from shared/GPU.md") in cub
    cars = recipe_summary(resolve_config(MetricConfig(dataset="cars196", data_root="x")))
    assert "about 3.8 s training + 0.5 s retrieval" in cars  # (8054 // 64) * 64 / 2092 = 3.85, 8131 / 15187 = 0.54
    small = recipe_summary(resolve_config(MetricConfig(dataset="cub", data_root="x", backbone="tinycnn", pretrained=False)))
    assert "no GPU time estimate for --backbone tinycnn at 224 px" in small


@pytest.mark.parametrize("name", ["cub", "cars196"])
def test_a_short_run_trains_and_evaluates(tmp_path, capsys, name):
    from metric.train import train

    root = MAKERS[name][0](tmp_path / "data")
    cfg = tiny_cfg(tmp_path / "run", dataset=name, data_root=str(root), split="auto", method="xbn", batch_size=8,
                   m_per_class=2, memory_size="8", image_size=16, backbone="tinycnn", pretrained=False, workers=0,
                   warmup_epochs=0, recall_ks=[1, 2], drift_every=1)
    train(cfg)
    rec = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert rec["num_queries"] == 16 and rec["queries_without_positive"] == 0 and rec["step"] == 2  # 16 images // 8
    assert 0.0 <= rec["recall@1"] <= rec["recall@2"] <= 1.0 and 0.0 <= rec["r_precision"] <= 1.0
    assert 0.0 < rec["map@r"] <= 1.0 and np.isfinite(rec["loss"])
    assert f"pytorch_metric_learning.datasets.{BENCHMARKS[name].class_name}" in capsys.readouterr().err
