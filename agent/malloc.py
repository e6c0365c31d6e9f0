"""glibc malloc settings for processes that move memory in MiB-sized buffers (agent, pager).

A migration passes every page through a few large, short-lived buffers per MiB (reads, AEAD
output, decompression). With glibc's defaults each of them is an mmap of its own, or the free
at the heap's top is trimmed back to the kernel, so the next buffer faults in and zeroes fresh pages:
measured here, that made post-copy's push 40% slower and doubled the downtime a workload rewriting
50 MB/s saw. Keeping the freed memory in the process costs at most KEEP_FREE per arena.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 << 20
"""Allocations below this come from the heap, where freed memory is reused."""
KEEP_FREE = 256 << 20
"""Free memory at the heap's top kept rather than given back."""
TOP_PAD = 64 << 20
"""Extra grown with each heap extension, so a run of growing buffers extends it once."""


def keep_freed_memory() -> bool:
    """Applies the settings; False where the C library is not glibc (no mallopt)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, KEEP_FREE), (M_TOP_PAD, TOP_PAD))
    return all(mallopt(param, value) == 1 for param, value in settings)
