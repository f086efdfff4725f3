"""``xbn_queue.training.memory``: the memory options both trainers share (one set of bounds, one size -> rows
rule, one ``queue_kwargs``), refused the same way by both command lines."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from metric.config import MetricConfig
from selfsup.config import SelfSupConfig
from tests.inprocess import run_inprocess
from xbn_queue.training.cli import UsageError, range_of
from xbn_queue.training.memory import BOUNDS, RULES, MemoryOptions, memory_rows

from .test_trainer_cli import METRIC_TINY, SELFSUP_TINY

#: The memory fields of each trainer's config and the shared bound (a key of BOUNDS or RULES) each must carry.
MEMORY_FIELDS = {
    MetricConfig: {"memory_size": "size", "memory_warmup_steps": "warmup_steps", "kalman_p0": "kalman_p0",
                   "kalman_q": "kalman_q", "kalman_r": "kalman_r", "kalman_gain_every": "kalman_gain_every"},
    SelfSupConfig: {"queue_size": "rows", "memory_warmup_steps": "warmup_steps", "kalman_p0": "kalman_p0",
                    "kalman_q": "kalman_q", "kalman_r": "kalman_r", "kalman_gain_every": "kalman_gain_every"},
}


@pytest.mark.parametrize("cls", list(MEMORY_FIELDS))
def test_both_configs_declare_the_one_set_of_bounds(cls):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, kind in MEMORY_FIELDS[cls].items():
        if kind in BOUNDS:
            assert range_of(fields[name]) is BOUNDS[kind], name
        else:
            assert fields[name].metadata.get("check") is RULES[kind] and range_of(fields[name]) is None, name


#: (option, value, the one-line error's text after "xbn-<trainer>: error: "), for both trainers.
BOUND_CASES = [
    ("--memory-warmup-steps", "-1", "--memory-warmup-steps -1: expected an integer >= 0"),
    ("--kalman-p0", "0", "--kalman-p0 0.0: expected a number > 0"),
    ("--kalman-p0", "-1", "--kalman-p0 -1.0: expected a number > 0"),
    ("--kalman-q", "-0.5", "--kalman-q -0.5: expected a number >= 0"),
    ("--kalman-gain-every", "0", "--kalman-gain-every 0: expected an integer >= 1"),
    ("--kalman-r", "0", "--kalman-r 0.0: expected a number > 0, 'auto' or 'sampling'"),
    ("--kalman-r", "-0.01", "--kalman-r -0.01: expected a number > 0, 'auto' or 'sampling'"),
    ("--kalman-r", "often", "--kalman-r often: expected a number > 0, 'auto' or 'sampling'"),
]
#: The size: xbn-metric's rows or a fraction of the training set, xbn-selfsup's rows (the same bound, BOUNDS["rows"]).
SIZE_CASES = [
    ("metric", "--memory-size", "0", "--memory-size 0: expected a row count >= 1 or a fraction of the training set > 0"),
    ("metric", "--memory-size", "-3", "--memory-size -3: expected a row count >= 1 or a fraction of the training set > 0"),
    ("selfsup", "--queue-size", "0", "--queue-size 0: expected an integer >= 1"),
    ("selfsup", "--queue-size", "-3", "--queue-size -3: expected an integer >= 1"),
    ("metric", "--memory-size", "0.0", "--memory-size 0.0: a fraction of the training set must be a finite number > 0"),
    ("metric", "--memory-size", "-0.5", "--memory-size -0.5: a fraction of the training set must be a finite number > 0"),
    ("metric", "--memory-size", "nan", "--memory-size nan: a fraction of the training set must be a finite number > 0"),
]


def _cases():
    for option, value, text in BOUND_CASES:
        yield "metric", option, value, text
        yield "selfsup", option, value, text
    yield from SIZE_CASES


@pytest.mark.parametrize("trainer,option,value,text", list(_cases()))
def test_every_memory_bound_is_one_line_exit_2_and_writes_nothing(tmp_path, trainer, option, value, text):
    tiny = METRIC_TINY if trainer == "metric" else SELFSUP_TINY
    res = run_inprocess(trainer, [*tiny, "--method" if trainer == "metric" else "--adaptation", "axbn",
                                  f"{option}={value}", "--output-dir", str(tmp_path / "run")])
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr
    assert lines == [lines[0]] and lines[0].startswith(f"xbn-{trainer}: error: {text}"), res.stderr
    assert not (tmp_path / "run").exists()


def test_memory_rows_of_a_size():
    assert memory_rows(64, 10) == 64 and memory_rows("64", None) == 64  # a row count, with or without the data
    assert memory_rows(0.5, 1001) == 500 and memory_rows("2.0", 7) == 14 and memory_rows(1e-9, 10) == 1
    assert memory_rows(0.5, None) == 0  # a fraction checked alone
    with pytest.raises(UsageError, match=r"^--queue-size 0: expected a row count >= 1"):
        memory_rows(0, 10, "--queue-size")
    with pytest.raises(UsageError, match=r"^--memory-size inf: a fraction of the training set must be a finite"):
        memory_rows("inf", 10)
    with pytest.raises(UsageError, match=r"^--memory-size True: expected a row count"):
        memory_rows(True, 10)


def test_rows_are_checked_once_against_the_batch_the_prefill_and_the_device():
    mem = MemoryOptions(adaptation="xbn", size=0.5, size_option="--memory-size")
    assert mem.rows(100, dim=8, batch_size=16, world_size=2, device="cpu") == 50
    with pytest.raises(UsageError, match=r"^--memory-size 0.5: 50 rows, fewer than one global batch \(16 x 4 processes\)$"):
        mem.rows(100, dim=8, batch_size=16, world_size=4)
    prefill = dataclasses.replace(mem, size=101, prefill=True)
    with pytest.raises(UsageError, match=r"^--prefill: .* but --memory-size 101 is 101 rows, more than the 100 training"):
        prefill.rows(100, dim=8, batch_size=16, world_size=1)
    assert dataclasses.replace(prefill, size=100).rows(100, dim=8, batch_size=16, world_size=1) == 100
    huge = MemoryOptions(adaptation="none", size=10**12, size_option="--queue-size")
    assert huge.rows(100, dim=512, batch_size=16, world_size=1) == 10**12  # no device: capacity not checked
    with pytest.raises(UsageError, match=r"^--queue-size 1000000000000: a memory of 1,000,000,000,000 rows x 512 needs"):
        huge.rows(100, dim=512, batch_size=16, world_size=1, device=torch.device("cpu"))
    # no memory (xbn-metric --method none): the rows the size stands for, recorded in checkpoints, not checked
    assert MemoryOptions(adaptation=None, size=0.5, prefill=True).rows(100, dim=8, batch_size=64, world_size=4) == 50


def test_queue_kwargs_are_the_adaptive_queue_arguments():
    from xbn_queue import AdaptiveQueue

    axbn = MemoryOptions(adaptation="axbn", size=64, warmup_steps=3, kalman_p0=2.0, kalman_q=0.5, kalman_r="0.02",
                         kalman_gain_every=5, prefill=True, mask_same_ids=True)
    kw = axbn.queue_kwargs()
    assert kw == {"adaptation": "axbn", "warmup_steps": 3, "kalman_p0": 2.0, "kalman_q": 0.5, "kalman_r": 0.02,
                  "kalman_gain_every": 5}
    q = AdaptiveQueue(size=64, dim=4, **kw)
    assert (q.warmup_steps, q.adaptation.name, q.adaptation.r, q.adaptation.gain_every) == (3, "axbn", 0.02, 5)
    assert dataclasses.replace(axbn, kalman_r=" Sampling ").queue_kwargs()["kalman_r"] == "sampling"
    assert MemoryOptions(adaptation="xbn", size=64, kalman_p0=2.0).queue_kwargs() == {"adaptation": "xbn", "warmup_steps": 0}
    with pytest.raises(ValueError, match="no memory"):
        MemoryOptions(adaptation=None, size=64).queue_kwargs()


def test_each_config_gathers_its_memory_options():
    m = MetricConfig(method="axbn-batch", memory_size=0.25, memory_warmup_steps=2, prefill=True, kalman_q=0.3,
                     kalman_r="auto", kalman_p0=3.0, kalman_gain_every=7).memory_options()
    assert m == MemoryOptions(adaptation="axbn", size=0.25, warmup_steps=2, prefill=True, kalman_p0=3.0, kalman_q=0.3,
                              kalman_r="auto", kalman_gain_every=7, size_option="--memory-size")
    assert MetricConfig(method="none").memory_options().adaptation is None
    assert MetricConfig(method="xbm").memory_options().adaptation == "none"
    s = SelfSupConfig(adaptation="xbn", queue_size=128, memory_warmup_steps=4, mask_same_ids=True).memory_options()
    assert (s.adaptation, s.size, s.warmup_steps, s.mask_same_ids, s.size_option) == ("xbn", 128, 4, True, "--queue-size")


@pytest.mark.parametrize("trainer", ["metric", "selfsup"])
def test_a_run_turns_its_size_into_rows_once_and_its_memory_has_them(tmp_path, monkeypatch, trainer):
    """One call of MemoryOptions.rows per run (right after the data is loaded); the memory the run builds
    has exactly those rows."""
    calls = []
    real = MemoryOptions.rows

    def counted(self, *args, **kwargs):
        calls.append(self.size)
        calls.append(real(self, *args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(MemoryOptions, "rows", counted)
    if trainer == "metric":
        from metric.train import MetricRun

        from tests.metric.helpers import tiny_cfg

        run = MetricRun(tiny_cfg(tmp_path, method="axbn", memory_size=0.3, max_steps=1))
        run.fit()
        queue = run.mem_loss.queue
        assert calls == [0.3, round(0.3 * len(run.data.train))] and run.meta["memory_rows"] == calls[1]
    else:
        from selfsup.train import Trainer, criterion_queue

        from tests.selfsup.conftest import tiny_config

        run = Trainer(tiny_config(tmp_path, adaptation="axbn", queue_size=64, max_steps=1, knn_every=0))
        run.fit()
        queue = criterion_queue(run.criterion)
        assert calls == [64, 64]
    assert queue.size == calls[1]
