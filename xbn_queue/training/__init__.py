"""Shared infrastructure of the ``metric`` and ``selfsup`` trainers.

Small, independent modules; none of them is imported by ``xbn_queue`` itself, and the optional packages
they use (PyYAML, NumPy, tqdm, matplotlib, wandb) are imported only when needed, with an ``ImportError``
that names the extra to install (``pip install "xbn-queue[train]"`` or ``"xbn-queue[wandb]"``).

- :mod:`~xbn_queue.training.loop`: ``RunLoop`` (the run both trainers share: it owns stopping, the epoch's
  end, precision, the finiteness check and saving), ``RunState``, ``RunSummary`` (``to_dict`` / ``from_dict``),
  ``Callback`` (``on_run_start``, ``on_epoch_start``, ``on_step_end``, ``on_epoch_end``, ``on_checkpoint``,
  ``on_train_end``, ``on_run_end``, ``on_exception``) and the product's own (``Tracking``, ``ProgressBar``,
  ``Checkpointer``), ``NonFiniteError``.
- :mod:`~xbn_queue.training.precision`: ``autocast``, ``amp_dtype``, ``grad_scaler``, ``backward_step`` (one AMP
  rule and one loss scaler for the trainers, their prefills, evaluations and ``xbn-metric embed``).
- :mod:`~xbn_queue.training.images`: ``IMAGE_EXTENSIONS``, ``BadImageError``, ``digits_uint8``.
- :mod:`~xbn_queue.training.config`: dataclass <-> command line / YAML (``parse_config``, ``save_config``,
  ``load_config``, ``config_to_dict``, ``build_parser``).
- :mod:`~xbn_queue.training.checkpoint`: ``atomic_save``, ``load_checkpoint``, ``resolve_resume``,
  ``check_compatible``.
- :mod:`~xbn_queue.training.distributed`: ``init_distributed`` -> ``DistContext`` for ``torchrun``;
  ``gather_features``, ``all_reduce_mean``, ``barrier``.
- :mod:`~xbn_queue.training.rng`: ``get_rng_state`` / ``set_rng_state`` for exact resume.
- :mod:`~xbn_queue.training.seeding`: ``seed_everything``, ``resolve_device``.
- :mod:`~xbn_queue.training.signals`: ``GracefulExit`` (SIGTERM / SIGINT -> checkpoint and stop).
- :mod:`~xbn_queue.training.tracking`: ``RunLogger`` (``metrics.jsonl`` + W&B), ``plot_history``, ``plot_compare``.
- :mod:`~xbn_queue.training.progress`: ``progress`` (a bar only when stderr is a terminal; plain lines otherwise).
- :mod:`~xbn_queue.training.cli`: the command-line contract of both trainers: ``UsageError``, valid
  ranges (``at_least``, ``between``, ``check_ranges``), run folders (``check_output_dir``,
  ``prepare_output_dir``, ``default_run_dir``), ``resume_command``, ``check_memory_fits``, ``run_main``
  (exit 0 / 2 / 128 + N, one-line errors).
- :mod:`~xbn_queue.training.memory`: ``MemoryOptions`` (the memory options both trainers share: adaptation,
  size, Kalman noises, warm-up, prefill, same-id masking; ``rows()`` turns the size into rows once, right after
  the data is loaded; ``queue_kwargs()`` builds the memory's arguments), ``memory_field`` (one set of bounds),
  ``memory_rows``.
- :mod:`~xbn_queue.training.prefill`: ``prefill_memory`` (a trainer's ``--prefill``; the trainer supplies how to
  read a batch) and ``prefill_batches`` (which training images it embeds, split over ranks).
- :mod:`~xbn_queue.training.embed`: ``embed_sharded``, ``shard_indices`` (an evaluation split embedded by every
  rank's share, gathered in the split's order).
- :mod:`~xbn_queue.training.series`: ``run_series`` (``compare`` and sweeps: a signal stops the whole
  series, per-run ``complete`` flags, ``--resume`` finishes only the missing runs), ``mean_std``,
  ``format_mean_std``, ``incomplete_banner``; the compare skeleton every series command shares (``seed_plan``,
  ``series_run_config``, ``RunOutcome.of_summary``, ``table_title``, ``write_series``).

Import from the submodules (``from xbn_queue.training.config import parse_config``); the functions and
classes above (except ``progress``, which shares its module's name) are also available lazily as
``xbn_queue.training.<name>``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "parse_config": "config", "build_parser": "config", "config_from_namespace": "config",
    "config_from_dict": "config", "config_to_dict": "config", "config_to_argv": "config", "save_config": "config",
    "load_config": "config",
    "atomic_save": "checkpoint", "load_checkpoint": "checkpoint", "resolve_resume": "checkpoint",
    "check_compatible": "checkpoint",
    "DistContext": "distributed", "init_distributed": "distributed", "gather_features": "distributed",
    "all_reduce_mean": "distributed", "barrier": "distributed",
    "get_rng_state": "rng", "set_rng_state": "rng",
    "seed_everything": "seeding", "resolve_device": "seeding",
    "GracefulExit": "signals",
    "RunLoop": "loop", "RunState": "loop", "RunSummary": "loop", "Callback": "loop", "NonFiniteError": "loop",
    "autocast": "precision", "amp_dtype": "precision", "grad_scaler": "precision", "backward_step": "precision",
    "prefill_batches": "prefill", "prefill_memory": "prefill",
    "embed_sharded": "embed", "shard_indices": "embed",
    "MemoryOptions": "memory", "memory_field": "memory", "memory_rows": "memory",
    "RunLogger": "tracking", "plot_history": "tracking", "plot_compare": "tracking", "read_metrics": "tracking",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
