"""Tiny, fast training configurations for the metric trainer tests."""

import os
import subprocess
import sys
from pathlib import Path

from metric.config import MetricConfig
from xbn_queue.training.config import config_to_argv

ROOT = Path(__file__).resolve().parents[2]

TINY = dict(dataset="digits", split="instance", train_fraction=0.1, epochs=1, warmup_epochs=1, batch_size=16,
            m_per_class=4, embedding_dim=32, memory_size="64", progress=False, drift_every=2, probe_size=16,
            staleness_samples=64, eval_batch_size=512, threads=1, kalman_gain_every=2)


def tiny_cfg(out, **kw) -> MetricConfig:
    return MetricConfig(**dict(TINY, output_dir=str(out), **kw))


def tiny_argv(out, **kw):
    return config_to_argv(tiny_cfg(out, **kw), only_changed=True)


def env(**extra):
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.update({k: str(v) for k, v in extra.items()})
    return e


def run_cli(argv, timeout=120, **extra_env):
    return subprocess.run([sys.executable, "-m", "metric", *argv], cwd=ROOT, env=env(**extra_env),
                          capture_output=True, text=True, timeout=timeout)
