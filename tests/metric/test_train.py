"""End-to-end training on CPU: every method, memories, faults, incompatible checkpoints, W&B offline."""

import math

import pytest
import torch
import yaml

from metric.config import MetricConfig, resolve_config
from metric.data import BadImageError
from metric.model import MetricModel
from metric.train import NonFiniteError, build_losses, train
from xbn_queue.training.checkpoint import load_checkpoint
from xbn_queue.training.tracking import read_metrics

from .conftest import make_folder
from .helpers import tiny_cfg

REQUIRED = {"epoch", "step", "recall@1", "recall@2", "recall@4", "recall@8", "map@r", "loss", "drift_mean", "drift_max", "lr"}


def memory_of(out, cfg):
    """The memory rows, pointer and labels stored in a run's last.pt."""
    ck = load_checkpoint(out / "last.pt")
    _, mem = build_losses(resolve_config(cfg), ck["meta"]["memory_rows"], False)
    mem.load_state_dict(ck["memory"])
    return mem.queue, ck


@pytest.mark.parametrize("method", ["none", "xbm", "xbm-batch", "xbn", "xbn-batch", "axbn", "axbn-batch"])
def test_each_method_trains_and_writes_its_files(tmp_path, method):
    res = train(tiny_cfg(tmp_path, method=method))
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in recs] == [1, 2] and [r["phase"] for r in recs] == ["warmup", "train"]
    for r in recs:
        assert REQUIRED <= set(r), REQUIRED - set(r)
        assert 0.0 <= r["recall@1"] <= r["recall@2"] <= r["recall@8"] <= 1.0 and 0.0 < r["map@r"] <= 1.0
        assert math.isfinite(r["loss"]) and r["drift_max"] >= r["drift_mean"] > 0.0
    assert recs[1]["step"] == 2 * recs[0]["step"] == 2 * (18 * 10 // 16)
    for f in ("config.yaml", "last.pt", "best.pt", "recall_drift.png"):
        assert (tmp_path / f).is_file(), f
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["method"] == method and saved["backbone"] == "tinycnn" and saved["image_size"] == 16  # resolved
    if method == "none":
        assert recs[1]["memory_rows"] == 0 and "staleness_mean_l2" not in recs[1]
    else:
        assert recs[1]["memory_rows"] == 64
        assert 0.0 <= recs[1]["staleness_mean_l2"] <= recs[1]["staleness_max_l2"]
    assert res["best"]["recall@1"] == max(r["recall@1"] for r in recs)
    if method.startswith("axbn"):  # the paper's noise (r = 0.01, q = 1): a gain of about 0.999, i.e. XBN
        assert saved["kalman_q"] == 1.0 and 0.999 < recs[1]["kalman_gain"] <= 1.0
    else:
        assert all("kalman_gain" not in r for r in recs)


def test_axbn_sampling_noise_logs_its_gain_and_saves_its_q(tmp_path):
    cfg = tiny_cfg(tmp_path, method="axbn", kalman_r="sampling")
    train(cfg)
    recs = read_metrics(tmp_path / "metrics.jsonl")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert (saved["kalman_r"], saved["kalman_q"]) == ("sampling", 0.01)  # the model's own default, resolved
    q, _ = memory_of(tmp_path, cfg)
    assert q.adaptation.r == "sampling" and q.adaptation.q == 0.01
    assert recs[1]["kalman_gain"] == pytest.approx(float(q.adaptation.mean_gain.double().mean()), rel=1e-12)
    assert 0.25 < recs[1]["kalman_gain"] < 0.6  # batch 16: steady 0.328 (xbn_queue tests check the value itself)


def test_xbm_and_xbn_really_use_different_memories(tmp_path):
    qs = {}
    for method in ("xbm", "xbn"):
        cfg = tiny_cfg(tmp_path / method, method=method)
        train(cfg)
        q, ck = memory_of(tmp_path / method, cfg)
        assert len(q) == 64 and torch.isfinite(q.embeddings).all()
        assert q.ids is not None and (q.ids >= 0).all() and len(q.ids) == 64
        qs[method] = q
    assert not torch.allclose(qs["xbm"].embeddings, qs["xbn"].embeddings)
    # XBN moment-matches the stored rows to each batch (Eq. 6): the older rows end up with (nearly) the
    # moments of the last enqueued batch; XBM's stale rows do not.
    gaps = {}
    for method, q in qs.items():
        z = q.embeddings.double()
        last = (q.ptr - 16 + torch.arange(16)) % 64
        old = torch.ones(64, dtype=torch.bool)
        old[last] = False
        gaps[method] = ((z[old].mean(0) - z[last].mean(0)).abs().max().item(),
                        (z[old].std(0) - z[last].std(0)).abs().max().item())
    assert gaps["xbn"][0] < 1e-3 and gaps["xbn"][1] < 2e-3, gaps
    assert gaps["xbn"][0] < 0.05 * gaps["xbm"][0] and gaps["xbn"][1] < 0.2 * gaps["xbm"][1], gaps


def test_nonfinite_embedding_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    forward = MetricModel.forward
    calls = {"n": 0}

    def poisoned(self, x):
        z = forward(self, x)
        if self.training and x.shape[0] == 16:
            calls["n"] += 1
            if calls["n"] == 15:  # the 15th training step: inside the second epoch, memory in use
                z = z * float("nan")
        return z

    monkeypatch.setattr(MetricModel, "forward", poisoned)
    cfg = tiny_cfg(tmp_path, method="xbn", checkpoint_every=1)
    with pytest.raises(NonFiniteError, match=r"non-finite embedding at step 15 \(epoch 2\)"):
        train(cfg)
    q, ck = memory_of(tmp_path, cfg)
    assert ck["state"]["global_step"] == 14
    assert torch.isfinite(q.embeddings).all() and len(q) == 3 * 16


def test_nonfinite_loss_stops_before_the_optimizer_step(tmp_path, monkeypatch):
    import metric.train as mt

    real = mt.build_losses

    def poisoned_losses(cfg, rows, distributed):
        batch_loss, mem = real(cfg, rows, distributed)
        forward = mem.forward
        calls = {"n": 0}

        def nan_at_third(*a, **kw):
            calls["n"] += 1
            loss = forward(*a, **kw)
            return loss * float("nan") if calls["n"] == 3 else loss

        mem.forward = nan_at_third
        return batch_loss, mem

    monkeypatch.setattr(mt, "build_losses", poisoned_losses)
    cfg = tiny_cfg(tmp_path, method="xbm", checkpoint_every=1)
    with pytest.raises(NonFiniteError, match=r"non-finite loss at step 14 \(epoch 2\)"):
        train(cfg)  # 11 warm-up steps, then the third memory step
    q, ck = memory_of(tmp_path, cfg)
    assert ck["state"]["global_step"] == 13 and torch.isfinite(q.embeddings).all()


def test_incompatible_checkpoint_is_refused(tmp_path):
    train(tiny_cfg(tmp_path, method="xbm", max_steps=3))
    with pytest.raises(ValueError, match=r"method: saved 'xbm', now 'xbn'; embedding_dim: saved 32, now 48; memory_size: saved 64, now 32"):
        train(tiny_cfg(tmp_path, method="xbn", embedding_dim=48, memory_size="32", resume="auto"))
    with pytest.raises(ValueError, match=r"method: saved 'xbm', now 'xbn'"):
        train(tiny_cfg(tmp_path, method="xbn", resume="auto"))


def test_unreadable_image_stops_or_is_skipped_and_counted(tmp_path, capsys):
    root = make_folder(tmp_path / "data", classes=tuple("abcdefgh"), per_class=6)
    bad = root / "a" / "002.png"
    bad.write_bytes(b"\x89PNG broken")
    kw = dict(dataset="folder", data_root=str(root), split="instance", train_fraction=0.5, batch_size=8, m_per_class=2,
              image_size=16, backbone="tinycnn", pretrained=False, workers=0, auto_augment="none", re_prob=0.0,
              memory_size="16", epochs=2)
    with pytest.raises(BadImageError, match="002.png"):
        train(tiny_cfg(tmp_path / "strict", **kw))
    capsys.readouterr()
    train(tiny_cfg(tmp_path / "skip", skip_bad_images=True, **kw))
    # one bad file: warned about once by the program (naming it), counted once in every record
    assert capsys.readouterr().err.count(f"skipping unreadable image {bad}") == 1
    recs = read_metrics(tmp_path / "skip" / "metrics.jsonl")
    assert [r["bad_images"] for r in recs] == [1, 1, 1]


def test_wandb_offline_logs_the_metrics(tmp_path, monkeypatch):
    from tests.wandb_history import read_wandb_history

    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(tiny_cfg(tmp_path, method="xbn", wandb_mode="offline", wandb_project="xbn-test"))
    recs = read_metrics(tmp_path / "metrics.jsonl")
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    hist = read_wandb_history(runs[0])
    logged = [h for h in hist if "recall@1" in h]
    assert [h["recall@1"] for h in logged] == [r["recall@1"] for r in recs]
    assert [h["drift_mean"] for h in logged] == [r["drift_mean"] for r in recs]


def test_dataset_defaults_only_fill_unset_options():
    cfg = resolve_config(MetricConfig(dataset="sop", backbone="resnet18", epochs=3))
    assert cfg.backbone == "resnet18" and cfg.epochs == 3  # user's choices kept
    assert cfg.recall_ks == [1, 10, 100, 1000] and cfg.image_size == 224 and cfg.memory_size == 0.5 and cfg.pretrained
    assert resolve_config(MetricConfig(dataset="deepfashion2")).memory_size == 1.0
    assert resolve_config(MetricConfig(dataset="digits")).backbone == "tinycnn"
    with pytest.raises(ValueError, match="--batch-size 30: expected a multiple of --m-per-class 4"):
        resolve_config(MetricConfig(batch_size=30, m_per_class=4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_amp_channels_last_run_and_gpu_evaluation(tmp_path):
    res = train(tiny_cfg(tmp_path, method="axbn", device="cuda", amp=True, channels_last=True, threads=0))
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert len(recs) == 2 and math.isfinite(recs[-1]["loss"]) and 0.0 < recs[-1]["recall@1"] <= 1.0
    q, _ = memory_of(tmp_path, tiny_cfg(tmp_path, method="axbn"))
    assert torch.isfinite(q.embeddings).all() and q.embeddings.dtype == torch.float32
    assert res["best"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_evaluation_matches_cpu():
    from metric.evaluate import retrieval_metrics

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-1, 2, (500, 8), generator=gen).float()
    y = torch.randint(0, 40, (500,), generator=gen)
    cpu = retrieval_metrics(x, y, ks=(1, 5, 20), chunk_size=64)
    gpu = retrieval_metrics(x.cuda(), y.cuda(), ks=(1, 5, 20), chunk_size=64)
    assert cpu == gpu


@pytest.mark.parametrize("dataset, maker", [("sop", "make_sop"), ("inshop", "make_inshop"), ("deepfashion2", "make_deepfashion2")])
def test_real_formats_train_end_to_end(tmp_path, dataset, maker):
    from . import conftest

    root = getattr(conftest, maker)(tmp_path / "data")
    cfg = tiny_cfg(tmp_path / "run", dataset=dataset, data_root=str(root), method="xbn", batch_size=8, m_per_class=2,
                   memory_size="8", image_size=16, backbone="tinycnn", pretrained=False, workers=0,
                   auto_augment="rand-m9-mstd0.5", re_prob=0.2, recall_ks=[1, 2])
    train(cfg)
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    expected_queries = {"sop": 15, "inshop": 4, "deepfashion2": 3}[dataset]
    assert recs[-1]["num_queries"] == expected_queries and 0.0 <= recs[-1]["recall@1"] <= recs[-1]["recall@2"] <= 1.0


def test_callbacks_see_every_step_checkpoint_and_the_summary(tmp_path):
    from xbn_queue.training.loop import Callback

    class Recorder(Callback):
        def __init__(self):
            self.steps, self.checkpoints, self.summaries = [], [], []

        def on_step_end(self, loop):
            self.steps.append((loop.state.epoch, loop.state.step_in_epoch, loop.state.global_step))

        def on_checkpoint(self, loop, path):
            assert path.is_file()  # written before the callback
            self.checkpoints.append((path.name, loop.state.global_step))

        def on_run_end(self, loop, summary):
            self.summaries.append(summary)

    rec = Recorder()
    res = train(tiny_cfg(tmp_path, method="xbn", checkpoint_every=4), callbacks=[rec])  # 2 epochs of 11 steps
    assert rec.steps == [(e, s, 11 * e + s) for e in (0, 1) for s in range(1, 12)]
    last = [step for name, step in rec.checkpoints if name == "last.pt"]
    assert last == [4, 8, 11, 12, 16, 20, 22]  # every 4th step inside an epoch, and each epoch's end
    assert {name for name, _ in rec.checkpoints} == {"last.pt", "best.pt"}
    (summary,) = rec.summaries
    assert summary.to_dict() == res and res["global_step"] == 22 and res["stopped"] is None
    assert res["best"]["recall@1"] == max(r["recall@1"] for r in read_metrics(tmp_path / "metrics.jsonl"))
