"""Read a running process's memory page by page, without freezing it (pre-copy without soft-dirty).

On kernels without soft-dirty tracking every CRIU dump, even one that leaves the tasks running,
keeps them frozen while it copies all of their memory out (about 1.25 s per GiB here, longer for
freshly touched tmpfs). Pre-copy rounds only need a good guess of the pages: a page that changes
while it is read, or after, gets a different digest when the final dump is compared, and is sent
again. So rounds read the pages straight from /proc/PID/mem while the workload runs.

Which pages: those CRIU would put in the process's pagemap. /proc/PID/pagemap says which pages
of each private mapping are present (or swapped); in a private file mapping only the pages the
process wrote (no longer the file's page cache page) count. Shared mappings and the kernel's
special mappings are CRIU's business alone. Keys match CRIU's: `pagemap-<pid in the container's
pid namespace>.img` and the page's virtual address.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.checkpoint.images import PAGE_SIZE

_PRESENT = np.uint64(1 << 63)
_SWAPPED = np.uint64(1 << 62)
_FILE_OR_SHARED = np.uint64(1 << 61)
# Kernel mappings CRIU does not take from the pagemap ([vdso] it does: it is read like the rest).
_SPECIAL = ("[vvar]", "[vvar_vclock]", "[vsyscall]", "[uprobes]")
_MAPS_LINE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ (\d+)\s*(.*)$")
# Pages per pread of /proc/PID/mem: 1 MiB, the stream's chunk.
READ_PAGES = 256
# Pagemap entries read at once: 512 KiB, so a huge sparse mapping is walked in bounded steps.
_PAGEMAP_STEP = 1 << 16


class LiveMemoryUnavailable(OSError):
    """/proc/PID/mem or /proc/PID/pagemap cannot be read (process gone, or ptrace not allowed)."""


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    private: bool
    readable: bool
    executable: bool
    anonymous: bool
    name: str


@dataclass(frozen=True)
class LiveProcess:
    host_pid: int
    pagemap: str
    """The name CRIU gives this process's pagemap image: pagemap-<namespace pid>.img."""


def namespace_pid(host_pid: int) -> int:
    """The process's pid in its innermost pid namespace (CRIU names its images by it)."""
    for line in Path(f"/proc/{host_pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    return host_pid


def live_processes(host_pids: list[int]) -> list[LiveProcess]:
    """The processes still alive among `host_pids`, named as CRIU will name them."""
    out = []
    for pid in sorted(set(host_pids)):
        try:
            out.append(LiveProcess(pid, f"pagemap-{namespace_pid(pid)}.img"))
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited meanwhile
    return out


def check_readable(processes: list[LiveProcess]) -> None:
    """Raise LiveMemoryUnavailable unless every process's memory can be opened for reading."""
    for process in processes:
        for what in ("pagemap", "mem"):
            try:
                os.close(os.open(f"/proc/{process.host_pid}/{what}", os.O_RDONLY))
            except (FileNotFoundError, ProcessLookupError):
                continue
            except OSError as exc:
                raise LiveMemoryUnavailable(
                    exc.errno, f"cannot read /proc/{process.host_pid}/{what}: {exc.strerror}"
                ) from exc


def mappings(host_pid: int) -> list[Mapping]:
    out = []
    for line in Path(f"/proc/{host_pid}/maps").read_text().splitlines():
        m = _MAPS_LINE.match(line)
        if m is None:
            continue
        perms, inode, name = m.group(3), int(m.group(4)), m.group(5).strip()
        out.append(
            Mapping(
                start=int(m.group(1), 16),
                end=int(m.group(2), 16),
                private=perms[3] == "p",
                readable=perms[0] == "r",
                executable=perms[2] == "x",
                anonymous=inode == 0 and not name.startswith("/"),
                name=name,
            )
        )
    return out


def _wanted(entries: np.ndarray, anonymous: bool) -> np.ndarray:
    """Indexes of the pages CRIU would dump from one private mapping's pagemap entries."""
    held = (entries & (_PRESENT | _SWAPPED)) != 0
    if not anonymous:  # file pages still shared with the page cache come back from the file
        held &= (entries & _FILE_OR_SHARED) == 0
    return np.flatnonzero(held)


def _runs(indexes: np.ndarray) -> Iterator[tuple[int, int]]:
    """(first, count) runs of consecutive indexes."""
    if len(indexes) == 0:
        return
    breaks = np.flatnonzero(np.diff(indexes) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(indexes)]))
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        yield int(indexes[s]), e - s


def read_pages(process: LiveProcess, buffer: bytearray) -> Iterator[tuple[int, memoryview]]:
    """(address, data) pieces of up to len(buffer) // 4096 consecutive pages from `address`, in
    address order.

    `data` is a view of `buffer`, valid until the next piece. Pages that vanish while being read
    (unmapped meanwhile) are skipped.
    """
    per_read = len(buffer) // PAGE_SIZE
    view = memoryview(buffer)
    with contextlib.ExitStack() as fds:
        try:
            pagemap_fd = os.open(f"/proc/{process.host_pid}/pagemap", os.O_RDONLY)
            fds.callback(os.close, pagemap_fd)
            mem_fd = os.open(f"/proc/{process.host_pid}/mem", os.O_RDONLY)
            fds.callback(os.close, mem_fd)
            vmas = mappings(process.host_pid)
        except (FileNotFoundError, ProcessLookupError):
            return  # the process exited: the final dump will not list it either
        except OSError as exc:
            raise LiveMemoryUnavailable(exc.errno, f"cannot read the memory of pid {process.host_pid}: {exc}") from exc
        # CRIU's parasite enters through the first page of the first executable mapping, which makes
        # that page private in every dump. Reading it too keeps our pages in CRIU's order.
        entry = next((vma.start for vma in vmas if vma.executable), None)
        for vma in vmas:
            if not vma.private or not vma.readable or vma.name in _SPECIAL:
                continue
            for step in range(vma.start, vma.end, _PAGEMAP_STEP * PAGE_SIZE):
                pages = min(_PAGEMAP_STEP, (vma.end - step) // PAGE_SIZE)
                entries = np.frombuffer(os.pread(pagemap_fd, pages * 8, (step // PAGE_SIZE) * 8), dtype=np.uint64)
                wanted = _wanted(entries, vma.anonymous)
                if vma.name == "[vdso]":  # CRIU reads all of it while it dumps, so dumps all of it
                    wanted = np.arange(pages)
                elif step == entry:
                    wanted = np.union1d(wanted, [0])
                for first, count in _runs(wanted):
                    for at in range(first, first + count, per_read):
                        n = min(per_read, first + count - at)
                        address = step + at * PAGE_SIZE
                        try:
                            got = os.preadv(mem_fd, [view[: n * PAGE_SIZE]], address)
                        except OSError:
                            continue  # unmapped since /proc/PID/maps was read
                        n = got // PAGE_SIZE
                        if n:
                            yield address, view[: n * PAGE_SIZE]
