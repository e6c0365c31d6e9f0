"""agent.malloc: MiB-sized buffers freed and allocated again reuse memory instead of faulting it in."""

from __future__ import annotations

import subprocess
import sys

CHURN = """
import resource, sys
from agent.malloc import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def churn():
    for _ in range(20):  # like a migration: a batch of MiB buffers, then all freed
        buffers = [bytearray(1 << 20) for _ in range(16)]
        del buffers
churn()  # the first round faults in whatever it keeps
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def minor_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True)
    return int(out.stdout)


def test_freed_buffers_are_reused_without_faults() -> None:
    default, kept = minor_faults("default"), minor_faults("keep")
    # 20 rounds of 16 MiB is 81920 pages: glibc's defaults fault most of them in again.
    assert default > 20_000, default
    assert kept < default // 10, (kept, default)


RELEASE = """
import os
from agent.malloc import keep_freed_memory, release_freed_memory
def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
assert keep_freed_memory()
buffers = [bytearray(1 << 20) for _ in range(64)]
del buffers
kept = rss()
assert release_freed_memory()
print(kept, rss())
"""


def test_kept_memory_goes_back_when_released() -> None:
    out = subprocess.run([sys.executable, "-c", RELEASE], capture_output=True, text=True, check=True)
    kept, released = map(int, out.stdout.split())
    assert kept - released > 48 << 20, (kept, released)  # most of the 64 MiB freed
