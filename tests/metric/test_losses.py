"""--loss / --miner by PML name with their arguments: what is built, every error path, config.yaml, resume."""

import pytest
import torch
import yaml
from pytorch_metric_learning import losses, miners

from metric.cli import main
from metric.config import resolve_config
from metric.losses import build_loss, build_miner, format_kwargs, parse_kwargs
from metric.train import build_losses

from .helpers import tiny_argv, tiny_cfg


def _exit_code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own errors
        return e.code


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(16, 8, generator=g), dim=1), torch.arange(16) // 4


def test_parse_and_format_kwargs():
    kw = parse_kwargs("pos_margin=0, neg_margin=0.5,swap=true,name=abc,q='x,y',ks=[1,2],r=none", "--loss-args")
    assert kw == {"pos_margin": 0, "neg_margin": 0.5, "swap": True, "name": "abc", "q": "x,y", "ks": [1, 2], "r": None}
    assert [type(kw[k]) for k in ("pos_margin", "neg_margin")] == [int, float]
    text = format_kwargs(kw)
    assert text == "ks=[1, 2],name='abc',neg_margin=0.5,pos_margin=0,q='x,y',r=none,swap=true"
    assert parse_kwargs(text, "--loss-args") == kw and parse_kwargs("", "--loss-args") == {}


@pytest.mark.parametrize("name, args, cls, kwargs", [
    ("ContrastiveLoss", "pos_margin=0,neg_margin=0.5", losses.ContrastiveLoss, dict(pos_margin=0, neg_margin=0.5)),
    ("MultiSimilarityLoss", "", losses.MultiSimilarityLoss, {}),
    ("MultiSimilarityLoss", "alpha=1.5,beta=40", losses.MultiSimilarityLoss, dict(alpha=1.5, beta=40)),
    ("TripletMarginLoss", "margin=0.1,triplets_per_anchor=5", losses.TripletMarginLoss, dict(margin=0.1, triplets_per_anchor=5)),
])
def test_the_built_loss_is_pmls_class_with_those_arguments(name, args, cls, kwargs):
    emb, labels = _batch()
    miner = miners.PairMarginMiner(pos_margin=0.2, neg_margin=0.8)
    want = cls(**kwargs)
    got = build_loss(name, args)
    assert type(got) is cls
    for k, v in kwargs.items():
        assert getattr(got, k) == v
    torch.testing.assert_close(got(emb, labels, miner(emb, labels)), want(emb, labels, miner(emb, labels)))
    # through the trainer: the batch loss and the memory's loss are that loss, with the miner of --miner
    cfg = resolve_config(tiny_cfg("out", method="xbm-batch", embedding_dim=8, loss=name, loss_args=args,
                                  miner="PairMarginMiner", miner_args="pos_margin=0.3,neg_margin=0.6"))
    batch_loss, mem = build_losses(cfg, 32, False)
    assert type(mem.loss) is cls and type(mem.miner) is miners.PairMarginMiner
    assert (mem.miner.pos_margin, mem.miner.neg_margin) == (0.3, 0.6)
    m = miners.PairMarginMiner(pos_margin=0.3, neg_margin=0.6)
    torch.testing.assert_close(batch_loss(emb, labels), want(emb, labels, m(emb, labels)))


def test_defaults_are_the_papers_and_miner_none_mines_nothing():
    cfg = resolve_config(tiny_cfg("out", embedding_dim=8))
    assert (cfg.loss, cfg.loss_args, cfg.miner, cfg.miner_args) == ("SupConLoss", "", "PairMarginMiner",
                                                                     "neg_margin=0.8,pos_margin=0.2")
    batch_loss, mem = build_losses(cfg, 32, False)
    assert type(mem.loss) is losses.SupConLoss and mem.loss.temperature == 0.1
    assert (mem.miner.pos_margin, mem.miner.neg_margin) == (0.2, 0.8)
    emb, labels = _batch(1)
    paper = miners.PairMarginMiner(pos_margin=0.2, neg_margin=0.8)
    torch.testing.assert_close(batch_loss(emb, labels), losses.SupConLoss()(emb, labels, paper(emb, labels)))
    # another miner without --miner-args: PML's defaults; --miner none: every pair
    assert resolve_config(tiny_cfg("out", miner="MultiSimilarityMiner")).miner_args == ""
    assert build_miner("none", "") is None
    cfg = resolve_config(tiny_cfg("out", embedding_dim=8, method="none", miner="none"))
    batch_loss, _ = build_losses(cfg, 32, False)
    torch.testing.assert_close(batch_loss(emb, labels), losses.SupConLoss()(emb, labels))


@pytest.mark.parametrize("extra, match", [
    (["--loss", "Contrastive"], "--loss Contrastive: not a loss of pytorch_metric_learning.losses; did you mean "
                                "ContrastiveLoss? e.g. ContrastiveLoss, MultiSimilarityLoss"),
    (["--miner", "PairMargin"], "--miner PairMargin: not a miner of pytorch_metric_learning.miners; did you mean PairMarginMiner?"),
    (["--loss", "ContrastiveLoss", "--loss-args", "pos_margin=0,neg_marg=0.5"],
     "--loss-args pos_margin=0,neg_marg=0.5: ContrastiveLoss takes no keyword 'neg_marg'; it takes pos_margin, neg_margin"),
    (["--loss", "ContrastiveLoss", "--loss-args", "pos_margin=abc"],
     "--loss-args pos_margin=abc: ContrastiveLoss's pos_margin is a number (default 0), got 'abc'"),
    (["--loss", "TripletMarginLoss", "--loss-args", "swap=1"],
     "--loss-args swap=1: TripletMarginLoss's swap is true or false (default False), got 1"),
    (["--miner-args", "pos_margin=0.1,epsilon=2"], "--miner-args pos_margin=0.1,epsilon=2: PairMarginMiner takes no keyword 'epsilon'"),
    (["--loss-args", "distance=cosine"], "--loss-args distance=cosine: distance takes a PML object"),
    (["--loss-args", "temperature"], "--loss-args temperature: expected NAME=VALUE,..."),
    (["--loss-args", "temperature=0.1,temperature=0.2"], "--loss-args temperature=0.1,temperature=0.2: temperature is given twice"),
    (["--loss", "ProxyAnchorLoss", "--method", "none"], "--loss ProxyAnchorLoss: needs num_classes=..., embedding_size=... in --loss-args"),
    (["--loss", "ProxyAnchorLoss", "--loss-args", "num_classes=5,embedding_size=32", "--method", "none"],
     "--loss ProxyAnchorLoss: has trainable parameters"),
    (["--loss", "FastAPLoss", "--method", "xbn"], "--loss FastAPLoss: a memory (PML's CrossBatchMemory) supports only"),
    (["--loss", "InstanceLoss", "--method", "none"], "--loss InstanceLoss with --miner PairMarginMiner: fails on a small batch"),
    (["--miner", "none", "--miner-args", "pos_margin=0.1"], "--miner-args pos_margin=0.1: --miner none takes no arguments"),
])
def test_bad_loss_or_miner_is_one_line_exit_2_nothing_written(tmp_path, capsys, extra, match):
    out = tmp_path / "run"
    assert _exit_code([*tiny_argv(out), *extra]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
    # compare refuses it the same way before anything is written
    assert _exit_code(["compare", *tiny_argv(tmp_path / "cmp"), "--methods", "none,xbm", "--seeds", "1", *extra]) == 2
    assert match in capsys.readouterr().err and not (tmp_path / "cmp").exists()


def test_loss_and_miner_are_saved_and_a_checkpoint_resumes_only_with_them(tmp_path, capsys):
    argv = tiny_argv(tmp_path, max_steps=2, loss="ContrastiveLoss", loss_args="neg_margin=0.5, pos_margin=0",
                     miner="MultiSimilarityMiner")
    assert main(argv) == 0
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert (saved["loss"], saved["loss_args"], saved["miner"], saved["miner_args"]) == (
        "ContrastiveLoss", "neg_margin=0.5,pos_margin=0", "MultiSimilarityMiner", "")
    # the same options written differently resume; another loss does not
    assert main(tiny_argv(tmp_path, max_steps=3, resume="auto", loss="ContrastiveLoss",
                          loss_args="pos_margin=0,neg_margin=0.5", miner="MultiSimilarityMiner")) == 0
    assert "resumed from" in capsys.readouterr().err
    assert main(tiny_argv(tmp_path, max_steps=4, resume="auto", loss="MultiSimilarityLoss",
                          miner="MultiSimilarityMiner")) == 2
    assert "differs: loss: saved 'ContrastiveLoss', now 'MultiSimilarityLoss'; loss_args: saved 'neg_margin=0.5,pos_margin=0', now ''" \
        in capsys.readouterr().err
