"""Embedding model: a timm backbone (or a small-image backbone) + a linear head (or none) + L2 (+ optional BN/LN).

Backbones: any timm model name, or for small images ``conv4`` (the Conv-4 of the few-shot and
metric-learning literature, flattened) and ``cifar_resnet18`` (3x3 stem, no max-pool), both from
:mod:`xbn_queue.training.backbones` (shared with the selfsup trainer), or ``tinycnn`` (the digits demo).

``MetricModel(x)`` returns (B, embedding_dim) float32 embeddings: ``head(backbone(x))`` L2-normalised,
then optionally BatchNorm1d / LayerNorm (the paper's Appendix A, Table 3), as in the paper's
Section 5.1 (ImageNet-pretrained ResNet-50, 512-d, cosine similarity). With ``head="none"`` the
backbone's features themselves are the embedding (``embedding_dim`` = the feature size), as the
Conv-4 of the few-shot literature is used: its flattened features keep the spatial layout, and a
linear head trained from scratch on a few classes was measured to transfer worse to unseen classes
(``docs/metric.md``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xbn_queue.training.backbones import TinyCNN
from xbn_queue.training.checkpoint import load_error_reason

__all__ = ["TinyCNN", "MetricModel", "build_model", "backbone_feature_size", "PretrainedWeightsError", "SMALL_BACKBONES",
           "HEADS"]


class PretrainedWeightsError(RuntimeError):
    """ImageNet weights could not be obtained; the message says what to do instead."""


#: Our backbones in timm's registry (:mod:`xbn_queue.training.backbones`, no hub weights): name -> default width.
SMALL_BACKBONES = {"tinycnn": 16, "conv4": 64, "cifar_resnet18": 64}
#: Embedding heads: ``linear`` (features -> embedding_dim) or ``none`` (the features are the embedding).
HEADS = ("linear", "none")


def _create_backbone(name: str, pretrained: bool, pretrained_path: Optional[str], width: Optional[int] = None,
                     image_size: int = 32) -> nn.Module:
    from xbn_queue.training.backbones import ENTRY_POINTS

    name = "tinycnn" if name == "tiny_cnn" else name
    small = name in SMALL_BACKBONES
    if width is not None and not small:
        raise ValueError(f"--width applies to the backbones {', '.join(SMALL_BACKBONES)}, not to the timm model {name!r}")
    if small and pretrained and not pretrained_path:
        raise PretrainedWeightsError(f"backbone {name!r} has no pretrained weights: use --no-pretrained or --pretrained-path FILE")
    kwargs = {"width": SMALL_BACKBONES[name] if width is None else int(width)} if small else {}
    if name == "conv4":
        kwargs["image_size"] = image_size
    use_hub = bool(pretrained and not pretrained_path)
    if small:  # built directly: the same constructor timm's registry calls, without importing timm
        backbone = ENTRY_POINTS[name](pretrained=False, **kwargs)
        if pretrained_path:
            load_backbone_weights(backbone, pretrained_path)
        return backbone
    import timm

    try:
        backbone = timm.create_model(name, pretrained=use_hub, num_classes=0, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(f"unknown backbone {name!r} (a timm model name, {', '.join(SMALL_BACKBONES)})") from None
        if not use_hub:
            raise
        raise PretrainedWeightsError(
            f"could not fetch ImageNet weights for backbone {name!r} ({err}). Without internet access, "
            f"download the weights elsewhere and pass --pretrained-path FILE (a state dict of the timm "
            f"model {name!r}), or train from scratch with --no-pretrained."
        ) from None
    except Exception as err:  # network / hub errors come in many types
        if not use_hub:
            raise
        raise PretrainedWeightsError(
            f"could not fetch ImageNet weights for backbone {name!r} ({type(err).__name__}: {err}). Without "
            f"internet access, download the weights elsewhere and pass --pretrained-path FILE (a state "
            f"dict of the timm model {name!r}), or train from scratch with --no-pretrained."
        ) from None
    if pretrained_path:
        load_backbone_weights(backbone, pretrained_path)
    return backbone


def load_backbone_weights(backbone: nn.Module, path: str) -> None:
    """Load a local state dict into the backbone; classifier weights in the file are ignored.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a readable state dict (``torch.load`` fails, or it holds something
            other than a dict of tensors), or backbone weights are missing from it or have other shapes.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"--pretrained-path {str(p)!r} not found")
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types (UnpicklingError, RuntimeError, EOFError)
        raise ValueError(f"--pretrained-path {p}: not a readable PyTorch state dict "
                         f"({load_error_reason(err)})") from None
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"--pretrained-path {p}: expected a state dict (a dict of tensors), "
                         f"got {type(sd).__name__}" + (" with non-tensor values" if isinstance(sd, dict) else ""))
    own = backbone.state_dict()
    mismatched = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise ValueError(f"--pretrained-path {p}: shapes differ for {', '.join(mismatched[:5])}")
    missing, _unexpected = backbone.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    if missing:
        raise ValueError(f"--pretrained-path {p}: {len(missing)} backbone weights missing, e.g. {', '.join(missing[:5])}")


class MetricModel(nn.Module):
    """Backbone -> linear head (or none) -> L2 normalisation (-> BatchNorm1d / LayerNorm).

    Args:
        backbone: maps (B, 3, H, W) to (B, F) features (timm model with ``num_classes=0``).
        num_features: F.
        embedding_dim: D (must equal F when ``head="none"``).
        embedding_norm: ``"l2"``, ``"bn"`` (L2 then BatchNorm1d) or ``"ln"`` (L2 then LayerNorm).
        head: ``"linear"`` (F -> D) or ``"none"`` (the features are the embedding).

    Raises:
        ValueError: an unknown ``embedding_norm`` or ``head``, or ``head="none"`` with D != F.
    """

    def __init__(self, backbone: nn.Module, num_features: int, embedding_dim: int = 512, embedding_norm: str = "l2",
                 head: str = "linear") -> None:
        super().__init__()
        if embedding_norm not in ("l2", "bn", "ln"):
            raise ValueError(f"embedding_norm must be l2, bn or ln, got {embedding_norm!r}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
        if head == "none" and embedding_dim != num_features:
            raise ValueError(f"head 'none' makes the backbone's {num_features} features the embedding, "
                             f"but embedding_dim is {embedding_dim}")
        self.backbone = backbone
        self.head: nn.Module = nn.Linear(num_features, embedding_dim) if head == "linear" else nn.Identity()
        self.embedding_norm = embedding_norm
        self.post_norm: nn.Module
        if embedding_norm == "bn":
            self.post_norm = nn.BatchNorm1d(embedding_dim)
        elif embedding_norm == "ln":
            self.post_norm = nn.LayerNorm(embedding_dim)
        else:
            self.post_norm = nn.Identity()

    def head_parameters(self) -> Iterable[nn.Parameter]:
        """Parameters trained in the pre-warmup (head and post-normalisation)."""
        return list(self.head.parameters()) + list(self.post_norm.parameters())

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) images -> (B, D) float32 embeddings."""
        f = self.backbone(x)  # (B, F)
        z = self.head(f).float()  # (B, D), float32 even under autocast
        z = F.normalize(z, dim=1)  # (B, D) unit rows
        return self.post_norm(z)


def backbone_feature_size(backbone: str, width: Optional[int] = None, image_size: int = 32) -> int:
    """The feature size F of a backbone, without weights or memory (built on the meta device).

    Raises:
        ValueError: as :func:`build_model` (unknown backbone, ``width`` for a timm model, an image too
            small for ``conv4``).
    """
    with torch.device("meta"):
        bb = _create_backbone(backbone, False, None, width, image_size)
    return int(getattr(bb, "num_features"))


def build_model(backbone: str, embedding_dim: int, embedding_norm: str = "l2", pretrained: bool = False,
                pretrained_path: Optional[str] = None, width: Optional[int] = None, image_size: int = 32,
                head: str = "linear") -> MetricModel:
    """Create the embedding model.

    Args:
        backbone: a timm model name or one of :data:`SMALL_BACKBONES`.
        embedding_dim: D.
        embedding_norm: ``l2``, ``bn`` or ``ln``.
        pretrained: ImageNet weights from timm's hub.
        pretrained_path: a local state dict for the backbone.
        width: channels of a small backbone (``None``: its default); refused for timm models.
        image_size: input side in pixels (fixes the feature size of ``conv4``, which is not pooled).
        head: ``linear`` or ``none`` (then ``embedding_dim`` must be the backbone's feature size,
            :func:`backbone_feature_size`).

    Raises:
        PretrainedWeightsError: ``pretrained`` without a reachable weight hub and no ``pretrained_path``.
        ValueError: unknown backbone, ``width`` for a timm model, an image too small for ``conv4``, or
            bad ``pretrained_path`` contents.
    """
    bb = _create_backbone(backbone, pretrained, pretrained_path, width, image_size)
    num_features = int(getattr(bb, "num_features"))
    return MetricModel(bb, num_features, embedding_dim, embedding_norm, head)
