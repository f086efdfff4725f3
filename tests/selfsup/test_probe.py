"""The linear probe (selfsup.probe) and ``xbn-selfsup --linear-probe``."""

import json
import math

import pytest
import torch

from selfsup.cli import main
from selfsup.probe import fit_linear_probe, linear_probe_accuracy


def _clusters(n, c=5, d=16, spread=0.3, seed=0):
    """Linearly separable: ``c`` well-apart class centres plus small noise."""
    g = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(c, d, generator=g)
    y = torch.arange(n) % c
    return centres[y] + spread * torch.randn(n, d, generator=g), y


def test_separable_features_reach_full_accuracy_and_random_labels_stay_at_chance():
    x, y = _clusters(600)
    assert linear_probe_accuracy(x[:400], y[:400], x[400:], y[400:], 5, epochs=10) == 1.0
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2400, 16, generator=g), torch.randint(0, 10, (2400,), generator=g)
    acc = linear_probe_accuracy(x[:400], y[:400], x[400:], y[400:], 10, epochs=10)
    assert abs(acc - 0.1) < 0.035  # chance 0.1; 2000 test labels: std 0.0067


def _probe64(x, y, c, epochs, batch_size, lr, momentum, weight_decay, seed):
    """The recipe written out in float64 lists: standardise, zero init, cosine SGD with momentum."""
    n, d = len(x), len(x[0])
    mean = [sum(r[j] for r in x) / n for j in range(d)]
    std = [max(math.sqrt(sum((r[j] - mean[j]) ** 2 for r in x) / n), 1e-6) for j in range(d)]
    xs = [[(r[j] - mean[j]) / std[j] for j in range(d)] for r in x]
    w, b = [[0.0] * d for _ in range(c)], [0.0] * c
    vw, vb = None, None
    total, t = epochs * -(-n // batch_size), 0
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(n, generator=g).tolist()  # the same shuffle: data order, not arithmetic
        for s in range(0, n, batch_size):
            rows = order[s : s + batch_size]
            gw, gb = [[0.0] * d for _ in range(c)], [0.0] * c
            for i in rows:
                z = [sum(w[k][j] * xs[i][j] for j in range(d)) + b[k] for k in range(c)]
                top = max(z)
                e = [math.exp(v - top) for v in z]
                p = [v / sum(e) for v in e]
                for k in range(c):
                    err = (p[k] - (1.0 if k == y[i] else 0.0)) / len(rows)
                    gb[k] += err
                    for j in range(d):
                        gw[k][j] += err * xs[i][j]
            gw = [[gw[k][j] + weight_decay * w[k][j] for j in range(d)] for k in range(c)]
            vw = gw if vw is None else [[momentum * vw[k][j] + gw[k][j] for j in range(d)] for k in range(c)]
            vb = gb if vb is None else [momentum * vb[k] + gb[k] for k in range(c)]
            step = lr * (1 + math.cos(math.pi * t / total)) / 2
            w = [[w[k][j] - step * vw[k][j] for j in range(d)] for k in range(c)]
            b = [b[k] - step * vb[k] for k in range(c)]
            t += 1
    return w, b


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
def test_probe_equals_the_float64_recipe(dtype, tol):
    x, y = _clusters(45, c=3, d=4, spread=1.5)
    kw = dict(epochs=3, batch_size=16, lr=0.5, momentum=0.9, weight_decay=1e-3, seed=7)
    w, b = _probe64(x.double().tolist(), y.tolist(), 3, **kw)
    probe = fit_linear_probe(x.to(dtype), y, 3, **kw)
    assert torch.allclose(probe.weight.double(), torch.tensor(w, dtype=torch.float64), rtol=tol, atol=tol)
    assert torch.allclose(probe.bias.double(), torch.tensor(b, dtype=torch.float64), rtol=tol, atol=tol)
    assert probe.weight.abs().max() > 0.1  # it moved: the comparison is not of two zero matrices


def test_probe_is_deterministic_given_the_seed_and_checks_its_inputs():
    x, y = _clusters(100, spread=2.0)
    a = fit_linear_probe(x, y, 5, epochs=2, batch_size=32, seed=3)
    b = fit_linear_probe(x, y, 5, epochs=2, batch_size=32, seed=3)
    c = fit_linear_probe(x, y, 5, epochs=2, batch_size=32, seed=4)
    assert torch.equal(a.weight, b.weight) and not torch.equal(a.weight, c.weight)
    with pytest.raises(ValueError, match=r"training labels: expected shape \(100,\)"):
        fit_linear_probe(x, y[:99], 5)
    with pytest.raises(ValueError, match="test features: expected 16 columns"):
        linear_probe_accuracy(x, y, x[:, :8], y, 5)
    with pytest.raises(ValueError, match="epochs >= 1"):
        fit_linear_probe(x, y, 5, epochs=0)


TINY = ["--dataset", "digits", "--image-size", "16", "--train-subset", "320", "--test-subset", "100", "--width", "8",
        "--batch-size", "32", "--split-bn", "2", "--queue-size", "96", "--epochs", "2", "--max-steps", "2",
        "--knn-k", "10", "--device", "cpu", "--no-progress", "--threads", "1", "--workers", "0"]


def test_cli_linear_probe_is_logged_beside_knn(tmp_path, capsys):
    assert main(TINY + ["--linear-probe", "--probe-epochs", "5", "--output-dir", str(tmp_path)]) == 0
    last = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert 0.0 <= last["probe_acc"] <= 1.0 and last["probe_acc"] == last["probe_acc_head"]  # --knn-features head
    assert 0.0 <= last["probe_acc_backbone"] <= 1.0 and "knn_acc" in last
    assert f"probe {100 * last['probe_acc']:.2f}%" in capsys.readouterr().err
    assert main(TINY + ["--probe-epochs", "0", "--output-dir", str(tmp_path / "bad")]) == 2
    assert "--probe-epochs" in capsys.readouterr().err and not (tmp_path / "bad").exists()

# On the real CIFAR-10 JPEGs: tests/selfsup/test_cli_compare.py::test_short_run_on_real_cifar10_jpegs runs with
# --linear-probe (one run for both monitors, to keep the suite short).
