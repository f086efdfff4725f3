"""examples/wandb_sweep.yaml: the exact commands ``wandb agent`` builds from it parse into the configs it means."""

import itertools
from pathlib import Path

import pytest
import yaml

from metric.cli import main

sweep_utils = pytest.importorskip("wandb.sdk.launch.sweeps.utils")

SWEEP = Path(__file__).resolve().parents[2] / "examples" / "wandb_sweep.yaml"


def agent_command(sweep, values):
    """The command ``wandb agent`` runs for one set of parameter values (wandb/wandb_agent.py, ``_command_run``)."""
    sweep_vars = sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})
    sweep_vars.update(interpreter=["python"], program=[sweep["program"]], env=["/usr/bin/env"])
    command = []
    for chunk in sweep_utils.create_sweep_command(list(sweep["command"])):
        chunk = str(chunk)
        command += (sweep_vars.get(chunk[2:-1]) or []) if chunk.startswith("${") and chunk.endswith("}") else [chunk]
    return command


def grid(sweep):
    params = sweep["parameters"]
    names = list(params)
    choices = [p["values"] if "values" in p else [p["value"]] for p in params.values()]
    return [dict(zip(names, combo)) for combo in itertools.product(*choices)]


def test_every_run_of_the_sweep_parses_into_the_config_it_names(monkeypatch):
    import metric.train as mt

    sweep = yaml.safe_load(SWEEP.read_text())
    assert sweep["method"] == "grid" and sweep["metric"] == {"name": "recall@1", "goal": "maximize"}
    seen = []

    def fake_train(cfg):  # the real CLI path up to training: parse, resolve, check, the run folder's name
        seen.append(cfg)
        return {"stopped": None, "best": {}, "output_dir": cfg.output_dir}

    monkeypatch.setattr(mt, "train", fake_train)
    runs = grid(sweep)
    assert len(runs) == 5 * 3 * 2 * 3
    for values in runs:
        command = agent_command(sweep, values)
        assert command[:4] == ["/usr/bin/env", "python", "-m", "metric"]
        assert f"--amp={values['amp']}" in command  # "--amp=True" / "--amp=False", as the agent writes it
        assert main(command[4:]) == 0, command
        cfg = seen.pop()
        assert (cfg.dataset, cfg.method, cfg.lr, cfg.amp, cfg.seed, cfg.wandb_mode) == (
            "omniglot", values["method"], values["lr"], values["amp"], values["seed"], "online")
        assert cfg.backbone == "conv4" and cfg.epochs == 6  # the Omniglot recipe's defaults stay


def test_the_agent_writes_booleans_as_python_does():
    command = agent_command({"program": "xbn-metric", "command": ["${env}", "${interpreter}", "-m", "metric", "${args}"]},
                            {"dataset": "omniglot", "amp": False, "lr": 0.0003})
    assert command == ["/usr/bin/env", "python", "-m", "metric", "--dataset=omniglot", "--amp=False", "--lr=0.0003"]
