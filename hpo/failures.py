"""How a trial can fail, as exception types: the worker decides what to do by the type it catches,
never by a message's words.

  TrialFailed      the recipe failed (diverged, does not fit, out of memory): recorded, counts
                   towards the worker's streak of failures (five in a row stop it)
  NotTheRecipe     a TrialFailed that says nothing about the recipe (a surplus trial, one that
                   waited an hour for GPU memory): its parameters run again, the streak does not grow
  WorkerStops      a failure every later trial of this worker would share: the trial is queued
                   again and the worker exits with the kind's exit code
    CudaPoisoned   the process's CUDA context is broken (device-side assert, illegal memory
                   access, a failed cuDNN/cuBLAS launch): the dispatcher starts a fresh worker
    DiskFull       no space left where the trial writes: the run stops with one line naming it
Anything else is a bug: its trial fails with the exception's name and message, and Optuna writes
its traceback to the worker's log.
"""

from __future__ import annotations

import errno
import sys

from hpo.protocol import Exit


class TrialFailed(Exception):
    """A trial that failed for a recorded reason; the worker goes on with the next one."""


class NotTheRecipe(TrialFailed):
    """A failure that is no fault of the recipe: the trial's parameters run again later."""


class Surplus(NotTheRecipe):
    """More trials started than the study needs: the latest ones step back without training."""


class WaitedForMemory(NotTheRecipe):
    """The trials beside it on the GPU kept their memory for longer than the wait."""


class OutOfMemory(TrialFailed):
    """The recipe needs more device memory than there is."""


class WorkerStops(Exception):
    """The trial failed in a way every later trial of this worker would: it is queued again and
    the worker exits with `exit_code`."""

    exit_code = Exit.FAILED


class CudaPoisoned(WorkerStops):
    """The CUDA context of this process is unusable: a fresh worker takes the slot."""

    exit_code = Exit.CUDA_POISONED


class DiskFull(WorkerStops):
    """No space left where the trial writes (checkpoints, artifacts): the run stops, naming it."""

    exit_code = Exit.DISK_FULL


# torch raises these as plain RuntimeErrors (cuDNN, cuBLAS, and CUDA itself before torch 2.8's
# AcceleratorError), so at this one boundary the kind is read from the message's start.
_CUDA_ERROR_STARTS = ("CUDA error", "CUDA driver error", "cuDNN error", "CUBLAS_STATUS", "CUDNN_STATUS")


def out_of_memory(err: BaseException) -> bool:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def cuda_poisoned(err: BaseException) -> bool:
    """Whether torch's error leaves this process's CUDA context broken (out of memory does not)."""
    if out_of_memory(err):
        return False
    torch = sys.modules.get("torch")
    accelerator_error = getattr(torch, "AcceleratorError", None) if torch is not None else None
    if accelerator_error is not None and isinstance(err, accelerator_error):
        return True
    return isinstance(err, RuntimeError) and str(err).lstrip().startswith(_CUDA_ERROR_STARTS)


def disk_full(err: BaseException) -> str | None:
    """Where a write ran out of space ("" when the error does not say), or None for another error."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return str(seen.filename) if seen.filename else ""
        seen = seen.__cause__ or seen.__context__
    return None
