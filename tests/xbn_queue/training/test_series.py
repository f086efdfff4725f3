"""The compare skeleton of xbn_queue.training.series that metric compare / sweep and selfsup compare share."""

import json
from dataclasses import dataclass, field
from typing import List, Optional

import pytest

from xbn_queue.training.cli import UsageError
from xbn_queue.training.series import (PlannedRun, RunOutcome, incomplete_banner, seed_plan, series_run_config, table_title,
                                       write_series)


def test_seed_plan_is_value_major_from_the_first_seed_and_refuses_no_seed():
    plan = seed_plan("adaptation", ["none", "xbn"], 5, 2)
    assert [r.name for r in plan] == ["none-seed5", "none-seed6", "xbn-seed5", "xbn-seed6"]
    assert [dict(r.settings) for r in plan][1] == {"adaptation": "none", "seed": 6}
    for seeds in (0, -1):
        with pytest.raises(UsageError, match=rf"^--seeds {seeds}: expected an integer >= 1$"):
            seed_plan("method", ["xbn"], 0, seeds)


def test_run_outcome_of_a_trainer_summary():
    stopped = RunOutcome.of_summary({"stopped": "signal", "signal": 15})
    assert (stopped.complete, stopped.signal) == (False, 15)
    for summary in ({"stopped": "max_steps"}, {"stopped": None}, {"already_complete": True}):
        done = RunOutcome.of_summary(summary)
        assert (done.complete, done.signal, done.result) == (True, None, summary)


@dataclass
class _Cfg:
    method: str = "none"
    seed: int = 0
    output_dir: str = ""
    resume: str = ""
    wandb_name: Optional[str] = None
    wandb_mode: str = "disabled"
    wandb_group: Optional[str] = None
    wandb_tags: List[str] = field(default_factory=list)
    lr: float = 0.1


def test_series_run_config_sets_the_run_its_folder_resume_and_wandb_group(tmp_path):
    run = PlannedRun("xbn-seed1", {"method": "xbn", "seed": 1, "lr": 0.5})
    cfg = series_run_config(_Cfg(), run, tmp_path / "cmp" / run.name, resume=True, wandb_name="w-xbn-seed1")
    assert (cfg.method, cfg.seed, cfg.lr, cfg.resume, cfg.wandb_name) == ("xbn", 1, 0.5, "auto", "w-xbn-seed1")
    assert cfg.output_dir == str(tmp_path / "cmp" / "xbn-seed1") and cfg.wandb_group is None  # W&B off: no group
    on = series_run_config(_Cfg(wandb_mode="offline", wandb_tags=["mine"]), run, tmp_path / "cmp" / run.name,
                           resume=False, wandb_name=None, varied=["lr"])
    assert (on.resume, on.wandb_group, on.wandb_tags) == ("", "cmp", ["mine", "lr=0.5"])


def test_table_title_names_unfinished_runs_first():
    assert table_title("digits: 3 seeds", []) == "digits: 3 seeds"
    banner = incomplete_banner(["a-seed0"], "xbn-metric compare --resume")
    assert table_title("T", ["a-seed0"], "xbn-metric compare --resume") == f"{banner}\n\nT; finished runs only"
    assert table_title("T", ["a-seed0"], "", partial="P") == f"{incomplete_banner(['a-seed0'])}\n\nP"


def test_write_series_writes_table_json_and_figures_only_when_every_run_finished(tmp_path, capsys):
    drawn = []

    def draw(png):
        drawn.append(png.name)
        png.write_bytes(b"png")

    def empty(png):
        raise ValueError("nothing recorded")

    result = {"runs": [{"method": "xbn", "complete": True}], "summary": {"xbn": {"mean": 0.5}}}
    (tmp_path / "a.png").write_bytes(b"stale")
    (tmp_path / "b.png").write_bytes(b"stale")
    write_series(tmp_path, "compare", "# table\n", result, figures={"a.png": draw, "b.png": empty})
    assert (tmp_path / "compare.md").read_text() == "# table\n"
    text = (tmp_path / "compare.json").read_text()
    assert text.endswith("}\n") and json.loads(text) == result
    assert drawn == ["a.png"] and (tmp_path / "a.png").read_bytes() == b"png"
    assert not (tmp_path / "b.png").exists()  # nothing to draw: no stale figure left beside the table
    assert capsys.readouterr().err == "[compare] nothing to plot: b.png not written\n"

    write_series(tmp_path / "new", "sweep", "# partial\n", result, ["xbn-seed1"], "cmd --resume", {"a.png": draw})
    write_series(tmp_path, "compare", "# partial\n", result, ["xbn-seed1"], "cmd --resume", {"a.png": draw})
    assert drawn == ["a.png"] and not (tmp_path / "a.png").exists()  # a figure of the earlier table is removed
    assert (tmp_path / "new" / "sweep.md").read_text() == "# partial\n" and (tmp_path / "new" / "sweep.json").is_file()
    assert capsys.readouterr().err == 2 * (incomplete_banner(["xbn-seed1"], "cmd --resume") + "\n")
