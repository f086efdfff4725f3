"""Which backbones ``torch.export`` and the dynamo ONNX exporter handle (docs/retrieval.md, the export section).

For each backbone: a :class:`metric.model.MetricModel` (64-d linear head, BatchNorm1d after the L2
normalisation; ``conv4`` with no head) with random weights in eval mode is exported with
``torch.export.export`` (dynamic batch) and with ``torch.onnx.export(..., dynamo=True)``; the ONNX
file runs in onnxruntime on a batch of 5 and is compared with PyTorch. One line per backbone.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/export_backbones.py tinycnn conv4 cifar_resnet18 resnet18 \\
        resnet50 efficientnet_b0 convnext_tiny vit_tiny_patch16_224
"""

import contextlib
import io
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from metric.model import backbone_feature_size, build_model


def main(names):
    logging.disable(logging.WARNING)
    tmp = Path(tempfile.mkdtemp())
    for name in names:
        size = 224 if name.startswith(("vit", "deit", "swin")) else 16 if name == "tinycnn" else 32 if name == "conv4" else 64
        head = "none" if name == "conv4" else "linear"
        dim = backbone_feature_size(name, None, size) if head == "none" else 64
        m = build_model(name, dim, "bn", image_size=size, head=head).eval()
        x = torch.randn(2, 3, size, size)
        res = {}
        t = time.time()
        try:
            with torch.no_grad():
                ep = torch.export.export(m, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
            ep.module()(torch.randn(5, 3, size, size))
            res["torch.export"] = f"ok {time.time() - t:.1f}s"
        except Exception as e:
            res["torch.export"] = f"FAIL {type(e).__name__}: {str(e)[:150]}"
        t = time.time()
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(m, (x,), str(tmp / f"{name}.onnx"), dynamo=True, input_names=["images"],
                                  output_names=["embeddings"], dynamic_shapes=({0: "batch"},))
            s = ort.InferenceSession(str(tmp / f"{name}.onnx"), providers=["CPUExecutionProvider"])
            xx = torch.randn(5, 3, size, size)
            got = s.run(None, {"images": xx.numpy()})[0]
            with torch.no_grad():
                ref = m(xx).numpy()
            res["onnx dynamo"] = f"ok {time.time() - t:.1f}s diff {np.abs(got - ref).max():.1e}"
        except Exception as e:
            res["onnx dynamo"] = f"FAIL {type(e).__name__}: {str(e)[:200]}"
        print(name, size, res, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
