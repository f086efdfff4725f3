"""How both trainers behave as command-line programs: exit codes, one-line errors, valid ranges, run folders.

The contract (the same for ``xbn-metric`` and ``xbn-selfsup``, single runs and ``compare``):

- exit status ``0`` only when everything finished; ``2`` for bad input found before the run starts (one
  line ``PROG: error: ...`` naming the option or file, the value and what is expected; no traceback;
  nothing written); ``128 + N`` when signal ``N`` stopped the work after its checkpoint (130 for SIGINT,
  143 for SIGTERM), after printing the exact command that resumes it; ``1`` for a failure of the run
  itself (a non-finite loss, a full disk, an unreadable image met mid-run), also as one line, naming the
  run folder and ``--resume`` when the run had written it (:func:`mark_started`). An error the loop did
  not expect after the run started (a ``ValueError`` of a bug) is a traceback, never exit 2.
- every numeric option declares its valid range next to its field (``metadata={"range": at_least(1)}``,
  or a rule ``metadata={"check": fn}``); :func:`check_ranges` enforces it and ``--help`` shows a range;
- a run folder that holds a run is never written into without ``--resume`` or ``--overwrite``
  (:func:`check_output_dir`), and nothing is created until every check has passed
  (:func:`prepare_output_dir` is called last); without ``--output-dir`` every run gets a new folder
  (:func:`default_run_dir`).

Typical use in a trainer::

    check_ranges(cfg)                                           # UsageError naming the option
    check_output_dir(out, resume=bool(cfg.resume), overwrite=cfg.overwrite)
    data = load(...); check data; load and check the checkpoint  # all before writing
    prepare_output_dir(out, overwrite=cfg.overwrite and not resumed)
    save_config(cfg, out / "config.yaml"); ...

and in ``main``: ``return run_main(PROG, body, bad_input=(DataFormatError, ...))``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Optional, Union

__all__ = [
    "UsageError", "RunError", "Range", "at_least", "above", "between", "check_ranges", "range_of",
    "check_output_dir", "holds_run", "prepare_output_dir", "FolderLock", "LOCK_FILE", "default_run_dir", "choose_output_dir", "series_output_dir",
    "resume_command", "parse_choices",
    "check_memory_fits", "device_capacity", "format_bytes", "one_line", "run_main", "mark_started", "warn",
    "available_cores",
    "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "RUN_FILES",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

#: Files whose presence means "this folder holds a run" (and that ``--overwrite`` replaces).
RUN_FILES = ("config.yaml", "last.pt", "best.pt", "metrics.jsonl")
#: Further files a run writes; ``--overwrite`` removes them too so that nothing stale is left.
_RUN_EXTRA_FILES = ("recall_drift.png", "history.png", "wandb-run-id.txt", "compare.md", "compare.json", "compare.png")


class UsageError(ValueError):
    """Bad input (an option, a file, the data): exit status 2, one line, nothing written."""


class RunError(RuntimeError):
    """The run itself failed (not the input): exit status 1, one line."""


# ------------------------------------------------------------------------------------- ranges
@dataclasses.dataclass(frozen=True)
class Range:
    """A valid interval for a numeric option, declared next to its field.

    Args:
        lo: Lower bound (``None``: none).
        hi: Upper bound (``None``: none).
        lo_open: ``lo`` itself is excluded.
        hi_open: ``hi`` itself is excluded.
    """

    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return False
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            return False
        if self.hi is not None and (value > self.hi or (self.hi_open and value == self.hi)):
            return False
        return True

    def __str__(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return "any number"


def at_least(lo: float) -> Range:
    """``value >= lo``."""
    return Range(lo=lo)


def above(lo: float) -> Range:
    """``value > lo``."""
    return Range(lo=lo, lo_open=True)


def between(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Range:
    """``lo <= value <= hi`` (either end may be open)."""
    return Range(lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open)


def range_of(f: dataclasses.Field) -> Optional[Range]:
    """The :class:`Range` declared in a field's ``metadata["range"]``, or ``None``."""
    return (f.metadata or {}).get("range")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_ranges(cfg: Any) -> None:
    """Check every field of the dataclass ``cfg`` that declares ``metadata["range"]`` or ``metadata["check"]``.

    ``metadata["check"]`` is a rule that a range cannot say (``--memory-size``: a row count or a fraction):
    ``check(option, value)`` raises :class:`UsageError`. ``None`` (an option left to a per-dataset
    default) passes; a list is checked item by item.

    Raises:
        UsageError: ``--batch-size -4: expected an integer >= 2``.
    """
    for f in dataclasses.fields(cfg):
        rng, check = range_of(f), (f.metadata or {}).get("check")
        value = getattr(cfg, f.name)
        if value is None:
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if check is not None:
                check(_flag(f.name), v)
            if rng is not None and v not in rng:
                kind = "an integer" if isinstance(v, int) and not isinstance(v, bool) else "a number"
                raise UsageError(f"{_flag(f.name)} {v}: expected {kind} {rng}")


# -------------------------------------------------------------------------------- run folders
def holds_run(path: Union[str, os.PathLike]) -> bool:
    """True when ``path`` is a folder with any of :data:`RUN_FILES` in it."""
    p = Path(path)
    return p.is_dir() and any((p / name).exists() for name in RUN_FILES)


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_dir(path: Union[str, os.PathLike], resume: bool, overwrite: bool, option: str = "--output-dir",
                     holds: Optional[Callable[[Path], bool]] = None) -> None:
    """Refuse a run folder that cannot be used, without touching the disk.

    Args:
        path: The run folder (need not exist).
        resume: ``--resume`` was given (a folder holding a run is then expected).
        overwrite: ``--overwrite`` was given.
        option: The option named in messages.
        holds: Predicate "this folder holds earlier results" (default :func:`holds_run`).

    Raises:
        UsageError: the path is a file, lies under a file, is not writable, or holds a run and neither
            ``--resume`` nor ``--overwrite`` was given (or both were).
    """
    p = Path(path)
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other: continue the run, or replace it")
    if p.exists() and not p.is_dir():
        raise UsageError(f"{option} {p}: exists and is not a folder")
    base = _nearest_existing(p)
    if not base.is_dir():
        raise UsageError(f"{option} {p}: cannot create a folder there, {base} is a file")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {p}: {base} is not writable")
    if not resume and not overwrite and (holds or holds_run)(p):
        raise UsageError(f"{option} {p} already holds a run: continue it with --resume, "
                         "replace it with --overwrite, or choose another folder")


def prepare_output_dir(path: Union[str, os.PathLike], overwrite: bool = False,
                       extra: Iterable[str] = ()) -> Path:
    """Create the run folder; with ``overwrite``, first delete the files of the run it holds.

    Call it only after every check has passed. Only the files a run writes (:data:`RUN_FILES`, the
    plots, ``compare.*``, ``wandb-run-id.txt`` and ``extra`` names) are removed, never anything else
    a user keeps in the folder.

    Returns:
        The folder as a ``Path``.
    """
    p = Path(path)
    if overwrite and p.is_dir():
        for name in (*RUN_FILES, *_RUN_EXTRA_FILES, *extra):
            target = p / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
    p.mkdir(parents=True, exist_ok=True)
    return p


#: The lock file a run, a series or a store holds in its folder while it writes there.
LOCK_FILE = ".xbn-queue.lock"
#: File descriptors of the locks this process holds; a forked child (a DataLoader worker) closes its copies, so
#: that the lock ends with the process that took it, not with the last of its workers.
_HELD_LOCK_FDS: set = set()


def _close_inherited_locks() -> None:
    for fd in list(_HELD_LOCK_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCK_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


class FolderLock:
    """An exclusive lock on a folder that results are written into (a run, a ``compare`` / ``sweep``
    series, an embedding store), so that two processes never write into one folder at once.

    :meth:`acquire` creates the folder if needed and takes ``fcntl.flock`` on ``<folder>/.xbn-queue.lock``
    without waiting; the file then names the holder (what, pid, host, since when). :meth:`release`
    removes the file and drops the lock. The kernel drops a flock when its process dies, so a lock
    left by a crash (SIGKILL, power loss) is stale: the next run takes it (and rewrites the file); a
    forked child (a DataLoader worker) closes its copy, so it does not keep the lock alive. On a
    filesystem without flock the folder is used unlocked, with a warning.

    Args:
        path: The folder.
        option: The option that named it, for the message (``--output-dir``, ``--out``).
        what: What holds it, written into the file (``"an xbn-metric run"``).
        prog: The command, for the warning.
    """

    def __init__(self, path: Union[str, os.PathLike], option: str = "--output-dir", what: str = "a run",
                 prog: str = "xbn-queue") -> None:
        self.path, self.option, self.what, self.prog = Path(path), option, what, prog
        self.file = self.path / LOCK_FILE
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        """True between :meth:`acquire` and :meth:`release`."""
        return self._fd is not None

    def acquire(self) -> "FolderLock":
        """Take the lock (creating the folder if needed).

        Raises:
            UsageError: another live process holds it (one line naming the folder and the holder).
        """
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            warn(self.prog, f"{self.option} {self.path}: no file locking on this platform; the folder is not locked")
            return self
        import errno
        import socket

        self.path.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    warn(self.prog, f"{self.option} {self.path}: cannot lock it ({one_line(err)}); the folder is not locked")
                    return self
                holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                raise UsageError(f"{self.option} {self.path}: in use by {' '.join(holder.split())}; wait until it "
                                 "has finished, or choose another folder") from None
            try:  # the file locked must still be the one at the path (a holder that let go removes it)
                same = os.path.samestat(os.fstat(fd), os.stat(self.file))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:  # pragma: no cover - 100 holders in a row let go between open and flock
            raise RunError(f"{self.option} {self.path}: could not lock {self.file}")
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        os.ftruncate(fd, 0)
        os.write(fd, f"{self.what} (pid {os.getpid()} on {socket.gethostname()}, since {since})\n".encode())
        self._fd = fd
        _HELD_LOCK_FDS.add(fd)
        return self

    def release(self) -> None:
        """Remove the lock file and drop the lock (nothing when not held)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.file)  # while still locked: no other process can hold this file now
        except FileNotFoundError:
            pass
        _HELD_LOCK_FDS.discard(self._fd)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "FolderLock":
        return self if self.held else self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _launch_stamp() -> str:
    """``YYYYmmdd-HHMMSS`` of this launch; the same on every rank of one ``torchrun`` (its agent's start)."""
    t = time.time()
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        try:  # Linux: start time of the parent (the torchrun agent), identical on every rank
            ticks = int(Path(f"/proc/{os.getppid()}/stat").read_text().rsplit(")", 1)[1].split()[19])
            btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                         if line.startswith("btime"))
            t = btime + ticks / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError, StopIteration):
            pass
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(t))


def default_run_dir(base: Union[str, os.PathLike], *parts: str) -> Path:
    """A new folder name ``BASE/<parts>-<timestamp>`` (``-2``, ``-3``, ... if it exists already).

    Args:
        base: Parent folder (e.g. ``runs/metric``).
        parts: Name parts (e.g. the dataset and the method).
    """
    name = "-".join([*(p for p in parts if p), _launch_stamp()])
    path = Path(base) / name
    if int(os.environ.get("WORLD_SIZE", "1") or 1) == 1:  # ranks must agree: no existence probe under torchrun
        i = 2
        while path.exists():
            path, i = Path(base) / f"{name}-{i}", i + 1
    return path


def choose_output_dir(output_dir: Optional[str], resume: str, base: Union[str, os.PathLike], *parts: str) -> str:
    """The run folder: ``output_dir`` when given, else the folder of ``--resume PATH``, else a new
    :func:`default_run_dir`.

    Raises:
        UsageError: a bare ``--resume`` without ``--output-dir`` (a new folder has nothing to continue).
    """
    if output_dir:
        return str(output_dir)
    if resume and resume.strip().lower() != "auto":
        p = Path(resume)
        return str(p if p.is_dir() else p.parent)
    if resume:
        raise UsageError("--resume: give the run folder to continue with --output-dir DIR (or --resume DIR); "
                         "without --output-dir every run starts in a new folder")
    return str(default_run_dir(base, *parts))


def series_output_dir(output_dir: Optional[str], resume: bool, base: Union[str, os.PathLike], kind: str,
                      dataset: str) -> str:
    """The folder of a series (``compare``, ``sweep``): ``output_dir`` when given, else a new
    ``BASE/<kind>-<dataset>-<timestamp>``.

    Raises:
        UsageError: ``--resume`` without ``--output-dir`` (a new folder has nothing to finish).
    """
    if output_dir:
        return str(output_dir)
    if resume:
        raise UsageError(f"{kind} --resume: give the {kind} folder to finish with --output-dir DIR")
    return str(default_run_dir(base, kind, dataset))


def parse_choices(option: str, value: Union[str, Sequence[str]], choices: Sequence[str]) -> list[str]:
    """A comma-separated list (or a list) of names from ``choices``, each at most once, in the given order.

    Raises:
        UsageError: an empty list, an unknown name or a name listed twice, naming ``option``.
    """
    text = value if isinstance(value, str) else ",".join(value)
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in choices]
    if unknown or not names:
        raise UsageError(f"{option} {text}: unknown {', '.join(unknown) or '(empty)'}; expected a comma-separated "
                         f"list of {', '.join(choices)}")
    if len(set(names)) != len(names):
        raise UsageError(f"{option} {text}: a value is listed twice")
    return names


def _display_prog(prog: str, package: str) -> str:
    argv0 = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    if argv0 == "__main__.py" or argv0.endswith(".py") or argv0 in ("", "-c"):
        return f"python -m {package}"
    return prog


def resume_command(prog: str, package: str, argv: Sequence[str], output_dir: Union[str, os.PathLike]) -> str:
    """The exact command that continues an interrupted run or comparison.

    ``argv`` (the arguments as given, subcommand included) with ``--overwrite`` and any ``--resume``
    removed, ``--output-dir`` added when absent, and ``--resume`` appended.

    Args:
        prog: Console-script name (``xbn-metric``).
        package: Module name for ``python -m`` (``metric``).
        argv: The command-line arguments without the program.
        output_dir: The run (or comparison) folder.
    """
    args: list[str] = []
    it = iter(range(len(argv)))
    skip = False
    for i in it:
        a = argv[i]
        if skip:
            skip = False
            continue
        if a in ("--overwrite", "--no-overwrite") or a.startswith("--resume="):
            continue
        if a == "--resume":
            skip = i + 1 < len(argv) and not argv[i + 1].startswith("-")
            continue
        args.append(a)
    if not any(a == "--output-dir" or a.startswith("--output-dir=") for a in args):
        args += ["--output-dir", str(output_dir)]
    return shlex.join([*_display_prog(prog, package).split(), *args, "--resume"])


# -------------------------------------------------------------------------------------- cores
def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, else ``os.cpu_count()``), >= 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


# ------------------------------------------------------------------------------------- memory
def format_bytes(n: float) -> str:
    """``1234567`` -> ``'1.2 MB'`` (decimal units)."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} PB"  # pragma: no cover


def device_capacity(device: Any) -> Optional[int]:
    """Bytes of memory of ``device`` (``"cpu"``: physical RAM; CUDA: the GPU's total), ``None`` if unknown."""
    kind = str(getattr(device, "type", device))
    if kind.startswith("cuda"):
        import torch

        index = getattr(device, "index", None)
        return int(torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device()).total_memory)
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def check_memory_fits(option: str, value: Any, rows: int, dim: int, device: Any, bytes_per_value: int = 4,
                      fraction: float = 0.8) -> int:
    """Refuse a memory whose size cannot fit the device, before allocating it.

    The memory is ``rows x dim`` values plus two int64 per row (label and sample id).

    Args:
        option: Option named in the message (``--memory-size``).
        value: The value the user gave.
        rows: Rows of the memory.
        dim: Embedding size.
        device: Where it would live.
        bytes_per_value: 4 for float32.
        fraction: Largest share of the device's memory the memory may take.

    Returns:
        The memory's size in bytes.

    Raises:
        UsageError: naming the option, the value and both sizes.
    """
    need = int(rows) * (int(dim) * bytes_per_value + 16)
    cap = device_capacity(device)
    if cap is not None and need > fraction * cap:
        raise UsageError(f"{option} {value}: a memory of {rows:,} rows x {dim} needs {format_bytes(need)}, more "
                         f"than {fraction:.0%} of the {format_bytes(cap)} of the {getattr(device, 'type', device)} device")
    return need


def check_memory_holds_a_batch(option: str, value: Any, rows: int, batch_size: int, world_size: int) -> None:
    """Refuse a memory smaller than one global batch (each step would overwrite its own rows).

    Raises:
        UsageError: naming the option, its value, the rows and the global batch.
    """
    if rows < batch_size * world_size:
        raise UsageError(f"{option} {value}: {rows} rows, fewer than one global batch "
                         f"({batch_size} x {world_size} processes)")


def check_two_classes(labels: Sequence[Any], where: str, why: str) -> None:
    """Refuse a training split with fewer than two classes.

    Args:
        labels: the training labels.
        where: the options naming the data (``--dataset X --data-root Y``).
        why: what needs two classes (``"metric learning"``, ``"the k-NN monitor"``), and why.

    Raises:
        UsageError: ``"<where>: the training split has N class(es); <why> needs at least 2..."``.
    """
    n = len(set(int(y) for y in labels))
    if n < 2:
        raise UsageError(f"{where}: the training split has {n} class(es); {why}")


# -------------------------------------------------------------------------------------- main
def one_line(err: BaseException) -> str:
    """An exception's message on one line (``FileNotFoundError``'s ``[Errno 2]`` form kept short)."""
    if isinstance(err, OSError) and err.strerror and err.filename:
        text = f"{err.filename}: {err.strerror}"
    else:
        text = str(err.args[0]) if len(err.args) == 1 and isinstance(err, KeyError) else str(err)
    return " ".join(text.split()) or type(err).__name__


def warn(prog: str, message: str) -> None:
    """Print ``[PROG] warning: message`` to stderr (one line)."""
    print(f"[{prog}] warning: {' '.join(message.split())}", file=sys.stderr, flush=True)


def _loaded_types(specs: Sequence[Union[type, str]]) -> tuple[type, ...]:
    """Exception types from ``specs``; a ``"module:Name"`` string is resolved only when its module is
    already imported (an exception of a module never imported cannot have been raised)."""
    out: list[type] = []
    for spec in specs:
        if isinstance(spec, str):
            module, _, name = spec.partition(":")
            if module in sys.modules and hasattr(sys.modules[module], name):
                out.append(getattr(sys.modules[module], name))
        else:
            out.append(spec)
    return tuple(out)


def mark_started(err: BaseException, where: str) -> None:
    """Record that ``err`` was raised after the run wrote its folder (the loop calls it, then re-raises).

    :func:`run_main` then never reports ``err`` as bad input (exit 2, "nothing written"): an expected
    failure (an ``OSError``, a ``UsageError`` or a declared input error met mid-run) is one line with
    ``where`` appended (exit 1), anything else a traceback, followed by ``where`` (a note).

    Args:
        err: The exception.
        where: What was written and how to continue, e.g. ``"the run in runs/x stopped at step 12;
            runs/x/last.pt holds step 10: continue it with --resume once fixed"``.
    """
    err.run_started = where  # type: ignore[attr-defined]
    if hasattr(err, "add_note"):  # Python >= 3.11: printed under the traceback
        err.add_note(where)


def run_main(prog: str, body: Callable[[], int], bad_input: Sequence[Union[type, str]] = (),
             failures: Sequence[Union[type, str]] = ()) -> int:
    """Run a command's ``body`` and turn its errors into the exit status contract.

    Args:
        prog: Program name for messages (``xbn-metric``).
        body: Does the work; returns the exit status (0, or 128 + N after a signal).
        bad_input: Further exception types that mean bad input (exit 2), besides :class:`UsageError`,
            ``ValueError`` and ``FileNotFoundError``; ``"module:Name"`` strings name types without
            importing their (possibly heavy) module, so that a refused option returns fast.
        failures: Exception types (or ``"module:Name"``) that mean the run failed (exit 1), besides
            :class:`RunError`, ``OSError`` and ``ImportError``.

    An exception :func:`mark_started` marked (raised after the run wrote its folder) is never exit 2:
    a failure, a :class:`UsageError`, ``FileNotFoundError`` or a ``bad_input`` type is one line naming
    the folder and ``--resume`` (exit 1); anything else (a plain ``ValueError`` of a bug) is re-raised,
    a traceback.

    Returns:
        The exit status.
    """
    try:
        return body()
    except KeyboardInterrupt:  # a second Ctrl-C: stop now, without the checkpoint
        print(f"{prog}: interrupted (second Ctrl-C): stopped without a final checkpoint", file=sys.stderr)
        return 130
    except Exception as err:
        declared = (UsageError, FileNotFoundError, NotADirectoryError, IsADirectoryError, *_loaded_types(bad_input))
        failed = (RunError, OSError, ImportError, *_loaded_types(failures))
        started: Optional[str] = getattr(err, "run_started", None)
        if started is None and isinstance(err, (ValueError, *declared)):
            print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
            return EXIT_USAGE
        if isinstance(err, failed) or (started is not None and isinstance(err, declared)):
            print(f"{prog}: error: {one_line(err)}" + (f"; {started}" if started else ""), file=sys.stderr)
            return EXIT_FAILED
        raise
