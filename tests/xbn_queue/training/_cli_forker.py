"""Runs many trainer command lines, each in its own forked process, after importing everything once.

``python _cli_forker.py CASES.json RESULTS.json [--together]``: ``CASES.json`` is a list of ``[module, argv]``
(``module`` is ``metric`` or ``selfsup``). For each case a child process is forked; it sets
``sys.argv``, redirects its stdout and stderr to files, runs ``sys.exit(main(argv))`` exactly as the
console script does, and exits with that status (an uncaught exception prints its traceback and exits
1, as Python would). The parent records ``[returncode, stdout, stderr]`` per case. Importing torch and
the trainers once instead of once per case keeps a battery of dozens of command lines to seconds on a
small machine, while every case is still a separate process with its own exit status and streams.
With ``--together`` every case is forked at once and then waited for (processes racing for one folder).
"""

import json
import os
import sys
import tempfile
import traceback


def _child(module: str, argv: list, out_path: str, err_path: str) -> None:
    for fd, path in ((1, out_path), (2, err_path)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False)
    code = 1
    try:
        if module == "metric":
            from metric.cli import main
        else:
            from selfsup.cli import main
        sys.argv = [f"xbn-{module}", *argv]
        code = main(argv)
    except SystemExit as e:  # argparse: --help, usage errors
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # what Python would print for an uncaught exception
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    cases = json.load(open(sys.argv[1]))
    import metric.cli  # noqa: F401  (imports shared by every child)
    import metric.experiments.compare  # noqa: F401
    import selfsup.cli  # noqa: F401
    import selfsup.compare  # noqa: F401
    import metric.train  # noqa: F401
    import selfsup.train  # noqa: F401

    together = "--together" in sys.argv[3:]  # fork every case at once, then wait for all (a race)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = [(os.path.join(tmp, f"{i}.out"), os.path.join(tmp, f"{i}.err")) for i in range(len(cases))]
        pids, statuses = [], {}
        for i, (module, argv) in enumerate(cases):
            pid = os.fork()
            if pid == 0:
                _child(module, argv, *paths[i])
            pids.append(pid)
            if not together:
                statuses[pid] = os.waitpid(pid, 0)[1]
        for pid in pids:
            if pid not in statuses:
                statuses[pid] = os.waitpid(pid, 0)[1]
        for i, pid in enumerate(pids):
            results.append([os.waitstatus_to_exitcode(statuses[pid]), open(paths[i][0]).read(), open(paths[i][1]).read()])
    json.dump(results, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
