"""Device memory of a training run: what it will need, known before it starts, and held for it.

A run's GPU memory is
  images       every cached image, uint8: N x H x W x 3 bytes (moved to the device once)
  model        parameters, gradients, the optimizer's state (2 copies for Adam/AdamW, 1 for SGD's
               momentum) and fit's copy of the best weights, plus the buffers
  activations  the larger of what the forward keeps for backward at train.batch_size, times 1.25 for
               the backward's own buffers, and 3 x the largest tensor an op makes at
               train.eval_batch_size (inference keeps nothing for backward)
  headroom     512 MiB: cuDNN workspaces, augmentation buffers, allocator rounding.
The activations are measured, not guessed: the forward runs once on fake tensors (shapes and
dtypes, no values, no memory, no GPU) under the run's autocast dtype, counting each storage once.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from maskcls import models
from maskcls.config import TrainConfig

HEADROOM = 512 * 2**20
OPTIMIZER_COPIES = {"sgd": 1, "adam": 2, "adamw": 2}


class NoRoom(RuntimeError):
    """The run does not fit on the device: never (`waited` False), or not within the wait for the
    runs beside it (`waited` True: it may fit later)."""

    def __init__(self, message: str, waited: bool):
        super().__init__(message)
        self.waited = waited


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


@dataclass(frozen=True)
class MemoryNeed:
    images: int
    model: int
    activations: int

    @property
    def total(self) -> int:
        return self.images + self.model + self.activations + HEADROOM

    def __str__(self) -> str:
        return (
            f"{gib(self.total)} (images {gib(self.images)}, model {gib(self.model)}, "
            f"activations {gib(self.activations)}, headroom {gib(HEADROOM)})"
        )


class _Largest(TorchDispatchMode):
    """The size of the largest tensor any op makes."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.bytes = max(self.bytes, t.numel() * t.element_size())
        return out


def _autocast(dtype: torch.dtype | None):
    return torch.autocast("cpu", dtype=dtype, enabled=dtype is not None)


def saved_for_backward(model: torch.nn.Module, shape: tuple, amp_dtype: torch.dtype | None) -> int:
    """Bytes the forward of a [B, 3, H, W] batch keeps for backward, each storage counted once."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        saved[storage._cdata] = storage.nbytes()
        return t

    model.train()
    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with FakeTensorMode(allow_non_fake_inputs=True), _autocast(amp_dtype), hooks:
        model(torch.empty(shape))
    return sum(saved.values())


def largest_tensor(model: torch.nn.Module, shape: tuple, amp_dtype: torch.dtype | None) -> int:
    """Bytes of the largest tensor an op makes in an inference forward of a [B, 3, H, W] batch."""
    model.eval()
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad(), _autocast(amp_dtype):
        x = torch.empty(shape)
        with _Largest() as largest:
            model(x)
    return largest.bytes


def estimate(cfg: TrainConfig, n_images: int, amp_dtype: torch.dtype | None) -> MemoryNeed:
    """What `fit(cfg, ...)` will need on a GPU for a cache of `n_images`; see the module docstring."""
    model = models.build(dataclasses.replace(cfg.model, pretrained=None))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    copies = 3 + OPTIMIZER_COPIES[cfg.optim.name]  # weights, gradients, optimizer state, best weights
    h, w = cfg.data.image_size
    train = saved_for_backward(model, (cfg.train.batch_size, 3, h, w), amp_dtype) * 5 // 4
    infer = 3 * largest_tensor(model, (cfg.train.eval_batch_size, 3, h, w), amp_dtype)
    return MemoryNeed(
        images=n_images * h * w * 3, model=params * copies + 2 * buffers, activations=max(train, infer)
    )


def reserve(need: int, device: torch.device, wait_s: float, poll_s: float = 5.0) -> float:
    """Hold `need` bytes of the GPU for this process before the run allocates anything, waiting up
    to `wait_s` seconds for other runs on the same GPU to finish; returns the seconds waited.

    The bytes are allocated and freed at once: PyTorch's caching allocator keeps the block for this
    process (other processes see it as used) and carves the run's tensors out of it. Two runs that
    check at the same moment cannot both get the memory: the second allocation fails and waits.
    """
    total = torch.cuda.mem_get_info(device)[1]
    if need > total:
        raise NoRoom(f"needs {gib(need)}, more than the GPU's {gib(total)}", waited=False)
    start = time.monotonic()
    while not _hold(need, device):
        waited = time.monotonic() - start
        if waited >= wait_s:
            free = torch.cuda.mem_get_info(device)[0]
            raise NoRoom(
                f"needs {gib(need)}; {gib(free)} of {gib(total)} still free after waiting {waited:.0f} s "
                "for the other runs on this GPU",
                waited=True,
            )
        time.sleep(poll_s)
    return time.monotonic() - start


def _hold(need: int, device: torch.device) -> bool:
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # ours, reusable
    if torch.cuda.mem_get_info(device)[0] + cached < need:
        return False
    try:
        torch.empty(need, dtype=torch.uint8, device=device)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return False
    return True


def release(device: torch.device) -> None:
    """Give a finished run's memory back: collect what only reference cycles still hold, free
    cuBLAS's workspaces (they live for the whole process and would pin the segment they sit in,
    often the run's whole reservation), then return the caching allocator's free segments to the
    GPU for the next run or a neighbour. Call it where no traceback of the run is alive (not inside
    an `except` block)."""
    gc.collect()
    if device.type == "cuda":
        torch._C._cuda_clearCublasWorkspaces()  # what PyTorch's own memory-leak checks do
        torch.cuda.empty_cache()
