"""prefill_batches: the images a trainer's --prefill embeds, shared by ranks."""

import numpy as np
import pytest

from xbn_queue.training.prefill import prefill_batches


@pytest.mark.parametrize("n,rows,batch,world", [(179, 64, 16, 1), (179, 64, 512, 2), (100, 97, 7, 3), (10, 3, 1, 2),
                                                (5000, 4096, 512, 4)])
def test_every_rank_gets_the_same_number_of_non_empty_batches_and_together_the_chosen_images_once(n, rows, batch, world):
    per_rank = [prefill_batches(n, rows, 3, batch, r, world) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # the same number of calls (each gathers across ranks)
    assert all(len(b) > 0 and len(b) <= batch + (batch == 1) for bs in per_rank for b in bs)
    union = np.concatenate([b for bs in per_rank for b in bs])
    assert len(union) == rows and len(set(union.tolist())) == rows and union.min() >= 0 and union.max() < n
    assert union.dtype == np.int64
    # the same images whatever the number of processes; another seed, another choice
    single = np.concatenate(prefill_batches(n, rows, 3, batch))
    assert set(single.tolist()) == set(union.tolist())
    if rows < n:
        assert set(np.concatenate(prefill_batches(n, rows, 4, batch)).tolist()) != set(single.tolist())


def test_the_choice_ignores_the_global_random_state():
    np.random.seed(0)
    a = prefill_batches(50, 20, 1, 8)
    np.random.seed(1)
    b = prefill_batches(50, 20, 1, 8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("args,match", [
    ((10, 11, 0, 4), r"rows must be in \[1, 10\]"),
    ((10, 1, 0, 4, 0, 2), r"rows must be in \[2, 10\]"),
    ((10, 5, 0, 0), "batch_size 0 must be >= 1"),
    ((10, 5, 0, 4, 2, 2), r"rank 2 in \[0, 2\)"),
])
def test_errors(args, match):
    with pytest.raises(ValueError, match=match):
        prefill_batches(*args)
