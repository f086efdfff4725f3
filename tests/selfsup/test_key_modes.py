"""``--adapt-keys raw|normalized`` and ``--knn-features backbone|head`` in the trainer (tiny digits runs)."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import selfsup.train as train_mod
from selfsup.augment import normalize_uint8
from selfsup.train import Trainer, criterion_queue, train
from tests.selfsup.conftest import tiny_config


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("adapt_keys", ["raw", "normalized"])
def test_what_the_queue_stores_in_each_key_mode(tmp_path, adapt_keys):
    """raw: the key encoder's outputs as they are; normalized: unit rows (with adaptation none both are exact)."""
    import copy

    from selfsup.loss import RawKeyMoCoLoss
    from selfsup.model import momentum_update, shuffle_batch

    cfg = tiny_config(tmp_path, adapt_keys=adapt_keys, adaptation="none")
    trainer = Trainer(cfg)
    assert isinstance(trainer.criterion, RawKeyMoCoLoss) == (adapt_keys == "raw")
    x0, x1, g = trainer.views(0, 0, trainer.sampler.batches(0)[0], None)
    # the step's keys, recomputed independently from a copy of the key encoder
    enc_k = copy.deepcopy(trainer.encoder_k)
    momentum_update(trainer.encoder_q, enc_k, cfg.momentum)
    x1s, unshuffle = shuffle_batch(x1, torch.Generator().set_state(g.get_state()))
    with torch.no_grad():
        keys = enc_k.train()(x1s)[unshuffle]  # (32, 128)
    trainer.moco_step(x0, x1, g)
    queue = criterion_queue(trainer.criterion)
    rows = (int(queue.ptr) - keys.shape[0] + torch.arange(keys.shape[0])) % queue.size  # (32,) just written
    stored = queue.embeddings[rows]  # (32, 128)
    assert len(queue) == keys.shape[0]  # the memory starts empty (PML's does; lightly's bank would be random)
    norms = stored.norm(dim=1)
    if adapt_keys == "raw":
        torch.testing.assert_close(stored, keys, rtol=1e-5, atol=1e-6)
        assert (norms - 1).abs().max() > 0.1  # really not normalised
    else:
        torch.testing.assert_close(stored, F.normalize(keys, dim=1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(norms, torch.ones_like(norms))


def test_raw_mode_trains_checkpoints_resumes_and_refuses_the_other_mode(tmp_path):
    cfg = tiny_config(tmp_path, adapt_keys="raw", adaptation="xbn", train_subset=128, epochs=1, max_steps=3)
    assert train(cfg)["global_step"] == 3
    sd = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)["criterion"]
    assert int(sd["queue.num_filled"]) == 96 and torch.isfinite(sd["queue.memory"]).all()
    assert train(replace(cfg, max_steps=0, resume="auto"))["global_step"] == 4
    with pytest.raises(ValueError, match="adapt_keys: saved 'raw', now 'normalized'"):
        Trainer(replace(cfg, adapt_keys="normalized", max_steps=0, resume="auto")).fit()


@pytest.mark.parametrize("given", [None, "backbone", "head"])
def test_knn_sees_the_chosen_features_and_logs_both(tmp_path, monkeypatch, given):
    knn_features = given or "head"  # unset: the encoder output, as the paper's Appendix B
    cfg = tiny_config(tmp_path, knn_features=given, epochs=1, max_steps=2, knn_bank_subset=64)
    trainer = Trainer(cfg)
    trainer.fit()
    rec = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "knn_acc" in r]
    assert rec and rec[-1]["knn_acc"] == rec[-1][f"knn_acc_{knn_features}"]
    assert f"knn_features: {knn_features}\n" in (tmp_path / "config.yaml").read_text()  # saved resolved
    assert {"knn_acc_backbone", "knn_acc_head"} <= set(rec[-1])

    seen = []
    real = train_mod.knn_accuracy

    def spy(queries, query_labels, bank, bank_labels, *args, **kw):
        seen.append((queries, bank))
        return real(queries, query_labels, bank, bank_labels, *args, **kw)

    monkeypatch.setattr(train_mod, "knn_accuracy", spy)
    acc = trainer.knn_eval()
    enc = trainer.encoder_q.eval()
    with torch.no_grad():
        test_x = normalize_uint8(trainer.test_u8)
        bank_x = normalize_uint8(trainer.train_u8[trainer.knn_bank_idx])
        expected = {
            "backbone": (F.normalize(enc.features(test_x), dim=1), F.normalize(enc.features(bank_x), dim=1)),
            "head": (F.normalize(enc(test_x), dim=1), F.normalize(enc(bank_x), dim=1)),
        }
    assert expected["head"][0].shape[1] == cfg.embedding_dim != expected["backbone"][0].shape[1]
    by_dim = {q.shape[1]: (q, b) for q, b in seen}
    for name, (q_exp, b_exp) in expected.items():
        q_seen, b_seen = by_dim[q_exp.shape[1]]
        torch.testing.assert_close(q_seen, q_exp, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b_seen, b_exp, rtol=1e-4, atol=1e-5)
    chosen_q, chosen_b = expected[knn_features]
    labels = torch.from_numpy(trainer.data.test_labels)
    bank_labels = torch.from_numpy(trainer.data.train_labels)[trainer.knn_bank_idx]
    assert acc == real(chosen_q, labels, chosen_b, bank_labels, trainer.data.num_classes, k=cfg.knn_k, t=cfg.knn_t)


@pytest.mark.parametrize("option", ["--adapt-keys", "--knn-features"])
def test_unknown_values_are_refused_by_the_command_line(option, capsys):
    from selfsup.cli import main

    with pytest.raises(SystemExit) as exc:
        main([option, "bogus"])
    assert exc.value.code == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


def test_a_checkpoint_from_before_the_option_resumes_as_normalized(tmp_path):
    cfg = tiny_config(tmp_path, adapt_keys="normalized", train_subset=96, epochs=1, max_steps=1, knn_every=0)
    train(cfg)
    ckpt = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=False)
    del ckpt["config"]["adapt_keys"]  # written by the previous release
    torch.save(ckpt, tmp_path / "last.pt")
    with pytest.raises(ValueError, match="adapt_keys: saved 'normalized', now 'raw'"):
        Trainer(replace(cfg, adapt_keys="raw", max_steps=0, resume="auto")).fit()
    assert train(replace(cfg, max_steps=0, resume="auto"))["global_step"] == 3  # 96 images, batch 32


def test_the_command_line_default_is_head(capsys):
    from selfsup.cli import main
    from selfsup.config import SelfSupConfig
    from xbn_queue.training.config import parse_config

    assert parse_config(SelfSupConfig, []).knn_features is None  # unset: resolved by the run
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: head; a resumed run keeps its checkpoint's)" in help_text


@pytest.mark.parametrize("saved", ["explicit", "absent"])
def test_a_run_monitored_on_backbone_features_resumes_on_them(tmp_path, saved, capsys):
    """A run of the previous default (``knn_features: backbone`` saved) or of a release before the option
    (no key: the monitor used the backbone) keeps its monitor when resumed without --knn-features, also
    from its own config.yaml; an explicit other choice is refused, since knn_acc would change meaning."""
    import yaml

    from selfsup.cli import main

    cfg = tiny_config(tmp_path, knn_features="backbone", train_subset=96, epochs=2, max_steps=3, knn_every=1)
    train(cfg)
    if saved == "absent":
        ckpt = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=False)
        del ckpt["config"]["knn_features"]
        torch.save(ckpt, tmp_path / "last.pt")
        text = (tmp_path / "config.yaml").read_text()
        (tmp_path / "config.yaml").write_text("".join(line for line in text.splitlines(True)
                                                      if not line.startswith("knn_features:")))
    config_yaml = tmp_path / "config.yaml"
    assert ("knn_features" in yaml.safe_load(config_yaml.read_text())) == (saved == "explicit")
    capsys.readouterr()
    assert main(["--config", str(config_yaml), "--knn-features", "head", "--resume", "--max-steps", "0"]) == 2
    err = capsys.readouterr().err
    assert "knn_features: saved 'backbone', now 'head'" in err and len(err.strip().splitlines()) == 1
    assert main(["--config", str(config_yaml), "--resume", "--max-steps", "0"]) == 0
    rec = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "knn_acc" in r]
    assert [r["epoch"] for r in rec] == [1.0, 2.0]  # epoch 2 ran after the resume
    assert all(r["knn_acc"] == r["knn_acc_backbone"] for r in rec)
    assert rec[-1]["knn_acc_backbone"] != rec[-1]["knn_acc_head"]  # the record after the resume tells them apart
    assert yaml.safe_load(config_yaml.read_text())["knn_features"] == "backbone"
