"""Shared small-image backbones: Conv-4 against a float64 reference, the CIFAR ResNet against torchvision."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xbn_queue.training.backbones import CifarResNet, Conv4, TinyCNN

ROOT = Path(__file__).resolve().parents[3]


def test_backbones_import_with_torch_alone() -> None:
    code = ("import sys; sys.modules['torchvision'] = None; sys.modules['timm'] = None\n"
            "from xbn_queue.training.backbones import CifarResNet, Conv4\n"
            "print(CifarResNet('resnet18', width=4)(__import__('torch').zeros(2, 3, 8, 8)).shape)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([2, 32])" in out.stdout


def test_the_metric_trainer_builds_a_small_backbone_without_importing_timm() -> None:
    """timm's import costs seconds per process; conv4 runs (the main job) must not pay it, and build the same net."""
    code = ("import sys, torch\n"
            "from metric.model import build_model\n"
            "torch.manual_seed(0); m = build_model('conv4', 256, pretrained=False, head='none', image_size=32)\n"
            "print('timm' in sys.modules, sum(float(p.double().sum()) for p in m.parameters()))\n"
            "import timm; from xbn_queue.training.backbones import register_with_timm; register_with_timm()\n"
            "torch.manual_seed(0); b = timm.create_model('conv4', pretrained=False, num_classes=0, width=64, image_size=32)\n"
            "print(all(torch.equal(a, c) for a, c in zip(m.backbone.state_dict().values(), b.state_dict().values())))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.split("\n")[:2]
    assert first.startswith("False "), out.stdout
    assert second == "True", out.stdout


def _conv4_reference(net: Conv4, x: torch.Tensor) -> torch.Tensor:
    """Plain float64 Conv-4 in training mode: conv, batch statistics, ReLU, 2x2 max-pool, four times, flattened."""
    h = x.double()
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == len(bns) == 4
    for conv, bn in zip(convs, bns):
        h = F.conv2d(h, conv.weight.double(), conv.bias.double(), padding=1)
        mean = h.mean(dim=(0, 2, 3), keepdim=True)
        var = h.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        h = (h - mean) / torch.sqrt(var + bn.eps) * bn.weight.double().view(1, -1, 1, 1) + bn.bias.double().view(1, -1, 1, 1)
        h = h.clamp_min(0.0)
        n, c, hh, ww = h.shape
        h = h[:, :, : hh // 2 * 2, : ww // 2 * 2].reshape(n, c, hh // 2, 2, ww // 2, 2).amax(dim=(3, 5))
    return h.reshape(h.shape[0], -1)


@pytest.mark.parametrize("size,width,side", [(32, 8, 2), (16, 4, 1), (84, 6, 5), (21, 5, 1)])
def test_conv4_matches_a_float64_reference_and_keeps_the_spatial_layout(size: int, width: int, side: int) -> None:
    torch.manual_seed(0)
    net = Conv4(width=width, image_size=size)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    assert net.num_features == width * side * side
    x = torch.randn(5, 3, size, size)
    out = net(x)  # (5, width * side^2)
    assert out.shape == (5, net.num_features)
    torch.testing.assert_close(out.double(), _conv4_reference(net, x), atol=1e-5, rtol=1e-5)
    # not globally pooled: moving content to another quadrant changes the feature, pooled features would not
    net.eval()
    if side > 1:
        a = torch.zeros(1, 3, size, size)
        a[..., :8, :8] = 1.0
        b = torch.zeros(1, 3, size, size)
        b[..., -8:, -8:] = 1.0
        assert not torch.allclose(net(a), net(b))


def test_conv4_refuses_bad_sizes() -> None:
    with pytest.raises(ValueError, match="at least 16 px"):
        Conv4(width=8, image_size=8)
    with pytest.raises(ValueError, match="width must be >= 1"):
        Conv4(width=0, image_size=32)
    with pytest.raises(ValueError, match="width must be >= 1"):
        CifarResNet("resnet18", width=0)
    with pytest.raises(ValueError, match="unknown backbone"):
        CifarResNet("resnet101")


@pytest.mark.parametrize("kind,stride,cin,planes", [("BasicBlock", 2, 8, 16), ("BasicBlock", 1, 8, 8), ("Bottleneck", 2, 8, 4),
                                                     ("Bottleneck", 1, 16, 4)])
def test_blocks_are_torchvision_blocks(kind: str, stride: int, cin: int, planes: int) -> None:
    """Same names, shapes and outputs as torchvision's blocks (selfsup checkpoints keep loading).

    The whole CIFAR ResNet-18 is compared with torchvision's in tests/selfsup/test_model.py.
    """
    import torchvision.models.resnet as tv

    from xbn_queue.training import backbones

    torch.manual_seed(0)
    expansion = getattr(tv, kind).expansion
    down = None
    if stride != 1 or cin != planes * expansion:
        down = nn.Sequential(nn.Conv2d(cin, planes * expansion, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * expansion))
    ref = getattr(tv, kind)(cin, planes, stride, down)
    ours = getattr(backbones, kind)(cin, planes, stride, None if down is None else
                                    nn.Sequential(nn.Conv2d(cin, planes * expansion, 1, stride=stride, bias=False),
                                                  nn.BatchNorm2d(planes * expansion)))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, cin, 8, 8)
    torch.testing.assert_close(ours(x), ref(x))  # training mode: batch statistics
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x))


def test_selfsup_and_metric_share_one_cifar_resnet() -> None:
    import selfsup.model

    from metric.model import build_model

    assert selfsup.model.CifarResNet is CifarResNet
    m = build_model("cifar_resnet18", 8, width=4)
    assert type(m.backbone) is CifarResNet
    enc = selfsup.model.MoCoEncoder(width=4, embedding_dim=8)
    # the MoCo encoder's backbone and metric's are the same module tree: one's weights load into the other
    m.backbone.load_state_dict(enc.backbone.state_dict())


@pytest.mark.parametrize("name,kwargs,build", [
    ("conv4", dict(width=8, image_size=28), lambda: Conv4(8, 28)),
    ("cifar_resnet18", dict(width=8), lambda: CifarResNet("resnet18", width=8)),
    ("tinycnn", dict(width=4), lambda: TinyCNN(4)),
])
def test_timm_registry_builds_our_backbones(name, kwargs, build):
    timm = pytest.importorskip("timm")
    from xbn_queue.training.backbones import register_with_timm

    assert register_with_timm() and register_with_timm()  # idempotent
    torch.manual_seed(0)
    ours = build()
    torch.manual_seed(0)
    theirs = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    assert type(theirs) is type(ours) and theirs.num_features == ours.num_features
    for (ka, a), (kb, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert ka == kb and torch.equal(a, b), ka
    with pytest.raises(ValueError, match=f"backbone '{name}' has no pretrained weights"):
        timm.create_model(name, pretrained=True, **kwargs)
