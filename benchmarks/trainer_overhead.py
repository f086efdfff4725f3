"""What the metric trainer costs over a plain PyTorch loop of the same experiment, on two jobs.

Every run is its own process, pinned to one core with one torch thread, in the same invocation,
alternating (the order rotated each round) so that a slow phase of a shared machine hits all of them.

**embedded**: 2 epochs of XBN on the embedded Omniglot split (1,760 training images, 960 retrieved once):

* **trainer**: ``python -m metric --dataset omniglot --method xbn --epochs 2 --eval-every 2``, everything
  else at its defaults (drift probe, staleness, checkpoints, ``metrics.jsonl``, plot);
* **plain**: the same experiment written plainly below (:func:`plain_loop`): the same Conv-4, SupCon
  loss with ``PairMarginMiner(0.2, 0.8)``, PML's ``MPerClassSampler`` (4 per class, batch 16), an XBN
  memory of half the training set, AdamW 1e-3, the mild augmentation per image with torchvision's
  ``transforms.v2`` on uint8 tensors held in memory, one leave-one-out Recall@1 at the end;
* **plain, batched**: the plain loop with the trainer's batched augmentation instead (so the ratio
  shows the trainer's own bookkeeping alone).

**folder**: the same experiment on an image folder: the 2,720 embedded images written once (before any
timing) as 105-px grayscale PNGs, ``train/<alphabet>__<character>/NN.png`` for the training alphabets and
``test/...`` for the retrieved ones (:func:`write_omniglot_folder`), so the split and the order are those of
the embedded job:

* **trainer**: ``python -m metric --dataset folder --data-root DIR`` with the options that
  ``--dataset omniglot`` defaults to (:data:`OMNIGLOT_OPTIONS`; the tensor cache decodes the PNGs once,
  in memory); it must print the embedded trainer's Recall@1 digit for digit (the same decoded tensors);
* **plain** and **plain, batched**: the plain loop reading the PNGs with PIL into tensors first.

It prints the wall time and the CPU time (user + system, which waiting for a core on a shared machine
does not inflate) of each process, start to exit, imports included; per job the best of the rounds and
the trainer / plain ratios (the median of the ratios paired by round); and Recall@1 of every run as a
sanity check. Usage::

    python benchmarks/trainer_overhead.py [--jobs embedded,folder] [--repeats 3] [--epochs 2] [--with-pil] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: What ``--dataset omniglot`` defaults to, spelled out for ``--dataset folder`` (metric/config.py).
OMNIGLOT_OPTIONS = ["--backbone", "conv4", "--no-pretrained", "--image-size", "32", "--batch-size", "16",
                    "--m-per-class", "4", "--memory-size", "0.5", "--augment", "mild", "--crop-min-scale", "0.6",
                    "--hflip", "0", "--re-prob", "0", "--workers", "0", "--drift-every", "50", "--kalman-gain-every", "10",
                    "--recall-ks", "1", "2", "4", "8"]


def write_omniglot_folder(root: Path) -> int:
    """The embedded Omniglot images as PNGs in ``train/`` and ``test/`` class folders; returns the file count."""
    from PIL import Image

    from metric.data import OMNIGLOT_EMBEDDED, OMNIGLOT_EMBEDDED_TRAIN, _omniglot_zip

    n = 0
    for alphabet, chars in _omniglot_zip(OMNIGLOT_EMBEDDED).items():
        part = "train" if alphabet in OMNIGLOT_EMBEDDED_TRAIN else "test"
        for char, images in chars.items():
            for k, img in enumerate(images):  # (105, 105) uint8, strokes bright on black as the loader gives them
                path = root / part / f"{alphabet}__{char}" / f"{k:02d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(path)
                n += 1
    return n


def _read_folder(root: Path):
    """``(train images, train labels, test images, test labels)`` of a ``train/`` / ``test/`` folder, read with PIL."""
    import numpy as np
    from PIL import Image

    names = {}
    out = []
    for part in ("train", "test"):
        images, labels = [], []
        for cls in sorted(p for p in (root / part).iterdir() if p.is_dir()):
            for f in sorted(cls.glob("*.png")):
                images.append(np.asarray(Image.open(f).convert("L")))
                labels.append(names.setdefault(cls.name, len(names)))
        out += [images, np.asarray(labels)]
    return tuple(out)


def plain_loop(epochs: int, seed: int = 0, batched: bool = False, folder: Path = None) -> float:
    """The experiment as a user would write it; returns leave-one-out Recall@1 on the retrieval alphabets.

    ``batched``: augment each batch with the trainer's batched augmentation instead of per image, so
    that the ratio shows the trainer's bookkeeping alone. ``folder``: read the images from the PNGs of
    :func:`write_omniglot_folder` (with PIL, into tensors) instead of the embedded zip.
    """
    import torch
    import torch.nn.functional as F
    from pytorch_metric_learning import losses, miners, samplers
    from torchvision.transforms import v2

    from metric.data import load_omniglot
    from xbn_queue.pml import AdaptiveCrossBatchMemory
    from xbn_queue.training.backbones import Conv4

    torch.manual_seed(seed)
    if folder is None:
        data = load_omniglot()
        train_items, train_labels, test_items, test_labels = data.train.items, data.train.labels, data.query.items, data.query.labels
    else:
        train_items, train_labels, test_items, test_labels = _read_folder(folder)

    def as_tensor(items, size):
        x = torch.from_numpy(__import__("numpy").stack(items)).unsqueeze(1).float()  # (N, 1, 105, 105)
        return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True).round().clamp(0, 255).to(torch.uint8)

    train_x, train_y = as_tensor(train_items, 32), torch.as_tensor(train_labels)
    test_x = as_tensor(test_items, 36)[..., 2:34, 2:34]  # resize 36 + centre crop 32, like the evaluation transform
    test_y = torch.as_tensor(test_labels)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    augment = v2.Compose([v2.RandomResizedCrop(32, scale=(0.6, 1.0), antialias=True),
                          v2.RandomAffine(degrees=10, translate=(0.05, 0.05))])

    if batched:
        from metric.fastdata import TensorMildAugment

        batch_augment = TensorMildAugment(32, 0.6)
    model = torch.nn.Sequential(Conv4(64, 32))
    loss_fn = losses.SupConLoss()
    miner = miners.PairMarginMiner(pos_margin=0.2, neg_margin=0.8)
    memory = AdaptiveCrossBatchMemory(loss_fn, embedding_size=256, memory_size=len(train_x) // 2, miner=miner,
                                      adaptation="xbn")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    sampler = samplers.MPerClassSampler(train_y, m=4, batch_size=16, length_before_new_iter=len(train_y))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(train_x, train_y), batch_size=16,
                                         sampler=sampler, drop_last=True)
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            if batched:
                x = batch_augment(x)  # (B, 3, 32, 32) normalised
            else:
                x = (torch.stack([augment(img) for img in x]).expand(-1, 3, -1, -1).float() / 255.0 - mean) / std
            emb = F.normalize(model(x), dim=1)
            loss = memory(emb, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        z = F.normalize(model((test_x.expand(-1, 3, -1, -1).float() / 255.0 - mean) / std), dim=1)
    sim = z @ z.T
    sim.fill_diagonal_(-2.0)
    return float((test_y[sim.argmax(dim=1)] == test_y).float().mean())


def _pinned_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("XBN_QUEUE_COMPILE", None)
    return env


def _pin() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})


def _timed(cmd: list) -> tuple:
    """Run ``cmd`` pinned to one core: ``(wall seconds, CPU seconds of the process (user + system), stdout)``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=_pinned_env(), capture_output=True, text=True, preexec_fn=_pin)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return wall, cpu, proc.stdout


def run_trainer(epochs: int, out: Path, folder: Path = None, extra: tuple = ()) -> dict:
    data = ["--dataset", "omniglot"] if folder is None else ["--dataset", "folder", "--data-root", str(folder), *OMNIGLOT_OPTIONS]
    data += list(extra)
    cmd = [sys.executable, "-m", "metric", *data, "--method", "xbn", "--epochs", str(epochs),
           "--eval-every", str(epochs), "--threads", "1", "--output-dir", str(out), "--overwrite", "--no-progress"]
    wall, cpu, _ = _timed(cmd)
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()][-1]
    return {"wall_s": wall, "cpu_s": cpu, "r1": float(last["recall@1"])}


def run_plain(epochs: int, batched: bool, folder: Path = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--plain-child", "--epochs", str(epochs)]
    cmd += (["--batched"] if batched else []) + (["--folder", str(folder)] if folder is not None else [])
    wall, cpu, out = _timed(cmd)
    return {"wall_s": wall, "cpu_s": cpu, "r1": float(out.strip().splitlines()[-1])}


def _machine() -> dict:
    """Where and when: CPU model, cores, torch, UTC time, load average (recorded with the results)."""
    import platform

    import torch

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "load_avg": list(os.getloadavg())}


def _report(job: str, runs: dict, epochs: int, repeats: int) -> dict:
    """Print and return a job's times: best of the rounds, and the median of the ratios paired by round."""
    import statistics

    best = {k: {c: min(r[c] for r in v) for c in ("wall_s", "cpu_s")} for k, v in runs.items()}
    paired = {f"{c}_{base}": statistics.median(t[c] / b[c] for t, b in zip(runs["trainer"], runs[base]))
              for base in ("plain", "plain-batched") for c in ("wall_s", "cpu_s")}
    what = {"embedded": "the embedded Omniglot split", "folder": "a folder of the 2,720 Omniglot PNGs"}[job]
    print(f"{job}: one core, {epochs} epochs on {what} (XBN), {repeats} rounds; best wall / best CPU seconds, R@1 of each round:")
    for name, label in (("trainer", "trainer (xbn-metric)"), ("trainer-pil", "trainer, --tensor-cache off"),
                        ("plain", "plain loop, per-image augmentation"), ("plain-batched", "plain loop, batched augmentation")):
        if name not in runs:
            continue
        r1 = [round(100 * r["r1"], 2) for r in runs[name]]
        print(f"  {label:38s} {best[name]['wall_s']:6.1f} s / {best[name]['cpu_s']:6.1f} s   R@1 {r1}")
    for base, label in (("plain", "per-image"), ("plain-batched", "batched")):
        if "trainer-pil" in runs:
            pil = statistics.median(t["cpu_s"] / b["cpu_s"] for t, b in zip(runs["trainer-pil"], runs[base]))
            paired[f"cpu_s_pil_{base}"] = pil
            print(f"  trainer --tensor-cache off / plain ({label}): CPU {pil:.2f}x (median of rounds)")
        print(f"  trainer / plain ({label:9s}): CPU {paired[f'cpu_s_{base}']:.2f}x (median of rounds), "
              f"wall {paired[f'wall_s_{base}']:.2f}x (median), {best['trainer']['wall_s'] / best[base]['wall_s']:.2f}x (best of each)")
    return {"runs": runs, "best": best, "median_paired_ratio": paired}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="rounds of the runs (order rotated each round)")
    ap.add_argument("--jobs", default="embedded,folder", help="embedded, folder or both (comma-separated)")
    ap.add_argument("--json", type=Path, default=None, help="also write the measurements here")
    ap.add_argument("--with-pil", action="store_true", help="folder job: also the trainer with --tensor-cache off (per-image PIL)")
    ap.add_argument("--plain-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--batched", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain_child:
        import torch

        torch.set_num_threads(1)
        print(plain_loop(args.epochs, batched=args.batched, folder=args.folder))
        return
    jobs = [j.strip() for j in args.jobs.split(",") if j.strip()]
    if not jobs or set(jobs) - {"embedded", "folder"}:
        ap.error(f"--jobs {args.jobs}: expected embedded, folder or both")
    machine = _machine()
    kinds = {job: ["trainer", "plain", "plain-batched"] + (["trainer-pil"] if job == "folder" and args.with_pil else [])
             for job in jobs}
    names = [(job, run) for job in jobs for run in kinds[job]]
    runs = {job: {run: [] for run in kinds[job]} for job in jobs}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "omniglot-pngs"
        if "folder" in jobs:
            print(f"wrote {write_omniglot_folder(folder):,} PNGs to {folder}", file=sys.stderr, flush=True)
        for r in range(args.repeats):
            for job, name in names[r % len(names):] + names[: r % len(names)]:  # rotate the order
                where = folder if job == "folder" else None
                if name.startswith("trainer"):
                    extra = ("--tensor-cache", "off") if name == "trainer-pil" else ()
                    runs[job][name].append(run_trainer(args.epochs, Path(tmp) / "run", where, extra))
                else:
                    runs[job][name].append(run_plain(args.epochs, name == "plain-batched", where))
                last = runs[job][name][-1]
                print(f"  {job} {name}: {last['wall_s']:.1f} s wall, {last['cpu_s']:.1f} s CPU", file=sys.stderr, flush=True)
    report = {job: _report(job, runs[job], args.epochs, args.repeats) for job in jobs}
    if len(jobs) == 2:
        same = [r["r1"] for r in runs["folder"]["trainer"]] == [r["r1"] for r in runs["embedded"]["trainer"]]
        print(f"  folder trainer R@1 equals the embedded trainer's: {'yes' if same else 'NO'}")
        report["folder_r1_equals_embedded"] = same
    machine["load_avg_end"] = list(os.getloadavg())
    if args.json:
        args.json.write_text(json.dumps({"epochs": args.epochs, "repeats": args.repeats, "machine": machine,
                                         **report}, indent=2) + "\n")


if __name__ == "__main__":
    main()
