"""CUDA variants (skipped without a GPU): the tensor augmentation on the GPU, a bf16 channels-last run."""

import json
import math

import pytest
import torch

from selfsup.augment import TensorMoCoAugment
from selfsup.train import train
from tests.selfsup.conftest import tiny_config

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _check_losses(path, steps):
    """One finite loss per step (NaN and +-inf fail: ``x == x`` lets inf through), and the epoch record's
    loss their mean (the same float64 sum of the same values, so equal up to one rounding)."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    per_step = [r for r in records if "step_loss" in r]
    assert [r["step"] for r in per_step] == list(range(1, steps + 1))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r.get("step_loss", 0.0)) for r in records), records
    epoch = [r for r in records if "epoch_loss" in r]
    assert epoch and epoch[-1]["loss"] == pytest.approx(sum(r["step_loss"] for r in per_step) / steps, rel=1e-12)


@cuda
def test_gpu_augmentation_equals_cpu_augmentation():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    cpu = TensorMoCoAugment()(images, torch.Generator().manual_seed(0))
    gpu = TensorMoCoAugment()(images.cuda(), torch.Generator().manual_seed(0))
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=2e-4, rtol=0)


@cuda
def test_tiny_run_on_gpu_with_amp_and_gpu_augment(tmp_path):
    summary = train(tiny_config(tmp_path, device="cuda", amp=True, channels_last=True, gpu_augment=True, max_steps=4))
    assert summary["global_step"] == 4 and 0.0 <= summary["knn_acc"] <= 1.0
    _check_losses(tmp_path / "metrics.jsonl", steps=4)
    sd = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)
    memory = sd["criterion"].get("queue.memory", sd["criterion"].get("memory_bank.queue.memory"))  # raw / normalized keys
    assert memory is not None and torch.isfinite(memory).all()
