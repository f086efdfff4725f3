"""Tests of xbn_queue.training.config: dataclass -> argparse / YAML, precedence, errors, round trip."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import pytest
import yaml

from xbn_queue.training.config import (
    build_parser,
    config_from_dict,
    config_from_namespace,
    config_to_argv,
    config_to_dict,
    load_config,
    parse_config,
    save_config,
)


@dataclass
class Cfg:
    """Toy trainer config."""

    dataset: str = field(default="digits", metadata={"choices": ["sop", "digits"], "help": "dataset (100% real)"})
    memory_size: str = field(default="0.5", metadata={"type": str, "help": "rows or fraction"})
    batch_size: int = 64
    lr: float = 1e-4
    amp: bool = True
    pretrained: bool = False
    resume: str = field(default="", metadata={"nargs": "?", "const": "auto"})
    wandb_project: Optional[str] = None
    seed: Optional[int] = 0
    output_dir: Path = Path("runs/x")
    ks: tuple[int, ...] = (1, 10)
    norm: Literal["l2", "bn", "ln"] = "l2"
    kalman_r: Union[float, str] = 0.01


def test_defaults_without_arguments() -> None:
    assert parse_config(Cfg, []) == Cfg()


def test_cli_types_and_flags() -> None:
    cfg = parse_config(Cfg, [
        "--dataset", "sop", "--memory-size", "4096", "--batch-size", "32", "--lr", "3e-3", "--no-amp",
        "--pretrained", "--wandb-project", "proj", "--seed", "none", "--output-dir", "out/a",
        "--ks", "1", "5", "20", "--norm", "bn", "--kalman-r", "auto",
    ])
    assert cfg.dataset == "sop"
    assert cfg.memory_size == "4096" and isinstance(cfg.memory_size, str)
    assert cfg.batch_size == 32 and isinstance(cfg.batch_size, int)
    assert cfg.lr == pytest.approx(3e-3) and isinstance(cfg.lr, float)
    assert cfg.amp is False and cfg.pretrained is True
    assert cfg.wandb_project == "proj" and cfg.seed is None
    assert cfg.output_dir == Path("out/a")
    assert cfg.ks == (1, 5, 20)
    assert cfg.norm == "bn"
    assert cfg.kalman_r == "auto"
    assert parse_config(Cfg, ["--kalman-r", "0.5"]).kalman_r == 0.5


def test_bare_resume_gives_const_and_value_is_kept() -> None:
    assert parse_config(Cfg, ["--resume"]).resume == "auto"
    assert parse_config(Cfg, ["--resume", "ckpt/last.pt"]).resume == "ckpt/last.pt"
    assert parse_config(Cfg, []).resume == ""


def test_bad_cli_values_exit_with_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_config(Cfg, ["--dataset", "imagenet"])
    assert info.value.code == 2
    assert "invalid choice: 'imagenet'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(Cfg, ["--batch-size", "many"])
    assert "--batch-size" in capsys.readouterr().err


def test_help_lists_kebab_options_and_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_config(Cfg, ["--help"], prog="xbn-toy")
    out = capsys.readouterr().out
    assert "usage: xbn-toy" in out
    for text in ["--memory-size", "--amp[=true|false], --no-amp", "--config FILE.yaml", "dataset (100% real) (default: digits)"]:
        assert text in out


def test_precedence_defaults_yaml_cli(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-2\nbatch-size: 16\namp: false\nmemory_size: 1024\nks: [1, 2]\ndataset: sop\n")
    cfg = parse_config(Cfg, ["--config", str(path)])
    assert cfg.lr == pytest.approx(1e-2) and isinstance(cfg.lr, float)  # PyYAML reads 1e-2 as a string
    assert (cfg.batch_size, cfg.amp, cfg.memory_size, cfg.ks, cfg.dataset) == (16, False, "1024", (1, 2), "sop")
    assert cfg.seed == 0  # default kept
    # Explicit CLI options win, even when they equal the dataclass default.
    cfg = parse_config(Cfg, ["--lr", "1e-4", "--config", str(path), "--amp", "--batch-size", "64"])
    assert (cfg.lr, cfg.amp, cfg.batch_size, cfg.dataset) == (1e-4, True, 64, "sop")


def test_yaml_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("lr: 0.1\nmemory_sise: 10\n")
    with pytest.raises(ValueError, match=r"bad\.yaml.*unknown key 'memory_sise'"):
        parse_config(Cfg, ["--config", str(path)])


def test_yaml_invalid_values_are_rejected(tmp_path: Path) -> None:
    cases = {
        "batch_size: 1.5\n": r"invalid value 1\.5 for 'batch_size'",
        "dataset: imagenet\n": r"'dataset'.*choose from",
        "amp: maybe\n": r"'amp'",
        "batch_size: null\n": r"'batch_size'.*None is not allowed",
        "- a\n- b\n": r"expected a mapping",
    }
    for i, (text, pattern) in enumerate(cases.items()):
        path = tmp_path / f"c{i}.yaml"
        path.write_text(text)
        with pytest.raises(ValueError, match=pattern):
            parse_config(Cfg, ["--config", str(path)])
    dup = tmp_path / "dup.yaml"
    dup.write_text("batch_size: 1\nbatch-size: 2\n")
    with pytest.raises(ValueError, match="given twice"):
        parse_config(Cfg, ["--config", str(dup)])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        parse_config(Cfg, ["--config", str(tmp_path / "nope.yaml")])


def test_save_config_round_trip_reproduces_run(tmp_path: Path) -> None:
    cfg = parse_config(Cfg, ["--lr", "2.5e-5", "--memory-size", "0.25", "--no-amp", "--ks", "1", "4",
                             "--output-dir", str(tmp_path / "run"), "--wandb-project", "p", "--kalman-r", "auto"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    raw = yaml.safe_load(path.read_text())
    assert raw["ks"] == [1, 4] and raw["output_dir"] == str(tmp_path / "run") and raw["amp"] is False
    assert "!!python" not in path.read_text()  # plain types only
    assert load_config(Cfg, path) == cfg
    assert parse_config(Cfg, ["--config", str(path)]) == cfg
    assert config_to_dict(cfg) == raw


def test_config_to_dict_plain_types() -> None:
    d = config_to_dict(Cfg(ks=(3,), output_dir=Path("/tmp/o")))
    assert d["ks"] == [3] and d["output_dir"] == "/tmp/o" and d["lr"] == 1e-4
    assert list(d) == [f for f in Cfg.__dataclass_fields__]


def test_extra_args_returned_separately() -> None:
    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("--methods", default="none,xbn")
        p.add_argument("--seeds", type=int, default=3)

    cfg, extras = parse_config(Cfg, ["--seeds", "2", "--lr", "0.5"], prog="toy compare", extra_args=add)
    assert cfg.lr == 0.5
    assert vars(extras) == {"methods": "none,xbn", "seeds": 2}


def test_build_parser_with_own_options() -> None:
    parser = build_parser(Cfg, prog="toy")
    parser.add_argument("--dry-run", action="store_true")
    ns = parser.parse_args(["--dry-run", "--batch-size", "8"])
    assert ns.dry_run is True
    assert config_from_namespace(Cfg, ns).batch_size == 8


def test_required_fields_and_post_init_validation() -> None:
    @dataclass
    class Req:
        data_root: str
        epochs: int = 1

        def __post_init__(self) -> None:
            if self.epochs < 1:
                raise ValueError("epochs must be >= 1")

    with pytest.raises(SystemExit):
        parse_config(Req, [])
    assert parse_config(Req, ["--data-root", "d"]).data_root == "d"
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        parse_config(Req, ["--data-root", "d", "--epochs", "0"])
    with pytest.raises(ValueError, match="missing required option"):
        config_from_dict(Req, {"epochs": 2})


def test_unsupported_field_type_and_reserved_name() -> None:
    @dataclass
    class Bad:
        mapping: dict = field(default_factory=dict)

    with pytest.raises(TypeError, match=r"'mapping'.*metadata=\{\"type\": str\}"):
        parse_config(Bad, [])

    @dataclass
    class Reserved:
        config: str = ""

    with pytest.raises(TypeError, match="named 'config'"):
        parse_config(Reserved, [])


def test_missing_yaml_gives_install_hint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml -> ImportError
    assert parse_config(Cfg, ["--lr", "2"]).lr == 2.0  # no YAML needed without --config
    with pytest.raises(ImportError, match=r'pip install "xbn-queue\[train\]"'):
        parse_config(Cfg, ["--config", str(path)])


def test_config_to_argv_round_trips_through_parse_config() -> None:
    cfg = Cfg(dataset="sop", memory_size="4096", batch_size=8, lr=3e-3, amp=False, pretrained=True,
              wandb_project=None, seed=None, output_dir=Path("out/b"), ks=(1, 5, 20), norm="ln", kalman_r="auto")
    argv = config_to_argv(cfg)
    assert "--no-amp" in argv and "--pretrained" in argv
    assert argv[argv.index("--ks") + 1 : argv.index("--ks") + 4] == ["1", "5", "20"]
    assert parse_config(Cfg, argv) == cfg


def test_config_to_argv_only_changed() -> None:
    assert config_to_argv(Cfg(), only_changed=True) == []
    argv = config_to_argv(Cfg(batch_size=8, amp=False), only_changed=True)
    assert argv == ["--batch-size", "8", "--no-amp"]
    assert parse_config(Cfg, argv) == Cfg(batch_size=8, amp=False)


@dataclass
class HeadCfg:
    """A config whose optional choice has 'none' among its values."""

    head: Optional[str] = field(default=None, metadata={"choices": ["linear", "none"]})
    wandb_project: Optional[str] = None


def test_none_that_is_a_choice_is_the_choice_not_unset(tmp_path: Path) -> None:
    assert parse_config(HeadCfg, ["--head", "none"]).head == "none"
    assert parse_config(HeadCfg, ["--head", "linear", "--wandb-project", "none"]) == HeadCfg("linear", None)
    cfg = HeadCfg(head="none", wandb_project="p")
    save_config(cfg, tmp_path / "c.yaml")
    assert "head: none" in (tmp_path / "c.yaml").read_text()
    assert load_config(HeadCfg, tmp_path / "c.yaml") == cfg  # round trip keeps the choice
    assert parse_config(HeadCfg, ["--config", str(tmp_path / "c.yaml")]) == cfg
