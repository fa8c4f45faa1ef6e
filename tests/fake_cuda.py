"""CUDA code paths on a machine without a GPU: fake CUDA tensors and a record of device traffic.

Inside `fake_cuda()`, tensors made with device="cuda" are fake tensors on cuda:0 (shapes, dtypes and
devices, no values), and an op that mixes a cuda and a cpu tensor raises
a device-mismatch RuntimeError, as it would on a GPU. `Traffic` records every copy between host and
device and every read of a device value by the host: on a real GPU each of these stalls the CPU
until the GPU has caught up. What they cannot check (values, backward, generator devices) is
covered by `pytest -m cuda` in bench/gpu_check.sh on a real GPU.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
CUDA = torch.device("cuda")
# Before 2.7, FakeTensorMode initialises the real CUDA runtime when a host tensor moves to the fake
# device (torch.as_tensor(array, device="cuda"), .to("cuda")); without a GPU that raises "CUDA
# driver version is insufficient". Seen with torch 2.6 in `make test-floors`.
FAKE_CUDA_NEEDS = (2, 7)


class Traffic(TorchDispatchMode):
    """Every host-to-device copy (`uploads`) and every device-to-host copy or scalar read (`syncs`)."""

    def __init__(self) -> None:
        super().__init__()
        self.uploads: list[str] = []
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default:  # .item(), bool(), float() of a device value
            self.syncs.append(f"{func} of a {args[0].device} tensor")
        out = func(*args, **kwargs)
        if func in (aten._to_copy.default, aten.copy_.default):
            source, target = (args[0], out) if func is aten._to_copy.default else (args[1], args[0])
            moved = f"{func}: {tuple(source.shape)} {source.device} -> {target.device}"
            if source.device.type == "cpu" and target.device.type == "cuda":
                self.uploads.append(moved)
            elif source.device.type == "cuda" and target.device.type == "cpu":
                self.syncs.append(moved)
        return out


@contextlib.contextmanager
def fake_cuda():
    """Fake CUDA tensors; real CPU tensors may flow in (the cache, numpy arrays), as in a real run."""
    if tuple(int(n) for n in torch.__version__.split(".")[:2]) < FAKE_CUDA_NEEDS:
        needs = ".".join(map(str, FAKE_CUDA_NEEDS))
        pytest.skip(f"the fake CUDA device needs torch>={needs} (this is {torch.__version__})")
    with FakeTensorMode(allow_non_fake_inputs=True):
        yield
