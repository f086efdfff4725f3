"""Omniglot: the embedded subset split by alphabet, the full dataset's standard layout, error paths."""

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import metric.data as md
from metric.data import DataFormatError, load_omniglot

from tests.inprocess import run_inprocess


def test_embedded_split_by_alphabet():
    d = load_omniglot()
    assert d.info["train_alphabets"] == ["Balinese", "Greek", "Korean"]
    assert d.info["test_alphabets"] == ["Early_Aramaic", "Latin"]
    # 24 + 24 + 40 characters train, 22 + 26 are retrieved; 20 drawings each
    assert (len(d.train), d.train.num_classes) == (1760, 88)
    assert (len(d.query), d.query.num_classes) == (960, 48)
    assert d.query_is_gallery and d.query is d.gallery
    assert not set(d.train.labels.tolist()) & set(d.query.labels.tolist())  # characters never seen in training
    assert np.bincount(d.query.labels - d.query.labels.min()).tolist() == [20] * 48
    img = d.train.items[0]
    assert img.shape == (105, 105) and img.dtype == np.uint8
    # inverted: strokes bright on a black background (most pixels are background)
    assert np.median(img) == 0 and img.max() == 255


def test_embedded_is_package_data():
    assert md.OMNIGLOT_EMBEDDED.is_file()
    assert (md.OMNIGLOT_EMBEDDED.parent / "LICENSE").read_text().startswith("The MIT License")
    assert "Lake" in (md.OMNIGLOT_EMBEDDED.parent / "README.md").read_text()


def _png(value: int, size: int = 12) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _standard_tree(root: Path, kind: str, alphabets, chars=2, drawings=3) -> None:
    for a in alphabets:
        for c in range(chars):
            d = root / f"images_{kind}" / a / f"character{c + 1:02d}"
            d.mkdir(parents=True)
            for k in range(drawings):
                (d / f"{k:04d}_{c:02d}.png").write_bytes(_png(40 * c + k))


def test_standard_layout(tmp_path):
    _standard_tree(tmp_path / "omniglot-py", "background", ["Alpha", "Beta"])  # torchvision's layout
    _standard_tree(tmp_path, "evaluation", ["Gamma"], chars=3)
    d = load_omniglot(tmp_path)
    assert d.info["train_alphabets"] == ["Alpha", "Beta"] and d.info["test_alphabets"] == ["Gamma"]
    assert (len(d.train), d.train.num_classes, len(d.query), d.query.num_classes) == (12, 4, 9, 3)
    assert d.train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert d.query.labels.tolist() == [4, 4, 4, 5, 5, 5, 6, 6, 6]
    # inverted pixel values
    assert int(d.train.items[1][0, 0]) == 255 - 1


def test_standard_layout_errors(tmp_path):
    with pytest.raises(DataFormatError, match="does not exist"):
        load_omniglot(tmp_path / "nowhere")
    with pytest.raises(DataFormatError, match="images_background"):
        load_omniglot(tmp_path)
    _standard_tree(tmp_path, "background", ["Alpha"])
    (tmp_path / "images_evaluation").mkdir()
    with pytest.raises(DataFormatError, match="holds no <Alphabet>/<character>/<image>.png"):
        load_omniglot(tmp_path)
    bad = tmp_path / "images_evaluation" / "Gamma" / "character01"
    bad.mkdir(parents=True)
    (bad / "0001_01.png").write_bytes(b"not a png")
    with pytest.raises(DataFormatError, match=r"cannot read image .*0001_01.png"):
        load_omniglot(tmp_path)


def test_embedded_zip_missing_or_corrupt(tmp_path, monkeypatch):
    monkeypatch.setattr(md, "OMNIGLOT_EMBEDDED", tmp_path / "gone.zip")
    with pytest.raises(DataFormatError, match="embedded subset .*gone.zip is missing"):
        load_omniglot()
    corrupt = tmp_path / "corrupt.zip"
    corrupt.write_bytes(b"PK\x03\x04 truncated")
    monkeypatch.setattr(md, "OMNIGLOT_EMBEDDED", corrupt)
    with pytest.raises(DataFormatError, match="corrupt.zip is not a readable zip archive"):
        load_omniglot()
    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("top/Latin/character01/a.png", _png(3))
    monkeypatch.setattr(md, "OMNIGLOT_EMBEDDED", other)
    with pytest.raises(DataFormatError, match="lacks the alphabets of the embedded split"):
        load_omniglot()


def test_download_needs_a_root():
    with pytest.raises(DataFormatError, match="--download needs --data-root"):
        load_omniglot(None, download=True)


@pytest.mark.parametrize("argv, match", [
    (["--dataset", "omniglot", "--data-root", "/no/such/omniglot"], "does not exist"),
    (["--dataset", "digits", "--download"], "--download: applies to --dataset omniglot, cub, cars196 only, not digits"),
    (["--dataset", "omniglot", "--download"], "--download: needs --data-root"),
])
def test_cli_errors_are_one_line(tmp_path, argv, match):
    out = tmp_path / "run"
    proc = run_inprocess("metric", [*argv, "--output-dir", str(out), "--epochs", "1"])
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and match in lines[0], proc.stderr
    assert not out.exists()


def test_a_short_omniglot_comparison_end_to_end(tmp_path):
    """The main job's command, shortened: the embedded data, the tensor cache, both baselines, the table."""
    out = tmp_path / "cmp"
    proc = run_inprocess("metric", ["compare", "--dataset", "omniglot", "--methods", "xbm,xbn", "--seeds", "1", "--epochs", "1",
                    "--max-steps", "12", "--probe-size", "8", "--staleness-samples", "32", "--output-dir", str(out),
                    "--no-progress"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "recipe: from scratch, small grayscale images (backbone conv4" in proc.stderr
    assert "AdamW lr 0.001, batch 16 (4 per class)" in proc.stderr
    table = (out / "compare.md").read_text()
    for row in ("| Raw pixels |", "| Untrained net |", "| XBM |", "| XBN |"):
        assert row in table
    assert (out / "compare.png").is_file()
    cfg = (out / "xbn-seed0" / "config.yaml").read_text()
    assert "dataset: omniglot" in cfg and "tensor_cache: auto" in cfg


# ------------------------------------------------------------------ --omniglot-rotations
def test_rotations_make_four_times_the_classes_from_the_same_images():
    import torch

    plain, rot = load_omniglot(), load_omniglot(rotations=4)
    n_labels = 88 + 48  # every character of the embedded subset
    assert (len(rot.train), rot.train.num_classes) == (4 * 1760, 4 * 88)
    assert (len(rot.query), rot.query.num_classes) == (4 * 960, 4 * 48)
    assert rot.query_is_gallery and rot.query is rot.gallery and rot.info["rotations"] == 4
    assert not set(rot.train.labels.tolist()) & set(rot.query.labels.tolist())  # still never seen in training
    for split, orig in ((rot.train, plain.train), (rot.query, plain.query)):
        n = len(orig)
        assert np.bincount(split.labels)[np.unique(split.labels)].tolist() == [20] * (4 * orig.num_classes)
        for k in range(4):
            assert split.labels[k * n:(k + 1) * n].tolist() == (orig.labels + k * n_labels).tolist()
            for i in (0, 7, n - 1):  # rotation k of image i sits at k * n + i: torch.rot90 of the original
                got = torch.from_numpy(split.items[k * n + i])
                assert torch.equal(got, torch.rot90(torch.from_numpy(orig.items[i]), k)), (k, i)
    with pytest.raises(ValueError, match="rotations must be one of"):
        load_omniglot(rotations=2)


def test_rotations_on_the_standard_layout(tmp_path):
    _standard_tree(tmp_path, "background", ["Alpha", "Beta"])
    _standard_tree(tmp_path, "evaluation", ["Gamma"], chars=3)
    d = md.load_dataset("omniglot", tmp_path, omniglot_rotations=4)
    assert (len(d.train), d.train.num_classes, len(d.query), d.query.num_classes) == (48, 16, 36, 12)
    assert d.train.labels.tolist()[:12] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert d.train.labels.tolist()[12:15] == [7, 7, 7] and d.query.labels.tolist()[9:12] == [11, 11, 11]  # + 7 labels


def test_a_run_with_rotated_classes_uses_the_tensor_cache_and_says_so(tmp_path, capsys):
    import yaml

    from metric.config import MetricConfig
    from metric.train import MetricRun

    cfg = MetricConfig(dataset="omniglot", omniglot_rotations=4, method="xbn", epochs=1, max_steps=3, probe_size=8,
                       staleness_samples=16, drift_every=0, progress=False, output_dir=str(tmp_path / "run"))
    run = MetricRun(cfg)
    try:
        summary = run.fit()
    finally:
        run.close()
    assert run.cache is not None and run.cache.train.shape[0] == 4 * 1760 and len(run.cache.query) == 4 * 960
    assert run.rows == 4 * 1760 // 2 and summary.global_step == 3
    assert "--omniglot-rotations 4" in capsys.readouterr().err  # the recipe line
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["omniglot_rotations"] == 4


@pytest.mark.parametrize("argv, match", [
    (["--dataset", "digits", "--omniglot-rotations", "4"], "--omniglot-rotations 4: applies to --dataset omniglot only"),
    (["--dataset", "omniglot", "--omniglot-rotations", "2"], "argument --omniglot-rotations: invalid choice: 2"),
])
def test_rotations_cli_errors_are_one_line(tmp_path, argv, match):
    out = tmp_path / "run"
    proc = run_inprocess("metric", [*argv, "--output-dir", str(out), "--epochs", "1"])
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and match in lines[0], proc.stderr
    assert not out.exists()
def _no_network(monkeypatch):
    """Every URL open fails as it does without network (nothing is ever fetched)."""
    import urllib.error
    import urllib.request

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.mark.parametrize("where", ["new", "existing"])
def test_download_without_network_is_one_line_exit_2_and_leaves_nothing(tmp_path, monkeypatch, capsys, where):
    from metric.cli import main

    _no_network(monkeypatch)
    keep = tmp_path / "data" / "mine.txt"
    if where == "existing":  # a --data-root the user already has: only what this call made goes
        keep.parent.mkdir()
        keep.write_text("kept")
    root = tmp_path / "data" / "omniglot" if where == "new" else tmp_path / "data"
    out = tmp_path / "run"
    before = sorted(tmp_path.rglob("*"))
    code = main(["--dataset", "omniglot", "--download", "--data-root", str(root), "--output-dir", str(out)])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("xbn-metric: error: --download: could not fetch "
                               "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/images_background.zip "
                               "(<urlopen error [Errno -2] Name or service not known>); nothing was kept.")
    assert f"unzip both into {root / 'omniglot-py'}/ (giving images_background/<Alphabet>/<character>/<image>.png" in lines[0]
    assert sorted(tmp_path.rglob("*")) == before  # no DIR/omniglot-py/, no DIR created, no run folder


def test_a_failed_download_removes_only_the_files_it_created(tmp_path, monkeypatch):
    """The first zip arrives, the second fails half-way: both go, the user's file in omniglot-py/ stays."""
    import urllib.error

    import torchvision.datasets.omniglot as tvo

    folder = tmp_path / "omniglot-py"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")

    def fake(url, root, filename=None, md5=None):
        if "background" in url:
            (Path(root) / "images_background" / "Greek" / "c1").mkdir(parents=True)
            (Path(root) / "images_background" / "Greek" / "c1" / "a.png").write_bytes(b"png")
            (Path(root) / filename).write_bytes(b"zip")
            return
        (Path(root) / filename).write_bytes(b"half a zi")
        raise urllib.error.URLError("timed out")

    monkeypatch.setattr(tvo, "download_and_extract_archive", fake)
    monkeypatch.setattr(tvo.Omniglot, "_check_integrity",  # no md5 of the fake zips: "there" once unpacked
                        lambda self: (Path(self.root) / self._get_target_folder()).is_dir())
    with pytest.raises(DataFormatError, match=r"^--download: could not fetch \S+/images_evaluation.zip \(<urlopen error "
                                              r"timed out>\); nothing was kept"):
        load_omniglot(tmp_path, download=True)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["omniglot-py",
                                                                                      "omniglot-py/notes.txt"]
