"""Process-wide settings for computing on the CPU, applied once at the start of a process.

Threads: torch starts one intra-op thread per physical core of the machine, whatever this process
was given (a container's CPU set, a SLURM allocation, `taskset`) and whatever else runs there;
every entry point instead uses the cores it owns, or `--threads`.

Memory: glibc returns every large freed block to the OS and page-faults it back on the next batch;
PyTorch on the CPU allocates a few MB per operation, so that churn alone costs 2-3x (the usual
fix is LD_PRELOAD=jemalloc). Raising glibc's mmap and trim thresholds keeps freed memory in the
process instead. Harmless elsewhere: CUDA memory has its own caching allocator.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def owned_cores() -> int:
    """The cores this process may run on (its CPU affinity), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def add_threads_argument(parser: argparse.ArgumentParser, default_help: str | None = None) -> None:
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help=default_help or f"CPU threads for torch (default: the cores this process owns, {owned_cores()})",
    )


def keep_freed_memory(limit: int = 1 << 30) -> bool:
    """Ask glibc to reuse freed blocks up to `limit` bytes; False where libc has no mallopt."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, limit)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, limit))
    except (OSError, AttributeError, TypeError):
        return False


def configure_cpu(threads: int | None = None) -> int:
    """Allocator settings and the intra-op threads of this process (default: the cores it owns);
    returns the thread count."""
    import torch

    from maskcls.errors import UserError

    if threads is not None and threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    keep_freed_memory()
    torch.set_num_threads(threads or owned_cores())
    return torch.get_num_threads()
