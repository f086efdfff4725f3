"""``xbn-metric export``: a run's embedding model as a Hugging Face model folder, a ``torch.export`` program,
an ONNX file or a TorchScript file.

Every format holds the whole embedding model in evaluation mode (backbone, head, L2 normalisation and
the optional BatchNorm / LayerNorm after it): input ``images`` (B, 3, H, W) float32, output
``embeddings`` (B, D) float32, batch size free. The preprocessing is recorded beside it: the
evaluation transform's resize, centre crop, interpolation and normalisation ``mean`` / ``std``, so that
``x = (rgb / 255 - mean) / std`` after resizing reproduces the trainer's input; also the run, the
checkpoint's SHA-256, the embedding size and the similarity to use.

* ``hf``: a folder ``model.safetensors`` + ``config.json`` + ``README.md`` (model card) for the Hugging
  Face Hub, loaded back with ``metric.hub.load_model(DIR or "user/repo")`` (:mod:`metric.hub`);
  ``--push-to-hub REPO`` uploads it.
* ``torch-export``: a ``torch.export`` program with a dynamic batch dimension (``torch.export.save``,
  ``.pt2``); runs with torch alone: ``torch.export.load(f).module()(x)``.
* ``onnx``: the dynamo exporter (``torch.onnx.export(..., dynamo=True)``, needs onnxscript); where it
  fails for a backbone, the TorchScript-based exporter, with a one-line warning.
* ``torchscript``: kept for compatibility; ``torch.jit`` is deprecated in PyTorch (``torch.jit.load``
  warns); prefer ``torch-export``.

Read the metadata back (:func:`read_metadata`)::

    json.load(open("DIR/config.json"))                                             # hf
    files = {"metadata.json": ""}; torch.export.load("model.pt2", extra_files=files); json.loads(files["metadata.json"])
    {p.key: p.value for p in onnx.load("model.onnx").metadata_props}["metadata.json"]
    files = {"metadata.json": ""}; torch.jit.load("model.pt", _extra_files=files); json.loads(files["metadata.json"])
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shlex
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from xbn_queue.training.cli import RunError, UsageError

from .checkpoint import PROG, LoadedModel, load_run_model

__all__ = ["export_model", "preprocessing", "run_exported", "read_metadata", "training_command", "hf_config",
           "FORMATS", "METADATA_KEY"]

FORMATS = ("hf", "torch-export", "onnx", "torchscript")
#: Name of the metadata entry (torch.export / TorchScript extra file, ONNX metadata property).
METADATA_KEY = "metadata.json"
#: Options of the run that say nothing about the model (reset to their defaults in the training command).
_RUNTIME_OPTIONS = ("output_dir", "overwrite", "resume", "progress", "wandb_project", "wandb_mode", "wandb_name",
                    "device", "threads", "workers", "tensor_cache")


def preprocessing(transform: Any) -> Dict[str, Any]:
    """The resize / crop / normalisation constants of a torchvision evaluation transform.

    Returns:
        ``{"resize": int or [h, w], "interpolation": str, "center_crop": [h, w], "mean": [3], "std": [3]}``
        (keys of the steps the transform has).
    """
    out: Dict[str, Any] = {}
    for t in getattr(transform, "transforms", [transform]):
        name = type(t).__name__
        if name == "Resize":
            out["resize"] = t.size if isinstance(t.size, int) else list(t.size)
            out["interpolation"] = getattr(t.interpolation, "value", str(t.interpolation))
        elif name == "CenterCrop":
            out["center_crop"] = list(t.size)
        elif name == "Normalize":
            # float32 constants written as their shortest decimal (0.485, not 0.48500001430511475)
            out["mean"] = [float(str(np.float32(v))) for v in t.mean]
            out["std"] = [float(str(np.float32(v))) for v in t.std]
    return out


def _metadata(lm: LoadedModel) -> Dict[str, Any]:
    cfg = lm.config
    return {"producer": PROG, "checkpoint": str(lm.checkpoint.resolve()), "checkpoint_sha256": lm.sha256,
            "backbone": cfg.backbone, "head": cfg.head, "embedding_dim": int(cfg.embedding_dim),
            "embedding_norm": cfg.embedding_norm, "image_size": int(cfg.image_size),
            "input": "images (B, 3, H, W) float32: RGB / 255, resized and centre-cropped, then (x - mean) / std",
            "output": "embeddings (B, D) float32",
            "similarity": "inner product" + (" (cosine: unit rows)" if cfg.embedding_norm == "l2" else ""),
            "preprocessing": preprocessing(lm.transform)}


def training_command(cfg: Any) -> str:
    """The ``xbn-metric`` command that trains a run like ``cfg`` (its resolved configuration).

    Options that say nothing about the model (output folder, device, threads, W&B, ...) are left out;
    a local ``--data-root`` / ``--pretrained-path`` becomes a placeholder (``DATA_ROOT``, ``BACKBONE_WEIGHTS``).
    """
    from xbn_queue.training.config import config_to_argv

    defaults = {f.name: f.default for f in dataclasses.fields(cfg) if f.default is not dataclasses.MISSING}
    changes: Dict[str, Any] = {k: defaults[k] for k in _RUNTIME_OPTIONS if k in defaults}
    if getattr(cfg, "data_root", None):
        changes["data_root"] = "DATA_ROOT"
    if getattr(cfg, "pretrained_path", None):
        changes["pretrained_path"] = "BACKBONE_WEIGHTS"
    try:
        argv = config_to_argv(dataclasses.replace(cfg, **changes), only_changed=True)
    except TypeError:  # a value without a command-line form: say so rather than guess
        return f"{PROG} (the configuration is in config.json under training.config)"
    return shlex.join([PROG, *argv])


def _history(checkpoint: Path) -> List[Dict[str, Any]]:
    """The evaluation records of ``metrics.jsonl`` beside a checkpoint (empty when there is none)."""
    f = checkpoint.parent / "metrics.jsonl"
    rows: List[Dict[str, Any]] = []
    if f.is_file():
        for line in f.read_text().splitlines():
            with contextlib.suppress(ValueError):
                r = json.loads(line)
                if isinstance(r, dict) and "recall@1" in r:
                    rows.append(r)
    return rows


def _evaluation(lm: LoadedModel) -> Dict[str, Any]:
    """The evaluation of the checkpoint's own weights: its best or last record at its step ({} if none)."""
    from xbn_queue.training.checkpoint import load_checkpoint

    state = load_checkpoint(lm.checkpoint, map_location="cpu", kind=PROG).get("state") or {}
    step = state.get("global_step")
    for key in ("best", "last"):
        rec = state.get(key) or {}
        if rec and rec.get("step") == step:
            return {k: v for k, v in rec.items() if isinstance(v, (int, float, str)) or v is None}
    return {}


def hf_config(lm: LoadedModel) -> Dict[str, Any]:
    """``config.json`` of the ``hf`` format (:mod:`metric.hub`): the model, its preprocessing, its training."""
    import xbn_queue

    cfg = lm.config
    run = lm.checkpoint.parent.name
    meta = _metadata(lm)
    meta.pop("checkpoint")  # a local path: not published
    meta.pop("checkpoint_sha256")
    model = {"backbone": cfg.backbone, "width": cfg.width, "head": cfg.head, "embedding_dim": int(cfg.embedding_dim),
             "embedding_norm": cfg.embedding_norm, "image_size": int(cfg.image_size)}
    resolved = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _RUNTIME_OPTIONS + ("data_root", "pretrained_path")}
    training = {"run": run, "checkpoint_name": lm.checkpoint.name, "checkpoint_sha256": lm.sha256,
                "method": cfg.method, "dataset": cfg.dataset, "split": cfg.split, "loss": cfg.loss, "miner": cfg.miner,
                "pretrained": bool(cfg.pretrained or cfg.pretrained_path), "evaluation": _evaluation(lm),
                "command": training_command(cfg), "config": resolved}
    return {"xbn_queue_format": 1, "library": "xbn-queue", "xbn_queue_version": xbn_queue.__version__,
            **model, **{k: v for k, v in meta.items() if k not in model}, "training": training}


def _check_out(out: Path, format: str, overwrite: bool) -> None:
    """Refuse an ``--out`` that would overwrite results (before anything is loaded or written)."""
    if format == "hf":
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out}: is a file, expected a folder (--format hf writes a folder)")
        if out.is_dir() and any(out.iterdir()) and not overwrite:
            raise UsageError(f"--out {out}: exists and is not empty; replace its model files with --overwrite "
                             "or choose another folder")
        return
    if out.is_dir():
        raise UsageError(f"--out {out}: is a folder, expected a file")
    if out.exists() and not overwrite:
        raise UsageError(f"--out {out}: exists; replace it with --overwrite or choose another name")


def export_model(run: Any, out: Any, format: str, overwrite: bool = False, push_to_hub: Optional[str] = None,
                 private: bool = False) -> Dict[str, Any]:
    """Export a run's embedding model (see the module docstring).

    Args:
        run: A run folder (``best.pt``) or a checkpoint file.
        out: The folder (``hf``) or file to write (``.pt2`` for torch-export, ``.onnx``, ``.pt`` for
            TorchScript are customary).
        format: One of :data:`FORMATS`.
        overwrite: Replace an existing ``out`` file; for ``hf``, write into a folder that is not empty
            (its ``model.safetensors``, ``config.json`` and ``README.md`` are replaced, nothing else).
        push_to_hub: A Hub repo id (``user/name``) to upload the ``hf`` folder to; ``None``: no network.
        private: Create that repository private.

    Returns:
        The metadata written with the model, plus ``"file"``, ``"format"``, ``"files"`` (name -> bytes),
        ``"max_abs_diff"`` (the largest difference between the exported model, loaded back, and the
        PyTorch model on a random batch), for ONNX ``"exporter"`` (``dynamo`` or ``legacy``), and
        ``"url"`` after a push.

    Raises:
        UsageError: an unknown format, ``--push-to-hub`` / ``--private`` out of place, or ``out`` exists
            (see ``overwrite``).
        ImportError: a package the format needs is missing (onnx; safetensors / huggingface_hub: the
            message names ``xbn-queue[hub]``).
        RunError: the upload failed (the folder is written).
    """
    out = Path(out)
    _check_request(out, format, overwrite, push_to_hub, private)
    lm = load_run_model(run, "cpu")
    size = int(lm.config.image_size)
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))  # (2, 3, H, W)
    res = _write_hf(lm, out) if format == "hf" else _write_one_file(lm, out, format, example)
    with torch.no_grad():
        ref = lm.model(example).numpy()  # (2, D)
    res["max_abs_diff"] = float(np.abs(run_exported(out, example.numpy()) - ref).max())
    if push_to_hub:
        res["url"] = _push(out, push_to_hub, private, lm)
    return res


def _check_request(out: Path, format: str, overwrite: bool, push_to_hub: Optional[str], private: bool) -> None:
    """Every check of ``export``'s options and of the packages the format needs, before anything is loaded.

    Raises:
        UsageError: an unknown format, ``--push-to-hub`` / ``--private`` out of place, ``out`` exists.
        ImportError: a package the format or the upload needs is missing.
    """
    from xbn_queue.training._optional import require

    if format not in FORMATS:
        raise UsageError(f"--format {format}: expected one of {', '.join(FORMATS)}")
    if push_to_hub and format != "hf":
        raise UsageError(f"--push-to-hub: uploads a model folder; use it with --format hf, not {format}")
    if private and not push_to_hub:
        raise UsageError("--private: applies to the repository --push-to-hub creates; give --push-to-hub REPO")
    _check_out(out, format, overwrite)
    if format == "hf":
        require("safetensors.torch", "export --format hf")
    if push_to_hub:
        require("huggingface_hub", "--push-to-hub")
    if format == "onnx":
        require("onnx", "export --format onnx")


def _push(out: Path, repo: str, private: bool, lm: LoadedModel) -> str:
    """Upload the ``hf`` folder to the Hub repository ``repo``; returns its URL.

    Raises:
        RunError: the upload failed (one line; the folder stays written).
    """
    from ..hub import push_folder

    try:
        return push_folder(out, repo, private, commit_message=f"{PROG} export of {lm.checkpoint.parent.name}")
    except Exception as err:  # network, authentication, a taken name: huggingface_hub raises many types
        from xbn_queue.training.cli import one_line

        raise RunError(f"--push-to-hub {repo}: upload failed ({type(err).__name__}: {one_line(err)[:200]}); "
                       f"the folder {out} is written: push it again with the same command plus --overwrite") from None


def _write_one_file(lm: LoadedModel, out: Path, format: str, example: torch.Tensor) -> Dict[str, Any]:
    """A file format (not ``hf``): written under a temporary name beside ``out``, then renamed."""
    res = dict(_metadata(lm), file=str(out), format=format)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{out.suffix}")  # keeps the suffix: torch.export.save wants .pt2
    try:
        res.update(_write_file(lm, tmp, format, example, _metadata(lm)))
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    res["files"] = {out.name: out.stat().st_size}
    return res


def _write_hf(lm: LoadedModel, out: Path) -> Dict[str, Any]:
    """The ``hf`` folder, written into a temporary sibling and then moved in file by file."""
    from ..hub import write_model_folder

    config = hf_config(lm)
    tmp = out.parent / f".{out.name}.tmp-export"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        files = write_model_folder(tmp, lm.model.state_dict(), config, _history(lm.checkpoint))
        out.mkdir(parents=True, exist_ok=True)
        for f in files:
            f.replace(out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dict(config, file=str(out), format="hf", files={f.name: (out / f.name).stat().st_size for f in files})


def _onnx_dynamo(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """The dynamo ONNX exporter (torch.export graph -> onnxscript), batch dimension dynamic."""
    from xbn_queue.training._optional import require

    require("onnxscript", "the dynamo ONNX exporter")
    with contextlib.redirect_stdout(io.StringIO()):  # its progress lines ("[torch.onnx] Obtain model graph ...")
        torch.onnx.export(model, (example,), str(path), dynamo=True, input_names=["images"],
                          output_names=["embeddings"], dynamic_shapes=({0: "batch"},), external_data=False)


def _onnx_legacy(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """The TorchScript-based ONNX exporter (opset 17), batch dimension dynamic."""
    torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["images"],
                      output_names=["embeddings"], opset_version=17,
                      dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}})


def _write_file(lm: LoadedModel, path: Path, format: str, example: torch.Tensor, meta: Dict[str, Any]) -> Dict[str, Any]:
    """One file of ``format`` at ``path``, the metadata inside it; returns what to add to the result."""
    extra: Dict[str, Any] = {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and exporter notices (torch.jit's deprecation among them)
        if format == "torch-export":
            batch = torch.export.Dim("batch", min=1)
            program = torch.export.export(lm.model, (example,), dynamic_shapes=({0: batch},))
            torch.export.save(program, str(path), extra_files={METADATA_KEY: json.dumps(meta)})
        elif format == "torchscript":
            traced = torch.jit.trace(lm.model, example)
            torch.jit.save(traced, str(path), _extra_files={METADATA_KEY: json.dumps(meta)})
        else:
            import onnx

            try:
                _onnx_dynamo(lm.model, example, path)
                extra["exporter"] = "dynamo"
            except Exception as err:  # the dynamo exporter raises many types; the legacy one still works
                first = (str(err).strip().splitlines() or [""])[0][:160]
                print(f"[{PROG}] warning: the dynamo ONNX exporter failed for backbone {lm.config.backbone} "
                      f"({type(err).__name__}: {first}); used the TorchScript-based exporter", file=sys.stderr)
                _onnx_legacy(lm.model, example, path)
                extra["exporter"] = "legacy"
            proto = onnx.load(str(path))
            entry = proto.metadata_props.add()
            entry.key, entry.value = METADATA_KEY, json.dumps(dict(meta, exporter=extra["exporter"]))
            onnx.save(proto, str(path))
    return extra


def read_metadata(path: Any) -> Dict[str, Any]:
    """The metadata of an exported model: ``config.json`` of a folder, the ``metadata.json`` entry of a file."""
    p = Path(path)
    if p.is_dir():
        from ..hub import read_config

        return read_config(p)
    if p.suffix.lower() == ".onnx":
        import onnx

        return json.loads({e.key: e.value for e in onnx.load(str(p)).metadata_props}[METADATA_KEY])
    files = {METADATA_KEY: ""}
    if p.suffix.lower() == ".pt2":
        torch.export.load(str(p), extra_files=files)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
            torch.jit.load(str(p), map_location="cpu", _extra_files=files)
    return json.loads(files[METADATA_KEY])


def run_exported(path: Any, images: np.ndarray) -> np.ndarray:
    """Run an exported model on a batch: an ``hf`` folder (:func:`metric.hub.load_model`), a ``.pt2``
    program (``torch.export.load``), an ONNX file (onnxruntime) or a TorchScript file (``torch.jit.load``).

    Args:
        path: A folder or file written by :func:`export_model`.
        images: (B, 3, H, W) float32, preprocessed as the metadata says.

    Returns:
        (B, D) float32 embeddings.

    Raises:
        ImportError: ``onnxruntime`` (for an ONNX file) or safetensors (for a folder) is not installed.
    """
    x = np.ascontiguousarray(images, dtype=np.float32)
    p = Path(path)
    if p.is_dir():
        from ..hub import load_model

        module, _ = load_model(p)
    elif p.suffix.lower() == ".onnx":
        from xbn_queue.training._optional import require

        ort = require("onnxruntime", "running an ONNX model")
        sess = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        return sess.run(["embeddings"], {"images": x})[0]
    elif p.suffix.lower() == ".pt2":
        module = torch.export.load(str(p)).module()
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
            module = torch.jit.load(str(p), map_location="cpu")
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()
