"""Process-wide settings for training on the CPU, applied once at the start of a process.

glibc returns every large freed block to the OS and page-faults it back on the next batch;
PyTorch on the CPU allocates a few MB per operation, so that churn alone costs 2-3x (the usual
fix is LD_PRELOAD=jemalloc). Raising glibc's mmap and trim thresholds keeps freed memory in the
process instead. Harmless elsewhere: CUDA memory has its own caching allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory(limit: int = 1 << 30) -> bool:
    """Ask glibc to reuse freed blocks up to `limit` bytes; False where libc has no mallopt."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, limit)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, limit))
    except (OSError, AttributeError, TypeError):
        return False


def configure_cpu(threads: int | None = None) -> None:
    """Allocator settings and, when given, the number of intra-op threads of this process."""
    keep_freed_memory()
    if threads:
        torch.set_num_threads(threads)
