"""Test-only fault injection. Python imports this module at start-up when its folder is on
PYTHONPATH; tests/test_failures.py puts it there for hpo.run, whose workers inherit it.

$HPO_FAULT = "cuda-error:MARKER": after a trial's first epoch, fit raises the error PyTorch raises
for an illegal memory access (torch.AcceleratorError), as a device-side fault would; once in all
processes together (the first to create MARKER), or every time with "cuda-error-always:".
"""

import importlib.abc
import importlib.util
import os
import sys

FAULT = os.environ.get("HPO_FAULT", "")


def fires(marker: str, always: bool) -> bool:
    if always:
        return True
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
        return True
    except FileExistsError:
        return False


def wrap(module) -> None:
    """maskcls.train.fit, with the fault after the first epoch's report."""
    import torch

    kind, _, marker = FAULT.partition(":")
    fit = module.fit

    def faulty_fit(cfg, data, device="cpu", on_epoch=None, *args, **kwargs):
        def report(epoch, metrics):
            if on_epoch is not None:
                on_epoch(epoch, metrics)
            if epoch == 1 and fires(marker, kind.endswith("always")):
                error = getattr(torch, "AcceleratorError", RuntimeError)  # its own type since torch 2.8
                raise error("CUDA error: an illegal memory access was encountered")

        return fit(cfg, data, device, report, *args, **kwargs)

    module.fit = faulty_fit


class Patch(importlib.abc.MetaPathFinder):
    """Wraps maskcls.train once it has loaded, before any module imports its names."""

    def find_spec(self, name, path, target=None):
        if name != "maskcls.train":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            wrap(module)

        spec.loader.exec_module = exec_module
        return spec


if FAULT.startswith("cuda-error"):
    sys.meta_path.insert(0, Patch())
