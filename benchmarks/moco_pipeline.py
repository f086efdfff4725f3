"""MoCo CIFAR input pipeline against the model step: can augmentation keep the model busy?

Measures, on one device:

* ``pil``: images/s of the standard PIL augmentation (two views) in ``--workers`` DataLoader workers;
* ``tensor``: images/s of :class:`selfsup.augment.TensorMoCoAugment` (two views) on the device, from a
  ``uint8`` tensor already there (what ``--gpu-augment`` does);
* ``step``: images/s of the MoCo training step alone (query forward/backward, momentum update, key
  forward, lightly NTXentLoss with the adaptive bank, SGD), on pre-augmented batches;
* ``epoch / compute``: time of a pass over ``--steps`` batches with each pipeline feeding the step,
  divided by the compute-only time of the same steps (1.0 = the model never waits for data).

Usage::

    python benchmarks/moco_pipeline.py --device cuda                       # ResNet-18, batch 256, bf16
    python benchmarks/moco_pipeline.py --device cpu --width 16 --batch-size 128 --steps 4

Images come from ``--data-root`` (the CIFAR-10 JPEG folder copy, ``train/<class>/*.jpg``) when it
exists, otherwise random ``uint8`` images of the same size. Prints a table and writes ``--json``.
"""

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfsup.augment import TensorMoCoAugment, pil_train_transform  # noqa: E402
from selfsup.config import SelfSupConfig  # noqa: E402
from selfsup.data import EpochBatches, ImageData, TwoViewDataset, load_dataset, pil_batch_loader  # noqa: E402
from selfsup.train import Trainer  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_images(args) -> ImageData:
    root = Path(args.data_root)
    n = args.steps * args.batch_size
    if (root / "train").is_dir():
        data = load_dataset("folder", str(root), train_subset=n, test_subset=10)
        source = f"CIFAR-10 JPEG folder {root}"
    else:
        rng = np.random.default_rng(0)
        imgs = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        data = ImageData(imgs, np.arange(n) % 10, imgs[:10], np.arange(10), [str(i) for i in range(10)])
        source = "random uint8 images"
    print(f"images: {len(data.train_images)} from {source}", file=sys.stderr)
    return data


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=40, help="batches per measured pass")
    p.add_argument("--width", type=int, default=64, help="ResNet first-stage width (64 = standard ResNet-18)")
    p.add_argument("--workers", type=int, default=min(15, os.cpu_count() or 1), help="DataLoader workers of the PIL pipeline")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--queue-size", type=int, default=4096)
    p.add_argument("--data-root", default=str(Path(__file__).resolve().parents[1] / ".data" / "cifar10"))
    p.add_argument("--json", default="moco_pipeline.json", help="where to write the results")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = load_images(args)
    n, B = len(data.train_images), args.batch_size
    cfg = SelfSupConfig(
        dataset="folder", batch_size=B, width=args.width, queue_size=max(args.queue_size, B), device=args.device,
        output_dir="/tmp/moco_pipeline_bench", progress=False, epochs=1, threads=args.threads,
    )
    trainer = Trainer(cfg, data)
    batches = EpochBatches(n, B, seed=0).batches(0)[: args.steps]
    steps = len(batches)
    u8 = torch.from_numpy(data.train_images).permute(0, 3, 1, 2).contiguous().to(device)  # (N, 3, 32, 32)
    aug = TensorMoCoAugment(size=32)
    results = {}

    # 1) PIL pipeline alone
    ds = TwoViewDataset(data.train_images, pil_train_transform(32), seed=0)
    loader = pil_batch_loader(ds, batches, epoch=0, workers=args.workers, pin_memory=device.type == "cuda")
    t = time.perf_counter()
    for _ in loader:
        pass
    results["pil_images_per_s"] = steps * B / (time.perf_counter() - t)

    # 2) tensor pipeline alone (warm-up once)
    aug(u8[batches[0].to(device)], torch.Generator().manual_seed(0))
    sync(device)
    t = time.perf_counter()
    for i, idx in enumerate(batches):
        g = torch.Generator().manual_seed(i)
        x = u8[idx.to(device)]
        aug(x, g), aug(x, g)
    sync(device)
    results["tensor_images_per_s"] = steps * B / (time.perf_counter() - t)

    # 3) compute only: the MoCo step on pre-augmented batches
    g = torch.Generator().manual_seed(0)
    x0 = aug(u8[batches[0].to(device)], g).contiguous(memory_format=trainer.memory_format)
    x1 = aug(u8[batches[0].to(device)], g).contiguous(memory_format=trainer.memory_format)
    for _ in range(2):  # warm-up (cuDNN autotune, queue fill)
        trainer.moco_step(x0, x1, torch.Generator().manual_seed(1))
    sync(device)
    t = time.perf_counter()
    for i in range(steps):
        trainer.moco_step(x0, x1, torch.Generator().manual_seed(i))
    sync(device)
    compute = time.perf_counter() - t
    results["step_images_per_s"] = steps * B / compute
    results["compute_only_s"] = compute

    # 4) full passes: each pipeline feeding the step
    t = time.perf_counter()
    for i, idx in enumerate(batches):
        a, b, gen = trainer.views(0, i, idx, None)  # the trainer's own --gpu-augment path
        trainer.moco_step(a, b, gen)
    sync(device)
    results["tensor_epoch_s"] = time.perf_counter() - t
    loader = pil_batch_loader(ds, batches, epoch=1, workers=args.workers, pin_memory=device.type == "cuda")
    t = time.perf_counter()
    for i, (_, a, b) in enumerate(loader):
        a = a.to(device, non_blocking=True).contiguous(memory_format=trainer.memory_format)
        b = b.to(device, non_blocking=True).contiguous(memory_format=trainer.memory_format)
        trainer.moco_step(a, b, torch.Generator().manual_seed(i))
    sync(device)
    results["pil_epoch_s"] = time.perf_counter() - t
    results["tensor_epoch_over_compute"] = results["tensor_epoch_s"] / compute
    results["pil_epoch_over_compute"] = results["pil_epoch_s"] / compute
    trainer.close()

    meta = {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch_size": B,
        "steps": steps,
        "width": args.width,
        "workers": args.workers,
        "amp": bool(trainer.amp),
    }
    out = {"meta": meta, "results": results}
    rows = [
        ("PIL DataLoader pipeline (2 views)", f"{results['pil_images_per_s']:.0f} img/s"),
        ("tensor pipeline on device (2 views)", f"{results['tensor_images_per_s']:.0f} img/s"),
        ("MoCo step, compute only", f"{results['step_images_per_s']:.0f} img/s"),
        ("epoch / compute-only, tensor pipeline", f"{results['tensor_epoch_over_compute']:.2f}x"),
        ("epoch / compute-only, PIL pipeline", f"{results['pil_epoch_over_compute']:.2f}x"),
    ]
    print(f"\nMoCo CIFAR pipeline on {meta['device']} ({meta['date_utc']} UTC), ResNet-18 width {args.width}, "
          f"batch {B}, {steps} steps, {args.workers} workers, {meta['threads']} threads, amp={meta['amp']}\n")
    print(f"| {'measure':<40} | {'value':>12} |\n|{'-' * 42}|{'-' * 14}|")
    for name, value in rows:
        print(f"| {name:<40} | {value:>12} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"\nwrote {args.json}")
    return out


if __name__ == "__main__":
    main()
