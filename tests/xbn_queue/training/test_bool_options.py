"""Every boolean option of both trainers: --x, --no-x, --x=VALUE (as wandb agent passes it), YAML, config_to_argv."""

import dataclasses
import typing

import pytest

from metric.config import MetricConfig
from selfsup.config import SelfSupConfig
from xbn_queue.training.config import config_to_argv, parse_config

VALUES = {"true": True, "True": True, "1": True, "yes": True, "false": False, "False": False, "0": False, "no": False}


def bool_fields(cls):
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if hints[f.name] in (bool, typing.Optional[bool])]


@pytest.mark.parametrize("cls", [MetricConfig, SelfSupConfig])
def test_every_boolean_accepts_a_value_and_both_flags(cls):
    names = bool_fields(cls)
    assert {"amp", "prefill", "overwrite", "progress"} <= set(names)
    for name in names:
        flag = "--" + name.replace("_", "-")
        for text, value in VALUES.items():
            assert getattr(parse_config(cls, [f"{flag}={text}"]), name) is value, (flag, text)
        assert getattr(parse_config(cls, [flag, "False"]), name) is False  # wandb's ${args_no_equals}
        assert getattr(parse_config(cls, [flag]), name) is True
        assert getattr(parse_config(cls, ["--no-" + flag[2:]]), name) is False


@pytest.mark.parametrize("argv, message", [
    (["--amp=maybe"], "xbn-toy: error: argument --amp: invalid boolean 'maybe' (expected true or false, True or False, "
                      "yes or no, 1 or 0) (see xbn-toy --help)\n"),
    (["--no-amp=false"], "xbn-toy: error: argument --no-amp: takes no value (write --amp=false) (see xbn-toy --help)\n"),
])
def test_a_bad_boolean_is_one_line_and_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        parse_config(MetricConfig, argv, prog="xbn-toy")
    assert info.value.code == 2 and capsys.readouterr().err == message


def test_optional_booleans_take_none_and_yaml_and_the_command_line_agree(tmp_path):
    assert parse_config(MetricConfig, ["--pretrained=none"]).pretrained is None
    assert parse_config(MetricConfig, ["--pretrained=False"]).pretrained is False
    path = tmp_path / "c.yaml"
    path.write_text("amp: false\nprefill: true\n")
    cfg = parse_config(MetricConfig, ["--config", str(path)])
    assert (cfg.amp, cfg.prefill) == (False, True)
    cfg = parse_config(MetricConfig, ["--config", str(path), "--amp=True"])  # the command line beats YAML
    assert (cfg.amp, cfg.prefill) == (True, True)


@pytest.mark.parametrize("cls", [MetricConfig, SelfSupConfig])
@pytest.mark.parametrize("only_changed", [False, True])
def test_config_to_argv_round_trips(cls, only_changed):
    flips = {name: not getattr(cls(), name) for name in bool_fields(cls) if getattr(cls(), name) is not None}
    cfg = dataclasses.replace(cls(), **flips)
    assert parse_config(cls, config_to_argv(cfg, only_changed=only_changed)) == cfg
    assert parse_config(cls, config_to_argv(cls(), only_changed=only_changed)) == cls()
