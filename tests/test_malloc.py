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


THREAD_RELEASE = """
import os, threading
from agent.malloc import keep_freed_memory, release_freed_memory
def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
assert keep_freed_memory()
start = rss()
def churn():  # like a link's or a pool's thread: MiB buffers allocated and freed off the main thread
    buffers = [bytearray(1 << 20) for _ in range(48)]
    del buffers
for _ in range(4):
    worker = threading.Thread(target=churn)
    worker.start()
    worker.join()
release_freed_memory()
print(start, rss())
"""


def test_memory_freed_in_threads_goes_back_when_released() -> None:
    # glibc's malloc_trim never shrinks the top of a thread's arena (only the main heap's), and
    # KEEP_FREE is larger than a thread heap, so before arenas were limited each migration's threads
    # left their buffers resident: the agent grew 12-20 MiB per migration.
    out = subprocess.run([sys.executable, "-c", THREAD_RELEASE], capture_output=True, text=True, check=True)
    start, released = map(int, out.stdout.split())
    assert released - start < 8 << 20, (start, released)
