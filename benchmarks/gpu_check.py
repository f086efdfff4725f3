"""The GPU acceptance check: CUDA tests, the four benchmarks and both trainers, against the GPU targets.

On a machine with one CUDA GPU, in at most ``--budget-s`` seconds (8 minutes by default), this runs:

1. ``cuda_tests``: the CUDA tests of ``tests/xbn_queue`` (``pytest -k "cuda or graph"``, plus the
   inductor-compiled bookkeeping test); a test skipped for want of CUDA counts as a failure on CUDA.
2. ``queue_overhead``: the PML loss step of ``AdaptiveCrossBatchMemory`` (xbn, axbn) against PML's
   ``CrossBatchMemory`` at 4,096 / 30,000 / 100,000 / 200,000 rows, with the queue's bookkeeping
   compiled (the CUDA default) and eager. Target: ratio <= 1.10 at every size (compiled).
3. ``lightly_bank``: ``AdaptiveMemoryBank`` against lightly's bank at (65,536, 128). Target <= 1.5x.
4. ``moco_pipeline``: the MoCo CIFAR-10 epoch with the on-device augmentation against the
   compute-only time, on the real CIFAR-10 JPEGs. Target <= 1.3x.
5. ``recall_eval``: Recall@K + MAP@R at SOP scale (60,502 x 512) on the GPU. Target <= 2 s.
6. ``metric_1epoch``: ``python -m metric`` for one epoch: resnet18, no pretrained weights, AMP, the
   CIFAR-10 JPEG train/test folders as a ``--dataset folder`` dataset, XBN.
7. ``selfsup_1epoch``: ``python -m selfsup train`` for one epoch on the same images, ``--adaptation axbn``.

It writes one JSON (``--json``) and one Markdown report (``--markdown``), prints the Markdown, and
exits 1 with a ``GPU CHECK FAILED`` line on stderr naming every failed step or missed target (exit
2 on bad arguments). ``--device cpu --quick`` is a dry run with tiny sizes that checks that every
step runs (targets are then not judged); it runs in well under a minute on a CPU.

    python benchmarks/gpu_check.py --data ../shared/data/cifar10-jpeg.tar.gz \\
        --json gpu_check.json --markdown gpu_check.md
    python benchmarks/gpu_check.py --device cpu --quick --data ../shared/data/cifar10-jpeg.tar.gz \\
        --json /tmp/g.json --markdown /tmp/g.md

``--data`` is the CIFAR-10 JPEG archive (extracted into ``--work-dir``; with ``--quick`` only a few
images per class) or a folder holding ``train/<class>/*.jpg`` and ``test/<class>/*.jpg``. Without
it (or when it does not exist) the data-dependent steps fail, or with ``--quick`` are skipped.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
for p in (str(ROOT), str(BENCH)):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

#: Performance targets on the GPU (see BENCHMARKS.md).
TARGETS = {
    "queue_overhead": 1.10,  # AdaptiveCrossBatchMemory step / PML CrossBatchMemory step, every size
    "lightly_bank": 1.5,  # AdaptiveMemoryBank forward / lightly MemoryBankModule forward
    "moco_pipeline": 1.3,  # epoch with on-device augmentation / compute-only
    "recall_eval": 2.0,  # seconds for Recall@K + MAP@R at SOP scale
}


class Step:
    """One step's record: status ``ok`` / ``failed`` / ``skipped``, seconds, results, target verdict."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.status = "skipped"
        self.seconds = 0.0
        self.summary = ""
        self.results: Dict[str, Any] = {}
        self.target: Optional[str] = None  # e.g. "<= 1.10x"
        self.target_met: Optional[bool] = None  # None: not judged
        self.error = ""

    def as_dict(self) -> Dict[str, Any]:
        return {k: v for k, v in vars(self).items()}


# ---------------------------------------------------------------------------------------------- data
def prepare_data(data: Optional[str], work: Path, quick: bool, per_class: int) -> Optional[Path]:
    """A folder with ``train/<class>/`` and ``test/<class>/``: ``data`` itself, or the archive extracted into ``work``.

    With ``quick`` only the first ``per_class`` images of each class and split are extracted.
    """
    if not data:
        return None
    src = Path(data).expanduser()
    if src.is_dir():
        root = src / "cifar10" if (src / "cifar10" / "train").is_dir() else src
        if not (root / "train").is_dir():
            raise ValueError(f"--data {data}: no train/ folder inside")
        return root
    if not src.is_file():
        return None
    dest = work / ("cifar10-quick" if quick else "cifar10")
    if (dest / "train").is_dir() and (dest / "test").is_dir():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    counts: Dict[str, int] = {}
    with tarfile.open(src, "r:*") as tar:
        members = []
        for m in tar:
            parts = Path(m.name).parts
            if not m.isfile() or len(parts) < 3 or parts[-3] not in ("train", "test") or not parts[-1].endswith(".jpg"):
                continue
            key = f"{parts[-3]}/{parts[-2]}"
            if quick and counts.get(key, 0) >= per_class:
                continue
            counts[key] = counts.get(key, 0) + 1
            members.append(m)
            out = dest / parts[-3] / parts[-2] / parts[-1]
            out.parent.mkdir(parents=True, exist_ok=True)
            f = tar.extractfile(m)
            if f is not None:
                out.write_bytes(f.read())
    if not counts:
        raise ValueError(f"--data {data}: no train/<class>/*.jpg or test/<class>/*.jpg inside the archive")
    return dest


# ---------------------------------------------------------------------------------------------- steps
def run_cmd(cmd: List[str], log: Path, timeout: float) -> str:
    """Run a command (from the repository root), tee its output to ``log``; raise on a non-zero exit."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(timeout, 1), env=env)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or "") + (e.stderr or "") if isinstance(e.stdout, str) else ""
        log.write_text(out)
        raise RuntimeError(f"timed out after {time.perf_counter() - t0:.0f} s: {' '.join(cmd)}") from None
    out = proc.stdout + proc.stderr
    log.write_text(f"$ {' '.join(cmd)}\n{out}")
    if proc.returncode != 0:
        tail = "\n".join(out.strip().splitlines()[-15:])
        raise RuntimeError(f"exit {proc.returncode}: {' '.join(cmd)}\n{tail}")
    return out


def step_cuda_tests(args, st: Step, work: Path) -> None:
    if args.quick:  # the dry run checks the mechanism on one file (its CUDA tests skip on a CPU)
        cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
               "tests/xbn_queue/test_host_sync.py", "-k", "cuda_graph or compile_switch"]
    else:
        cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/xbn_queue",
               "-k", "cuda or CUDA or graph or inductor"]
    out = run_cmd(cmd, work / "cuda_tests.log", args.remaining())
    last = [ln for ln in out.strip().splitlines() if ln.strip()][-1]
    st.results["pytest"] = last
    skipped_for_cuda = [ln for ln in out.splitlines() if "SKIPPED" in ln and "CUDA" in ln]
    st.results["skipped_for_want_of_cuda"] = len(skipped_for_cuda)
    st.summary = last
    if args.device == "cuda" and skipped_for_cuda:
        raise RuntimeError(f"{len(skipped_for_cuda)} CUDA test(s) skipped on a CUDA machine: {skipped_for_cuda[0]}")


def step_queue_overhead(args, st: Step, work: Path) -> None:
    import queue_overhead

    if args.quick:
        base = ["--sizes", "256", "--dim", "32", "--batch", "16", "--classes", "20", "--repeats", "2",
                "--warmup", "1", "--bf16-steps", "0"]
        modes = ["off"]  # compiling on a CPU takes about a minute: the dry run checks the eager path
    else:
        base = ["--sizes", "4096,30000,100000,200000", "--repeats", "30", "--warmup", "10", "--bf16-steps", "0"]
        modes = ["on", "off"]
    rows = []
    for mode in modes:
        payload = queue_overhead.main(base + ["--device", args.device, "--compile", mode,
                                              "--json", str(work / f"queue_overhead_{mode}.json")])
        rows += payload["rows"]
    st.results["rows"] = [{k: r[k] for k in ("memory_size", "adaptation", "compile", "ms", "pml_ms", "ratio")} for r in rows]
    judged = [r for r in rows if r["compile"] == modes[0]]
    worst = max(judged, key=lambda r: r["ratio"])
    st.summary = "; ".join(f"{r['compile']} {r['adaptation']}@{r['memory_size']}: {r['ratio']:.3f}x" for r in rows)
    st.target = f"<= {TARGETS['queue_overhead']:.2f}x at every size ({modes[0]})"
    st.results["worst"] = {k: worst[k] for k in ("memory_size", "adaptation", "ratio")}
    st.target_met = all(r["ratio"] <= TARGETS["queue_overhead"] for r in judged)


def step_lightly_bank(args, st: Step, work: Path) -> None:
    import lightly_bank

    if args.quick:
        base = ["--sizes", "512", "--dim", "16", "--batch", "32", "--repeats", "2", "--warmup", "1"]
    else:
        base = ["--repeats", "200", "--warmup", "20"]
    payload = lightly_bank.main(base + ["--device", args.device, "--adaptations", "xbn,axbn",
                                        "--json", str(work / "lightly_bank.json")])
    rows = payload["rows"]
    st.results["rows"] = [{k: r[k] for k in ("memory_size", "adaptation", "ms", "lightly_ms", "ratio")} for r in rows]
    st.summary = "; ".join(f"{r['adaptation']}: {r['ratio']:.3f}x ({r['ms']:.3f} vs {r['lightly_ms']:.3f} ms)" for r in rows)
    st.target = f"<= {TARGETS['lightly_bank']:.1f}x"
    st.target_met = all(r["ratio"] <= TARGETS["lightly_bank"] for r in rows)


def step_moco_pipeline(args, st: Step, work: Path) -> None:
    import moco_pipeline

    if args.quick:
        base = ["--batch-size", "8", "--steps", "2", "--width", "4", "--workers", "0", "--queue-size", "16"]
    else:
        base = ["--batch-size", "256", "--steps", "40", "--workers", str(min(15, os.cpu_count() or 1))]
    out = moco_pipeline.main(base + ["--device", args.device, "--data-root", str(args.data_root),
                                     "--json", str(work / "moco_pipeline.json")])
    res = out["results"]
    st.results = {k: round(v, 4) for k, v in res.items()}
    st.summary = (f"epoch/compute {res['tensor_epoch_over_compute']:.2f}x (tensor pipeline), "
                  f"{res['pil_epoch_over_compute']:.2f}x (PIL); step {res['step_images_per_s']:.0f} img/s")
    st.target = f"<= {TARGETS['moco_pipeline']:.1f}x (tensor pipeline)"
    st.target_met = res["tensor_epoch_over_compute"] <= TARGETS["moco_pipeline"]


def step_recall_eval(args, st: Step, work: Path) -> None:
    import recall_eval

    base = ["--n", "3000", "--classes", "600"] if args.quick else []
    row = recall_eval.main(base + ["--device", args.device, "--json", str(work / "recall_eval.json")])
    st.results = {k: row[k] for k in row if k.startswith(("recall", "map", "seconds", "peak", "n"))}
    st.summary = f"{row['seconds']:.2f} s for n={row['n']} (peak extra {row['peak_extra_mb']} MB)"
    st.target = f"<= {TARGETS['recall_eval']:.0f} s at SOP scale"
    st.target_met = row["seconds"] <= TARGETS["recall_eval"]


def _last_metrics(run_dir: Path) -> Dict[str, Any]:
    log = run_dir / "metrics.jsonl"
    if not log.is_file():
        return {}
    lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
    return json.loads(lines[-1]) if lines else {}


def step_metric(args, st: Step, work: Path) -> None:
    out_dir = Path(tempfile.mkdtemp(prefix="metric_", dir=work)) / "run"  # fresh, never existing
    cmd = [sys.executable, "-m", "metric", "--dataset", "folder", "--data-root", str(args.data_root),
           "--backbone", "resnet18", "--no-pretrained", "--amp", "--method", "xbn", "--epochs", "1",
           "--warmup-epochs", "0", "--device", args.device, "--output-dir", str(out_dir), "--no-progress"]
    if args.quick:
        cmd += ["--image-size", "32", "--batch-size", "8", "--max-steps", "2", "--workers", "0",
                "--memory-size", "32", "--recall-ks", "1", "2"]
    else:
        cmd += ["--image-size", str(args.metric_image_size), "--workers", str(min(15, os.cpu_count() or 1))]
    run_cmd(cmd, work / "metric_1epoch.log", args.remaining())
    st.results = _last_metrics(out_dir)
    keys = [k for k in st.results if "recall" in k.lower() or "map" in k.lower()]
    st.summary = ", ".join(f"{k} {st.results[k]:.4g}" for k in keys[:4] if isinstance(st.results[k], (int, float))) or "ran"


def step_selfsup(args, st: Step, work: Path) -> None:
    out_dir = Path(tempfile.mkdtemp(prefix="selfsup_", dir=work)) / "run"
    cmd = [sys.executable, "-m", "selfsup", "train", "--dataset", "folder", "--data-root", str(args.data_root),
           "--adaptation", "axbn", "--epochs", "1", "--amp", "--device", args.device,
           "--output-dir", str(out_dir), "--no-progress"]
    if args.quick:
        cmd += ["--batch-size", "8", "--width", "4", "--queue-size", "32", "--max-steps", "2", "--workers", "0",
                "--knn-k", "5", "--train-subset", "40", "--test-subset", "20"]
    else:
        cmd += ["--gpu-augment", "--workers", str(min(15, os.cpu_count() or 1))]
    run_cmd(cmd, work / "selfsup_1epoch.log", args.remaining())
    st.results = _last_metrics(out_dir)
    keys = [k for k in st.results if "knn" in k.lower() or "loss" in k.lower()]
    st.summary = ", ".join(f"{k} {st.results[k]:.4g}" for k in keys[:3] if isinstance(st.results[k], (int, float))) or "ran"


STEPS: List[tuple] = [
    ("cuda_tests", step_cuda_tests, False),
    ("queue_overhead", step_queue_overhead, False),
    ("lightly_bank", step_lightly_bank, False),
    ("moco_pipeline", step_moco_pipeline, True),
    ("recall_eval", step_recall_eval, False),
    ("metric_1epoch", step_metric, True),
    ("selfsup_1epoch", step_selfsup, True),
]


# ---------------------------------------------------------------------------------------------- report
def markdown(report: Dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"# GPU acceptance run ({'dry run, ' if report['quick'] else ''}{m['device_name']})",
        "",
        f"{m['date_utc']}, torch {m['torch']}, Python {m['python']}, {m['cpus']} CPUs; "
        f"total {report['seconds']:.0f} s of a {report['budget_s']:.0f} s budget. "
        f"Verdict: **{'PASS' if report['passed'] else 'FAIL'}**.",
        "",
        "| step | status | seconds | result | target | met |",
        "|---|---|---:|---|---|---|",
    ]
    for s in report["steps"]:
        met = {True: "yes", False: "**no**", None: "-"}[s["target_met"]]
        result = s["summary"] if s["status"] != "failed" else f"error: {s['error'].splitlines()[0]}"
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {result} | {s['target'] or '-'} | {met} |")
    if report["failures"]:
        lines += ["", "Failures:", ""] + [f"- {f}" for f in report["failures"]]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that every step runs, targets not judged")
    p.add_argument("--data", default="", help="CIFAR-10 JPEG archive (.tar.gz) or a folder with train/ and test/")
    p.add_argument("--json", required=True, metavar="PATH", help="write the JSON report here")
    p.add_argument("--markdown", required=True, metavar="PATH", help="write the Markdown report here")
    p.add_argument("--work-dir", default="", help="where data is extracted and logs / runs go (default: a new temp folder)")
    p.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of the whole run (default 8 min)")
    p.add_argument("--metric-image-size", type=int, default=64, help="input size of the 1-epoch metric run (default 64)")
    p.add_argument("--steps", default="", help="comma-separated subset of steps to run (default: all)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda: no CUDA device is available (use --device cpu --quick for a dry run)",
              file=sys.stderr)
        return 2
    names = [n for n, _, _ in STEPS]
    chosen = [s for s in args.steps.split(",") if s] or names
    unknown = [s for s in chosen if s not in names]
    if unknown:
        print(f"gpu_check: --steps: unknown step(s) {', '.join(unknown)}; choose from {', '.join(names)}", file=sys.stderr)
        return 2
    for path in (args.json, args.markdown):
        parent = Path(path).expanduser().resolve().parent
        if not parent.is_dir():
            print(f"gpu_check: {path}: folder {parent} does not exist", file=sys.stderr)
            return 2
    if args.data and not Path(args.data).expanduser().exists():
        print(f"gpu_check: --data {args.data}: no such file or folder", file=sys.stderr)
        return 2
    work = Path(args.work_dir).expanduser() if args.work_dir else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    args.remaining = lambda: args.budget_s - (time.perf_counter() - t_start)

    steps: List[Step] = []
    failures: List[str] = []
    try:
        args.data_root = prepare_data(args.data, work, args.quick, per_class=4)
    except ValueError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    except (OSError, tarfile.TarError) as e:
        print(f"gpu_check: --data {args.data}: cannot read it ({e})", file=sys.stderr)
        return 2
    for name, fn, needs_data in STEPS:
        st = Step(name)
        steps.append(st)
        if name not in chosen:
            st.summary = "not selected (--steps)"
            continue
        if needs_data and args.data_root is None:
            if args.quick:
                st.summary = "skipped: no CIFAR-10 JPEG data (--data)"
                continue
            st.status, st.error = "failed", "no CIFAR-10 JPEG data: pass --data (archive or folder)"
            failures.append(f"{name}: {st.error}")
            continue
        if args.remaining() <= 0:
            st.status, st.error = "failed", f"not started: the {args.budget_s:.0f} s budget is spent"
            failures.append(f"{name}: {st.error}")
            continue
        print(f"== gpu_check: {name}", flush=True)
        t0 = time.perf_counter()
        try:
            fn(args, st, work)
            st.status = "ok"
        except Exception as e:  # every error is recorded, reported and fails the run
            st.status = "failed"
            st.error = f"{type(e).__name__}: {e}"
            (work / f"{name}.traceback.txt").write_text(traceback.format_exc())
            failures.append(f"{name}: {st.error.splitlines()[0]}")
        st.seconds = time.perf_counter() - t0
        if args.quick:
            st.target_met = None  # tiny sizes: the numbers mean nothing
        elif st.status == "ok" and st.target_met is False:
            failures.append(f"{name}: target {st.target} missed ({st.summary})")
    total = time.perf_counter() - t_start
    if total > args.budget_s:
        failures.append(f"the run took {total:.0f} s, over the {args.budget_s:.0f} s budget")
    report = {
        "check": "gpu_check",
        "quick": args.quick,
        "device": args.device,
        "machine": {
            "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device_name": torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU {platform.machine()}",
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "data": str(args.data_root) if args.data_root else None,
        "work_dir": str(work),
        "budget_s": args.budget_s,
        "seconds": total,
        "targets": TARGETS,
        "steps": [s.as_dict() for s in steps],
        "failures": failures,
        "passed": not failures,
    }
    Path(args.json).expanduser().write_text(json.dumps(report, indent=2, default=str) + "\n")
    md = markdown(report)
    Path(args.markdown).expanduser().write_text(md)
    print(md)
    if failures:
        print("GPU CHECK FAILED: " + " | ".join(failures), file=sys.stderr)
        return 1
    print(f"gpu_check passed ({total:.0f} s); logs in {work}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("gpu_check: interrupted", file=sys.stderr)
        sys.exit(130)
