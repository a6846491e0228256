"""glibc malloc settings for CPU jobs: keep freed memory for reuse instead of handing it back to the kernel.

PyTorch's CPU allocator is the C library's ``malloc``. With glibc's defaults a large tensor (above a threshold
that starts at 128 KiB) is a fresh ``mmap`` and each free returns memory to the kernel, so the next batch's
tensors fault every page in again, zero-filled: the embedded demo made ~69 million minor page faults and spent
a tenth of its CPU time in the kernel (``/usr/bin/time``: 138.5 s system, 1166.9 s user). ``keep_freed_memory``
sets the three ``mallopt`` parameters that the PyTorch CPU tuning guides set through environment variables
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``), from inside the process, so
``longtail`` gets them however it is started. Results do not change (allocation only); the resident memory
stays near its peak instead of shrinking between batches. ``benchmarks/demo_levers.py`` measures it: evaluating
the 10k test set at batch 512 takes 0.72x-0.81x the time, with far fewer page faults (most of the demo's faults
were these); at the demo's evaluation batch of 128 and in training and generation it is within noise (0.95x-0.98x
over the whole slice), so it is a guard for larger batches more than a speed-up of the demo.

Skipped (returns False) off glibc, when the user set any of those variables or a ``glibc.malloc`` tunable
(``GLIBC_TUNABLES``) or preloads another allocator (jemalloc, tcmalloc, mimalloc in ``LD_PRELOAD``), or with
``LONGTAIL_MALLOC=default``. The ``longtail`` command calls it before any job; a program using the library calls
it itself if it wants it.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20  # below it, the heap (the ceiling of glibc's own dynamic threshold on 64-bit)
TRIM_THRESHOLD = 1 << 30  # free heap top kept before trimming
TOP_PAD = 64 << 20  # extra heap asked for at each growth

USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_CONF")
OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_done: list[bool] = []


def keep_freed_memory() -> bool:
    """Apply the settings once per process (see the module docstring); True when they are in effect."""
    if _done:
        return _done[0]
    _done.append(_apply())
    return _done[0]


def _apply() -> bool:
    if os.environ.get("LONGTAIL_MALLOC", "").lower() == "default":
        return False
    if any(v in os.environ for v in USER_VARIABLES):
        return False
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    if any(a in os.environ.get("LD_PRELOAD", "") for a in OTHER_ALLOCATORS):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = [mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD))]
    return all(applied)
