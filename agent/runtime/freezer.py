"""A container's cgroup freezer, written directly: a warm standby's freeze and thaw.

containerd's pause and resume run runc, a process started per call, on the activation's path;
under load that start alone is tens of milliseconds. Writing the freezer file is one syscall, so a
thaw lets the stage's processes run within a millisecond of the request (docs/chains.md, "Warm
standby"). containerd is not told: its task stays `running` while frozen, and the agent says which
containers it froze (runtime/service.py).

cgroup v1 (the `freezer` controller, used whenever it is mounted, as runc does on a hybrid host):
`freezer.state`, `FROZEN`/`THAWED`; a thaw is done when the write returns, a freeze passes through
`FREEZING` (waited for by re-reading, re-writing `FROZEN` as runc does). cgroup v2: `cgroup.freeze`,
`1`/`0`, done when `cgroup.events` says `frozen 1`/`frozen 0`: waited for by the kernel's
notification on that file (poll(2), POLLPRI), not by re-reading it.
"""

from __future__ import annotations

import asyncio
import os
import select
import time
from dataclasses import dataclass
from pathlib import Path

V1_STATE = "freezer.state"
V2_FREEZE = "cgroup.freeze"
V2_EVENTS = "cgroup.events"


class FreezerError(Exception):
    """The container's freezer cgroup could not be found, written, or did not reach its state."""


@dataclass(frozen=True)
class FreezerCgroup:
    version: int
    """1: the v1 `freezer` controller; 2: the unified hierarchy's `cgroup.freeze`."""
    path: Path
    """The cgroup's directory."""


def _mounts(mountinfo: str) -> tuple[dict[str, tuple[str, str]], tuple[str, str] | None]:
    """v1 cgroup mounts by controller, and the cgroup2 mount: each (root, mount point)."""
    v1: dict[str, tuple[str, str]] = {}
    v2: tuple[str, str] | None = None
    for line in mountinfo.splitlines():
        head, sep, tail = line.partition(" - ")
        fields, after = head.split(), tail.split()
        if not sep or len(fields) < 5 or len(after) < 3:
            continue
        root, point = fields[3], fields[4]
        if after[0] == "cgroup2" and v2 is None:
            v2 = (root, point)
        elif after[0] == "cgroup":
            for option in after[2].split(","):
                v1.setdefault(option, (root, point))
    return v1, v2


def _under(mount: tuple[str, str], cgroup: str) -> Path:
    root, point = mount
    relative = os.path.relpath(cgroup, root) if root != "/" else cgroup.lstrip("/")
    if relative.startswith(".."):
        raise FreezerError(f"cgroup {cgroup} is outside the mount of {root} at {point}")
    return Path(point) / ("" if relative == "." else relative)


def freezer_of(proc_cgroup: str, mountinfo: str) -> FreezerCgroup:
    """The freezer cgroup of a process, from its /proc/PID/cgroup and this process's mountinfo."""
    v1_mounts, v2_mount = _mounts(mountinfo)
    unified: str | None = None
    for line in proc_cgroup.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, cgroup = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            unified = cgroup
        elif "freezer" in controllers.split(","):
            if "freezer" not in v1_mounts:
                raise FreezerError("the process is in a v1 freezer cgroup, but no freezer hierarchy is mounted")
            return FreezerCgroup(1, _under(v1_mounts["freezer"], cgroup))
    if unified is not None and v2_mount is not None:
        return FreezerCgroup(2, _under(v2_mount, unified))
    raise FreezerError("the process is in no freezer cgroup (no v1 freezer, no cgroup2 mount)")


def locate(pid: int) -> FreezerCgroup:
    """The freezer cgroup of process `pid` (a container's init: its cgroup is the container's)."""
    try:
        proc_cgroup = Path(f"/proc/{pid}/cgroup").read_text()
        mountinfo = Path("/proc/self/mountinfo").read_text()
    except OSError as exc:
        raise FreezerError(f"reading the cgroup of pid {pid}: {exc}") from exc
    return freezer_of(proc_cgroup, mountinfo)


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise FreezerError(f"writing {value!r} to {path}: {exc}") from exc


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise FreezerError(f"reading {path}: {exc}") from exc


def events_frozen(events: str) -> bool | None:
    """`frozen` of a cgroup.events file: True, False, or None when the file has no such line."""
    for line in events.splitlines():
        key, _, value = line.partition(" ")
        if key == "frozen":
            return value.strip() == "1"
    return None


def is_frozen(cgroup: FreezerCgroup) -> bool:
    """Whether the cgroup is frozen (or, v1, freezing)."""
    if cgroup.version == 1:
        return _read(cgroup.path / V1_STATE).strip() in ("FROZEN", "FREEZING")
    return _read(cgroup.path / V2_FREEZE).strip() == "1"


def _await_v2(cgroup: FreezerCgroup, frozen: bool, deadline: float) -> None:
    """Block until cgroup.events says `frozen` is `frozen`: the kernel notifies the file (POLLPRI)
    on each change, so this sleeps in poll(2) rather than re-reading."""
    events = cgroup.path / V2_EVENTS
    try:
        fd = os.open(events, os.O_RDONLY)
    except OSError as exc:
        raise FreezerError(f"opening {events}: {exc}") from exc
    try:
        poller = select.poll()
        poller.register(fd, select.POLLPRI | select.POLLERR)
        while True:
            os.lseek(fd, 0, os.SEEK_SET)
            if events_frozen(os.read(fd, 4096).decode()) is frozen:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise FreezerError(f"{cgroup.path} not {'frozen' if frozen else 'thawed'} in time")
            poller.poll(left * 1000)
    finally:
        os.close(fd)


async def freeze(cgroup: FreezerCgroup, within: float = 10.0) -> None:
    """Freeze every process of the cgroup; returns once they all are."""
    deadline = time.monotonic() + within
    if cgroup.version == 2:
        _write(cgroup.path / V2_FREEZE, "1")
        await asyncio.to_thread(_await_v2, cgroup, True, deadline)
        return
    state = cgroup.path / V1_STATE
    while True:
        _write(state, "FROZEN")  # again each round: a task forking mid-freeze can leave it FREEZING
        if _read(state).strip() == "FROZEN":
            return
        if time.monotonic() > deadline:
            _write(state, "THAWED")
            raise FreezerError(f"{cgroup.path} still freezing after {within:g} s; thawed again")
        await asyncio.sleep(0.001)


async def thaw(cgroup: FreezerCgroup, within: float = 10.0) -> None:
    """Let the cgroup's processes run again. v1: done as the write returns (the kernel wakes every
    task in it before the write returns); v2: once cgroup.events says so."""
    if cgroup.version == 2:
        _write(cgroup.path / V2_FREEZE, "0")
        with open(cgroup.path / V2_EVENTS) as events:  # noqa: ASYNC230 - cgroupfs: never blocks
            if events_frozen(events.read()) is False:
                return
        await asyncio.to_thread(_await_v2, cgroup, False, time.monotonic() + within)
        return
    state = cgroup.path / V1_STATE
    _write(state, "THAWED")
    if _read(state).strip() != "THAWED":
        raise FreezerError(f"{cgroup.path} did not thaw")
