"""``xbn-metric export``: a run's embedding model as a TorchScript or ONNX file that runs without this package.

The file holds the whole embedding model in evaluation mode (backbone, head, L2 normalisation and the
optional BatchNorm / LayerNorm after it): input ``images`` (B, 3, H, W) float32, output ``embeddings``
(B, D) float32, batch size free. The preprocessing is recorded as metadata (a JSON object): the
evaluation transform's resize, centre crop, interpolation and normalisation ``mean`` / ``std``, so
that ``x = (rgb / 255 - mean) / std`` after resizing reproduces the trainer's input; also the run, the
checkpoint's SHA-256, the embedding size and the similarity to use.

Read the metadata back::

    files = {"metadata.json": ""}; torch.jit.load("model.pt", _extra_files=files); json.loads(files["metadata.json"])
    {p.key: p.value for p in onnx.load("model.onnx").metadata_props}["metadata.json"]
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from xbn_queue.training.cli import UsageError

from .retrieval import PROG, LoadedModel, load_run_model

__all__ = ["export_model", "preprocessing", "run_exported", "export_main", "FORMATS", "METADATA_KEY"]

FORMATS = ("torchscript", "onnx")
#: Name of the metadata entry (TorchScript extra file, ONNX metadata property).
METADATA_KEY = "metadata.json"


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
            out["mean"] = [float(v) for v in t.mean]
            out["std"] = [float(v) for v in t.std]
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


def export_model(run: Any, out: Any, format: str, overwrite: bool = False) -> Dict[str, Any]:
    """Export a run's embedding model (see the module docstring).

    Args:
        run: A run folder (``best.pt``) or a checkpoint file.
        out: The file to write (``.pt`` / ``.ts`` for TorchScript, ``.onnx`` for ONNX are customary).
        format: ``torchscript`` or ``onnx``.
        overwrite: Replace an existing ``out``.

    Returns:
        The metadata written with the model, plus ``"file"`` and ``"max_abs_diff"``: the largest
        difference between the exported model and the PyTorch model on a random batch.

    Raises:
        UsageError: an unknown format, or ``out`` exists without ``overwrite``.
        ImportError: ``onnx`` is not installed (for the ONNX format).
    """
    if format not in FORMATS:
        raise UsageError(f"--format {format}: expected one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise UsageError(f"--out {out}: exists; replace it with --overwrite or choose another name")
    if out.is_dir():
        raise UsageError(f"--out {out}: is a folder, expected a file")
    if format == "onnx":
        from xbn_queue.training._optional import require

        onnx = require("onnx", "export --format onnx")
    lm = load_run_model(run, "cpu")
    meta = _metadata(lm)
    size = int(lm.config.image_size)
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))  # (2, 3, H, W)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and exporter deprecation notices
        if format == "torchscript":
            traced = torch.jit.trace(lm.model, example)
            torch.jit.save(traced, str(tmp), _extra_files={METADATA_KEY: json.dumps(meta)})
        else:
            # the TorchScript-based exporter: it needs no onnxscript and handles every backbone here
            torch.onnx.export(lm.model, (example,), str(tmp), dynamo=False, input_names=["images"],
                              output_names=["embeddings"], opset_version=17,
                              dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}})
            proto = onnx.load(str(tmp))
            entry = proto.metadata_props.add()
            entry.key, entry.value = METADATA_KEY, json.dumps(meta)
            onnx.save(proto, str(tmp))
    tmp.replace(out)
    with torch.no_grad():
        ref = lm.model(example).numpy()  # (2, D)
    diff = float(np.abs(run_exported(out, example.numpy()) - ref).max())
    return dict(meta, file=str(out), format=format, max_abs_diff=diff)


def run_exported(path: Any, images: np.ndarray) -> np.ndarray:
    """Run an exported model file (TorchScript with torch, ONNX with onnxruntime) on a batch.

    Args:
        path: A file written by :func:`export_model`.
        images: (B, 3, H, W) float32, preprocessed as the metadata says.

    Returns:
        (B, D) float32 embeddings.

    Raises:
        ImportError: ``onnxruntime`` is not installed (for an ONNX file).
    """
    x = np.ascontiguousarray(images, dtype=np.float32)
    if str(path).lower().endswith(".onnx"):
        from xbn_queue.training._optional import require

        ort = require("onnxruntime", "running an ONNX model")
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return sess.run(["embeddings"], {"images": x})[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


DESCRIPTION = """Export a run's embedding model (backbone, head, normalisation; evaluation mode) as a file that
runs without this package: TorchScript (torch.jit.load) or ONNX (onnxruntime). Input images (B, 3, H, W)
float32, output embeddings (B, D). The evaluation transform's resize, crop and normalisation constants,
the run and the checkpoint's SHA-256 are stored in the file as metadata (metadata.json).
Exit status: 0 written; 2 bad input (one line, nothing written)."""


def export_main(argv: List[str]) -> int:
    """``xbn-metric export RUN --format torchscript|onnx --out FILE``; returns the exit status."""
    from xbn_queue.training.config import _OneLineParser

    p = _OneLineParser(prog=f"{PROG} export", description=DESCRIPTION)
    p.add_argument("run", metavar="RUN", help="run folder (its best.pt) or checkpoint file")
    p.add_argument("--format", required=True, choices=FORMATS, help="torchscript or onnx")
    p.add_argument("--out", required=True, help="the file to write (e.g. model.pt, model.onnx)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    a = p.parse_args(argv[1:])
    res = export_model(a.run, a.out, a.format, a.overwrite)
    print(f"[{PROG}] {a.format} model written to {res['file']} (embedding dimension {res['embedding_dim']}; "
          f"max abs difference to PyTorch on a random batch: {res['max_abs_diff']:.2e})", file=sys.stderr)
    return 0
