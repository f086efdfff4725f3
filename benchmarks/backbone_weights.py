"""Write the backbone of a trained ``xbn-metric`` run as a plain state dict for ``--pretrained-path``.

``--pretrained-path`` (:func:`metric.model.load_backbone_weights`) takes a dict of tensors whose keys are
the backbone's own (``features.0.weight``, ...); a run's ``best.pt`` / ``last.pt`` holds the whole model
under ``"model"`` with the backbone's keys prefixed by ``backbone.`` (the head and normalisation are left
out here). Usage::

    python benchmarks/backbone_weights.py RUN/best.pt backbone.pt
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: backbone_weights.py CHECKPOINT.pt OUT.pt", file=sys.stderr)
        return 2
    ckpt = torch.load(Path(argv[0]), map_location="cpu", weights_only=False)
    model = ckpt.get("model", ckpt)
    sd = {k[len("backbone."):]: v for k, v in model.items() if k.startswith("backbone.")}
    if not sd:
        print(f"backbone_weights: {argv[0]}: no backbone.* weights", file=sys.stderr)
        return 2
    torch.save(sd, argv[1])
    print(f"{argv[1]}: {len(sd)} tensors from {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
