"""agent/runtime/freezer.py: finding a process's freezer cgroup, and freezing and thawing one for real."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.runtime import freezer
from agent.runtime.freezer import FreezerCgroup, FreezerError, events_frozen, freezer_of

HYBRID_MOUNTS = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs ro,size=4096k,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
40 31 0:37 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V2_MOUNTS = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"


def test_v1_freezer_is_used_whenever_it_is_mounted() -> None:
    proc = "7:freezer:/ferryman/ferryman/stage-1\n4:memory:/ferryman/ferryman/stage-1\n0::/system.slice/x\n"
    assert freezer_of(proc, HYBRID_MOUNTS) == FreezerCgroup(1, Path("/sys/fs/cgroup/freezer/ferryman/ferryman/stage-1"))


def test_v2_uses_the_unified_cgroup() -> None:
    proc = "0::/ferryman.slice/ferryman-stage-1.scope\n"
    assert freezer_of(proc, V2_MOUNTS) == FreezerCgroup(2, Path("/sys/fs/cgroup/ferryman.slice/ferryman-stage-1.scope"))


def test_a_mount_of_a_subtree_is_followed() -> None:
    """Inside a cgroup namespace or a bind mount, the mount's root is a cgroup, not /."""
    mounts = "37 31 0:34 /outer /sys/fs/cgroup/freezer rw - cgroup cgroup rw,freezer\n"
    assert freezer_of("6:freezer:/outer/c1\n", mounts).path == Path("/sys/fs/cgroup/freezer/c1")
    with pytest.raises(FreezerError, match="outside the mount"):
        freezer_of("6:freezer:/elsewhere/c1\n", mounts)


def test_no_freezer_is_a_clear_error() -> None:
    with pytest.raises(FreezerError, match="no freezer hierarchy is mounted"):
        freezer_of("6:freezer:/c\n", V2_MOUNTS)
    with pytest.raises(FreezerError, match="in no freezer cgroup"):
        freezer_of("4:memory:/c\n", HYBRID_MOUNTS)


def test_events_frozen_reads_the_frozen_line() -> None:
    assert events_frozen("populated 1\nfrozen 1\n") is True
    assert events_frozen("populated 1\nfrozen 0\n") is False
    assert events_frozen("populated 1\n") is None


def _state(pid: int) -> str:
    """The scheduler state of a process: a frozen one sleeps (D or S) and accrues no CPU time."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


@pytest.fixture
def spinner() -> Iterator[tuple[int, FreezerCgroup]]:
    """A busy-looping process in a freezer cgroup of its own (cgroup v1 or v2, as this host has)."""
    proc = subprocess.Popen(["sh", "-c", "while :; do :; done"])
    located = freezer.locate(proc.pid)
    name = f"ferryman-test-{secrets.token_hex(4)}"
    own = Path("/sys/fs/cgroup/freezer") / name if located.version == 1 else located.path / name
    own.mkdir()
    try:
        (own / "cgroup.procs").write_text(str(proc.pid))
        yield proc.pid, FreezerCgroup(located.version, own)
    finally:
        proc.kill()
        if located.version == 1:
            (own / "freezer.state").write_text("THAWED")
        else:
            (own / "cgroup.freeze").write_text("0")
        proc.wait()
        own.rmdir()


async def test_freeze_stops_the_cpu_and_thaw_gives_it_back(spinner: tuple[int, FreezerCgroup]) -> None:
    pid, cgroup = spinner
    assert freezer.locate(pid) == cgroup
    assert not freezer.is_frozen(cgroup)
    await freezer.freeze(cgroup)
    assert freezer.is_frozen(cgroup)
    before = _cpu_ticks(pid)
    await asyncio.sleep(0.3)
    assert _cpu_ticks(pid) == before, "a frozen process ran"
    assert _state(pid) in ("D", "S"), _state(pid)
    await freezer.thaw(cgroup)
    assert not freezer.is_frozen(cgroup)
    await asyncio.sleep(0.3)
    assert _cpu_ticks(pid) > before, "the thawed process did not run"


def test_a_gone_process_is_a_clear_error() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    with pytest.raises(FreezerError, match=f"reading the cgroup of pid {proc.pid}"):
        freezer.locate(proc.pid)
