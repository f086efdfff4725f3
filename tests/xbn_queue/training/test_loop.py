"""RunLoop itself, driven by a toy trainer: a three-weight regression with a momentum optimiser and a memory.

No trainer, no data set: the batches are a function of ``(seed, epoch, step)``, each step also draws from
the global RNG (so that a resume must restore it), and "the memory" is a buffer the step appends its
batch's mean to after the finiteness check, as the trainers write their queues.
"""

import dataclasses
import json
import signal
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest
import torch

from xbn_queue.training.checkpoint import check_compatible, load_checkpoint
from xbn_queue.training.loop import Callback, NonFiniteError, RunLoop, RunState, RunSummary

STEPS = 4  # per epoch


@dataclasses.dataclass
class ToyConfig:
    output_dir: str = ""
    epochs: int = 3
    lr: float = 0.1
    seed: int = 0
    max_steps: Optional[int] = None
    nan_at_step: int = 0  # the batch of this step (1-based) holds a NaN
    checkpoint_every: int = 0
    eval_every: int = 1
    resume: str = ""
    overwrite: bool = False
    device: str = "cpu"
    amp: bool = False
    progress: Optional[bool] = False
    wandb_project: Optional[str] = None
    wandb_mode: str = "disabled"
    wandb_name: Optional[str] = None


@dataclasses.dataclass
class ToyState(RunState):
    loss_sum: float = 0.0
    evaluations: int = 0

    epoch_sums = ("loss_sum",)


class ToyRun(RunLoop):
    """The smallest trainer: every hook a trainer may supply, nothing else."""

    prog = "toy"
    checkpoint_keys = ("model", "memory")
    state_class = ToyState

    def check(self) -> None:
        if self.cfg.lr <= 0:
            raise ValueError(f"--lr {self.cfg.lr}: expected a number > 0")

    def build(self) -> None:
        torch.manual_seed(self.cfg.seed)
        self.model = torch.nn.Linear(3, 1, bias=False)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.cfg.lr, momentum=0.9)
        self.memory = torch.zeros(0, 3)  # (rows, 3): one row per step, written after the checks
        self.steps_per_epoch, self.total_epochs, self.eval_every = STEPS, self.cfg.epochs, self.cfg.eval_every

    def batches(self) -> Iterator[torch.Tensor]:
        for step in range(self.state.step_in_epoch, STEPS):
            g = torch.Generator().manual_seed(self.cfg.seed * 1000 + self.state.epoch * 10 + step)
            x = torch.randn(8, 3, generator=g)  # (8, 3)
            if self.state.global_step + 1 == self.cfg.nan_at_step:
                x[0, 0] = float("nan")
            yield x

    def train_step(self, x: torch.Tensor) -> float:
        noise = 0.01 * torch.randn(8, 1)  # (8, 1) from the global RNG: a resume must restore it
        y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + noise  # (8, 1)
        with self.autocast():
            loss = torch.nn.functional.mse_loss(self.model(x), y)
        self.check_finite("loss", loss)  # before the memory and the optimiser
        self.memory = torch.cat([self.memory, x.mean(0, keepdim=True)])
        self.backward_step(loss)
        value = float(loss.detach())
        self.state.loss_sum += value
        return value

    def end_epoch(self, evaluate: bool) -> Dict[str, Any]:
        st = self.state
        record: Dict[str, Any] = {"epoch": st.epoch + 1, "step": st.global_step, "loss": st.loss_sum}
        if evaluate:
            st.evaluations += 1
            record["weight_norm"] = float(self.model.weight.detach().norm())
        return record

    def checkpoint_state(self) -> Dict[str, Any]:
        return {**super().checkpoint_state(), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "memory": self.memory.clone()}

    def load_state(self, ckpt: Dict[str, Any], path: Path) -> None:
        check_compatible(ckpt["config"], dataclasses.asdict(self.cfg), ["lr", "seed"], source=path)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.memory = ckpt["memory"].clone()
        super().load_state(ckpt, path)


class Recorder(Callback):
    """Records every hook, and asks for a stop (as SIGTERM would) after the steps in ``signal_at``."""

    def __init__(self, signal_at=()):
        self.signal_at = set(signal_at)
        self.calls: List[tuple] = []

    def on_run_start(self, loop):
        self.calls.append(("run_start",))

    def on_epoch_start(self, loop):
        self.calls.append(("epoch_start", loop.state.epoch))

    def on_step_end(self, loop):
        self.calls.append(("step_end", loop.state.global_step))
        if loop.state.global_step in self.signal_at:
            loop.stop.request(signal.SIGTERM)

    def on_epoch_end(self, loop, record):
        self.calls.append(("epoch_end", record["step"], "weight_norm" in record))

    def on_checkpoint(self, loop, path):
        self.calls.append(("checkpoint", path.name, loop.state.global_step))

    def on_train_end(self, loop, stop):
        self.calls.append(("train_end", stop))

    def on_run_end(self, loop, summary):
        self.calls.append(("run_end", summary.stopped))

    def on_exception(self, loop, err):
        self.calls.append(("exception", type(err).__name__))


def run(out: Path, callbacks=(), **kw) -> RunSummary:
    loop = ToyRun(ToyConfig(output_dir=str(out), **kw), callbacks)
    try:
        return loop.fit()
    finally:
        loop.close()


def records(out: Path) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_checkpoint(a: Path, b: Path) -> None:
    ca, cb = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    assert ca["state"] == cb["state"]
    assert torch.equal(ca["memory"], cb["memory"]) and torch.equal(ca["model"]["weight"], cb["model"]["weight"])
    assert torch.equal(ca["optimizer"]["state"][0]["momentum_buffer"], cb["optimizer"]["state"][0]["momentum_buffer"])


def test_callbacks_fire_in_the_documented_order(tmp_path):
    rec = Recorder()
    summary = run(tmp_path, [rec], epochs=2, checkpoint_every=1)
    assert summary.stopped is None and summary.global_step == 8
    epoch = lambda e: [("epoch_start", e),  # noqa: E731
                       *[c for s in range(4 * e + 1, 4 * e + 4) for c in (("checkpoint", "last.pt", s), ("step_end", s))],
                       ("step_end", 4 * e + 4),  # the epoch's last step: its checkpoint follows the bookkeeping
                       ("checkpoint", "last.pt", 4 * e + 4), ("epoch_end", 4 * e + 4, True)]
    # the product's callbacks (metrics.jsonl, progress, last.pt) run before a user's: it sees each checkpoint first
    assert rec.calls == [("run_start",), *epoch(0), *epoch(1), ("train_end", None), ("run_end", None)]
    assert [r["step"] for r in records(tmp_path)] == [4, 8]


def test_max_steps_stops_after_the_bookkeeping_of_a_partial_epoch(tmp_path):
    rec = Recorder()
    summary = run(tmp_path, [rec], max_steps=6)
    assert (summary.stopped, summary.global_step) == ("max_steps", 6)
    assert [c for c in rec.calls if c[0] == "epoch_end"] == [("epoch_end", 4, True), ("epoch_end", 6, True)]
    state = load_checkpoint(tmp_path / "last.pt")["state"]
    assert (state["epoch"], state["step_in_epoch"], state["global_step"], state["evaluations"]) == (1, 2, 6, 2)
    again = run(tmp_path, [], max_steps=6, resume="auto")  # nothing left: nothing trained, nothing written
    assert again.already_complete and again.global_step == 6


def test_a_signal_inside_an_epoch_stops_at_once_without_the_bookkeeping(tmp_path):
    rec = Recorder(signal_at={2})
    summary = run(tmp_path, [rec])
    assert (summary.stopped, summary.signal, summary.global_step) == ("signal", signal.SIGTERM, 2)
    assert [c for c in rec.calls if c[0] == "epoch_end"] == []
    assert rec.calls[-3:] == [("checkpoint", "last.pt", 2), ("train_end", "signal"), ("run_end", "signal")]
    state = load_checkpoint(tmp_path / "last.pt")["state"]
    assert (state["epoch"], state["step_in_epoch"], state["loss_sum"] > 0) == (0, 2, True)


def test_a_signal_at_an_epochs_last_step_finishes_its_bookkeeping_then_stops(tmp_path):
    rec = Recorder(signal_at={4})
    summary = run(tmp_path, [rec])
    assert (summary.stopped, summary.global_step) == ("signal", 4)
    assert [c for c in rec.calls if c[0] == "epoch_end"] == [("epoch_end", 4, True)]  # evaluated, recorded
    state = load_checkpoint(tmp_path / "last.pt")["state"]
    assert (state["epoch"], state["step_in_epoch"], state["loss_sum"], state["evaluations"]) == (1, 0, 0.0, 1)
    resumed = Recorder()
    assert run(tmp_path, [resumed], resume="auto").global_step == 12
    assert resumed.calls[1:3] == [("epoch_start", 1), ("step_end", 5)]  # epoch 1's bookkeeping is not done again
    assert [r["step"] for r in records(tmp_path)] == [4, 8, 12]


def test_a_signal_at_the_runs_last_step_leaves_a_complete_run(tmp_path):
    summary = run(tmp_path, [Recorder(signal_at={12})])
    assert (summary.stopped, summary.global_step) == (None, 12)


@pytest.mark.parametrize("stop_at", [2, 4, 6])
def test_a_resumed_run_equals_an_uninterrupted_one_bit_for_bit(tmp_path, stop_at):
    run(tmp_path / "straight", [])
    assert run(tmp_path / "split", [Recorder(signal_at={stop_at})]).global_step == stop_at
    assert run(tmp_path / "split", [], resume="auto").global_step == 12
    assert_same_checkpoint(tmp_path / "straight", tmp_path / "split")
    assert records(tmp_path / "straight") == records(tmp_path / "split")


def test_a_non_finite_loss_stops_before_the_memory_and_the_optimiser(tmp_path):
    rec = Recorder()
    loop = ToyRun(ToyConfig(output_dir=str(tmp_path), nan_at_step=3, checkpoint_every=1), [rec])
    try:
        with pytest.raises(NonFiniteError, match=r"non-finite loss at step 3 \(epoch 1\).*last good checkpoint "
                                                 r".*last\.pt is kept"):
            loop.fit()
        kept = load_checkpoint(tmp_path / "last.pt")
        assert loop.memory.shape == (2, 3) and torch.equal(loop.memory, kept["memory"])  # not the bad batch
        assert torch.equal(loop.model.weight, kept["model"]["weight"])  # no optimiser step
        assert kept["state"]["global_step"] == loop.state.global_step == 2
        assert rec.calls[-1] == ("exception", "NonFiniteError")
    finally:
        loop.close()


def test_a_check_fails_on_construction_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match=r"--lr -1: expected a number > 0"):
        ToyRun(ToyConfig(output_dir=str(tmp_path / "run"), lr=-1))
    assert not (tmp_path / "run").exists()


def test_an_incompatible_checkpoint_is_refused_with_the_differing_keys(tmp_path):
    run(tmp_path, [], max_steps=2)
    with pytest.raises(ValueError, match=r"incompatible .* differs: lr: saved 0.1, now 0.2"):
        run(tmp_path, [], lr=0.2, resume="auto")


def test_resumes_checkpoint_is_read_before_the_build_and_a_rewrite_after_the_read_is_refused(tmp_path):
    from xbn_queue.training.checkpoint import CheckpointError, atomic_save
    from xbn_queue.training.cli import UsageError

    class Counted(ToyRun):
        builds = 0

        def build(self) -> None:
            type(self).builds += 1
            super().build()

    run(tmp_path, [], max_steps=2)
    (tmp_path / "last.pt").write_bytes((tmp_path / "last.pt").read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match="last.pt is not a readable"):
        Counted(ToyConfig(output_dir=str(tmp_path), resume="auto"))
    assert Counted.builds == 0  # refused before anything was built

    run(tmp_path / "b", [], max_steps=2)
    loop = ToyRun(ToyConfig(output_dir=str(tmp_path / "b"), resume="auto"))  # reads b/last.pt
    try:
        atomic_save(load_checkpoint(tmp_path / "b" / "last.pt"), tmp_path / "b" / "last.pt")  # another writer
        with pytest.raises(UsageError, match="changed since it was read"):
            loop.fit()
    finally:
        loop.close()


def test_state_and_summary_round_trip_and_default_missing_keys():
    st = ToyState(epoch=2, step_in_epoch=1, global_step=9, loss_sum=1.5, best={"step": 8}, evaluations=2)
    assert ToyState.from_dict(st.to_dict()) == st
    old = ToyState.from_dict({"epoch": 1, "step_in_epoch": 4, "global_step": 4, "record_pending": True, "model": {}})
    assert (old.epoch, old.loss_sum, old.best, old.record_pending) == (1, 0.0, {}, True)  # defaults; unknown keys ignored
    old.next_epoch()
    assert (old.epoch, old.step_in_epoch, old.record_pending) == (2, 0, False)
    summary = RunSummary("out", 7, stopped="signal", signal=15, values={"knn_acc": 0.5})
    assert RunSummary.from_dict(summary.to_dict()) == summary
