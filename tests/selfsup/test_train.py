"""End-to-end CPU runs of the MoCo trainer on digits (seconds each)."""

import glob
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from selfsup.train import NonFiniteError, Trainer, criterion_queue, train
from tests.selfsup.conftest import tiny_config

TIMING_KEYS = {"epoch_time_s", "images_per_s"}


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def queue_of(checkpoint_path):
    """The queue's buffers in a checkpoint, as ``queue.*`` in both key modes (lightly's loss nests it in ``memory_bank``)."""
    sd = torch.load(checkpoint_path, map_location="cpu", weights_only=True)["criterion"]
    return {k.removeprefix("memory_bank."): v for k, v in sd.items() if k.startswith(("memory_bank.queue.", "queue."))}


@pytest.mark.parametrize("adaptation", ["none", "xbn", "axbn"])
def test_each_adaptation_trains_writes_outputs_and_resumes(tmp_path, adaptation):
    cfg = tiny_config(tmp_path, adaptation=adaptation, train_subset=128, max_steps=3, kalman_gain_every=2)
    first = train(cfg)
    assert first["global_step"] == 3
    for name in ("config.yaml", "metrics.jsonl", "last.pt", "history.png"):
        assert (tmp_path / name).is_file(), name
    rec = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rec if "knn_acc" not in r] == [1, 2, 3]
    assert all({"epoch", "step", "loss", "lr"} <= set(r) for r in rec)
    # resume to the end of the 2 epochs (4 steps each)
    second = train(replace(cfg, max_steps=0, resume="auto"))
    assert second["global_step"] == 8
    rec = read_jsonl(tmp_path / "metrics.jsonl")
    knn = {r["epoch"]: r["knn_acc"] for r in rec if "knn_acc" in r}
    assert set(knn) == {0.75, 1.0, 2.0}
    assert all(0.0 <= a <= 1.0 for a in knn.values())
    assert [r["step"] for r in rec if "knn_acc" not in r] == list(range(1, 9))
    bank = queue_of(tmp_path / "last.pt")
    assert int(bank["queue.num_filled"]) == 96  # 8 steps x 32 keys through a 96-row ring
    assert torch.isfinite(bank["queue.memory"]).all()
    if adaptation == "axbn":
        # Kalman state is checkpointed: 7 filter updates (the first step finds the queue empty)
        assert int(bank["queue.adaptation.step"]) == 7
        # The epoch records say what the filter does: the paper's noise gives a gain of about 0.999.
        gains = [r["kalman_gain"] for r in rec if "knn_acc" in r]  # the epoch records (0.75, 1, 2)
        assert len(gains) == 3 and all(0.999 < k <= 1.0 for k in gains)
        assert gains[-1] == pytest.approx(float(bank["queue.adaptation.mean_gain"].double().mean()), rel=1e-12)
    else:
        assert all("kalman_gain" not in r for r in rec)


def test_sampling_noise_model_saves_its_q_and_logs_a_gain_below_one(tmp_path):
    train(tiny_config(tmp_path, adaptation="axbn", kalman_r="sampling", train_subset=128, max_steps=4))
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert (saved["kalman_r"], saved["kalman_q"]) == ("sampling", 0.01)
    gain = [r["kalman_gain"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "kalman_gain" in r][-1]
    assert 0.3 < gain < 0.8  # batch 32: steady 0.428, on its way down from (1 + qB) / (2 + qB) = 0.57


def test_resume_in_process_is_bit_identical(tmp_path):
    straight = train(tiny_config(tmp_path / "a", adaptation="axbn", train_subset=128, kalman_gain_every=2))
    cfg = tiny_config(tmp_path / "b", adaptation="axbn", train_subset=128, kalman_gain_every=2, max_steps=5)
    train(cfg)
    resumed = train(replace(cfg, max_steps=0, resume="auto"))
    assert straight["global_step"] == resumed["global_step"] == 8
    qa, qb = queue_of(tmp_path / "a" / "last.pt"), queue_of(tmp_path / "b" / "last.pt")
    assert qa.keys() == qb.keys()
    for k in qa:
        assert torch.equal(qa[k], qb[k]), k
    ra = {r["step"]: r for r in read_jsonl(tmp_path / "a" / "metrics.jsonl") if r["epoch"] in (1.0, 2.0)}
    rb = {r["step"]: r for r in read_jsonl(tmp_path / "b" / "metrics.jsonl") if r["epoch"] in (1.0, 2.0)}
    for step in ra:
        assert {k: v for k, v in ra[step].items() if k not in TIMING_KEYS} == {k: v for k, v in rb[step].items() if k not in TIMING_KEYS}


def test_bank_inside_the_lightly_loss_is_ours_and_holds_the_adapted_keys(tmp_path):
    from lightly.loss import NTXentLoss

    from xbn_queue.lightly import AdaptiveMemoryBank

    cfg = tiny_config(tmp_path, adaptation="xbn", adapt_keys="normalized", max_steps=2)
    trainer = Trainer(cfg)
    assert type(trainer.criterion) is NTXentLoss
    bank = trainer.criterion.memory_bank
    assert isinstance(bank, AdaptiveMemoryBank) and bank.adaptation == "xbn"
    trainer.fit()
    stored = bank.queue.embeddings.clone()  # (64, 128): two batches of keys
    assert stored.shape == (64, 128)

    seen = {}
    original = bank.forward

    def spy(output, labels=None, update=False):
        seen["keys"] = output.detach().clone()
        out, negatives = original(output, labels=labels, update=update)
        seen["negatives"] = negatives.clone()
        return out, negatives

    bank.forward = spy
    idx = trainer.sampler.batches(0)[2]
    x0, x1, g = trainer.views(0, 2, idx, None)
    loss = trainer.moco_step(x0, x1, g)
    del bank.forward

    k = F.normalize(seen["keys"].double(), dim=1)  # lightly normalizes keys before the bank sees them
    torch.testing.assert_close(seen["keys"].double(), k)
    # float64 XBN (Eq. 6) of the stored rows to the keys' statistics, Bessel-corrected std, eps 1e-6
    r = stored.double()
    adapted = (r - r.mean(0)) / (r.std(0) + 1e-6) * k.std(0) + k.mean(0)
    torch.testing.assert_close(seen["negatives"].double(), F.normalize(adapted, dim=1).t(), atol=1e-5, rtol=1e-5)
    after = bank.queue.embeddings  # (96, 128): adapted old rows, then this batch's keys
    torch.testing.assert_close(after[:64].double(), adapted, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after[64:].double(), k, atol=1e-6, rtol=1e-6)
    assert torch.isfinite(loss) and loss.item() > 0


def test_non_finite_embedding_stops_naming_the_step_and_keeps_a_clean_checkpoint(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, adaptation="xbn", checkpoint_every=1, max_steps=6))
    views = trainer.views

    def poisoned(epoch, step, idx, batch):
        x0, x1, g = views(epoch, step, idx, batch)
        if trainer.state.global_step == 2:
            x1 = x1 * float("nan")
        return x0, x1, g

    trainer.views = poisoned
    before = None
    with pytest.raises(NonFiniteError, match=r"non-finite embedding at step 3 .*last good checkpoint .*last.pt is kept"):
        try:
            trainer.fit()
        finally:
            before = criterion_queue(trainer.criterion).embeddings.clone()
    ckpt = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["state"]["global_step"] == 2
    assert torch.isfinite(before).all() and before.shape == (64, 128)
    q = queue_of(tmp_path / "last.pt")
    assert all(torch.isfinite(v).all() for v in q.values() if v.is_floating_point())


def test_checkpoint_from_another_configuration_is_refused(tmp_path):
    train(tiny_config(tmp_path, max_steps=1, knn_every=0))
    with pytest.raises(ValueError, match=r"differs: .*queue_size: saved 96, now 128.*adaptation: saved 'xbn', now 'none'|differs: .*adaptation: saved 'xbn', now 'none'.*queue_size: saved 96, now 128"):
        train(tiny_config(tmp_path, queue_size=128, adaptation="none", resume="auto"))


def test_pil_pipeline_is_reproducible_with_workers(tmp_path):
    a = train(tiny_config(tmp_path / "w0", gpu_augment=False, workers=0, max_steps=2, knn_every=0))
    b = train(tiny_config(tmp_path / "w1", gpu_augment=False, workers=1, max_steps=2, knn_every=0))
    la = [r["loss"] for r in read_jsonl(tmp_path / "w0" / "metrics.jsonl")]
    lb = [r["loss"] for r in read_jsonl(tmp_path / "w1" / "metrics.jsonl")]
    assert la == lb and a["knn_acc"] == b["knn_acc"]


def test_wandb_offline_run_logs_the_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from tests.wandb_history import read_wandb_history

    monkeypatch.setenv("WANDB_SILENT", "true")
    train(tiny_config(tmp_path, max_steps=2, wandb_mode="offline", wandb_project="xbn-selfsup-test"))
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert len(runs) == 1
    history = read_wandb_history(runs[0])
    local = read_jsonl(tmp_path / "metrics.jsonl")
    by_step = {h["_step"]: h for h in history}
    assert [r["step"] for r in local] == [1, 2, 2]  # W&B merges the step record and the epoch record of step 2
    for r in local:
        for key, value in r.items():
            if key != "step" and not (r["step"] == 2 and key == "loss" and "knn_acc" not in r):
                assert by_step[r["step"]][key] == pytest.approx(value), (r["step"], key)
    assert 0.0 <= by_step[2]["knn_acc"] <= 1.0


def test_bad_image_stops_naming_the_file_or_is_skipped_and_counted(tmp_path, capsys):
    from selfsup.cli import main
    from tests.selfsup.test_data import make_folder

    root = make_folder(tmp_path / "data", per_class=12, size=16)
    bad = root / "train" / "ship" / "0003.jpg"
    bad.write_bytes(b"\x00" * 10)
    argv = ["--dataset", "folder", "--data-root", str(root), "--image-size", "16", "--width", "8", "--batch-size", "16",
            "--split-bn", "2", "--queue-size", "32", "--epochs", "1", "--knn-k", "5", "--device", "cpu", "--no-progress",
            "--threads", "1", "--output-dir", str(tmp_path / "run")]
    assert main(argv) == 2
    assert f"cannot read image {bad}" in capsys.readouterr().err
    assert main(argv + ["--skip-bad-images"]) == 0
    assert capsys.readouterr().err.count(f"skipping unreadable image {bad}") == 1
    last = read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]
    assert last["bad_images"] == 1 and "knn_acc" in last


@pytest.mark.parametrize("adapt_keys", ["raw", "normalized"])
def test_every_adaptation_starts_from_the_same_empty_memory(tmp_path, adapt_keys):
    """The arms of a comparison differ only by the adaptation: the same (empty) memory at step 0, the same
    global RNG state after the build, and so the same first step (there is nothing stored to adapt yet)."""
    arms = {}
    for adaptation in ("none", "xbn", "axbn"):
        trainer = Trainer(tiny_config(tmp_path / adaptation, adapt_keys=adapt_keys, adaptation=adaptation))
        queue = criterion_queue(trainer.criterion)
        start = {k: v.clone() for k, v in queue.state_dict().items() if k in ("memory", "ptr", "num_filled")}
        rng = torch.get_rng_state()
        x0, x1, g = trainer.views(0, 0, trainer.sampler.batches(0)[0], None)
        loss = trainer.moco_step(x0, x1, g)
        arms[adaptation] = (start, rng, len(queue), loss, queue.embeddings)
    ref_start, ref_rng, ref_fill, ref_loss, ref_rows = arms["none"]
    assert int(ref_start["num_filled"]) == 0 and int(ref_start["ptr"]) == 0
    assert ref_start["memory"].abs().sum() == 0 and ref_fill == 32  # one batch of keys after the first step
    for adaptation, (start, rng, fill, loss, rows) in arms.items():
        for key in ref_start:
            assert torch.equal(start[key], ref_start[key]), (adaptation, key)
        assert torch.equal(rng, ref_rng), adaptation
        assert fill == ref_fill and torch.equal(loss, ref_loss) and torch.equal(rows, ref_rows), adaptation


def test_a_run_started_with_random_rows_resumes_with_its_memory(tmp_path):
    """Checkpoints of normalized-key runs without adaptation written when that bank started with random
    unit rows resume with the rows they hold (the empty start applies to new runs only)."""
    cfg = tiny_config(tmp_path, adapt_keys="normalized", adaptation="none", max_steps=1, knn_every=0)
    train(cfg)
    ckpt = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=False)
    rows = F.normalize(torch.randn(96, 128, generator=torch.Generator().manual_seed(5)), dim=1)  # (96, 128)
    rows[:32] = ckpt["criterion"]["memory_bank.queue.memory"][:32]  # the first batch overwrote random rows
    ckpt["criterion"]["memory_bank.queue.memory"] = rows
    ckpt["criterion"]["memory_bank.queue.num_filled"].fill_(96)
    torch.save(ckpt, tmp_path / "last.pt")
    trainer = Trainer(replace(cfg, max_steps=0, resume="auto"))
    trainer.restore(tmp_path / "last.pt")
    queue = criterion_queue(trainer.criterion)
    assert len(queue) == 96 and int(queue.ptr) == 32
    torch.testing.assert_close(queue.embeddings, rows, rtol=0, atol=0)


def test_the_recipe_line_names_the_learning_rate_it_sets():
    from selfsup.train import recipe_summary

    cfg = tiny_config("unused", knn_features="head", lr=0.05, epochs=3)
    line = recipe_summary(cfg, world_size=1, steps_per_epoch=10)
    assert "SGD lr 0.05, momentum 0.9, weight decay 0.0005, cosine over 30 steps, batch 32" in line
    assert "queue 96 of raw keys (PML's MoCo example), starting empty, adaptation xbn" in line
    assert "k-NN monitor on head features (k=10, t=0.1)" in line
    assert "SGD lr 0.05," in recipe_summary(cfg, world_size=4)  # without --scale-lr the rate is as given
    scaled = recipe_summary(replace(cfg, scale_lr=True), world_size=4)
    assert "SGD lr 0.2 (--lr 0.05 x 4 processes)," in scaled and "cosine over 3 epochs" in scaled
