"""Optional real-data check: CIFAR-10 JPEGs as a ``folder`` dataset, train on 5 classes, test on the other 5.

Skipped unless the archive ``../shared/data/cifar10-jpeg.tar.gz`` (or an extracted copy in
``.data/cifar10``) is present.
"""

import tarfile
from pathlib import Path

import pytest

from metric.train import train
from xbn_queue.training.tracking import read_metrics

from .helpers import ROOT, tiny_cfg

ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
EXTRACTED = ROOT / ".data" / "cifar10"


def _cifar_root(tmp_path_factory) -> Path:
    for cand in (EXTRACTED, EXTRACTED / "cifar10"):
        if (cand / "train").is_dir() and (cand / "test").is_dir():
            return cand
    if not ARCHIVE.is_file():
        pytest.skip(f"CIFAR-10 JPEGs not found ({ARCHIVE} or {EXTRACTED})")
    dest = tmp_path_factory.mktemp("cifar10")
    with tarfile.open(ARCHIVE) as tar:
        try:
            tar.extractall(dest, filter="data")
        except TypeError:  # Python without extraction filters
            tar.extractall(dest)
    for cand in [dest, *dest.iterdir()]:
        if (cand / "train").is_dir():
            return cand
    pytest.skip(f"unexpected layout in {ARCHIVE}")


@pytest.mark.slow
def test_cifar10_zero_shot_retrieval_beats_chance(tmp_path_factory):
    root = _cifar_root(tmp_path_factory)
    out = tmp_path_factory.mktemp("run")
    cfg = tiny_cfg(out, dataset="folder", data_root=str(root), split="class", train_fraction=0.5, method="xbn",
                   image_size=32, batch_size=64, m_per_class=16, memory_size="2048", max_steps=150, epochs=1,
                   warmup_epochs=0, lr=1e-3, backbone="tinycnn", pretrained=False, workers=2,
                   auto_augment="none", re_prob=0.0, hflip=0.5, crop_min_scale=0.6, drift_every=25, eval_chunk=1024)
    res = train(cfg)
    recs = read_metrics(out / "metrics.jsonl")
    assert res["stopped"] == "max_steps" and recs[-1]["step"] == 150
    # 5 unseen test classes of 1,000 images each, leave-one-out: chance Recall@1 is about 0.2
    assert recs[-1]["num_queries"] == 5000
    assert recs[-1]["recall@1"] > 0.3, recs[-1]
