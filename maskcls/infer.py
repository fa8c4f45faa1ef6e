"""Running a model: the device, its autocast, batched inference with test-time mirroring."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

import numpy as np
import torch
import torch.nn.functional as F

from maskcls.config import TrainConfig
from maskcls.data.batches import DeviceImages
from maskcls.errors import UserError
from maskcls.labels import NUM_CLASSES

Autocast = Callable[[], AbstractContextManager]


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is visible; use --device cpu")
    return torch.device(name)


def autocast(cfg: TrainConfig, device: torch.device) -> tuple[Autocast, torch.dtype | None]:
    """bf16 autocast on CUDA where supported (fp16 otherwise); full precision on the CPU."""
    if device.type != "cuda" or not cfg.train.amp:
        return contextlib.nullcontext, None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return (lambda: torch.autocast("cuda", dtype=dtype)), dtype


@torch.no_grad()
def predict_probs(
    model: torch.nn.Module,
    images: DeviceImages,
    rows: torch.Tensor,
    batch_size: int,
    amp: Autocast = contextlib.nullcontext,
    tta: bool = False,
) -> torch.Tensor:
    """Class probabilities [len(rows), 18] on the device; with `tta`, the mean over the image and
    its mirror."""
    model.eval()
    probs = [torch.zeros((0, NUM_CLASSES), device=images.device)]
    for batch in rows.split(batch_size):
        x = images.inputs(batch)
        with amp():
            p = F.softmax(model(x).float(), dim=1)
            if tta:
                p = (p + F.softmax(model(x.flip(3)).float(), dim=1)) / 2
        probs.append(p)
    return torch.cat(probs)


def infer(model: torch.nn.Module, images: DeviceImages, batch_size: int, tta: bool = False) -> np.ndarray:
    """Class probabilities [N, 18] of every image, on the host."""
    rows = torch.arange(len(images), device=images.device)
    return predict_probs(model, images, rows, batch_size, tta=tta).cpu().numpy()


def cpu_latency_ms(model: torch.nn.Module, image_size: tuple[int, int], repeats: int = 20) -> float:
    """Milliseconds per image on the CPU, measured the same way for every model: a copy of the
    model in fp32 eval mode, one image at a time, one thread, the fastest of `repeats` runs after
    three warm-up runs (the fastest is the least disturbed by whatever else the machine runs)."""
    import copy
    import time

    cpu_model = copy.deepcopy(model).float().cpu().eval()
    x = torch.zeros(1, 3, *image_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            for _ in range(3):
                cpu_model(x)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                cpu_model(x)
                times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return float(min(times) * 1000)
