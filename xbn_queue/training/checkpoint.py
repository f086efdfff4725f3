"""Crash-safe checkpoints, ``--resume`` resolution and configuration compatibility checks.

``atomic_save(obj, path)`` writes ``torch.save(obj)`` to a temporary file in the same directory, flushes
and fsyncs it, then renames it over ``path`` with ``os.replace`` (atomic on POSIX and Windows), so a
run killed at any moment leaves either the previous checkpoint or the new one, never a torn file.

``resolve_resume(resume, output_dir)`` turns the ``--resume`` option into a path: ``""`` means a fresh
run, ``"auto"`` (what a bare ``--resume`` gives) means ``output_dir/last.pt`` when it exists, and anything
else is a checkpoint file (or a directory holding ``last.pt``) that must exist; a relative name is also
looked up in ``output_dir`` (``--resume best.pt``).

``check_compatible(saved_cfg, cfg, keys)`` refuses to resume from a checkpoint whose configuration
differs on keys that change the model or the memory, listing every difference::

    path = resolve_resume(cfg.resume, cfg.output_dir)
    if path is not None:
        ckpt = load_checkpoint(path, map_location=device)
        check_compatible(ckpt["config"], config_to_dict(cfg), ["method", "embedding_dim", "memory_size"])
    ...
    atomic_save({"model": model.state_dict(), ..., "config": config_to_dict(cfg)}, out / "last.pt")
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch

__all__ = ["atomic_save", "load_checkpoint", "resolve_resume", "check_compatible", "LAST_CHECKPOINT", "CheckpointError",
           "IncompatibleCheckpointError", "load_error_reason"]

PathLike = Union[str, "os.PathLike[str]"]

#: File name that ``resolve_resume("auto", output_dir)`` looks for.
LAST_CHECKPOINT = "last.pt"

_MISSING = object()


class CheckpointError(ValueError, RuntimeError):
    """A file that is not a readable checkpoint (corrupt, truncated, or not one of ours).

    A ``ValueError`` (bad input: the trainers exit with status 2) and, for older callers, a
    ``RuntimeError``.
    """


class IncompatibleCheckpointError(ValueError):
    """A readable checkpoint of another configuration (:func:`check_compatible`); bad input, exit status 2."""


def load_error_reason(err: BaseException) -> str:
    """A short reason for a failed ``torch.load``: the first line of the message, trimmed.

    Args:
        err: The exception ``torch.load`` raised.

    Returns:
        ``"TypeName: first sentence"`` (at most 120 characters of message), or the type name alone.
    """
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    first = first.split(". ")[0].rstrip(".")
    if len(first) > 120:
        first = first[:117] + "..."
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _fsync_dir(directory: Path) -> None:
    """Best-effort fsync of a directory so that a rename survives a power loss (POSIX only)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: PathLike) -> Path:
    """Save ``obj`` with ``torch.save`` atomically.

    Writes to a temporary file in the destination directory, flushes and ``os.fsync``s it, then
    ``os.replace``s it onto ``path``. Parent directories are created. On any error the temporary file
    is removed and an existing ``path`` is left untouched.

    Args:
        obj: Anything ``torch.save`` accepts (typically a dict of state dicts).
        path: Destination file.

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkstemp: it creates the file with mode 0600, and the checkpoint should get the
    # usual permissions (0666 minus the umask) like any file the user writes.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def load_checkpoint(
    path: PathLike,
    map_location: Union[str, torch.device, None] = "cpu",
    weights_only: bool = True,
    kind: Optional[str] = None,
    required_keys: Iterable[str] = (),
) -> Any:
    """Load a checkpoint written by :func:`atomic_save`.

    Args:
        path: Checkpoint file.
        map_location: Passed to ``torch.load`` (``"cpu"`` by default, so that a GPU checkpoint loads
            anywhere; move modules afterwards).
        weights_only: Passed to ``torch.load``. ``True`` (the safe default) accepts tensors, state
            dicts and plain Python containers/scalars, which is what these utilities produce
            (including :func:`xbn_queue.training.rng.get_rng_state`). Pass ``False`` only for a file you
            trust that holds other Python objects.
        kind: The program whose checkpoint this should be (``"xbn-metric"``). When given, a file that
            cannot be loaded, is not a dict, or lacks ``required_keys`` raises :class:`CheckpointError`
            with the one-line message ``PATH is not a readable KIND checkpoint (reason)``.
        required_keys: Keys the loaded dict must have (checked only with ``kind``).

    Returns:
        The loaded object.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        CheckpointError: If the file cannot be loaded (the message names the file), or, with ``kind``,
            is not a dict with ``required_keys``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} not found")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as err:  # torch raises several types (UnpicklingError, RuntimeError, EOFError)
        if kind is not None:
            raise CheckpointError(f"{path} is not a readable {kind} checkpoint ({load_error_reason(err)})") from None
        hint = (
            " If it holds Python objects other than tensors and plain containers and you trust the file,"
            " load it with weights_only=False."
            if weights_only
            else ""
        )
        raise CheckpointError(f"cannot load checkpoint {str(path)!r}: {err}.{hint}") from err
    if kind is not None:
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path} is not a readable {kind} checkpoint (it holds a {type(obj).__name__}, not a dict)")
        missing = [k for k in required_keys if k not in obj]
        if missing:
            raise CheckpointError(f"{path} is not a readable {kind} checkpoint (missing: {', '.join(missing)})")
    return obj


def resolve_resume(resume: Union[PathLike, bool, None], output_dir: PathLike) -> Optional[Path]:
    """Resolve a ``--resume`` value to the checkpoint to continue from.

    Args:
        resume: ``""``, ``None`` or ``False``: start fresh. ``"auto"`` or ``True``:
            ``output_dir/last.pt`` if it exists, else start fresh. Any other value: a checkpoint file,
            or a directory containing ``last.pt``; it must exist. A relative path that does not exist
            from the working directory is looked up in ``output_dir``.
        output_dir: The run's output directory.

    Returns:
        The checkpoint path, or ``None`` for a fresh run.

    Raises:
        FileNotFoundError: If an explicit path (or a directory without ``last.pt``) does not exist.
    """
    if resume is None or resume is False:
        return None
    if resume is True:
        resume = "auto"
    text = os.fspath(resume)
    if text.strip() == "":
        return None
    if text.strip().lower() == "auto":
        candidate = Path(output_dir) / LAST_CHECKPOINT
        return candidate if candidate.is_file() else None
    path = Path(text).expanduser()
    if not path.exists() and not path.is_absolute() and (Path(output_dir) / path).exists():
        path = Path(output_dir) / path  # e.g. --resume epoch10.pt inside the run folder
    if path.is_dir():
        candidate = path / LAST_CHECKPOINT
        if not candidate.is_file():
            raise FileNotFoundError(f"--resume {text!r} is a directory without {LAST_CHECKPOINT}")
        return candidate
    if not path.is_file():
        raise FileNotFoundError(f"--resume {text!r}: checkpoint file not found")
    return path


def _fmt(value: Any) -> str:
    return "<missing>" if value is _MISSING else repr(value)


def check_compatible(
    saved_cfg: Mapping[str, Any],
    cfg: Mapping[str, Any],
    keys: Iterable[str],
    source: Optional[PathLike] = None,
) -> None:
    """Refuse to resume from a checkpoint whose configuration differs on ``keys``.

    Keys may be written with ``_`` or ``-``; both dicts are looked up by field name (``_``). A key
    absent from one side counts as a difference (shown as ``<missing>``).

    Args:
        saved_cfg: The configuration stored in the checkpoint (``config_to_dict`` output).
        cfg: The current configuration as a dict.
        keys: The keys that must agree (e.g. ``["method", "embedding_dim", "memory_size"]``).
        source: Optional checkpoint path, named in the message.

    Raises:
        IncompatibleCheckpointError: A ``ValueError`` listing every differing key, e.g.
            ``checkpoint 'run/last.pt' is incompatible with the current configuration; differs:
            memory_size: saved 1024, now 2048; method: saved 'xbm', now 'xbn'``.
    """
    diffs = []
    for key in keys:
        name = key.replace("-", "_")
        old = saved_cfg.get(name, saved_cfg.get(key, _MISSING))
        new = cfg.get(name, cfg.get(key, _MISSING))
        # bool is an int subclass: True == 1, but a flag and a count are not the same setting.
        if old != new or isinstance(old, bool) != isinstance(new, bool):
            diffs.append(f"{name}: saved {_fmt(old)}, now {_fmt(new)}")
    if diffs:
        where = f" {str(source)!r}" if source is not None else ""
        raise IncompatibleCheckpointError(
            f"checkpoint{where} is incompatible with the current configuration; differs: " + "; ".join(diffs)
        )
