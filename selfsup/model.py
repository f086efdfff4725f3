"""The MoCo model: a CIFAR ResNet with a projection head, its momentum key encoder, split batch-norm.

The CIFAR ResNet (3x3 stride-1 stem, no max-pool) lives in :mod:`xbn_queue.training.backbones`,
shared with ``xbn-metric --backbone cifar_resnet18``; it is re-exported here. Its module and
parameter names are unchanged, so earlier checkpoints load as before.
"""

import copy
from functools import partial

import torch
from torch import Tensor, nn

from xbn_queue.training.backbones import CifarResNet

__all__ = ["CifarResNet", "SplitBatchNorm", "MoCoEncoder", "make_key_encoder", "momentum_update", "shuffle_batch"]


class SplitBatchNorm(nn.BatchNorm2d):
    """Batch-norm over ``num_splits`` groups of the batch, emulating per-GPU BN (shuffle-BN) on one device.

    In training, the batch ``(N, C, H, W)`` is viewed as ``(N / s, C * s, H, W)`` so each of the ``s``
    groups of ``N / s`` consecutive samples is normalized with its own statistics; running
    statistics are the average over groups. In evaluation it is a plain ``BatchNorm2d``.
    """

    def __init__(self, num_features: int, num_splits: int, **kw) -> None:
        super().__init__(num_features, **kw)
        self.num_splits = num_splits

    def forward(self, input: Tensor) -> Tensor:
        N, C, H, W = input.shape
        if (self.training or not self.track_running_stats) and self.num_splits > 1:
            if N % self.num_splits != 0:
                raise ValueError(f"SplitBatchNorm: batch of {N} is not divisible into {self.num_splits} splits")
            running_mean = self.running_mean.repeat(self.num_splits)
            running_var = self.running_var.repeat(self.num_splits)
            # (N, C, H, W) -> (N / s, s * C, H, W): sample n goes to split n // (N / s)
            x = input.reshape(self.num_splits, N // self.num_splits, C, H, W).transpose(0, 1)
            x = x.reshape(N // self.num_splits, self.num_splits * C, H, W)
            out = nn.functional.batch_norm(
                x,
                running_mean,
                running_var,
                self.weight.repeat(self.num_splits),
                self.bias.repeat(self.num_splits),
                True,
                self.momentum,
                self.eps,
            )
            out = out.reshape(N // self.num_splits, self.num_splits, C, H, W).transpose(0, 1).reshape(N, C, H, W)
            with torch.no_grad():
                self.running_mean.copy_(running_mean.view(self.num_splits, C).mean(dim=0))
                self.running_var.copy_(running_var.view(self.num_splits, C).mean(dim=0))
                self.num_batches_tracked.add_(1)
            return out
        return super().forward(input)


class MoCoEncoder(nn.Module):
    """Backbone + projection head.

    Args:
        backbone: ``resnet18`` | ``resnet34`` | ``resnet50`` (CIFAR variants).
        head: ``linear`` (one ``nn.Linear``, MoCo v1 / PML example) or ``mlp`` (lightly's
            ``MoCoProjectionHead``, hidden size = feature size, MoCo v2).
        embedding_dim: output size of the head.
        width: first-stage channels of the backbone.
        split_bn: number of batch-norm splits (1 = plain BN).
    """

    def __init__(self, backbone: str = "resnet18", head: str = "linear", embedding_dim: int = 128, width: int = 64, split_bn: int = 1) -> None:
        super().__init__()
        norm = partial(SplitBatchNorm, num_splits=split_bn) if split_bn > 1 else nn.BatchNorm2d
        self.backbone = CifarResNet(backbone, width=width, norm_layer=norm)
        feat = self.backbone.num_features
        if head == "linear":
            self.head: nn.Module = nn.Linear(feat, embedding_dim)
        elif head == "mlp":
            from lightly.models.modules import MoCoProjectionHead

            self.head = MoCoProjectionHead(input_dim=feat, hidden_dim=feat, output_dim=embedding_dim)
        else:
            raise ValueError(f"unknown head {head!r}; expected linear or mlp")

    def features(self, x: Tensor) -> Tensor:
        """Backbone features ``(B, F)`` (what the k-NN monitor uses with ``--knn-features backbone``)."""
        return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> projections ``(B, embedding_dim)`` (not normalized; the loss normalizes)."""
        return self.head(self.backbone(x))


def make_key_encoder(query: nn.Module) -> nn.Module:
    """A frozen copy of the query encoder (lightly's ``deactivate_requires_grad``)."""
    from lightly.models.utils import deactivate_requires_grad

    key = copy.deepcopy(query)
    deactivate_requires_grad(key)
    return key


@torch.no_grad()
def momentum_update(query: nn.Module, key: nn.Module, m: float) -> None:
    """``key <- m * key + (1 - m) * query`` for parameters (lightly's ``update_momentum``)."""
    from lightly.models.utils import update_momentum

    update_momentum(query, key, m=m)


def shuffle_batch(x: Tensor, generator: torch.Generator) -> tuple:
    """MoCo's batch shuffle for shuffle-BN on one device.

    Returns:
        ``(x[perm], unshuffle)`` with ``unshuffle`` (B,) such that ``y[unshuffle]`` restores the order.
    """
    perm = torch.randperm(x.shape[0], generator=generator).to(x.device)
    return x[perm], torch.argsort(perm)
