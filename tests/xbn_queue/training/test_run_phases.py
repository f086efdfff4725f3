"""Exit 2 is for bad input found before a run starts; a failure after its first write names the folder and --resume."""

import functools

import pytest

import metric.train
from metric.cli import main
from xbn_queue.training.loop import Callback
from xbn_queue.training.cli import EXIT_FAILED, EXIT_USAGE, UsageError, mark_started, run_main

from tests.metric.helpers import tiny_argv


def raising(err):
    def body():
        raise err

    return body


def test_run_main_bad_input_before_the_run_is_exit_2(capsys):
    assert run_main("prog", raising(ValueError("--lr -1: expected a number > 0"))) == EXIT_USAGE
    assert capsys.readouterr().err == "prog: error: --lr -1: expected a number > 0\n"


def test_run_main_after_the_first_write_never_says_bad_input(capsys):
    where = "the run in runs/x stopped after step 3 (runs/x/last.pt holds step 2): continue it with --resume once fixed"
    for err in (UsageError("bad row in data.csv"), OSError(28, "No space left on device")):
        mark_started(err, where)
        assert run_main("prog", raising(err)) == EXIT_FAILED
        line = capsys.readouterr().err
        assert line.count("\n") == 1 and line.startswith("prog: error: ") and line.endswith(f"; {where}\n")
    bug = ValueError("shapes (3,) and (4,) do not match")
    mark_started(bug, where)
    with pytest.raises(ValueError, match="do not match") as info:  # a bug: the traceback, not "bad input"
        run_main("prog", raising(bug))
    assert getattr(info.value, "__notes__", [where]) == [where]
    assert capsys.readouterr().err == ""


class RaiseAtStep(Callback):
    """Raises ``err`` after step ``step`` (a bug or a full disk in a step's side work)."""

    def __init__(self, step, err):
        self.step, self.err = step, err

    def on_step_end(self, loop):
        if loop.state.global_step == self.step:
            raise self.err


def with_callback(monkeypatch, callback):
    """Every run the command line starts gets ``callback``."""
    monkeypatch.setattr(metric.train, "train", functools.partial(metric.train.train, callbacks=[callback]))


def test_a_value_error_raised_mid_run_is_a_traceback_naming_the_folder_and_resume(tmp_path, monkeypatch):
    with_callback(monkeypatch, RaiseAtStep(3, ValueError("a bug in the step's bookkeeping")))
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="a bug in the step's bookkeeping") as info:
        main(["train", *tiny_argv(out, method="xbm", checkpoint_every=2)])
    assert info.value.run_started == (f"the run in {out} stopped after step 3 ({out / 'last.pt'} holds step 2): "
                                      "continue it with --resume once fixed")
    assert (out / "config.yaml").exists() and (out / "last.pt").exists()  # written: never "nothing written"


def test_an_os_error_mid_run_is_one_line_naming_the_folder_and_exit_1(tmp_path, monkeypatch, capsys):
    with_callback(monkeypatch, RaiseAtStep(2, OSError(28, "No space left on device")))
    out = tmp_path / "run"
    assert main(["train", *tiny_argv(out, method="xbm")]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (f"xbn-metric: error: [Errno 28] No space left on device; the run in {out} stopped after "
                                    "step 2 (no checkpoint was written yet): continue it with --resume once fixed")


def test_an_incompatible_checkpoint_before_the_run_is_still_exit_2(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *tiny_argv(out, method="xbm", max_steps=2)]) == 0
    capsys.readouterr()
    assert main(["train", *tiny_argv(out, method="xbn", max_steps=2), "--resume"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "method: saved 'xbm', now 'xbn'" in err
