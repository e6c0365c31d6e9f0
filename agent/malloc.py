"""glibc malloc settings for processes that move memory in MiB-sized buffers (agent, pager).

A migration passes every page through a few large, short-lived buffers per MiB (reads, AEAD
output, decompression). With glibc's defaults each of them is an mmap of its own, or the free
at the heap's top is trimmed back to the kernel, so the next buffer faults in and zeroes fresh pages:
measured here, a 1 GiB lazy migration then took 7.0-7.8 s instead of 4.1-5.2 s, and a workload
rewriting 50 MB/s saw about twice the downtime. Keeping the freed memory costs up to KEEP_FREE per
arena while migrations run; release_freed_memory gives it back once they are over.

All threads share the main arena (ARENA_MAX): glibc's malloc_trim gives back the free memory inside
a thread arena but never shrinks its top, and KEEP_FREE is larger than a thread heap, so the top
never shrinks on free either. The buffers of each migration's threads (links, seal workers, page
hashing) stayed resident: the agent grew 12-20 MiB per 256 MiB migration, 40-50 MiB per two 1 GiB
ones, for good. The threads allocate a few buffers per MiB and mostly hold the GIL while they do,
so one arena's lock costs nothing measurable.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
ARENA_MAX = 1
"""Arenas for the whole process: the main one, which malloc_trim can shrink."""
MMAP_THRESHOLD = 128 << 20
"""Allocations below this come from the heap, where freed memory is reused."""
KEEP_FREE = 256 << 20
"""Free memory at the heap's top kept rather than given back."""
TOP_PAD = 64 << 20
"""Extra grown with each heap extension, so a run of growing buffers extends it once."""


def _glibc_function(name: str) -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Applies the settings; False where the C library is not glibc (no mallopt). Call it before
    the process starts threads: a thread that already has an arena keeps it."""
    mallopt = _glibc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    settings = (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (M_TRIM_THRESHOLD, KEEP_FREE),
        (M_TOP_PAD, TOP_PAD),
        (M_ARENA_MAX, ARENA_MAX),
    )
    return all(mallopt(param, value) == 1 for param, value in settings)


def release_freed_memory() -> bool:
    """Gives the free memory of every arena back to the kernel (glibc's malloc_trim); False where
    there is none to give or no glibc."""
    malloc_trim = _glibc_function("malloc_trim")
    if malloc_trim is None:
        return False
    malloc_trim.argtypes = (ctypes.c_size_t,)
    return bool(malloc_trim(0))
