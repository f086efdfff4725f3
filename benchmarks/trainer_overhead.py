"""What the metric trainer costs over a plain PyTorch loop of the same experiment.

Both run as their own process, pinned to one core with one torch thread, in the same invocation,
alternating (trainer, plain, plain, trainer, ...) so that a slow phase of a shared machine hits both:

* **trainer**: ``python -m metric --dataset omniglot --method xbn --epochs 2 --eval-every 2`` (the
  embedded Omniglot split: 1,760 training images, 960 retrieved), everything else at its defaults
  (drift probe, staleness, checkpoints, ``metrics.jsonl``, plot);
* **plain**: the same experiment written plainly below (:func:`plain_loop`): the same Conv-4, SupCon
  loss with ``PairMarginMiner(0.2, 0.8)``, PML's ``MPerClassSampler`` (4 per class, batch 16), an XBN
  memory of half the training set, AdamW 1e-3, the mild augmentation per image with torchvision's
  ``transforms.v2`` on uint8 tensors held in memory, one leave-one-out Recall@1 at the end.

* **plain, batched**: the plain loop with the trainer's batched augmentation instead (so the ratio
  shows the trainer's own bookkeeping alone).

It prints the wall time of each process (start to exit, imports included) and their ratio, and
Recall@1 of both as a sanity check. Usage::

    python benchmarks/trainer_overhead.py [--repeats 3] [--epochs 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def plain_loop(epochs: int, seed: int = 0, batched: bool = False) -> float:
    """The experiment as a user would write it; returns leave-one-out Recall@1 on the retrieval alphabets.

    ``batched``: augment each batch with the trainer's batched augmentation instead of per image, so
    that the ratio shows the trainer's bookkeeping alone.
    """
    import torch
    import torch.nn.functional as F
    from pytorch_metric_learning import losses, miners, samplers
    from torchvision.transforms import v2

    from metric.data import load_omniglot
    from xbn_queue.pml import AdaptiveCrossBatchMemory
    from xbn_queue.training.backbones import Conv4

    torch.manual_seed(seed)
    data = load_omniglot()

    def as_tensor(items, size):
        x = torch.from_numpy(__import__("numpy").stack(items)).unsqueeze(1).float()  # (N, 1, 105, 105)
        return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True).round().clamp(0, 255).to(torch.uint8)

    train_x, train_y = as_tensor(data.train.items, 32), torch.as_tensor(data.train.labels)
    test_x = as_tensor(data.query.items, 36)[..., 2:34, 2:34]  # resize 36 + centre crop 32, like the evaluation transform
    test_y = torch.as_tensor(data.query.labels)
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


def run_trainer(epochs: int, folder: Path) -> tuple:
    cmd = [sys.executable, "-m", "metric", "--dataset", "omniglot", "--method", "xbn", "--epochs", str(epochs),
           "--eval-every", str(epochs), "--threads", "1", "--output-dir", str(folder), "--overwrite", "--no-progress"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=_pinned_env(), capture_output=True, text=True, preexec_fn=_pin)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"trainer failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    last = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()][-1]
    return seconds, float(last["recall@1"])


def run_plain(epochs: int, batched: bool) -> tuple:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--plain-child", "--epochs", str(epochs)] + (["--batched"] if batched else [])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=_pinned_env(), capture_output=True, text=True, preexec_fn=_pin)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"plain loop failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return seconds, float(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="rounds of the three runs (order rotated each round)")
    ap.add_argument("--json", type=Path, default=None, help="also write the measurements here")
    ap.add_argument("--plain-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--batched", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain_child:
        import torch

        torch.set_num_threads(1)
        print(plain_loop(args.epochs, batched=args.batched))
        return
    runs = {"trainer": [], "plain": [], "plain-batched": []}
    names = list(runs)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name in names[r % 3:] + names[: r % 3]:  # rotate the order
                if name == "trainer":
                    runs[name].append(run_trainer(args.epochs, Path(tmp) / "run"))
                else:
                    runs[name].append(run_plain(args.epochs, batched=name == "plain-batched"))
                print(f"  {name}: {runs[name][-1][0]:.1f} s", file=sys.stderr, flush=True)
    best = {k: min(s for s, _ in v) for k, v in runs.items()}
    print(f"one core, {args.epochs} epochs on the embedded Omniglot split (XBN), best of {args.repeats} runs each:")
    print(f"  trainer (xbn-metric)                   {best['trainer']:6.1f} s   R@1 {100 * runs['trainer'][0][1]:.2f}")
    print(f"  plain loop, per-image augmentation     {best['plain']:6.1f} s   R@1 {100 * runs['plain'][0][1]:.2f}")
    print(f"  plain loop, batched augmentation       {best['plain-batched']:6.1f} s   R@1 {100 * runs['plain-batched'][0][1]:.2f}")
    print(f"  ratio trainer / plain (per-image)      {best['trainer'] / best['plain']:6.2f}x")
    print(f"  ratio trainer / plain (batched)        {best['trainer'] / best['plain-batched']:6.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"epochs": args.epochs, "runs_s_r1": runs, "best_s": best,
                                         "ratio_per_image": best["trainer"] / best["plain"],
                                         "ratio_batched": best["trainer"] / best["plain-batched"]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
