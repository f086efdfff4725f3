"""xbn_queue.lightning.AdaptiveQueueCallback with a tiny LightningModule: warm-up, prefill, logged drift / staleness."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning")
pytest.importorskip("pytorch_metric_learning")

from lightning.pytorch.loggers import Logger  # noqa: E402
from pytorch_metric_learning.losses import SupConLoss  # noqa: E402

from xbn_queue import AdaptiveQueue  # noqa: E402
from xbn_queue.drift import queue_staleness  # noqa: E402
from xbn_queue.lightning import AdaptiveQueueCallback, find_memory  # noqa: E402
from xbn_queue.pml import AdaptiveCrossBatchMemory  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")  # Lightning's hints (num_workers, logging interval, ...)

N, D_IN, D = 44, 6, 4  # 44 samples, batches of 8: the last batch of an epoch has 4 rows


class Indexed(torch.utils.data.Dataset):
    """(x, label, index): the index is the sample id the memory stores."""

    def __init__(self, n: int = N, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % 5
        self.x = torch.randn(n, D_IN, generator=g) + self.y[:, None].float()  # (n, D_IN)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], torch.tensor(i)


class Tiny(L.LightningModule):
    """Linear embedding + dropout (so that eval mode matters), PML SupCon through the xbn_queue drop-in."""

    def __init__(self, memory_size: int = 20, **queue_kwargs: Any) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(D_IN, 8), nn.Dropout(0.5), nn.Linear(8, D))
        self.criterion = AdaptiveCrossBatchMemory(SupConLoss(), D, memory_size=memory_size, adaptation="xbn",
                                                  **queue_kwargs)
        self.seen: List[Dict[str, Any]] = []  # per step: inputs, embeddings, loss, memory before the loss

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, ids = batch
        q = self.criterion.queue
        before = {"rows": q.embeddings.clone(), "labels": q.labels, "ids": q.ids, "n": len(q),
                  "net": {k: v.clone() for k, v in self.net.state_dict().items()}}
        emb = self(x)
        loss = self.criterion(emb, y, ids=ids)
        self.seen.append({"x": x, "y": y, "ids": ids, "emb": emb.detach().clone(), "loss": loss.detach().clone(),
                          "before": before, "in_warmup": q.in_warmup})
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Capture(Logger):
    """A logger that keeps what it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.records: List[Dict[str, Any]] = []

    @property
    def name(self) -> str:
        return "capture"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.records.append({"step": step, **metrics})


def _fit(module, callbacks, steps, shuffle=False, logger=False, dataset=None):
    loader = torch.utils.data.DataLoader(dataset or Indexed(), batch_size=8, shuffle=shuffle)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=logger, callbacks=callbacks,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    return trainer


def test_warmup_keeps_the_memory_out_of_the_loss_as_the_queue_argument_does(tmp_path):
    module = Tiny()
    _fit(module, [AdaptiveQueueCallback(warmup_steps=2)], steps=4)
    assert module.criterion.queue.warmup_steps == 2
    assert [s["in_warmup"] for s in module.seen] == [True, True, False, False]
    for s in module.seen[:2]:  # the plain batch loss (what PML computes with an empty memory)
        torch.testing.assert_close(s["loss"].double(), SupConLoss()(s["emb"].double(), s["y"]), rtol=1e-5, atol=1e-6)
    ref = SupConLoss()(module.seen[2]["emb"].double(), module.seen[2]["y"])
    assert not torch.allclose(module.seen[2]["loss"].double(), ref, rtol=1e-3)  # the memory is in the loss now
    # the same embeddings through a drop-in built with warmup_steps=2: the same losses at every step
    plain = AdaptiveCrossBatchMemory(SupConLoss(), D, memory_size=20, adaptation="xbn", warmup_steps=2)
    for s in module.seen:
        torch.testing.assert_close(plain(s["emb"], s["y"], ids=s["ids"]), s["loss"])


def test_prefill_writes_the_loaders_embeddings_in_eval_mode_before_the_first_memory_step():
    module = Tiny(memory_size=20)
    callback = AdaptiveQueueCallback(prefill=True)
    _fit(module, [callback], steps=1)
    first = module.seen[0]["before"]
    # a plain loop: the initial model in eval mode over the (unshuffled) loader, the first 20 rows
    ref = Tiny(memory_size=20).eval()
    with torch.no_grad():
        data = Indexed()
        rows = torch.cat([ref(data.x[i : i + 8]) for i in range(0, N, 8)])[:20]  # (20, D)
    assert first["n"] == 20 and callback.prefilled
    torch.testing.assert_close(first["rows"], rows)
    assert torch.equal(first["labels"], data.y[:20]) and torch.equal(first["ids"], torch.arange(20))
    assert module.training  # modes restored


def test_prefill_waits_for_the_warmup_and_leaves_the_random_state_alone():
    with_prefill, without = Tiny(memory_size=20), Tiny(memory_size=20)
    torch.manual_seed(5)
    _fit(with_prefill, [AdaptiveQueueCallback(warmup_steps=2, prefill=True)], steps=3, shuffle=True)
    torch.manual_seed(5)
    _fit(without, [AdaptiveQueueCallback(warmup_steps=2)], steps=3, shuffle=True)
    for a, b in zip(with_prefill.seen, without.seen):  # same shuffle, same dropout draws
        assert torch.equal(a["ids"], b["ids"])
    assert [s["before"]["n"] for s in with_prefill.seen] == [0, 8, 20]  # prefilled right before step 3
    for step in (1, 2):  # the memory is out of the loss until step 3: same weights; and the same dropout draws
        torch.testing.assert_close(with_prefill.seen[step]["emb"], without.seen[step]["emb"])
    # what the prefill wrote: the model of step 3 (eval mode) on the loader's batches, whatever their order
    third = with_prefill.seen[2]["before"]
    data = Indexed()
    model = Tiny().eval()
    model.net.load_state_dict(third["net"])
    with torch.no_grad():
        expected = model(data.x[third["ids"]])  # (20, D)
    torch.testing.assert_close(third["rows"], expected)
    assert torch.equal(third["labels"], data.y[third["ids"]]) and len(set(third["ids"].tolist())) == 20


def test_a_resumed_run_does_not_prefill_again():
    callback = AdaptiveQueueCallback(prefill=True)
    callback.load_state_dict({"prefilled": True})
    module = Tiny()
    _fit(module, [callback], steps=1)
    assert module.seen[0]["before"]["n"] == 0
    assert AdaptiveQueueCallback(prefill=True).state_dict() == {"prefilled": False}


class Reference(L.Callback):
    """Recomputes what the callback logs, plainly in float64, on the same state (runs after it)."""

    def __init__(self, every: int, probe_size: int) -> None:
        self.every, self.probe_size, self.data = every, probe_size, Indexed()
        self.records: Dict[int, Dict[str, float]] = {}

    def _embed(self, module, x):
        was = module.training
        module.eval()
        with torch.no_grad():
            z = module(x).double()
        module.train(was)
        return z

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before = self._embed(module, self.data.x[: self.probe_size]) if trainer.global_step % self.every == 0 else None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.before is None:
            return
        d = (self._embed(module, self.data.x[: self.probe_size]) - self.before).norm(dim=1)  # (P,)
        q = module.criterion.queue
        stored, ids = q.embeddings.double(), q.ids  # (n, D), (n,)
        fresh = self._embed(module, self.data.x[ids])  # (n, D): every stored row's sample, now
        l2 = (stored - fresh).norm(dim=1)
        cos = (stored * fresh).sum(1) / (stored.norm(dim=1) * fresh.norm(dim=1))
        gap = ((stored.mean(0) - fresh.mean(0)).abs() + (stored.std(0) - fresh.std(0)).abs()) / fresh.std(0)
        self.records[trainer.global_step] = {
            "memory/drift_mean": d.mean().item(), "memory/drift_max": d.max().item(),
            "memory/staleness_mean_l2": l2.mean().item(), "memory/staleness_max_l2": l2.max().item(),
            "memory/staleness_cosine": cos.mean().item(), "memory/staleness_moment_gap": gap.mean().item(),
            "memory/staleness_rows": float(len(q)), "memory/rows": float(len(q)), "memory/in_warmup": 0.0,
        }
        self.queue_staleness = queue_staleness(q, torch.unique(ids), self._embed(module, self.data.x[torch.unique(ids)]).float())


def test_drift_and_staleness_are_logged_every_n_steps_with_the_drift_functions_values():
    logger, module = Capture(), Tiny(memory_size=20)
    callback = AdaptiveQueueCallback(log_every=2, probe_size=16)
    reference = Reference(every=2, probe_size=16)
    _fit(module, [callback, reference], steps=5, logger=logger)
    logged = {r["step"]: r for r in logger.records if "memory/drift_mean" in r}
    assert sorted(logged) == [1, 3, 5]  # measured over steps 0->1, 2->3, 4->5
    assert sorted(reference.records) == [1, 3, 5]
    for step, expected in reference.records.items():
        got = {k: v for k, v in logged[step].items() if k != "step"}
        assert set(got) == set(expected)
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    last = reference.queue_staleness  # the drift module's function on the same state
    assert logged[5]["memory/staleness_mean_l2"] == pytest.approx(last["mean_l2"], rel=1e-6)
    assert logged[5]["memory/staleness_moment_gap"] == pytest.approx(last["moment_gap"], rel=1e-6)
    assert [r["step"] for r in callback.history] == [1, 3, 5]


def test_without_ids_only_the_drift_is_logged():
    class NoIds(Tiny):
        def training_step(self, batch, batch_idx):
            x, y, _ = batch
            return self.criterion(self(x), y)

    logger = Capture()
    _fit(NoIds(), [AdaptiveQueueCallback(log_every=1, probe_size=4)], steps=2, logger=logger)
    keys = set(logger.records[-1]) - {"step"}
    assert keys == {"memory/rows", "memory/in_warmup", "memory/drift_mean", "memory/drift_max"}


class TwoQueues(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = AdaptiveQueue(8, 4)
        self.loss = AdaptiveCrossBatchMemory(SupConLoss(), 4, memory_size=8)


def test_find_memory_by_search_or_by_name():
    module = TwoQueues()
    with pytest.raises(ValueError, match=r"several AdaptiveQueues \('a', 'loss.queue'\): name one with memory="):
        find_memory(module)
    assert find_memory(module, "a") == (module.a, module.a)
    assert find_memory(module, "loss") == (module.loss.queue, module.loss.queue)  # PML: rows go into its queue
    assert find_memory(module, "loss.queue")[1] is module.loss.queue
    with pytest.raises(ValueError, match=r"memory='b': TwoQueues has no attribute 'b'"):
        find_memory(module, "b")
    with pytest.raises(ValueError, match=r"memory='loss.loss': SupConLoss is not an AdaptiveQueue"):
        find_memory(module, "loss.loss")
    with pytest.raises(ValueError, match=r"Linear holds no AdaptiveQueue"):
        find_memory(nn.Linear(2, 2))


def test_find_memory_gives_a_lightly_bank_for_its_write_rule():
    pytest.importorskip("lightly")
    from lightly.loss import NTXentLoss

    from xbn_queue.lightly import AdaptiveMemoryBank

    holder = nn.Module()
    holder.criterion = NTXentLoss(memory_bank_size=(16, 4))
    holder.criterion.memory_bank = AdaptiveMemoryBank(size=(16, 4))
    target, queue = find_memory(holder)
    assert target is holder.criterion.memory_bank and queue is holder.criterion.memory_bank.queue


def test_a_module_without_a_memory_fails_at_fit_with_one_line():
    class Plain(Tiny):
        def __init__(self) -> None:
            super().__init__()
            del self.criterion

    with pytest.raises(ValueError, match="Plain holds no AdaptiveQueue"):
        _fit(Plain(), [AdaptiveQueueCallback()], steps=1)


@pytest.mark.parametrize("kwargs, match", [
    ({"warmup_steps": -1}, "warmup_steps must be an int >= 0 or None, got -1"),
    ({"log_every": 1.5}, "log_every must be an int >= 0, got 1.5"),
    ({"probe_size": 0}, "probe_size must be an int >= 1, got 0"),
    ({"prefill_rows": 0}, "prefill_rows must be an int >= 1 or None, got 0"),
    ({"probe": torch.zeros(0, 3)}, r"probe must be a tensor \(N, ...\) with N >= 1"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaptiveQueueCallback(**kwargs)


def test_without_lightning_the_import_error_names_the_package_and_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightning", None)
    path = Path(__file__).resolve().parents[2] / "xbn_queue" / "lightning.py"
    spec = importlib.util.spec_from_file_location("xbn_queue._lightning_probe", path)
    with pytest.raises(ImportError, match=r'needs the optional package "lightning": pip install lightning '
                                          r'\(included in "xbn-queue\[dev\]"\)'):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
