"""Raw-pixel and untrained-network baselines: against plain references, cached, in compare's table and JSON."""

import json

import numpy as np
import pytest
import torch

from metric.experiments import baselines as B
from metric.cli import main
from metric.config import resolve_config
from metric.data import load_digits

from .helpers import tiny_argv, tiny_cfg


def _recall_at_1_loo(feats: np.ndarray, labels: np.ndarray) -> float:
    """Leave-one-out Recall@1 by cosine similarity, a plain float64 loop."""
    f = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    hits = 0
    for i in range(len(f)):
        sims = f @ f[i]
        sims[i] = -np.inf
        hits += labels[int(np.argmax(sims))] == labels[i]
    return hits / len(f)


def test_raw_pixels_and_untrained_net_match_plain_references(tmp_path):
    from timm.data import create_transform

    from metric.data import open_image
    from metric.model import build_model
    from metric.train import build_transforms
    from xbn_queue.training.seeding import seed_everything

    cfg = resolve_config(tiny_cfg(tmp_path, split="class", image_size=12, eval_chunk=64, eval_batch_size=4096))
    res = B.compute_baselines(cfg, seeds=[3, 4])
    assert set(res) == {"raw-pixels", "untrained"} and len(res["raw-pixels"]) == 1 and len(res["untrained"]) == 2
    data = load_digits("class")
    labels = data.query.labels
    tf = create_transform(input_size=12, is_training=False, interpolation="bicubic")
    raw = np.stack([tf(open_image(it)).double().flatten().numpy() for it in data.query.items])  # (Q, 3 * 12 * 12)
    assert res["raw-pixels"][0]["recall@1"] == pytest.approx(_recall_at_1_loo(raw, labels), abs=1e-9)
    _, eval_tf = build_transforms(cfg)
    x = torch.stack([eval_tf(open_image(it)) for it in data.query.items])
    x_train = torch.stack([eval_tf(open_image(it)) for it in data.train.items])
    for seed, r in zip([3, 4], res["untrained"]):
        seed_everything(seed)
        model = build_model(cfg.backbone, cfg.embedding_dim, cfg.embedding_norm, False, None, cfg.width, cfg.image_size)
        _set_batchnorm_plainly(model, x_train)
        with torch.no_grad():
            z = model(x).double().numpy()  # (Q, D)
        assert r["recall@1"] == pytest.approx(_recall_at_1_loo(z, labels), abs=1e-9)
    assert res["untrained"][0]["map@r"] != res["untrained"][1]["map@r"]  # one network per seed


def _set_batchnorm_plainly(model, x_train):
    """Every BatchNorm's running mean / unbiased variance = its input's, over all training images (float64)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms, "the test needs a network with BatchNorm"
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.__setitem__(mod, inp[0].detach().double())) for m in norms]
    model.train()
    with torch.no_grad():
        model(x_train)  # train mode: every layer normalises with its batch's statistics
    for h in hooks:
        h.remove()
    for m in norms:
        a = seen[m].transpose(0, 1).reshape(seen[m].shape[1], -1)  # (C, N * H * W)
        m.running_mean.copy_(a.mean(dim=1))
        m.running_var.copy_(a.var(dim=1, unbiased=True))
    model.eval()


def test_recompute_batchnorm_against_plain_statistics():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 6 * 6, 5), torch.nn.BatchNorm1d(5))
    x = torch.randn(37, 3, 8, 8) * 3 + 1
    ds = [(x[i], 0, i, True) for i in range(len(x))]
    ref = __import__("copy").deepcopy(net)
    _set_batchnorm_plainly(ref, x)
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "num_batches" not in k}
    assert B.recompute_batchnorm(net, ds, batch_size=64, device=torch.device("cpu")) == 2
    assert not net.training and net[1].momentum == 0.1
    for a, b in ((net[1], ref[1]), (net[5], ref[5])):
        torch.testing.assert_close(a.running_mean.double(), b.running_mean.double(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.running_var.double(), b.running_var.double(), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in weights.items())  # no weight changed
    assert B.recompute_batchnorm(torch.nn.Linear(3, 2), ds, 8, torch.device("cpu")) == 0


def test_baselines_are_cached_until_their_settings_change(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path)
    first = B.load_or_compute_baselines(cfg, [0], tmp_path)
    assert json.loads((tmp_path / "baselines.json").read_text())["results"] == first

    def boom(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(B, "compute_baselines", boom)
    assert B.load_or_compute_baselines(cfg, [0], tmp_path) == first
    with pytest.raises(AssertionError, match="recomputed"):
        B.load_or_compute_baselines(tiny_cfg(tmp_path, split="class"), [0], tmp_path)
    with pytest.raises(AssertionError, match="recomputed"):
        B.load_or_compute_baselines(cfg, [0, 1], tmp_path)


def test_compare_prints_and_writes_both_baselines(tmp_path, capsys):
    main(["compare", *tiny_argv(tmp_path), "--methods", "xbn", "--seeds", "2"])
    cap = capsys.readouterr()
    result = json.loads((tmp_path / "compare.json").read_text())
    base = result["baselines"]["summary"]
    assert set(base) == {"raw-pixels", "untrained"}
    assert base["raw-pixels"]["recall@1"]["n"] == 1 and base["untrained"]["recall@1"]["n"] == 2
    runs = result["baselines"]["runs"]["untrained"]
    assert base["untrained"]["map@r"]["mean"] == pytest.approx(np.mean([r["map@r"] for r in runs]))
    table = (tmp_path / "compare.md").read_text()
    lines = [ln for ln in table.splitlines() if ln.startswith("| ")]
    assert [ln.split(" | ")[0] for ln in lines] == ["| Method", "| Raw pixels", "| Untrained net", "| XBN"]
    cell = f"| Raw pixels | {100 * base['raw-pixels']['recall@1']['mean']:.2f} |"  # one value: no "± 0.00"
    assert lines[1].startswith(cell) and cell in cap.out
    u = base["untrained"]["recall@1"]
    assert lines[2].startswith(f"| Untrained net | {100 * u['mean']:.2f} ± {100 * u['std']:.2f} |")
    assert "baseline raw pixels: recall@1" in cap.err and "baseline untrained net: recall@1" in cap.err


@pytest.mark.parametrize("tensor_cache", ["on", "off"])
def test_trainer_and_baselines_evaluate_on_sets_of_the_one_builder(tmp_path, monkeypatch, tensor_cache):
    """compute_baselines and the trainer both take their evaluation sets from metric.train.evaluation_sets, and
    those hold the evaluation images: each query image is the evaluation transform of its file (float64 check)."""
    import metric.train as T
    from metric.data import open_image
    from metric.train import build_transforms, evaluation_sets, train

    built = []

    def spy(cfg, data, device, size=None, **kwargs):
        sets = evaluation_sets(cfg, data, device, size, **kwargs)
        built.append((size or cfg.image_size, sets))
        return sets

    monkeypatch.setattr(T, "evaluation_sets", spy)
    cfg = resolve_config(tiny_cfg(tmp_path / "run", image_size=36, tensor_cache=tensor_cache, max_steps=1))
    B.compute_baselines(cfg, seeds=[0])
    assert [size for size, _ in built] == [B.RAW_PIXELS_MAX_SIZE, 36]
    train(cfg)
    assert [size for size, _ in built] == [B.RAW_PIXELS_MAX_SIZE, 36, 36]
    data = load_digits("instance", train_fraction=cfg.train_fraction)
    for size, sets in built:
        assert (sets.cache is not None) == (tensor_cache == "on")
        assert len(sets.train) == len(data.train) and len(sets.query) == len(data.query)
        assert (sets.gallery is sets.query) == data.query_is_gallery
        if tensor_cache == "off":  # the evaluation transform of each file at ``size`` px
            eval_tf = build_transforms(resolve_config(tiny_cfg(tmp_path, image_size=size)))[1]
            for i in (0, len(data.query) - 1):
                torch.testing.assert_close(sets.query[i][0].double(), eval_tf(open_image(data.query.items[i])).double())
        else:
            assert tuple(sets.query[0][0].shape) == (3, size, size)
