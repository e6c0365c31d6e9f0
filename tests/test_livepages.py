"""Pre-copy from /proc/PID/mem: the live reader finds the pages CRIU dumps, with the same content,
and the delta it feeds sends only what changed, without stopping the process."""

from __future__ import annotations

import contextlib
import mmap
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from agent.checkpoint.delta import DeltaStats, PageTracker
from agent.checkpoint.images import PAGE_SIZE, read_pagemaps
from agent.checkpoint.livepages import (
    LiveMemoryUnavailable,
    LiveProcess,
    check_readable,
    live_processes,
    mappings,
    read_pages,
)
from tests.harness.workloads import MemhogStatus, static_binary

RESIDENT_MIB = 32


@contextlib.contextmanager
def memhog(tmp: Path, rate_mb_s: int) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    binary = tmp / "memhog"
    binary.write_bytes(static_binary("memhog"))
    binary.chmod(0o755)
    status = tmp / "status"
    with (tmp / "memhog.out").open("wb") as out:
        proc = subprocess.Popen(
            [str(binary), str(RESIDENT_MIB), str(rate_mb_s), str(status)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 30
        while b"memhog ready" not in (tmp / "memhog.out").read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, "memhog did not start"
            time.sleep(0.02)
        yield proc, status
    finally:
        proc.kill()
        proc.wait()


def live_pages(process: LiveProcess) -> dict[int, bytes]:
    buffer = bytearray(64 * PAGE_SIZE)
    return {
        start + i * PAGE_SIZE: bytes(data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE])
        for start, data in read_pages(process, buffer)
        for i in range(len(data) // PAGE_SIZE)
    }


def test_live_reader_matches_a_criu_dump(tmp_path: Path) -> None:
    with memhog(tmp_path, 0) as (proc, _):
        os.kill(proc.pid, signal.SIGSTOP)  # the same memory for both readers
        try:
            for _ in range(500):
                if Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T":
                    break
                time.sleep(0.002)
            (process,) = live_processes([proc.pid])
            assert process.pagemap == f"pagemap-{proc.pid}.img"  # no pid namespace here
            live = live_pages(process)
            vdso = next(m for m in mappings(proc.pid) if m.name == "[vdso]")
            images = tmp_path / "images"
            images.mkdir()
            subprocess.run(
                ["criu", "dump", "-t", str(proc.pid), "-D", str(images), "--leave-stopped", "--shell-job"],
                check=True,
                capture_output=True,
            )
        finally:
            os.kill(proc.pid, signal.SIGCONT)
    (pm,) = read_pagemaps(images)
    assert pm.name == process.pagemap
    dumped = list(pm.present_vaddrs())
    with (images / pm.pages_file).open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        dumped_data = {v: mm[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] for i, v in enumerate(dumped)}
    assert len(dumped) >= RESIDENT_MIB * 256
    # The same pages in the same (address) order, so the target's store can become CRIU's pages file
    # by a rename: the first code page (CRIU's parasite makes it private) included.
    assert sorted(live) == dumped
    differ = {v: sum(a != b for a, b in zip(live[v], d, strict=True)) for v, d in dumped_data.items() if live[v] != d}
    # Byte for byte but in the vDSO, which CRIU itself touches for the dump, and in the thread's rseq
    # area: when CRIU's parasite runs in the task, the kernel writes the CPU it ran on there (a
    # couple of bytes; for a static binary they live in its first heap page).
    others = {v: n for v, n in differ.items() if not vdso.start <= v < vdso.end}
    assert len(others) <= 1 and all(n <= 8 for n in others.values()), {hex(v): n for v, n in differ.items()}


def test_live_delta_sends_only_changed_pages(tmp_path: Path) -> None:
    with memhog(tmp_path, 20) as (proc, status):
        processes = live_processes([proc.pid])
        tracker = PageTracker()
        try:
            first = DeltaStats()
            sent = sum(len(b.vaddrs) for b in tracker.live_delta(processes, first))
            assert sent == first.changed >= RESIDENT_MIB * 256
            time.sleep(0.3)  # ~6 MB rewritten at 20 MB/s
            second = DeltaStats()
            resent = sum(len(b.vaddrs) for b in tracker.live_delta(processes, second))
            assert 0 < resent == second.changed < first.changed // 2
            assert second.unchanged > first.changed // 2
            beats_before = MemhogStatus.parse(status.read_text()).beats
            time.sleep(0.3)
            assert MemhogStatus.parse(status.read_text()).beats > beats_before  # never stopped
        finally:
            tracker.close()


def test_vanished_process_reads_nothing() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert live_processes([proc.pid]) == []
    assert list(read_pages(LiveProcess(proc.pid, "pagemap-1.img"), bytearray(PAGE_SIZE))) == []


def test_unreadable_memory_is_reported(tmp_path: Path) -> None:
    """Where ptrace rules refuse /proc/PID/mem (here: an unprivileged reader of root's process), the
    check says so, and pre-copy falls back to CRIU dumps."""
    with memhog(tmp_path, 0) as (proc, _):
        processes = live_processes([proc.pid])
        child = os.fork()
        if child == 0:  # pragma: no cover - runs in the child
            code = 3
            try:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                check_readable(processes)
                code = 1
            except LiveMemoryUnavailable as exc:
                code = 0 if "cannot read /proc/" in str(exc) else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        check_readable(processes)  # root may
