"""prefill_memory: a trainer's --prefill (the trainer supplies only how a batch of chosen images is read)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from xbn_queue import AdaptiveQueue
from xbn_queue.training.distributed import DistContext
from xbn_queue.training.prefill import prefill_batches, prefill_memory

NUM_TRAIN, ROWS, SEED, BATCH = 30, 12, 5, 5


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    model[1].running_mean.uniform_(-1, 1)
    images = torch.randn(NUM_TRAIN, 6, dtype=torch.float64)  # (N, 6)
    labels = torch.arange(NUM_TRAIN) % 7  # (N,)
    reads = []

    def read(batches):
        for b in batches:
            reads.append(b.tolist())
            i = torch.from_numpy(b)  # (b,)
            yield images[i].float(), labels[i], i

    return model, images, labels, read, reads


def _reference(model, images, chosen):
    """(ROWS, 4) float64 eval-mode embeddings of the chosen images, one at a time."""
    ref = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    ref.load_state_dict(model.state_dict())
    ref = ref.double().eval()
    with torch.no_grad():
        return torch.cat([ref(images[int(i)][None]) for i in chosen])


@pytest.mark.parametrize("normalize", [False, True])
def test_the_memory_holds_the_eval_mode_embeddings_of_the_chosen_images(normalize):
    model, images, labels, read, reads = _setup()
    model.train()
    model[2].eval()  # a submodule's own mode: restored as it was
    queue = AdaptiveQueue(size=ROWS, dim=4, adaptation="xbn")
    bn = {k: v.clone() for k, v in model[1].state_dict().items()}
    rng = torch.get_rng_state()
    done = prefill_memory(queue, model, read, num_train=NUM_TRAIN, seed=SEED, batch_size=BATCH, ctx=DistContext(),
                          device=torch.device("cpu"), amp=True, normalize=normalize, progress=False)
    assert torch.equal(torch.get_rng_state(), rng)  # no global random number drawn (exact resume)
    batches = prefill_batches(NUM_TRAIN, ROWS, SEED, BATCH)
    chosen = np.concatenate(batches)  # (ROWS,) in writing order
    assert done is True and reads == [b.tolist() for b in batches] and len(queue) == ROWS
    ref = _reference(model, images, chosen)  # (ROWS, 4)
    if normalize:
        ref = ref / ref.norm(dim=1, keepdim=True)
    torch.testing.assert_close(queue.embeddings.double(), ref, rtol=1e-5, atol=1e-6)
    assert queue.ids.tolist() == chosen.tolist() and torch.equal(queue.labels, labels[torch.from_numpy(chosen)])
    assert queue.num_steps == 0  # not a training step: no adaptation counted
    assert model.training and model[1].training and not model[2].training
    assert all(torch.equal(bn[k], v) for k, v in model[1].state_dict().items())  # eval mode: statistics untouched


def test_a_memory_larger_than_the_training_set_is_refused():
    model, _, _, read, reads = _setup()
    with pytest.raises(ValueError, match=r"rows must be in \[1, 30\]"):
        prefill_memory(AdaptiveQueue(size=31, dim=4), model, read, num_train=NUM_TRAIN, seed=SEED, batch_size=BATCH,
                       ctx=DistContext(), device=torch.device("cpu"), amp=False)
    with pytest.raises(ValueError, match="is not a memory"):
        prefill_memory(object(), model, read, num_train=NUM_TRAIN, seed=SEED, batch_size=BATCH, ctx=DistContext(),
                       device=torch.device("cpu"), amp=False)
    assert reads == []  # nothing read before the checks
