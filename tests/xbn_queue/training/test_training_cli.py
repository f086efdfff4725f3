"""Tests of xbn_queue.training.cli and xbn_queue.training.series (in process, fast)."""

import dataclasses
import re
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Union

import pytest
import torch

from xbn_queue.training.checkpoint import CheckpointError, atomic_save, load_checkpoint
from xbn_queue.training.cli import (UsageError, above, at_least, between, check_memory_fits, check_output_dir,
                                    check_ranges, choose_output_dir, default_run_dir, holds_run, prepare_output_dir,
                                    resume_command, run_main)
from xbn_queue.training.config import load_config, parse_config, save_config
from xbn_queue.training.series import (PlannedRun, RunOutcome, check_series_dir, format_mean_std, incomplete_banner,
                                       mean_std, run_series)


@dataclass
class Cfg:
    batch_size: int = field(default=8, metadata={"help": "batch", "range": at_least(2)})
    frac: float = field(default=0.5, metadata={"help": "fraction", "range": between(0, 1, lo_open=True)})
    lr: Optional[float] = field(default=None, metadata={"help": "lr (default: per dataset)", "range": above(0)})
    ks: List[int] = field(default_factory=lambda: [1, 2], metadata={"range": at_least(1)})
    size: Union[int, float] = field(default=0.5, metadata={"help": "rows or a fraction"})
    crop_min_scale: float = field(default=0.1, metadata={"hidden_aliases": ["crop-scale-min"]})


def test_ranges_name_the_option_value_and_interval():
    check_ranges(Cfg())  # defaults and None pass
    for kw, msg in ((dict(batch_size=-4), "--batch-size -4: expected an integer >= 2"),
                    (dict(frac=0.0), r"--frac 0.0: expected a number in \(0, 1\]"),
                    (dict(lr=0.0), "--lr 0.0: expected a number > 0"),
                    (dict(ks=[1, 0]), "--ks 0: expected an integer >= 1"),
                    (dict(frac=float("nan")), "--frac nan")):
        with pytest.raises(UsageError, match=msg):
            check_ranges(Cfg(**kw))
    assert 1.0 in between(0, 1) and 1.0 not in between(0, 1, hi_open=True) and True not in at_least(0)


def test_parser_errors_are_one_line_hidden_aliases_and_typed_yaml(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(Cfg, ["--batch-size", "many"], prog="prog")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("prog: error: argument --batch-size")
    assert parse_config(Cfg, ["--crop-scale-min", "0.3"]).crop_min_scale == 0.3  # the old spelling still works
    (tmp_path / "old.yaml").write_text("crop_scale_min: 0.25\n")
    assert parse_config(Cfg, ["--config", str(tmp_path / "old.yaml")]).crop_min_scale == 0.25
    cfg = parse_config(Cfg, ["--size", "64", "--lr", "1e-4"])
    assert cfg.size == 64 and isinstance(cfg.size, int) and parse_config(Cfg, ["--size", "0.5"]).size == 0.5
    save_config(cfg, tmp_path / "c.yaml")
    text = (tmp_path / "c.yaml").read_text()
    assert "size: 64\n" in text and "lr: 0.0001\n" in text and "'" not in text  # real types, not strings
    assert load_config(Cfg, tmp_path / "c.yaml") == cfg
    (tmp_path / "bad.yaml").write_text("lr: [1, 2\n")
    with pytest.raises(ValueError, match=r"bad.yaml: not a valid YAML file \(line 2, column 1\)"):
        parse_config(Cfg, ["--config", str(tmp_path / "bad.yaml")])


def test_output_dir_checks_touch_nothing(tmp_path):
    run = tmp_path / "run"
    check_output_dir(run, resume=False, overwrite=False)  # does not exist yet: fine, and still absent
    assert not run.exists()
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    check_output_dir(run, resume=False, overwrite=False)  # a folder without a run is fine
    (run / "metrics.jsonl").write_text("{}\n")
    assert holds_run(run)
    with pytest.raises(UsageError, match="already holds a run: continue it with --resume, replace it with --overwrite"):
        check_output_dir(run, resume=False, overwrite=False)
    check_output_dir(run, resume=True, overwrite=False)
    check_output_dir(run, resume=False, overwrite=True)
    with pytest.raises(UsageError, match="exclude each other"):
        check_output_dir(run, resume=True, overwrite=True)
    with pytest.raises(UsageError, match="exists and is not a folder"):
        check_output_dir(run / "notes.txt", resume=False, overwrite=False)
    with pytest.raises(UsageError, match="notes.txt is a file"):
        check_output_dir(run / "notes.txt" / "sub", resume=False, overwrite=False)
    (run / "last.pt").write_bytes(b"x")
    (run / "history.png").write_bytes(b"x")
    prepare_output_dir(run, overwrite=True)  # removes the run's files, keeps the user's
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


def test_default_run_dirs_are_new_and_resume_needs_a_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    a = default_run_dir(tmp_path, "digits", "xbn")
    assert a.parent == tmp_path and a.name.startswith("digits-xbn-") and not a.exists()
    a.mkdir()
    b = default_run_dir(tmp_path, "digits", "xbn")
    assert b != a and not b.exists()
    assert choose_output_dir("given", "", tmp_path) == "given"
    assert choose_output_dir(None, str(a), tmp_path) == str(a)
    with pytest.raises(UsageError, match="--output-dir"):
        choose_output_dir(None, "auto", tmp_path)


def test_resume_command_is_the_exact_command(monkeypatch):
    monkeypatch.setattr("sys.argv", ["/usr/bin/xbn-metric"])
    cmd = resume_command("xbn-metric", "metric", ["compare", "--seeds", "2", "--resume", "x.pt", "--lr", "0.1", "--overwrite"], "runs/a b")
    assert cmd == "xbn-metric compare --seeds 2 --lr 0.1 --output-dir 'runs/a b' --resume"
    monkeypatch.setattr("sys.argv", ["/repo/metric/__main__.py"])
    assert resume_command("xbn-metric", "metric", ["--output-dir", "o", "--resume"], "o") == \
        "python -m metric --output-dir o --resume"


def test_memory_size_is_checked_in_bytes_before_allocating():
    assert check_memory_fits("--memory-size", 1000, 1000, 128, "cpu") == 1000 * (128 * 4 + 16)
    with pytest.raises(UsageError, match=r"--memory-size 10000000000: a memory of 10,000,000,000 rows x 512 needs 20.6 TB, more than 80% of the"):
        check_memory_fits("--memory-size", 10_000_000_000, 10_000_000_000, 512, torch.device("cpu"))


def test_run_main_exit_codes(capsys):
    def raiser(exc):
        def body():
            raise exc
        return body

    assert run_main("p", lambda: 0) == 0 and run_main("p", lambda: 130) == 130
    assert run_main("p", raiser(UsageError("--x 1: expected\nmore"))) == 2
    assert capsys.readouterr().err == "p: error: --x 1: expected more\n"
    assert run_main("p", raiser(FileNotFoundError(2, "No such file or directory", "/nope"))) == 2
    assert "p: error: /nope: No such file or directory" in capsys.readouterr().err
    assert run_main("p", raiser(PermissionError(13, "Permission denied", "/ro/x"))) == 1
    assert run_main("p", raiser(KeyboardInterrupt())) == 130
    capsys.readouterr()
    assert run_main("p", raiser(KeyError("k")), bad_input=("builtins:KeyError",)) == 2
    assert run_main("p", raiser(KeyError("k")), bad_input=("not_imported_module:Error",), failures=(KeyError,)) == 1
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        run_main("p", raiser(ZeroDivisionError()))


def test_corrupt_and_foreign_checkpoints_are_named_in_one_line(tmp_path):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"garbage" * 20)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(bad, kind="xbn-metric")
    text = str(e.value)
    assert text.startswith(f"{bad} is not a readable xbn-metric checkpoint (") and "\n" not in text
    assert "weights_only" not in text and isinstance(e.value, ValueError)
    atomic_save({"model": {}}, bad)
    with pytest.raises(CheckpointError, match=r"not a readable xbn-selfsup checkpoint \(missing: config\)"):
        load_checkpoint(bad, kind="xbn-selfsup", required_keys=("model", "config"))
    atomic_save([1, 2], bad)
    with pytest.raises(CheckpointError, match="it holds a list, not a dict"):
        load_checkpoint(bad, kind="xbn-metric")


def test_series_stops_on_a_signal_and_resumes_only_what_is_missing(tmp_path):
    plan = [PlannedRun(f"{m}-seed{s}", {"method": m, "seed": s}) for m in ("a", "b") for s in (0, 1)]
    trained: List[str] = []

    def stop_at(name):
        def train_one(run, run_dir):
            done = (run_dir / "done").exists()
            if not done:
                trained.append(run.name)
            run_dir.mkdir(parents=True, exist_ok=True)
            if run.name == name:  # the trainer caught SIGINT: checkpoint written, run not complete
                (run_dir / "last.pt").write_bytes(b"partial")
                return RunOutcome(complete=False, signal=signal.SIGINT)
            (run_dir / "done").write_text("1")
            (run_dir / "last.pt").write_bytes(b"full")
            return RunOutcome(complete=True, result={"score": len(run.name)})
        return train_one

    report = run_series(plan, tmp_path, stop_at("b-seed0"), verbose=False)
    assert report.exit_code == 130 and report.signal == signal.SIGINT and not report.complete
    assert [r.complete for r in report.records] == [True, True, False, False]
    assert report.incomplete() == ["b-seed0", "b-seed1"] and report.records[3].outcome is None
    with pytest.raises(UsageError, match="already holds a run"):
        check_series_dir(tmp_path, plan, resume=False, overwrite=False)
    check_series_dir(tmp_path, plan, resume=True, overwrite=False)
    trained.clear()
    report = run_series(plan, tmp_path, stop_at(""), verbose=False)
    assert report.exit_code == 0 and report.complete and trained == ["b-seed0", "b-seed1"]
    with pytest.raises(UsageError, match="duplicate runs: x"):
        check_series_dir(tmp_path / "new", [PlannedRun("x", {}), PlannedRun("x", {})], resume=False, overwrite=False)


def test_series_stops_when_the_signal_arrives_between_runs(tmp_path):
    import os

    plan = [PlannedRun(f"r{i}", {}) for i in range(3)]

    def train_one(run, run_dir):
        if run.name == "r0":
            os.kill(os.getpid(), signal.SIGTERM)  # arrives outside any trainer: the series' own handler
        return RunOutcome(complete=True)

    report = run_series(plan, tmp_path, train_one, verbose=False)
    assert report.exit_code == 143 and report.incomplete() == ["r1", "r2"]


def test_table_helpers():
    assert mean_std([0.5, 0.7]) == pytest.approx({"mean": 0.6, "std": 0.1414213562, "n": 2})
    assert format_mean_std(mean_std([0.5, 0.7])) == "60.00 ± 14.14"
    assert format_mean_std(mean_std([0.9889])) == "98.89"  # one seed: no "± 0.00"
    assert format_mean_std(None) == format_mean_std(mean_std([])) == "n/a"
    assert incomplete_banner(["a", "b"], "cmd --resume").startswith("INCOMPLETE: 2 run(s) did not finish")


def test_progress_is_a_bar_only_on_a_terminal(capsys, monkeypatch):
    from xbn_queue.training import progress as progress_module

    monkeypatch.setattr(progress_module, "_stderr_is_terminal", lambda: False)
    assert list(progress_module.progress(range(100), desc="epoch 1/2", enabled=None)) == list(range(100))
    err = capsys.readouterr().err
    assert "\r" not in err and err.splitlines()[0].startswith("epoch 1/2: 10/100 steps") and len(err.splitlines()) == 9
    list(progress_module.progress(range(10), desc="short", enabled=None))  # short loops: silent
    list(progress_module.progress(range(100), desc="off", enabled=False))
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(progress_module, "_stderr_is_terminal", lambda: True)
    bar = progress_module.progress(range(3), desc="tty", enabled=None)
    assert type(bar).__name__ == "tqdm"
    bar.close()


def test_int_or_float_parses_an_integer_whatever_typing_cached():
    poisoned = Optional[Union[float, int]]  # typing may hand this very object back for Optional[Union[int, float]]

    @dataclass
    class C:
        m: Optional[Union[int, float]] = None

    assert poisoned == Optional[Union[int, float]]
    assert type(parse_config(C, ["--m", "64"]).m) is int and parse_config(C, ["--m", "0.5"]).m == 0.5


def test_parse_choices_keeps_order_and_refuses_unknown_empty_and_repeated():
    from xbn_queue.training.cli import UsageError, parse_choices

    assert parse_choices("--methods", " xbn, none ", ["none", "xbn", "axbn"]) == ["xbn", "none"]
    assert parse_choices("--adaptations", ["axbn", "none"], ["none", "xbn", "axbn"]) == ["axbn", "none"]
    for value, message in [("xbn,foo", "--methods xbn,foo: unknown foo"), (",", "--methods ,: unknown (empty)"),
                           ("xbn,xbn", "--methods xbn,xbn: a value is listed twice")]:
        with pytest.raises(UsageError, match="^" + re.escape(message)):
            parse_choices("--methods", value, ["none", "xbn"])


def test_series_output_dir_given_new_or_refused_resume(tmp_path):
    from xbn_queue.training.cli import UsageError, series_output_dir

    assert series_output_dir("given", False, tmp_path, "sweep", "digits") == "given"
    new = Path(series_output_dir(None, False, tmp_path, "sweep", "digits"))
    assert new.parent == tmp_path and new.name.startswith("sweep-digits-") and not new.exists()
    with pytest.raises(UsageError, match="sweep --resume: give the sweep folder"):
        series_output_dir(None, True, tmp_path, "sweep", "digits")


_CHILD = """
import json, os, pathlib, signal, sys, time
d = pathlib.Path(sys.argv[1]); d.mkdir(parents=True, exist_ok=True)
(d / "env.json").write_text(json.dumps({k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "EXTRA")}))
print("hello from", d.name, flush=True)
mode = sys.argv[2]
if mode in ("wait", "starting"):  # a trainer (checkpoint on SIGTERM, exit 128 + 15), or one still starting up
    if mode == "wait":
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
    (d / "ready").write_text("1")
    while True:
        time.sleep(0.02)
if mode in ("fail", "bad"):
    print("xbn-x: error: " + ("disk full" if mode == "fail" else "--foo 3: no"), file=sys.stderr)
sys.exit({"fail": 1, "bad": 2}.get(mode, 0))
"""


def _child_command(modes):
    import sys

    return lambda run, run_dir, slot: [sys.executable, "-c", _CHILD, str(run_dir), modes[run.name]]


def test_job_slots_split_cores_and_hand_out_gpus():
    from xbn_queue.training.series import JobSlot, job_slots

    assert job_slots(2, cores=5, gpus=[]) == [JobSlot(0, 2, None), JobSlot(1, 2, None)]
    assert [s.threads for s in job_slots(3, cores=2, gpus=[])] == [1, 1, 1]  # at least one thread
    assert [s.gpu for s in job_slots(4, cores=8, gpus=["3", "5", "7"])] == ["3", "5", "7", "3"]
    assert [s.gpu for s in job_slots(2, cores=8, gpus=["0"])] == [None, None]  # one GPU: shared, environment untouched


def test_parallel_series_runs_each_run_in_its_own_process_with_its_share(tmp_path, monkeypatch, capfd):
    import json

    import xbn_queue.training.series as series

    monkeypatch.setattr(series, "available_cores", lambda: 4)
    monkeypatch.setattr(series, "visible_gpus", lambda: ["0", "1"])
    plan = [PlannedRun(f"r{i}", {}) for i in range(3)]
    report = run_series(plan, tmp_path, None, verbose=True, jobs=2, command=_child_command({r.name: "ok" for r in plan}),
                        env={"EXTRA": "x"})
    assert report.complete and report.exit_code == 0
    envs = [json.loads((tmp_path / r.name / "env.json").read_text()) for r in plan]
    assert all(e["OMP_NUM_THREADS"] == "2" and e["EXTRA"] == "x" for e in envs)
    assert {envs[0]["CUDA_VISIBLE_DEVICES"], envs[1]["CUDA_VISIBLE_DEVICES"]} == {"0", "1"}
    err = capfd.readouterr().err
    assert "[r0] hello from r0" in err and "run 3/3: r2" in err and "(job 2/2, 2 thread(s), GPU" in err


def test_parallel_series_passes_a_signal_on_and_starts_nothing_more(tmp_path):
    import os
    import threading
    import time

    plan = [PlannedRun(f"r{i}", {}) for i in range(3)]

    def interrupt():
        deadline = time.time() + 60
        while time.time() < deadline and not all((tmp_path / f"r{i}" / "ready").exists() for i in (0, 1)):
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C reaches the series only (its runs have their own session)

    threading.Thread(target=interrupt, daemon=True).start()
    modes = {"r0": "wait", "r1": "starting", "r2": "wait"}  # r1 ends at SIGTERM's default action: stopped too
    report = run_series(plan, tmp_path, None, verbose=False, jobs=2, command=_child_command(modes))
    assert report.exit_code == 130 and report.incomplete() == ["r0", "r1", "r2"]
    assert [r.outcome.signal if r.outcome else None for r in report.records] == [signal.SIGTERM, signal.SIGTERM, None]
    assert not (tmp_path / "r2").exists()


@pytest.mark.parametrize("mode,error,match", [("fail", "RunError", r"run r0 failed \(exit status 1\): disk full$"),
                                              ("bad", "UsageError", r"run r0: --foo 3: no$")])
def test_parallel_series_raises_a_failed_run(tmp_path, mode, error, match):
    from xbn_queue.training import cli

    plan = [PlannedRun("r0", {}), PlannedRun("r1", {})]
    with pytest.raises(getattr(cli, error), match=match):
        run_series(plan, tmp_path, None, verbose=False, jobs=2, command=_child_command({"r0": mode, "r1": "ok"}))
    with pytest.raises(UsageError, match="--jobs 0: expected an integer >= 1"):
        run_series(plan, tmp_path, None, jobs=0)
    with pytest.raises(UsageError, match="jobs > 1 needs a command"):
        run_series(plan, tmp_path, None, jobs=2)


def test_parse_option_value_converts_as_the_command_line_does():
    from xbn_queue.training.config import parse_option_value

    assert parse_option_value(Cfg, "lr", "1e-3") == 0.001 and parse_option_value(Cfg, "lr", "none") is None
    assert parse_option_value(Cfg, "size", "64") == 64 and isinstance(parse_option_value(Cfg, "size", "0.5"), float)
    assert parse_option_value(Cfg, "batch_size", "16") == 16
    with pytest.raises(ValueError, match="invalid literal"):
        parse_option_value(Cfg, "batch_size", "x")
    with pytest.raises(ValueError, match="a list option"):
        parse_option_value(Cfg, "ks", "1")
    with pytest.raises(KeyError):
        parse_option_value(Cfg, "nope", "1")

def test_memory_smaller_than_one_global_batch_is_refused():
    from xbn_queue.training.cli import check_memory_holds_a_batch

    check_memory_holds_a_batch("--memory-size", "64", 64, 16, 4)  # exactly one global batch: fine
    with pytest.raises(UsageError, match=r"^--memory-size 0.1: 63 rows, fewer than one global batch \(16 x 4 processes\)$"):
        check_memory_holds_a_batch("--memory-size", "0.1", 63, 16, 4)


def test_a_training_split_with_one_class_is_refused():
    from xbn_queue.training.cli import check_two_classes

    check_two_classes([3, 1, 3], "--dataset x", "k-NN needs at least 2")
    with pytest.raises(UsageError, match=r"^--dataset x: the training split has 1 class\(es\); k-NN needs at least 2$"):
        check_two_classes(torch.tensor([5, 5, 5]), "--dataset x", "k-NN needs at least 2")
