"""How the process's C allocator hands memory back to the OS, which sets the cost of CPU training.

torch allocates CPU tensors with ``malloc``. glibc serves a block above its mmap threshold with a
fresh ``mmap`` and unmaps it on ``free``, and returns the top of its heap to the OS once more than
its trim threshold is free: each training step then faults in, and the kernel zeroes, every page
of its large activations again. At sequence 8192 that was a third of the step's time in the
kernel (``sys``) for both the Transformer and HOPE pilots on this project's 2-core CPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest: blocks above it are still mmap'ed
TOP_PAD = 1 << 30  # grow the heap in 1 GiB steps (address space; pages are touched on demand)
TRIM_THRESHOLD = 2**31 - 1  # the largest (a C int): keep up to ~2 GiB of free heap top


def retain_freed_memory() -> bool:
    """Keep freed memory in the process for the next allocation (glibc ``mallopt``): blocks up
    to 32 MiB come from the heap, which grows in 1 GiB steps and keeps up to ~2 GiB of free
    top. Returns whether it applied (Linux with glibc; elsewhere a no-op).

    The process keeps its peak heap size until it exits, as a caching allocator does (torch's on
    GPU, or jemalloc, which PyTorch's CPU tuning guide suggests for the same reason). Measured
    on the 2-core CPU, per step at 1 × 8192: Transformer++ pilot 16-17 -> 14.2-14.9 s, HOPE
    pilot 23-24 -> 19.7-20.9 s; at 2 × 1024 no change for either (Transformer 1.77 vs 1.76-1.82 s).
    ``pipeline.train`` calls it (``train.retain_freed_memory``), as does the throughput benchmark.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    settings = ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TOP_PAD, TOP_PAD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return all(mallopt(param, value) == 1 for param, value in settings)
