"""``xbn-metric export``: TorchScript / ONNX files equal the PyTorch model on real images, with metadata."""

import json
import warnings

import numpy as np
import pytest
import torch

from metric.cli import main
from metric.config import resolve_config
from metric.data import load_digits, open_image
from metric.export import METADATA_KEY, run_exported
from metric.retrieval import file_sha256, load_run_model
from metric.train import train

from .helpers import tiny_cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(resolve_config(tiny_cfg(out, embedding_norm="bn", max_steps=3)))  # bn: the post-normalisation is exported too
    return out


def _real_batch(lm, n=64):
    """The first n held-out digits (real scans) through the run's evaluation transform: (n, 3, H, W)."""
    items = load_digits("instance", 0.1, 0).query.items[:n]
    return torch.stack([lm.transform(open_image(it)) for it in items])


@pytest.mark.parametrize("fmt,suffix", [("torchscript", ".pt"), ("onnx", ".onnx")])
def test_exported_model_equals_pytorch_on_real_images(run, tmp_path, fmt, suffix, capsys):
    if fmt == "onnx":
        onnx = pytest.importorskip("onnx")
    out = tmp_path / f"model{suffix}"
    assert main(["export", str(run), "--format", fmt, "--out", str(out)]) == 0
    lm = load_run_model(run, "cpu")
    x = _real_batch(lm)
    with torch.no_grad():
        ref = lm.model(x).numpy()  # (64, D)
    if fmt == "torchscript":
        files = {METADATA_KEY: ""}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
            module = torch.jit.load(str(out), _extra_files=files)
        meta = json.loads(files[METADATA_KEY])
        with torch.no_grad():
            got = module(x).numpy()
    else:
        meta = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}[METADATA_KEY])
        pytest.importorskip("onnxruntime")
        got = run_exported(out, x.numpy())
    diff = float(np.abs(got - ref).max())
    print(f"{fmt}: max abs difference to PyTorch on {len(x)} real digits: {diff:.2e}")
    assert got.shape == ref.shape and diff <= 1e-4
    assert meta["checkpoint_sha256"] == file_sha256(run / "best.pt") and meta["embedding_norm"] == "bn"
    pre = meta["preprocessing"]
    assert pre["mean"] == pytest.approx([0.485, 0.456, 0.406]) and pre["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert pre["center_crop"] == [16, 16] and meta["embedding_dim"] == ref.shape[1]
    assert "max abs difference" in capsys.readouterr().err


def test_export_bad_input(run, tmp_path, capsys):
    out = tmp_path / "m.pt"
    out.write_text("keep me")
    assert main(["export", str(run), "--format", "torchscript", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_text() == "keep me"
    assert main(["export", str(tmp_path / "nowhere"), "--format", "torchscript", "--out", str(tmp_path / "n.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("xbn-metric: error:") and "nowhere" in err and len(err.splitlines()) == 1
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert main(["export", str(tmp_path / "junk.pt"), "--format", "onnx", "--out", str(tmp_path / "n.onnx")]) == 2
    assert "not a readable xbn-metric checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "n.pt").exists() and not (tmp_path / "n.onnx").exists()
