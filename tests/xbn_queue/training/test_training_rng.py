"""Tests of xbn_queue.training.rng and xbn_queue.training.seeding."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from xbn_queue.training.checkpoint import atomic_save, load_checkpoint
from xbn_queue.training.rng import get_rng_state, set_rng_state
from xbn_queue.training.seeding import resolve_device, seed_everything


def _draw() -> tuple:
    out = (random.random(), random.gauss(0, 1), float(np.random.rand()), float(np.random.randn()),
           torch.rand(3).tolist(), torch.randint(0, 1000, (2,)).tolist())
    if torch.cuda.is_available():
        out += (torch.rand(2, device="cuda").tolist(),)
    return out


def test_round_trip_restores_next_numbers(tmp_path: Path) -> None:
    seed_everything(123)
    _draw()
    np.random.randn()  # leave a cached Gaussian in NumPy's legacy state
    state = get_rng_state()
    expected = [_draw() for _ in range(3)]
    seed_everything(999)  # scramble everything
    assert _draw() != expected[0]
    path = atomic_save({"rng": state}, tmp_path / "rng.pt")
    set_rng_state(load_checkpoint(path)["rng"])  # through a weights_only checkpoint
    assert [_draw() for _ in range(3)] == expected


def test_state_holds_all_generators() -> None:
    state = get_rng_state()
    assert {"python", "torch", "numpy"} <= set(state)
    assert state["numpy"]["keys"].shape == (624,)
    assert ("cuda" in state) == torch.cuda.is_available()


def test_partial_state_leaves_others_alone() -> None:
    seed_everything(1)
    state = get_rng_state()
    py_next = random.random()
    seed_everything(2)
    torch_next = torch.rand(1).item()
    seed_everything(2)
    set_rng_state({"python": state["python"]})
    assert random.random() == py_next
    assert torch.rand(1).item() == torch_next


def test_seed_everything_is_reproducible() -> None:
    seed_everything(7)
    a = _draw()
    seed_everything(7)
    assert _draw() == a
    seed_everything(8)
    assert _draw() != a
    with pytest.raises(ValueError, match="seed must be"):
        seed_everything(-1)


def test_resolve_device() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == torch.device(expected)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"'cuda' was requested but CUDA is not available.*--device cpu"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda:1")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_index_out_of_range() -> None:
    assert resolve_device("cuda").type == "cuda"
    with pytest.raises(ValueError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")
