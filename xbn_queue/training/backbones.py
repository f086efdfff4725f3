"""Backbones for small images, shared by both trainers (torch only).

* :class:`CifarResNet`: torchvision's ResNet recipe with the two usual CIFAR changes (the official
  MoCo CIFAR demo, PML's MoCo notebook): a 3x3 stride-1 stem and no max-pool, global average pooling.
  The residual blocks are written here with torchvision's module names, so at ``width=64`` the
  parameters and state-dict keys are those of ``torchvision.models.resnet18`` (resp. 34, 50) with
  ``conv1`` replaced, ``maxpool`` dropped and ``fc`` removed (a test loads torchvision's weights and
  compares outputs). ``width`` (channels of the first stage) can be lowered for quick CPU runs.
  The self-supervised trainer's MoCo encoder and ``xbn-metric --backbone cifar_resnet18`` use it.
* :class:`Conv4`: the Conv-4 network of the few-shot and metric-learning literature (matching /
  prototypical networks): four blocks of [3x3 conv, BatchNorm, ReLU, 2x2 max-pool], flattened (not
  globally pooled, so the spatial layout survives). ``xbn-metric --backbone conv4``.
* :class:`TinyCNN`: three conv blocks and global pooling for tiny images (the ``digits`` demo, tests).

Every backbone maps ``(B, 3, H, W)`` images to ``(B, num_features)`` features.

After :func:`register_with_timm` (called by importing this module when timm is already imported),
``timm.create_model("conv4", width=32, image_size=28)`` (and ``"cifar_resnet18"``, ``"tinycnn"``)
builds them like any timm model (without pretrained weights). The trainers build them through
:data:`ENTRY_POINTS` instead, so that a run on a small backbone never imports timm (importing torch
and timm took 7.8-8.6 s of CPU against 2.9-3.6 s for torch alone, ``/usr/bin/time python -c "import
torch, timm"``, 2-core AMD EPYC VM, 2026-12-06; a run still imports part of that, ``torch._dynamo``,
through its optimiser).
"""

from __future__ import annotations

import sys
from typing import Any, Callable, List, Optional, Type, Union

import torch
from torch import Tensor, nn

__all__ = ["BasicBlock", "Bottleneck", "CifarResNet", "Conv4", "TinyCNN", "CIFAR_RESNET_ARCHS"]

NormLayer = Callable[[int], nn.Module]


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (torchvision's ``BasicBlock``, same names).

    Args:
        inplanes: input channels.
        planes: output channels.
        stride: stride of the first convolution.
        downsample: maps the input to the output's shape when they differ.
        norm_layer: batch-norm class.
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        """``(B, inplanes, H, W)`` -> ``(B, planes, H / stride, W / stride)``."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 - 3x3 - 1x1 convolutions with a residual connection (torchvision's ``Bottleneck``, stride on the 3x3).

    Args: as :class:`BasicBlock`; the output has ``planes * 4`` channels.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = norm_layer(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        """``(B, inplanes, H, W)`` -> ``(B, 4 * planes, H / stride, W / stride)``."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


#: ``arch -> (block, blocks per stage)``, as torchvision.
CIFAR_RESNET_ARCHS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}


class CifarResNet(nn.Module):
    """ResNet for 32x32 images: 3x3 stem, no max-pool, global average pool; outputs features.

    Args:
        arch: ``resnet18`` | ``resnet34`` | ``resnet50``.
        width: channels of the first stage (torchvision: 64); later stages have 2x, 4x, 8x.
        norm_layer: batch-norm class (e.g. ``partial(SplitBatchNorm, num_splits=8)``).

    Attributes:
        num_features: output feature size (``8 * width * block.expansion``).

    Raises:
        ValueError: unknown ``arch`` or ``width < 1``.
    """

    def __init__(self, arch: str = "resnet18", width: int = 64, norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        if arch not in CIFAR_RESNET_ARCHS:
            raise ValueError(f"unknown backbone {arch!r}; expected one of {sorted(CIFAR_RESNET_ARCHS)}")
        if int(width) < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        block, layers = CIFAR_RESNET_ARCHS[arch]
        self._norm_layer = norm_layer
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.num_features = width * 8 * block.expansion
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block: Type[Union[BasicBlock, Bottleneck]], planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                self._norm_layer(planes * block.expansion),
            )
        layers: List[nn.Module] = [block(self.inplanes, planes, stride, downsample, norm_layer=self._norm_layer)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, norm_layer=self._norm_layer))
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> ``(B, num_features)``."""
        x = self.relu(self.bn1(self.conv1(x)))  # (B, w, H, W): no max-pool
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 8w * expansion, H / 8, W / 8)
        return torch.flatten(self.avgpool(x), 1)


class Conv4(nn.Module):
    """Conv-4: 4 x [3x3 conv (``width`` channels), BatchNorm, ReLU, 2x2 max-pool], flattened.

    The output keeps the spatial layout: ``num_features = width * (H // 16) * (W // 16)`` for an
    ``H x W`` input (each max-pool floors odd sizes), e.g. 64 * 2 * 2 = 256 at 32 px with ``width=64``.

    Args:
        width: channels of every block (64 in the literature).
        image_size: the input's side in pixels (square images), which fixes ``num_features``.

    Raises:
        ValueError: ``width < 1``, or an ``image_size`` below 16 (four 2x2 pools need 16 px).
    """

    def __init__(self, width: int = 64, image_size: int = 84) -> None:
        super().__init__()
        w, s = int(width), int(image_size)
        if w < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        if s < 16:
            raise ValueError(f"conv4 needs images of at least 16 px (four 2x2 max-pools), got image size {image_size}")
        layers: List[nn.Module] = []
        c_in = 3
        for _ in range(4):
            layers += [nn.Conv2d(c_in, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c_in = w
        self.features = nn.Sequential(*layers)
        for _ in range(4):
            s //= 2
        self.out_size = s
        self.num_features = w * s * s

    def forward(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> ``(B, width * (H // 16) * (W // 16))``."""
        f = self.features(x)  # (B, w, H // 16, W // 16)
        return torch.flatten(f, 1)


class TinyCNN(nn.Module):
    """A small CNN for tiny images (the ``digits`` demo and the tests): 3 conv blocks, global pooling.

    Args:
        width: channels of the first block (doubled per block).

    Attributes:
        num_features: output feature size (4 * width).
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = int(width)
        layers: List[nn.Module] = []
        c_in = 3
        for c_out, stride in ((w, 1), (2 * w, 2), (4 * w, 2)):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.num_features = 4 * w

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, num_features)."""
        return self.features(x).mean(dim=(2, 3))


# ------------------------------------------------------------------------------- timm's registry
def _no_weights(name: str, pretrained: bool) -> None:
    if pretrained:
        raise ValueError(f"backbone {name!r} has no pretrained weights")


def tinycnn(pretrained: bool = False, width: int = 16, **_: Any) -> TinyCNN:
    """timm entry point of :class:`TinyCNN` (timm's own keyword arguments, e.g. ``num_classes``, are ignored)."""
    _no_weights("tinycnn", pretrained)
    return TinyCNN(width)


def conv4(pretrained: bool = False, width: int = 64, image_size: int = 84, **_: Any) -> Conv4:
    """timm entry point of :class:`Conv4` (timm's own keyword arguments, e.g. ``num_classes``, are ignored)."""
    _no_weights("conv4", pretrained)
    return Conv4(width, image_size)


def cifar_resnet18(pretrained: bool = False, width: int = 64, norm_layer: NormLayer = nn.BatchNorm2d,
                   **_: Any) -> CifarResNet:
    """timm entry point of the CIFAR ResNet-18 (timm's own keyword arguments, e.g. ``num_classes``, are ignored)."""
    _no_weights("cifar_resnet18", pretrained)
    return CifarResNet("resnet18", width=width, norm_layer=norm_layer)


_REGISTERED = False


def register_with_timm() -> bool:
    """Register ``tinycnn``, ``conv4`` and ``cifar_resnet18`` in timm's model registry (once).

    Returns:
        True when they are registered, False when timm is not installed.
    """
    global _REGISTERED
    if _REGISTERED:
        return True
    try:
        from timm.models import register_model
    except ImportError:  # timm is optional here: the classes work without it
        return False
    for entry in (tinycnn, conv4, cifar_resnet18):
        register_model(entry)
    _REGISTERED = True
    return True


#: Entry points by name, for building a small backbone without importing timm (seconds per process).
ENTRY_POINTS = {"tinycnn": tinycnn, "conv4": conv4, "cifar_resnet18": cifar_resnet18}

if "timm" in sys.modules and sys.modules["timm"] is not None:  # timm already imported: registering is free
    register_with_timm()
