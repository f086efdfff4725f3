"""A checkpoint written before the shared layout (xbn-selfsup 0.4.0 and earlier: the run state flat at the top
level, a pending epoch record after a signal at the epoch's last step) still resumes, record first."""

import json
import shutil

import torch

from selfsup.train import Trainer, train
from xbn_queue.training.loop import CHECKPOINT_FORMAT

from tests.selfsup.conftest import REPO, tiny_config

FIXTURE = REPO / "tests" / "selfsup" / "data" / "checkpoint-0.4"
# Written by xbn-queue 0.4.0 (main at 86eaf41) on the 2-core AMD EPYC VM, 2026-12-06:
# train(tiny_config(out, **KW), callbacks=[a callback calling loop.stop.request(15) after step 4]); step 4 is
# the first epoch's last step, where 0.4 stopped before the epoch's record (record_pending).
KW = dict(adaptation="axbn", train_subset=128, test_subset=64, epochs=2, width=2, embedding_dim=16, queue_size=64,
          knn_bank_subset=128)


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_flat_checkpoint_of_0_4_loads_as_written(tmp_path):
    old = torch.load(FIXTURE / "last.pt", map_location="cpu", weights_only=True)
    assert "state" not in old and old["record_pending"] is True and old["global_step"] == 4  # the layout under test
    shutil.copytree(FIXTURE, tmp_path / "run")
    trainer = Trainer(tiny_config(tmp_path / "run", resume="auto", **KW))
    try:
        trainer.restore(tmp_path / "run" / "last.pt")
        st = trainer.state
        assert (st.epoch, st.step_in_epoch, st.global_step, st.record_pending) == (0, 4, 4, True)
        assert (st.epoch_loss_sum, st.epoch_loss_count) == (old["epoch_loss_sum"], old["epoch_loss_count"])
        assert not trainer.finished()  # the pending record is still to write
        now = trainer.criterion.state_dict()
        assert now.keys() == old["criterion"].keys()
        assert all(torch.equal(now[k], old["criterion"][k]) for k in now)  # the queue and its Kalman state, as saved
    finally:
        trainer.close()


def test_a_flat_checkpoint_of_0_4_resumes_with_its_pending_record_first(tmp_path):
    out = tmp_path / "run"
    shutil.copytree(FIXTURE, out)
    res = train(tiny_config(out, resume="auto", **KW))
    assert (res["stopped"], res["global_step"]) == (None, 8)
    recorded, got = read(FIXTURE / "metrics.jsonl"), read(out / "metrics.jsonl")
    assert got[:4] == recorded  # the 0.4 run's step records, kept as written
    pending = got[4]
    assert (pending["step"], pending["epoch"]) == (4, 1.0) and 0.0 <= pending["knn_acc"] <= 1.0  # then its record
    assert [r["step"] for r in got[5:]] == [5, 6, 7, 8, 8]
    new = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert new["format"] == CHECKPOINT_FORMAT and new["state"]["global_step"] == 8 and new["state"]["epoch"] == 2
