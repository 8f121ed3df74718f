"""Keep large freed CPU blocks for reuse (glibc), for training large models on the CPU.

glibc's malloc serves every request above its mmap threshold (dynamic, at most 32 MiB by default)
with a fresh ``mmap`` and gives it back to the kernel on ``free``. torch's CPU allocator does not
cache, so each step's activations of that size (ResNet-18 at 224x224 from batch 16 on) are mapped,
page-faulted and zeroed again every time: 16,384 faults per 64 MiB. Raising the mmap threshold
(and the trim threshold, which would otherwise hand the heap's top back) keeps such blocks in the
heap for the next step. On this project's 2-core VM: fake_quantize forward at 2^24 fp32
elements 25.5 -> 3.97 ms (the benchmark harness, README "Performance"); a W4A4 SAQ step of
ResNet-18 at batch 16, 224x224, 1.85-1.89 s -> 1.71-1.73 s (median of 5 steps after 2, two
runs each; not a committed benchmark). The cost is memory: freed blocks stay with the process (up to the trim
threshold at the heap's top) instead of going back to the system.

``saq train`` applies it on the CPU (``--malloc-keep auto``); libraries should not change a
process-wide allocator setting on import, so nothing else calls it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Optional

__all__ = ["keep_large_cpu_blocks", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 256 << 20  # requests up to 256 MiB come from the heap
TRIM_THRESHOLD = 1 << 30  # free memory at the heap's top is returned past 1 GiB


def _glibc() -> Optional[ctypes.CDLL]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    # musl and others have no gnu_get_libc_version (and no such thresholds)
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def keep_large_cpu_blocks(mmap_threshold: int = MMAP_THRESHOLD,
                          trim_threshold: int = TRIM_THRESHOLD) -> Optional[str]:
    """Set glibc's mmap and trim thresholds for this process (see the module docstring).

    Returns None when applied, else the reason it was not (not Linux/glibc, or mallopt refused a
    value). Both thresholds are bytes and must fit in a C int.
    """
    for name, v in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if not isinstance(v, int) or not 0 < v < 2**31:
            raise ValueError(f"keep_large_cpu_blocks: {name}={v!r} must be an int in (0, 2**31)")
    libc = _glibc()
    if libc is None:
        return f"the C library of this platform ({sys.platform}) is not glibc"
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    if libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) != 1:
        return f"glibc refused mmap_threshold={mmap_threshold}"
    if libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold) != 1:
        return f"glibc refused trim_threshold={trim_threshold}"
    return None
