"""``xbn-metric export``: every format, loaded back the documented way, embeds real images as the trainer's
model does; the Hugging Face folder (config, card, push, load from a repo id); the error paths.

One tiny trained run (module fixture) serves every test. No test touches the network: the Hub is a
monkeypatched ``huggingface_hub.HfApi`` / ``snapshot_download``.
"""

import copy
import json
import shlex
import sys
import warnings

import numpy as np
import pytest
import torch
import yaml

from metric.cli import main
from metric.config import COMPAT_KEYS, MetricConfig, resolve_config
from metric.data import load_digits, open_image
from metric.retrieval.export import read_metadata, run_exported
from metric.hub import load_model, model_card
from metric.retrieval import file_sha256, load_run_model
from metric.train import train
from xbn_queue.training.checkpoint import load_checkpoint
from xbn_queue.training.config import parse_config

from .helpers import tiny_cfg

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(resolve_config(tiny_cfg(out, embedding_norm="bn", max_steps=3)))  # bn: the post-normalisation is exported too
    return out


@pytest.fixture(scope="module")
def trained(run):
    """The run's model, 64 held-out digits (real scans) as PIL images, their input batch and the trainer's
    embeddings: ``(lm, images, x (64, 3, H, W), ref (64, D), tol)``.

    ``tol``: two float32 evaluations of one network that sum in other orders (an exporter's fused or
    reordered kernels) differ by about as much as either differs from the exact result. The float64
    evaluation of the same weights measures the trainer's own float32 error, ``err32``; an export is
    accepted within ``8 * err32`` of the trainer (margin for a different order's error being larger),
    and never below ``16 eps * max|ref|`` (a few roundings of the largest output).
    """
    lm = load_run_model(run, "cpu")
    images = [open_image(it) for it in load_digits("instance", 0.1, 0).query.items[:64]]
    x = torch.stack([lm.transform(im) for im in images])  # (64, 3, H, W)
    with torch.no_grad():
        ref = lm.model(x)  # (64, D) float32
        m64 = copy.deepcopy(lm.model).double()  # the same weights in float64, its forward written out plainly
        z = m64.head(m64.backbone(x.double()))  # (64, D)
        ref64 = m64.post_norm(z / z.norm(dim=1, keepdim=True))  # (64, D) L2 then BatchNorm1d
    err32 = float((ref.double() - ref64).abs().max())
    tol = max(8 * err32, 16 * EPS32 * float(ref64.abs().max()))
    return lm, images, x, ref.numpy(), tol


def _check_metadata(meta, run, ref):
    assert meta["embedding_norm"] == "bn" and meta["embedding_dim"] == ref.shape[1] and meta["backbone"] == "tinycnn"
    pre = meta["preprocessing"]
    assert pre["mean"] == [0.485, 0.456, 0.406] and pre["std"] == [0.229, 0.224, 0.225]  # timm's ImageNet constants
    assert pre["center_crop"] == [16, 16] and pre["resize"] == 18 and pre["interpolation"] == "bicubic"


def _load_documented(fmt, out):
    """The exported model loaded as the module docstring / docs tell a user, without this package (but hf)."""
    if fmt == "hf":
        model, preprocess = load_model(out)
        return lambda x: model(x).numpy(), preprocess
    if fmt == "torch-export":
        module = torch.export.load(str(out)).module()
        return lambda x: module(x).numpy(), None
    if fmt == "onnx":
        ort = pytest.importorskip("onnxruntime")
        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        return lambda x: sess.run(["embeddings"], {"images": x.numpy()})[0], None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice (docs/retrieval.md)
        module = torch.jit.load(str(out))
    return lambda x: module(x).numpy(), None


@pytest.mark.parametrize("fmt,name", [("hf", "folder"), ("torch-export", "model.pt2"), ("onnx", "model.onnx"),
                                      ("torchscript", "model.pt")])
def test_exported_model_embeds_like_the_trainer(run, trained, tmp_path, fmt, name, capsys):
    if fmt == "onnx":
        pytest.importorskip("onnx")
        pytest.importorskip("onnxscript")
    lm, images, x, ref, tol = trained
    out = tmp_path / name
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # export itself shows no torch.jit / exporter notice
        assert main(["export", str(run), "--format", fmt, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "max abs difference" in err and "warning" not in err
    embed, preprocess = _load_documented(fmt, out)
    if preprocess is not None:  # hf: the folder's own preprocessing, from PIL images, equals the trainer's
        x_hf = torch.stack([preprocess(im) for im in images])
        assert torch.equal(x_hf, x)  # the same torchvision operations on the same images in this process
    with torch.no_grad():
        got = embed(x)
        one = embed(x[:1])  # the batch dimension is free
    diff = float(np.abs(got - ref).max())
    print(f"{fmt}: max abs difference to the trainer's model on {len(x)} real digits: {diff:.2e} (tolerance {tol:.1e})")
    assert got.shape == ref.shape and diff <= tol
    assert float(np.abs(one - ref[:1]).max()) <= tol
    meta = read_metadata(out)
    _check_metadata(meta, run, ref)
    sha = meta["training"]["checkpoint_sha256"] if fmt == "hf" else meta["checkpoint_sha256"]
    assert sha == file_sha256(run / "best.pt")
    if fmt == "onnx":
        assert meta["exporter"] == "dynamo" and "(dynamo exporter)" in err  # tinycnn exports with dynamo
    if fmt == "torchscript":
        assert "deprecated" in err


def test_hf_folder_config_and_card(run, trained, tmp_path):
    lm = trained[0]
    out = tmp_path / "hf"
    assert main(["export", str(run), "--format", "hf", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    state = load_checkpoint(run / "best.pt", kind="xbn-metric")["state"]
    tr = cfg["training"]
    assert tr["method"] == "xbn" and tr["dataset"] == "digits" and tr["evaluation"]["step"] == state["global_step"]
    assert tr["evaluation"]["recall@1"] == state["best"]["recall@1"]
    # the training command, parsed back, gives the run's model and data options
    cmd = shlex.split(tr["command"])
    assert cmd[0] == "xbn-metric" and "--output-dir" not in cmd
    again = resolve_config(parse_config(MetricConfig, cmd[1:], prog="xbn-metric"))
    assert {k: getattr(again, k) for k in COMPAT_KEYS} == {k: getattr(lm.config, k) for k in COMPAT_KEYS}
    # the model card: the Hub's front matter, the metrics of these weights, the command, how to load
    text = (out / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "xbn-queue" and meta["license"] == "cc-by-4.0" and meta["datasets"] == ["digits"]
    assert {"metric-learning", "method-xbn", "tinycnn"} <= set(meta["tags"])
    row = next(line for line in body.splitlines() if "**these weights**" in line)
    assert f"| {100 * state['best']['recall@1']:.2f} |" in row and f"| {100 * state['best']['map@r']:.2f} |" in row
    assert tr["command"] in body and "load_model(" in body and "(1, 3, 16, 16)" in body
    # --overwrite into the folder replaces the three model files and leaves the user's own
    (out / "notes.txt").write_text("mine")
    (out / "README.md").write_text("old card")
    assert main(["export", str(run), "--format", "hf", "--out", str(out), "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "README.md").read_text() == text


@pytest.mark.parametrize("dataset,license,words", [("omniglot", "mit", "MIT"), ("sop", "other", "see the dataset's terms"),
                                                   ("inshop", "other", "see the dataset's terms")])
def test_card_licence_of_the_data(dataset, license, words):
    config = {"backbone": "conv4", "head": "none", "embedding_dim": 64, "embedding_norm": "l2", "image_size": 32,
              "xbn_queue_version": "0", "similarity": "inner product",
              "preprocessing": {"resize": 36, "center_crop": [32, 32], "mean": [0.5] * 3, "std": [0.5] * 3},
              "training": {"dataset": dataset, "method": "axbn", "evaluation": {"step": 5, "recall@1": 0.5}}}
    card = model_card(config, [])
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["license"] == license and front["datasets"] == [dataset]
    assert ("license_name" in front) == (license == "other") and f"Licence of the data: {words}" in card
    assert "| 50.00 |" in card  # without metrics.jsonl the checkpoint's own evaluation is the table


class FakeHfApi:
    """Records the calls ``--push-to-hub`` makes; ``fail`` makes the upload raise as a network error would."""

    instances = []
    fail = False

    def __init__(self, *args, **kwargs):
        self.calls = []
        FakeHfApi.instances.append(self)

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))
        return f"https://huggingface.co/{kwargs['repo_id']}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        if FakeHfApi.fail:
            raise OSError("connection refused")


def test_push_to_hub_only_when_asked(run, tmp_path, monkeypatch, capsys):
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(hub, "HfApi", FakeHfApi)
    monkeypatch.setattr(FakeHfApi, "instances", [])
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "local")]) == 0
    assert FakeHfApi.instances == []  # no push, no client
    out = tmp_path / "pushed"
    assert main(["export", str(run), "--format", "hf", "--out", str(out), "--push-to-hub", "me/tiny", "--private"]) == 0
    (api,) = FakeHfApi.instances
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][1] == dict(repo_id="me/tiny", repo_type="model", private=True, exist_ok=True)
    up = api.calls[1][1]
    assert up["repo_id"] == "me/tiny" and up["repo_type"] == "model" and up["folder_path"] == str(out)
    assert "pushed to https://huggingface.co/me/tiny" in capsys.readouterr().err
    # a failed upload: one line, exit 1, the folder stays written
    monkeypatch.setattr(FakeHfApi, "fail", True)
    again = tmp_path / "again"
    assert main(["export", str(run), "--format", "hf", "--out", str(again), "--push-to-hub", "me/tiny"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--push-to-hub me/tiny: upload failed" in err[0] and "connection refused" in err[0]
    assert (again / "model.safetensors").is_file()
    assert FakeHfApi.instances[-1].calls[0][1]["private"] is None  # without --private: the account's default


def test_load_model_from_a_repo_id(run, trained, tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    lm, _, x, ref, tol = trained
    folder = tmp_path / "hf"
    assert main(["export", str(run), "--format", "hf", "--out", str(folder)]) == 0
    asked = []

    def fake_snapshot_download(**kwargs):
        asked.append(kwargs)
        return str(folder)

    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download)

    def no_run_folder(*args, **kwargs):
        raise AssertionError("load_model read a checkpoint")

    monkeypatch.setattr("metric.retrieval.checkpoint.load_run_model", no_run_folder)  # the folder alone rebuilds the model
    monkeypatch.setattr("xbn_queue.training.checkpoint.load_checkpoint", no_run_folder)
    model, _ = load_model("me/tiny", revision="v1")
    assert asked[0]["repo_id"] == "me/tiny" and asked[0]["revision"] == "v1"
    with torch.no_grad():
        assert float(np.abs(model(x).numpy() - ref).max()) <= tol
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        load_model(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="config.json: not found"):
        load_model(tmp_path)  # a folder, but not a model folder
    (folder / "config.json").write_text(json.dumps({"backbone": "tinycnn"}))
    with pytest.raises(ValueError, match="missing width, head, embedding_dim"):
        load_model(folder)


def test_onnx_falls_back_to_the_legacy_exporter(run, trained, tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    import metric.retrieval.export as export

    def dynamo_fails(*args, **kwargs):
        raise RuntimeError("unsupported operator aten::foo\nmore detail")

    monkeypatch.setattr(export, "_onnx_dynamo", dynamo_fails)
    out = tmp_path / "m.onnx"
    assert main(["export", str(run), "--format", "onnx", "--out", str(out)]) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warning) == 1 and "backbone tinycnn" in warning[0] and "aten::foo" in warning[0]
    assert "TorchScript-based exporter" in warning[0] and read_metadata(out)["exporter"] == "legacy"
    _, _, x, ref, tol = trained
    assert float(np.abs(run_exported(out, x.numpy()) - ref).max()) <= tol


def _one_line(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("xbn-metric") and len(err.splitlines()) == 1, err
    return err


def test_export_bad_input(run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "m.pt"
    out.write_text("keep me")
    assert main(["export", str(run), "--format", "torchscript", "--out", str(out)]) == 2
    assert "exists" in _one_line(capsys) and out.read_text() == "keep me"
    with pytest.raises(SystemExit) as stop:  # argparse's choices: one line, status 2
        main(["export", str(run), "--format", "keras", "--out", str(tmp_path / "k")])
    assert stop.value.code == 2 and "invalid choice: 'keras'" in _one_line(capsys)
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    assert main(["export", str(run), "--format", "hf", "--out", str(full)]) == 2
    assert "exists and is not empty" in _one_line(capsys) and [p.name for p in full.iterdir()] == ["notes.txt"]
    assert main(["export", str(run), "--format", "hf", "--out", str(out)]) == 2
    assert "is a file, expected a folder" in _one_line(capsys)
    assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "p.onnx"), "--push-to-hub", "me/x"]) == 2
    assert "--push-to-hub: uploads a model folder; use it with --format hf" in _one_line(capsys)
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "q"), "--private"]) == 2
    assert "--private" in _one_line(capsys)
    assert main(["export", str(tmp_path / "nowhere"), "--format", "torchscript", "--out", str(tmp_path / "n.pt")]) == 2
    assert "nowhere" in _one_line(capsys)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert main(["export", str(tmp_path / "junk.pt"), "--format", "onnx", "--out", str(tmp_path / "n.onnx")]) == 2
    assert "not a readable xbn-metric checkpoint" in _one_line(capsys)
    # the hub extra missing: one line naming it, exit 1 (a missing package), nothing written
    for missing, args in (("safetensors", []), ("huggingface_hub", ["--push-to-hub", "me/x"])):
        with monkeypatch.context() as m:
            m.setitem(sys.modules, missing, None)
            m.setitem(sys.modules, f"{missing}.torch", None)
            assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "h"), *args]) == 1
            err = _one_line(capsys)
            assert f"'{missing}'" in err and 'pip install "xbn-queue[hub]"' in err
    assert not any((tmp_path / n).exists() for n in ("k", "q", "h", "n.pt", "n.onnx", "p.onnx"))
