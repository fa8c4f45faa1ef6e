"""fit's own training step fed by our data path, against the same step on a batch already on the
device: how close the data path comes to keeping the GPU busy (goal on a GPU: >= 0.95).

Both sides run maskcls.train's `setup` and `train_one_batch` (forward, loss, backward, optimizer and
schedule step under the run's autocast and channels_last) on the same model, in one process, one
after the other, each timed over whole epochs after a warm-up:

    ours       epoch_batches(): the epoch's order, gathered from the decoded images on the device,
               augmented there (flip/affine/colour, CutMix/Mixup as configured)
    preloaded  one batch of the same size, made once, fed again and again (no data work at all)

    python bench/fit_step.py --data ROOT --device cuda --size 256x192 --model resnet34 [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from maskcls.config import load
from maskcls.infer import pick_device
from maskcls.runtime import configure_cpu
from maskcls.train import epoch_batches, load_data, setup, train_one_batch


def images_per_s(batches, p, cfg, device, epochs: int) -> float:
    """Images per second of train_one_batch over `epochs` passes of `batches()`."""
    count, start = 0, time.perf_counter()
    for _ in range(epochs):
        for step, (x, targets) in enumerate(batches(), start=1):
            train_one_batch(p, cfg, x, targets, step)
            count += len(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="data root (a stand-in)")
    parser.add_argument("--size", default="256x192", help="training HxW")
    parser.add_argument("--model", default="resnet34")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per side (after a warm-up one)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cache-dir", default="runs/fit-step-cache")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    configure_cpu()
    device = pick_device(args.device)
    h, w = (int(v) for v in args.size.split("x"))
    cfg = load(
        None,
        {
            "data.root": args.data,
            "data.image_size": [h, w],
            "data.cache_dir": args.cache_dir,
            "model.name": args.model,
            "train.batch_size": args.batch_size,
            "augment.policy": "medium",
        },
    )
    data = load_data(cfg, progress=False)
    p = setup(cfg, data, device)
    p.model.train()

    def ours():
        return epoch_batches(cfg, data, p.on, p.draws)

    x0, t0 = next(iter(ours()))
    x0, t0 = x0.clone(), t0.clone()

    def preloaded():
        return ((x0, t0) for _ in range(p.n_batches))

    images_per_s(ours, p, cfg, device, 1)  # warm-up: cudnn autotune, the allocator's first blocks
    ours_rate = images_per_s(ours, p, cfg, device, args.epochs)
    preloaded_rate = images_per_s(preloaded, p, cfg, device, args.epochs)
    ratio = ours_rate / preloaded_rate
    print(
        f"{device}: {len(data.train_rows)} training images at {h}x{w}, {args.model}, "
        f"batch {args.batch_size}; "
        f"fit's step with our data path {ours_rate:.0f} img/s, on a preloaded batch {preloaded_rate:.0f} "
        f"img/s: {ratio:.3f}"
    )
    if args.json:
        figures = {"ours": ours_rate, "preloaded": preloaded_rate, "ratio": ratio, "device": str(device)}
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
