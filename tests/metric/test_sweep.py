"""``xbn-metric sweep``: the runs of both sweeps, the aggregation, the outputs, resume, bad input."""

import json
import statistics

import pytest

from metric.cli import main
from metric.config import resolve_config
from metric.experiments.sweep import Axis, format_sweep_tables, sweep_plan, sweep_points
from xbn_queue.training.cli import UsageError

from .helpers import tiny_argv, tiny_cfg


def _exit_code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own errors
        return e.code


def test_plan_covers_both_sweeps_once_each():
    cfg = resolve_config(tiny_cfg("out", batch_size=16, memory_size=0.5))
    bs, ms = Axis("batch_size", (8, 16, 32), "--batch-sizes"), Axis("memory_size", (0.25, 0.5), "--memory-sizes")
    plan, fixed = sweep_plan(cfg, ["xbm", "xbn"], [bs, ms], seeds=2)
    assert fixed == {"batch_size": 16, "memory_size": 0.5}
    points = [(r.settings["method"], r.settings["batch_size"], r.settings["memory_size"], r.settings["seed"]) for r in plan]
    assert len(points) == len(set(points)) == 2 * (3 + 2 - 1) * 2  # (16, 0.5) is in both sweeps, trained once
    for r in plan:
        st = r.settings
        assert r.name == f"{st['method']}-b{st['batch_size']}-m{st['memory_size']}-seed{st['seed']}"
        assert st["m_per_class"] == 4
    plan, _ = sweep_plan(cfg, ["xbm"], [bs, Axis("memory_size", (0.5,), "--memory-sizes")], seeds=1, classes_per_batch=2)
    assert [(r.settings["batch_size"], r.settings["m_per_class"]) for r in plan] == [(8, 4), (16, 8), (32, 16)]
    with pytest.raises(UsageError, match="--batch-sizes: 6 is not a multiple of the images per class"):
        sweep_plan(cfg, ["xbm"], [Axis("batch_size", (6,), "--batch-sizes")], seeds=1)


def test_points_are_mean_and_sample_std_over_seeds():
    runs = [{"method": "xbn", "batch_size": b, "memory_size": m, "seed": s, "recall@1": r}
            for (b, m, s, r) in [(8, 0.5, 0, 0.5), (8, 0.5, 1, 0.7), (16, 0.5, 0, 0.9), (16, 0.5, 1, 0.8),
                                 (16, 0.25, 0, 0.6), (16, 0.25, 1, 0.6)]]
    runs.append({"method": "xbn", "batch_size": 8, "memory_size": 0.5, "seed": 2, "recall@1": 0.0, "complete": False})
    axes = [Axis("batch_size", (8, 16), "--batch-sizes"), Axis("memory_size", (0.25, 0.5), "--memory-sizes")]
    pts = sweep_points(runs, ["xbn"], axes, {"batch_size": 16, "memory_size": 0.5}, ["recall@1"])
    assert [(p["value"], p["recall@1"]["mean"], p["recall@1"]["n"]) for p in pts["batch_size"]] == [
        (8, pytest.approx(0.6), 2), (16, pytest.approx(0.85), 2)]
    assert pts["batch_size"][0]["recall@1"]["std"] == pytest.approx(statistics.stdev([0.5, 0.7]))
    assert [p["recall@1"]["mean"] for p in pts["memory_size"]] == [pytest.approx(0.6), pytest.approx(0.85)]
    table = format_sweep_tables(pts, {"batch_size": 16, "memory_size": 0.5})
    assert "| XBN | 60.00 ± 14.14 | 85.00 ± 7.07 |" in table and "| Method | 25 % | 50 % |" in table


def test_sweep_writes_outputs_and_resume_never_reruns_a_finished_run(tmp_path, capsys):
    argv = ["sweep", *tiny_argv(tmp_path, drift_every=0, memory_size=32), "--methods", "xbm,xbn", "--batch-sizes", "8,16",
            "--memory-sizes", "32,64", "--seeds", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "sweep.json").read_text())
    assert result["fixed"] == {"batch_size": 16, "memory_size": 32} and result["complete"]
    # points (8, 32), (16, 32), (16, 64) per method: (16, 32) shared by both sweeps
    assert sorted((r["method"], r["batch_size"], r["memory_size"]) for r in result["runs"]) == sorted(
        (m, b, mem) for m in ("xbm", "xbn") for b, mem in ((8, 32), (16, 32), (16, 64)))
    for r in result["runs"]:  # each run's score is the best evaluation of its own run folder
        folder = tmp_path / f"{r['method']}-b{r['batch_size']}-m{r['memory_size']}-seed0"
        recs = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert r["recall@1"] == max(x["recall@1"] for x in recs)
    xbn16 = next(p for p in result["points"]["batch_size"] if p["method"] == "xbn" and p["value"] == 16)
    assert xbn16 == next(p for p in result["points"]["memory_size"] if p["method"] == "xbn" and p["value"] == 32) | {"value": 16}
    assert set(result["baselines"]["summary"]) == {"raw-pixels", "untrained"}
    md = (tmp_path / "sweep.md").read_text()
    assert "R@1 (best / last epoch) vs batch size (memory 32)" in md and "R@1 (best / last epoch) vs memory size (batch 16)" in md
    assert "MAP@R (best / last epoch) vs batch size" in md and "R-Precision (best / last epoch) vs batch size" in md and "| XBN − XBM, R@1 best |" in md
    assert "| XBM |" in md and "| XBN |" in md and md.strip() in out
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def state():
        ckpts = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.glob("*-seed0/*.pt")}
        return ckpts, {p: p.read_bytes() for p in tmp_path.glob("*-seed0/metrics.jsonl")}

    before = state()
    assert len(before[0]) == 12 and len(before[1]) == 6
    assert _exit_code(argv) == 2  # the folder holds a sweep: refused without --resume / --overwrite
    assert "--resume" in capsys.readouterr().err
    assert state() == before
    assert main(argv + ["--resume"]) == 0  # every run is finished: none is trained again (no checkpoint written)
    again = json.loads((tmp_path / "sweep.json").read_text())
    assert state() == before
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(again["runs"]) == strip(result["runs"]) and again["points"] == result["points"]


@pytest.mark.parametrize("extra,match", [
    (["--methods", "xbm,bogus"], "--methods xbm,bogus: unknown bogus"),
    (["--batch-sizes", "8,x"], "--batch-sizes 8,x: expected comma-separated integers"),
    (["--batch-sizes", "0"], "--batch-sizes 0: expected comma-separated integers >= 1"),
    (["--batch-sizes", "8,8"], "--batch-sizes 8,8: a value is listed twice"),
    (["--memory-sizes", "0.5,-1.5"], "--memory-sizes 0.5,-1.5: --memory-size -1.5: a fraction of the training set must be a finite number > 0"),
    (["--memory-sizes", "a"], "--memory-sizes a: 'a' is neither a row count nor a fraction"),
    (["--seeds", "0"], "--seeds 0: expected an integer >= 1"),
    (["--classes-per-batch", "0"], "--classes-per-batch 0: expected an integer >= 1"),
    (["--vary", "foo=1,2"], "--vary foo=1,2: unknown option --foo"),
    (["--vary", "lr"], "--vary lr: expected OPTION=V1,V2,..."),
    (["--vary", "lr=a"], "--vary lr=a: --lr a: could not convert string to float"),
    (["--vary", "lr=-1"], "--vary lr=-1: --lr -1.0: expected a number > 0"),
    (["--vary", "lr=1e-3,0.001"], "--vary lr=1e-3,0.001: a value is listed twice"),
    (["--vary", "augment=mild,bogus"], "--vary augment=mild,bogus: --augment bogus: expected one of timm, mild"),
    (["--vary", "memory-size=0.0"], "--vary memory-size=0.0: --memory-size 0.0: a fraction of the training set must be a finite number > 0"),
    (["--vary", "method=xbm,xbn"], "the sweep sets --method itself; use --methods"),
    (["--vary", "train-fraction=0.2,0.5"], "--train-fraction defines the evaluation data"),
    (["--vary", "batch-size=8", "--batch-sizes", "16"], "--vary batch-size: --batch-size is already swept by --batch-sizes"),
    (["--vary", "m-per-class=2,4", "--classes-per-batch", "2"], "--classes-per-batch: sets --m-per-class from the batch size"),
    (["--jobs", "0"], "--jobs 0: expected an integer >= 1"),
    (["--batch-sizes", "64"], "sweep point xbm-b64-m64-seed0: --batch-size 64: 16 classes per batch"),
    (["--batch-sizes", "16", "--memory-sizes", "8"], "sweep point xbm-b16-m8-seed0: --memory-size 8: 8 rows, fewer than one global batch"),
])
def test_sweep_bad_input_is_one_line_and_trains_nothing(tmp_path, capsys, extra, match):
    assert _exit_code(["sweep", *tiny_argv(tmp_path / "s"), *extra]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


def test_sigint_stops_the_whole_sweep_and_resume_finishes_it(tmp_path):
    """The series machinery of compare, through sweep: exit 130, no table counting a cut-short run, --resume completes."""
    import signal

    from tests.inprocess import run_inprocess

    from .test_resume import start_and_wait_for_hang

    out = tmp_path / "sw"
    argv = ["sweep", *tiny_argv(out, warmup_epochs=0, checkpoint_every=2, drift_every=0, memory_size=32), "--methods", "xbn",
            "--batch-sizes", "8,16", "--memory-sizes", "32", "--seeds", "1"]
    proc = start_and_wait_for_hang(out, step=2, argv=argv)  # first run (xbn-b8-m32-seed0) at step 2
    proc.send_signal(signal.SIGINT)
    stdout, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "Traceback" not in err
    assert "finish with: python -m metric sweep" in err and err.rstrip().endswith("--resume")
    md = (out / "sweep.md").read_text()
    assert md.startswith("INCOMPLETE: 2 run(s)") and "| XBN | n/a | n/a |" in md
    assert json.loads((out / "sweep.json").read_text())["complete"] is False
    assert not (out / "sweep.png").exists() and not (out / "xbn-b16-m32-seed0").exists()
    res = run_inprocess("metric", argv + ["--resume"])
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads((out / "sweep.json").read_text())
    assert result["complete"] is True and all(r["complete"] for r in result["runs"])
    assert "resumed from" in res.stderr and (out / "sweep.png").exists()


def test_vary_any_option_logs_the_gain_over_xbm_and_the_staleness(tmp_path, capsys):
    """--vary lr with --jobs 2: runs named by the value, gains = paired differences with XBM's run of the same
    point and seed (read back from the run folders), sweep.csv, gain.png, gain_staleness.png."""
    import csv

    argv = ["sweep", *tiny_argv(tmp_path, drift_every=0), "--methods", "xbm,xbn", "--vary", "lr=1e-3,3e-3", "--seeds", "1",
            "--jobs", "2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "sweep.json").read_text())
    assert result["sweeps"] == {"lr": [0.001, 0.003]} and result["fixed"] == {"lr": 0.001} and result["complete"]

    def last(folder):
        return [json.loads(line) for line in (tmp_path / folder / "metrics.jsonl").read_text().splitlines()][-1]

    rows = list(csv.DictReader((tmp_path / "sweep.csv").open()))
    assert [(r["method"], r["lr"]) for r in rows] == [("xbm", "0.001"), ("xbm", "0.003"), ("xbn", "0.001"), ("xbn", "0.003")]
    for lr in ("0.001", "0.003"):
        xbm, xbn = last(f"xbm-lr{lr}-seed0"), last(f"xbn-lr{lr}-seed0")
        run = next(r for r in result["runs"] if r["method"] == "xbn" and str(r["lr"]) == lr)
        assert run["gain_last_recall@1"] == pytest.approx(xbn["recall@1"] - xbm["recall@1"])
        assert run["gain_last_map@r"] == pytest.approx(xbn["map@r"] - xbm["map@r"])
        assert run["xbm_staleness_cosine"] == xbm["staleness_cosine"] and run["staleness_cosine"] == xbn["staleness_cosine"]
        row = next(r for r in rows if r["method"] == "xbn" and r["lr"] == lr)
        assert float(row["gain_last_recall@1"]) == pytest.approx(run["gain_last_recall@1"])
        point = next(p for p in result["points"]["lr"] if p["method"] == "xbn" and str(p["value"]) == lr)
        assert point["gain_recall@1"] == {"mean": pytest.approx(run["gain_recall@1"]), "std": 0.0, "n": 1}
        gain = 100 * run["gain_recall@1"]
        assert f"{'+' if gain >= 0 else ''}{gain:.2f}" in printed
    assert "| XBN − XBM, R@1 best |" in printed and "| staleness XBM |" in printed and "vs --lr" in printed
    for png in ("sweep.png", "gain.png", "gain_staleness.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
