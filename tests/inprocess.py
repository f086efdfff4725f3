"""A trainer's command line run in the test's own process, as its console script would run it.

``run_inprocess("metric", argv)`` calls ``metric.cli.main(argv)`` with ``sys.argv`` set as the console script
sets it, and returns a :class:`subprocess.CompletedProcess` (exit status, stdout, stderr) like
``subprocess.run([sys.executable, "-m", "metric", *argv], capture_output=True, text=True)`` would, in a
fraction of the time (no fresh interpreter importing torch). What a fresh process would show is kept:

* the exit status is ``main``'s return value, or ``SystemExit``'s code (argparse's ``--help`` and usage
  errors); an uncaught exception prints its traceback to stderr and gives status 1, as Python does;
* warnings are printed to stderr under Python's default filters for a script (pytest would otherwise
  record them out of sight), so a "one line on stderr" check also counts a stray warning;
* argparse wraps its help at 80 columns, as with stdout not a terminal.

The process-wide state a command may set before it refuses its input (the number of torch threads, the
torch / numpy / Python random states, ``sys.argv``) is put back afterwards.

Use it wherever the contract is the argument parsing, the exit status and the one-line error; keep a real
subprocess only where the contract needs one (signals, exit codes 128+N, DDP, locks between processes,
``python -m`` itself).
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import sys
import traceback
import warnings
from subprocess import CompletedProcess
from typing import Sequence

import numpy as np
import torch


def _main(module: str):
    if module == "metric":
        from metric.cli import main
    elif module == "selfsup":
        from selfsup.cli import main
    else:
        raise ValueError(f"unknown trainer {module!r}")
    return main


def run_inprocess(module: str, argv: Sequence[str]) -> CompletedProcess:
    """``python -m MODULE ARGV`` in this process: ``CompletedProcess(returncode, stdout, stderr)``."""
    main = _main(module)
    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_columns = sys.argv, os.environ.get("COLUMNS")
    threads = torch.get_num_threads()
    rng = (torch.random.get_rng_state(), np.random.get_state(), random.getstate())
    sys.argv = [f"xbn-{module}", *argv]
    os.environ["COLUMNS"] = "80"
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                warnings.catch_warnings(record=True) as caught:
            warnings.resetwarnings()  # Python's default filters for a script, not pytest's
            warnings.simplefilter("default")
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            try:
                code = main(list(argv))
            except SystemExit as e:  # argparse: --help, usage errors
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:  # what Python prints for an uncaught exception
                traceback.print_exc()
                code = 1
        for w in caught:
            err.write(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line))
    finally:
        sys.argv = saved_argv
        if saved_columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = saved_columns
        torch.set_num_threads(threads)
        torch.random.set_rng_state(rng[0])
        np.random.set_state(rng[1])
        random.setstate(rng[2])
    return CompletedProcess([f"xbn-{module}", *argv], code, out.getvalue(), err.getvalue())
