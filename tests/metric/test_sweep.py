"""``xbn-metric sweep``: the runs of both sweeps, the aggregation, the outputs, resume, bad input."""

import json
import statistics

import pytest

from metric.cli import main
from metric.config import resolve_config
from metric.sweep import format_sweep_tables, sweep_jobs, sweep_points

from .helpers import tiny_argv, tiny_cfg


def test_jobs_cover_both_sweeps_once_each():
    cfg = resolve_config(tiny_cfg("out", batch_size=16, memory_size="0.5"))
    jobs, fixed = sweep_jobs(cfg, ["xbm", "xbn"], [8, 16, 32], ["0.25", "0.5"], seeds=2)
    assert fixed == {"batch_size": 16, "memory_size": "0.5"}
    points = [(lab["method"], lab["batch_size"], lab["memory_size"], lab["seed"]) for lab, _ in jobs]
    assert len(points) == len(set(points)) == 2 * (3 + 2 - 1) * 2  # (16, 0.5) is in both sweeps, trained once
    for lab, c in jobs:
        assert (c.method, c.batch_size, c.memory_size, c.seed) == (lab["method"], lab["batch_size"], lab["memory_size"], lab["seed"])
        assert c.output_dir.endswith(f"{lab['method']}-b{lab['batch_size']}-m{lab['memory_size']}-seed{lab['seed']}")
        assert c.m_per_class == 4
    jobs, _ = sweep_jobs(cfg, ["xbm"], [8, 16, 32], ["0.5"], seeds=1, classes_per_batch=2)
    assert [(c.batch_size, c.m_per_class) for _, c in jobs] == [(8, 4), (16, 8), (32, 16)]
    with pytest.raises(ValueError, match="--batch-sizes: 6 is not a multiple of the images per class"):
        sweep_jobs(cfg, ["xbm"], [6], ["0.5"], seeds=1)


def test_points_are_mean_and_sample_std_over_seeds():
    runs = [{"method": "xbn", "batch_size": b, "memory_size": m, "seed": s, "recall@1": r}
            for (b, m, s, r) in [(8, "0.5", 0, 0.5), (8, "0.5", 1, 0.7), (16, "0.5", 0, 0.9), (16, "0.5", 1, 0.8),
                                 (16, "0.25", 0, 0.6), (16, "0.25", 1, 0.6)]]
    pts = sweep_points(runs, ["xbn"], [8, 16], ["0.25", "0.5"], {"batch_size": 16, "memory_size": "0.5"}, ["recall@1"])
    assert [(p["value"], p["recall@1"]["mean"], p["recall@1"]["n"]) for p in pts["batch_size"]] == [
        (8, pytest.approx(0.6), 2), (16, pytest.approx(0.85), 2)]
    assert pts["batch_size"][0]["recall@1"]["std"] == pytest.approx(statistics.stdev([0.5, 0.7]))
    assert [p["recall@1"]["mean"] for p in pts["memory_size"]] == [pytest.approx(0.6), pytest.approx(0.85)]
    table = format_sweep_tables(pts, {"batch_size": 16, "memory_size": "0.5"})
    assert "| XBN | 60.00 ± 14.14 | 85.00 ± 7.07 |" in table and "| Method | 25 % | 50 % |" in table


def test_sweep_writes_outputs_and_resume_never_reruns_a_finished_run(tmp_path, capsys):
    argv = ["sweep", *tiny_argv(tmp_path, drift_every=0, memory_size="32"), "--methods", "xbm,xbn", "--batch-sizes", "8,16",
            "--memory-sizes", "32,64", "--seeds", "1", "--resume"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "sweep.json").read_text())
    assert result["fixed"] == {"batch_size": 16, "memory_size": "32"}
    # points (8, 32), (16, 32), (16, 64) per method: (16, 32) shared by both sweeps
    assert sorted((r["method"], r["batch_size"], r["memory_size"]) for r in result["runs"]) == sorted(
        (m, b, mem) for m in ("xbm", "xbn") for b, mem in ((8, "32"), (16, "32"), (16, "64")))
    for r in result["runs"]:  # each run's score is the best evaluation of its own run folder
        folder = tmp_path / f"{r['method']}-b{r['batch_size']}-m{r['memory_size']}-seed0"
        recs = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert r["recall@1"] == max(x["recall@1"] for x in recs)
    xbn16 = next(p for p in result["points"]["batch_size"] if p["method"] == "xbn" and p["value"] == 16)
    assert xbn16 == next(p for p in result["points"]["memory_size"] if p["method"] == "xbn" and p["value"] == "32") | {"value": 16}
    assert set(result["baselines"]["summary"]) == {"raw-pixels", "untrained"}
    md = (tmp_path / "sweep.md").read_text()
    assert "R@1 vs batch size (memory 32)" in md and "R@1 vs memory size (batch 16)" in md and "MAP@R vs batch size" in md
    assert "| XBM |" in md and "| XBN |" in md and md.strip() in out
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def state():
        ckpts = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.glob("*-seed0/*.pt")}
        return ckpts, {p: p.read_bytes() for p in tmp_path.glob("*-seed0/metrics.jsonl")}

    before = state()
    assert len(before[0]) == 12 and len(before[1]) == 6
    assert main(argv) == 0  # resumed: every run is finished, none is trained again (no checkpoint written)
    again = json.loads((tmp_path / "sweep.json").read_text())
    assert state() == before
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(again["runs"]) == strip(result["runs"]) and again["points"] == result["points"]


@pytest.mark.parametrize("extra,match", [
    (["--methods", "xbm,bogus"], "--methods: unknown bogus"),
    (["--batch-sizes", "8,x"], "--batch-sizes: expected comma-separated integers"),
    (["--batch-sizes", "0"], "--batch-sizes: expected integers >= 1"),
    (["--memory-sizes", "1.5"], "memory_size fraction must be in"),
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--classes-per-batch", "0"], "--classes-per-batch must be >= 1"),
    (["--batch-sizes", "64"], "needs 16 classes, the training set has 10"),
    (["--batch-sizes", "16", "--memory-sizes", "8"], "memory size 8 gives 8 rows"),
])
def test_sweep_bad_input_is_one_line_and_trains_nothing(tmp_path, capsys, extra, match):
    with pytest.raises(SystemExit) as e:
        main(["sweep", *tiny_argv(tmp_path / "s"), *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()
