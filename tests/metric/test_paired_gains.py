"""Paired gains of the adapted memories over XBM, XBM* and No-XBM (compare and sweep), on synthetic run records.

Every expected number is worked out by hand in the comments: per-seed differences, their mean and their
sample standard deviation (ddof=1).
"""

import pytest

from metric.experiments.compare import format_gain_table, gain_columns, paired_gains
from metric.experiments.sweep import Axis, add_gains, format_gain_tables, sweep_points
from xbn_queue.training.series import paired_differences

#        seed:        0     1     2
BEST = {"none":      (0.80, 0.81, 0.79),
        "xbm":       (0.78, 0.80, 0.79),
        "xbm-batch": (0.82, 0.83, 0.81),
        "xbn":       (0.85, 0.84, 0.86),
        "axbn":      (0.77, 0.83, 0.99)}  # seed 2 of axbn did not finish
EARLY = {"none": (0.50, 0.55, 0.52), "xbm": (0.60, 0.65, 0.61), "xbm-batch": (0.62, 0.66, 0.60),
         "xbn": (0.70, 0.72, 0.74), "axbn": (0.60, 0.70, 0.99)}


def _runs():
    runs = [{"method": m, "seed": s, "complete": not (m == "axbn" and s == 2), "recall@1": BEST[m][s],
             "early_recall@1": EARLY[m][s]} for m in BEST for s in range(3)]
    runs.append({"method": "xbn", "seed": 7, "complete": True, "recall@1": 0.10, "early_recall@1": 0.10})  # no twin
    return runs


def test_paired_differences_pair_by_seed_and_skip_unfinished_and_unpaired():
    runs = _runs()
    assert paired_differences(runs, "xbn", "xbm", "recall@1") == pytest.approx([0.07, 0.04, 0.07])
    assert paired_differences(runs, "axbn", "xbm", "recall@1") == pytest.approx([-0.01, 0.03])  # seed 2 unfinished
    assert paired_differences(runs, "xbn", "bogus", "recall@1") == []
    with pytest.raises(ValueError, match="two xbm runs"):
        paired_differences(runs + [dict(runs[3])], "xbn", "xbm", "recall@1")


def test_compare_paired_gains_by_hand():
    methods = ["none", "xbm", "xbm-batch", "xbn", "axbn"]
    gains = paired_gains(_runs(), methods, ["early_recall@1", "recall@1"])
    assert list(gains) == ["xbn", "axbn"] and list(gains["xbn"]) == ["xbm", "xbm-batch", "none"]
    want = {  # (mean, std, n)
        # xbn - xbm, best: 0.07, 0.04, 0.07 -> mean 0.06; deviations .01 -.02 .01 -> var 6e-4 / 2 -> std sqrt(3e-4)
        ("xbn", "xbm", "recall@1"): (0.06, 3e-4 ** 0.5, 3),
        # xbn - xbm*, best: .03 .01 .05 -> 0.03; deviations 0 -.02 .02 -> var 8e-4 / 2 -> std 0.02
        ("xbn", "xbm-batch", "recall@1"): (0.03, 0.02, 3),
        # xbn - none, best: .05 .03 .07 -> 0.05, std 0.02
        ("xbn", "none", "recall@1"): (0.05, 0.02, 3),
        # xbn - xbm, early: .10 .07 .13 -> 0.10; deviations 0 -.03 .03 -> std 0.03
        ("xbn", "xbm", "early_recall@1"): (0.10, 0.03, 3),
        # xbn - none, early: .20 .17 .22 -> 0.59 / 3; deviations .0033.. -.0266.. .0233.. -> var 0.0012667 / 2
        ("xbn", "none", "early_recall@1"): (0.59 / 3, (((0.20 - 0.59 / 3) ** 2 + (0.17 - 0.59 / 3) ** 2
                                                        + (0.22 - 0.59 / 3) ** 2) / 2) ** 0.5, 3),
        # axbn - xbm, best: -.01 .03 (seed 2 unfinished) -> 0.01; deviations -.02 .02 -> var 8e-4 / 1 -> std 0.028284
        ("axbn", "xbm", "recall@1"): (0.01, 8e-4 ** 0.5, 2),
    }
    for (t, b, k), (mean, std, n) in want.items():
        assert gains[t][b][k] == {"mean": pytest.approx(mean, abs=1e-12), "std": pytest.approx(std, abs=1e-12), "n": n}
    table = format_gain_table(gains, gain_columns("R@1 ep 1")).splitlines()
    assert table[0] == "| Paired gain | R@1 ep 1 | R@1 best |"
    assert table[2] == "| XBN − XBM | +10.00 ± 3.00 | +6.00 ± 1.73 |"
    # early, xbn - xbm*: .08 .06 .14 -> mean .28 / 3 = .09333; deviations -.01333 -.03333 .04667 -> squares
    # .000178 + .001111 + .002178 = .003467, / 2 = .001733 -> std .04163
    assert table[3] == "| XBN − XBM* | +9.33 ± 4.16 | +3.00 ± 2.00 |"
    # early, xbn - none: .20 .17 .22 -> .19667; squares .0000111 + .000711 + .000544 = .0012667, / 2 -> std .02517
    assert table[4] == "| XBN − No-XBM | +19.67 ± 2.52 | +5.00 ± 2.00 |"
    # early, axbn - xbm: 0 .05 -> .025; deviations -.025 .025 -> var .00125 / 1 -> std .035355
    assert table[5] == "| AXBN − XBM | +2.50 ± 3.54 | +1.00 ± 2.83 |"
    assert len(table) == 2 + 6  # two targets x three baselines
    # without XBM* and No-XBM in the series only the rows over XBM; without any baseline, nothing
    assert list(paired_gains(_runs(), ["xbm", "xbn"], ["recall@1"])["xbn"]) == ["xbm"]
    assert paired_gains(_runs(), ["xbn", "axbn"], ["recall@1"]) == {}


def test_sweep_gains_over_each_baseline_by_hand():
    #   point (batch):        8            16
    best = {"none":      ((0.60, 0.62), (0.70, 0.75)),
            "xbm-batch": ((0.66, 0.72), (0.78, 0.80)),
            "xbn":       ((0.70, 0.74), (0.80, 0.81))}
    runs = [{"method": m, "batch_size": b, "memory_size": 0.5, "seed": s, "complete": True, "recall@1": best[m][i][s],
             "early_recall@1": best[m][i][s] - 0.1} for m in best for i, b in enumerate((8, 16)) for s in (0, 1)]
    axes = [Axis("batch_size", (8, 16), "--batch-sizes")]
    add_gains(runs, axes)
    xbn8 = [r for r in runs if r["method"] == "xbn" and r["batch_size"] == 8]
    assert [r["gain_over_xbm-batch_recall@1"] for r in xbn8] == pytest.approx([0.04, 0.02])
    assert [r["gain_over_none_recall@1"] for r in xbn8] == pytest.approx([0.10, 0.12])
    assert [r["gain_over_none_early_recall@1"] for r in xbn8] == pytest.approx([0.10, 0.12])
    assert not any("gain_recall@1" in r for r in runs)  # no xbm in this sweep
    assert "gain_over_none_recall@1" in runs[4] and "gain_over_xbm-batch_recall@1" not in runs[4]  # xbm-batch - none
    keys = ["recall@1", "gain_over_xbm-batch_recall@1", "gain_over_none_recall@1", "gain_over_none_early_recall@1"]
    pts = sweep_points(runs, list(best), axes, {"batch_size": 16}, keys)
    xbn = {p["value"]: p for p in pts["batch_size"] if p["method"] == "xbn"}
    # batch 8: xbn - xbm*: .04 .02 -> 0.03, std sqrt(2 x .01^2 / 1) = 0.014142; xbn - none: .10 .12 -> 0.11
    # batch 16: xbn - xbm*: .02 .01 -> 0.015, std 0.0070711; xbn - none: .10 .06 -> 0.08, std 0.028284
    for value, key, mean, std in ((8, "gain_over_xbm-batch_recall@1", 0.03, 2e-4 ** 0.5),
                                  (8, "gain_over_none_recall@1", 0.11, 2e-4 ** 0.5),
                                  (16, "gain_over_xbm-batch_recall@1", 0.015, 5e-5 ** 0.5),
                                  (16, "gain_over_none_recall@1", 0.08, 8e-4 ** 0.5)):
        assert xbn[value][key] == {"mean": pytest.approx(mean), "std": pytest.approx(std), "n": 2}
    lines = format_gain_tables(pts, {"batch_size": 16}, "R@1 ep 1").splitlines()
    assert "| XBN − XBM*, R@1 best | +3.00 ± 1.41 | +1.50 ± 0.71 |" in lines
    assert "| XBN − No-XBM, R@1 best | +11.00 ± 1.41 | +8.00 ± 2.83 |" in lines
    assert "| XBN − No-XBM, R@1 ep 1 | +11.00 ± 1.41 | +8.00 ± 2.83 |" in lines
    assert not any(line.startswith("| XBM* − No-XBM") for line in lines)  # only the adapted memories over XBM*, No-XBM
