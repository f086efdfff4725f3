import torch
from torch import nn
from torchvision.models import resnet18

from selfsup.model import CifarResNet, MoCoEncoder, SplitBatchNorm, make_key_encoder, momentum_update, shuffle_batch


def test_cifar_resnet18_is_torchvision_resnet18_with_cifar_stem():
    ref = resnet18()
    ref.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    ref.maxpool = nn.Identity()
    ref.fc = nn.Identity()
    ours = CifarResNet("resnet18", width=64)
    ref_shapes = {k: v.shape for k, v in ref.state_dict().items()}
    our_shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert our_shapes == ref_shapes
    ours.load_state_dict(ref.state_dict())
    ours.eval(), ref.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours(x), ref(x))
    assert ours(x).shape == (2, 512)


def test_split_batchnorm_normalizes_each_split_separately():
    torch.manual_seed(0)
    bn = SplitBatchNorm(3, num_splits=2)
    x = torch.randn(8, 3, 2, 2) * torch.tensor([1.0, 5.0]).repeat_interleave(4).view(8, 1, 1, 1)
    out = bn(x)
    ref = torch.cat([nn.functional.batch_norm(x[i * 4 : (i + 1) * 4].double(), None, None, training=True, eps=bn.eps) for i in range(2)])
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    # running stats: mean over splits of each split's momentum update
    m0 = 0.1 * torch.stack([x[:4].mean((0, 2, 3)), x[4:].mean((0, 2, 3))]).mean(0)
    torch.testing.assert_close(bn.running_mean, m0)
    bn.eval()
    torch.testing.assert_close(bn(x), nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps))


def test_key_encoder_is_frozen_copy_and_momentum_update_is_ema():
    torch.manual_seed(0)
    q = MoCoEncoder(width=8, split_bn=2, embedding_dim=16)
    k = make_key_encoder(q)
    assert all(not p.requires_grad for p in k.parameters())
    for pq, pk in zip(q.parameters(), k.parameters()):
        torch.testing.assert_close(pq, pk)
    with torch.no_grad():
        for p in q.parameters():
            p.add_(1.0)
    before = [p.clone() for p in k.parameters()]
    momentum_update(q, k, 0.9)
    for pq, pk, b in zip(q.parameters(), k.parameters(), before):
        torch.testing.assert_close(pk, 0.9 * b + 0.1 * pq)


def test_mlp_head_is_lightly_moco_head():
    from lightly.models.modules import MoCoProjectionHead

    enc = MoCoEncoder(width=8, head="mlp", embedding_dim=16)
    assert isinstance(enc.head, MoCoProjectionHead)
    assert enc(torch.randn(4, 3, 16, 16)).shape == (4, 16)
    assert enc.features(torch.randn(4, 3, 16, 16)).shape == (4, 64)


def test_shuffle_batch_roundtrip():
    x = torch.arange(10.0).view(10, 1)
    xs, un = shuffle_batch(x, torch.Generator().manual_seed(3))
    assert not torch.equal(xs, x)
    torch.testing.assert_close(xs[un], x)
