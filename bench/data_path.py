"""Side by side, in one process, on the same images and model:

(a) the common path: PIL decode + per-image torchvision transforms every epoch, in a DataLoader;
(b) ours: decode once into the cache, then batches indexed and augmented on the device.

Prints images/s for data alone and for data + train step, and the ratio b/a; also our
data + train step as a fraction of the same step fed from tensors already on the device.

    python bench/data_path.py [--people 200] [--size 128x96] [--trials 3] [--device auto] [--json FILE]

On CUDA the train step runs under bf16 autocast with channels_last, as training does.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from maskcls.config import MEAN, STD, load
from maskcls.data import cache
from maskcls.data.batches import DeviceImages, device_batches
from maskcls.data.layout import scan
from maskcls.data.synth import generate
from maskcls.infer import pick_device
from maskcls.models import build
from maskcls.runtime import configure_cpu


class PilDataset(Dataset):
    """What most competition notebooks did: open, decode, transform, every epoch."""

    def __init__(self, paths, labels, size):
        self.paths, self.labels = paths, labels
        self.transform = T.Compose(
            [
                T.Resize(size),
                T.RandomHorizontalFlip(),
                T.RandomAffine(degrees=0, translate=(0.05, 0.05), scale=(0.95, 1.1)),
                T.ColorJitter(0.1, 0.1, 0.1),
                T.ToTensor(),
                T.Normalize(MEAN, STD),
            ]
        )

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as img:
            return self.transform(img.convert("RGB")), self.labels[i]


def timed(path, step, device, min_seconds: float) -> float:
    """Images per second over whole passes of `path()`, repeated for at least `min_seconds`."""
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        for x, y in path():
            step(x, y)
            count += len(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="data root (default: a generated 384x512 stand-in)")
    parser.add_argument("--people", type=int, default=200)
    parser.add_argument("--size", default="128x96", help="training HxW")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--model", default="mobilenetv3_small_050")
    parser.add_argument("--trials", type=int, default=3, help="timed trials per path; the best is kept")
    parser.add_argument("--seconds", type=float, default=2.0, help="minimum length of one timed trial")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="DataLoader workers for (a)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="also write the figures to this file (bench/gpu_check.py reads it)")
    args = parser.parse_args()
    configure_cpu()  # for both paths: the DataLoader workers of (a) inherit it
    device = pick_device(args.device)
    size = tuple(int(v) for v in args.size.split("x"))
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    root = args.data or generate(work / "data", people=args.people, eval_people=0, progress=False)
    table = scan(root)
    paths, labels = list(table["path"]), table["label"].to_numpy()

    start = time.perf_counter()
    images = cache.build(paths, size, work / "cache", progress=False)
    decode_once = time.perf_counter() - start

    cfg = load(None, {"model.name": args.model, "data.image_size": list(size)})
    model = build(cfg.model).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else torch.autocast("cpu", enabled=False)
    )

    def train_step(x, y):
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with amp:
            loss = torch.nn.functional.cross_entropy(model(x).float(), y.to(device, non_blocking=True))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def consume(x, y):
        x.to(device, non_blocking=True)

    def common_path():
        loader = DataLoader(
            PilDataset(paths, torch.as_tensor(labels), size),
            batch_size=args.batch_size,
            shuffle=True,
            num_workers=args.workers,
            pin_memory=device.type == "cuda",
            persistent_workers=False,
        )
        return loader

    on_device = DeviceImages(images, device, channels_last=True)
    targets = torch.as_tensor(labels, device=device)
    gen = torch.Generator(device=device).manual_seed(0)

    every_row = torch.arange(len(labels), device=device)

    def our_path():
        order = torch.randperm(len(labels)).to(device)  # one copy per epoch, as in training
        for x, positions in device_batches(on_device, every_row, order, args.batch_size, "light", gen):
            yield x, targets[positions]

    fixed = on_device.inputs(every_row[: args.batch_size * 8])
    fixed_y = targets[: len(fixed)]

    def preloaded():  # the ceiling: the same step on tensors already on the device, no augmentation
        for _ in range(len(labels) // args.batch_size):
            yield fixed[: args.batch_size], fixed_y[: args.batch_size]

    def best(path, step):
        return max(timed(path, step, device, args.seconds) for _ in range(args.trials))

    timed(our_path, train_step, device, 0)  # warm-up: cudnn autotune, allocator
    rows = {
        "data alone": (best(common_path, consume), best(our_path, consume)),
        "data + train step": (best(common_path, train_step), best(our_path, train_step)),
    }
    ceiling = best(preloaded, train_step)
    print(
        f"device: {device}, {torch.get_num_threads()} threads; {len(paths)} images of "
        f"{Image.open(paths[0]).size[0]}x{Image.open(paths[0]).size[1]} -> {size[0]}x{size[1]}, "
        f"model {args.model}, batch {args.batch_size}, DataLoader workers {args.workers}"
    )
    print(
        f"decode once into the cache: {decode_once:.1f} s ({len(paths) / decode_once:.0f} img/s), "
        "paid once per study and image size"
    )
    print(f"{'':20s} {'(a) PIL+DataLoader':>20s} {'(b) cache+device':>18s} {'b/a':>7s}")
    for name, (a, b) in rows.items():
        print(f"{name:20s} {a:16.0f} img/s {b:12.0f} img/s {b / a:6.1f}x")
    fraction = rows["data + train step"][1] / ceiling
    print(
        f"(b) data + train step as a fraction of the step on preloaded device tensors: "
        f"{fraction:.2f} ({ceiling:.0f} img/s)"
    )
    if args.json:
        figures = {
            name.replace(" ", "_").replace("+", "and"): {"a": a, "b": b} for name, (a, b) in rows.items()
        }
        figures.update(preloaded=ceiling, fraction_of_preloaded=fraction, device=str(device), size=list(size))
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
