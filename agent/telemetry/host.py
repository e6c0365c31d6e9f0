"""Reading this host's counters from /proc and /sys (blocking: call from a thread).

Each reading is a raw snapshot of cumulative counters; the sampler turns two of them into rates.
A source the kernel does not offer (no PSI, no EDAC, no MCE row) reads as None instead of failing the sample.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from agent.telemetry import procfs
from agent.telemetry.procfs import CpuTimes, IoBytes, PressureLine, TelemetryParseError

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class HostPaths:
    """Where the kernel interfaces are; tests point `edac` at a crafted tree, never /proc itself."""

    proc: Path = Path("/proc")
    sys_block: Path = Path("/sys/block")
    edac: Path = Path("/sys/devices/system/edac")


@dataclass(frozen=True)
class HostReading:
    cpu: CpuTimes | None
    load: tuple[float, float, float] | None
    meminfo: dict[str, int] | None
    pressure: dict[str, PressureLine]
    """cpu / memory / io -> avg10 values; a resource without PSI is absent."""
    disk: IoBytes | None
    net: IoBytes | None
    oom_kills: int | None
    edac: tuple[int, int] | None
    """(corrected, uncorrected) error counts summed over memory controllers; None without EDAC."""
    machine_checks: int | None = None
    """Machine check exceptions (the MCE row of /proc/interrupts, x86); None where there is none."""


def whole_disks(sys_block: Path) -> list[str]:
    """Block devices backed by hardware (they have a `device` link): loop, ram, zram, dm and md
    devices are left out, as they only re-count bytes of a real disk or never touch one."""
    try:
        return sorted(entry.name for entry in sys_block.iterdir() if (entry / "device").exists())
    except OSError:
        return []


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _parsed(what: str, text: str | None, parse: Callable[[str], T]) -> T | None:
    """Run a parser, turning a malformed file into an absent field (logged) rather than a lost sample."""
    if text is None:
        return None
    try:
        return parse(text)
    except TelemetryParseError as exc:
        log.warning("unreadable kernel file", extra={"source": what, "error": exc.message})
        return None


def read_edac(root: Path) -> tuple[int, int] | None:
    """Summed ce_count / ue_count of every memory controller under `root` (…/edac/mc/mc*)."""
    controllers = sorted((root / "mc").glob("mc*"))
    if not controllers:
        return None
    corrected = uncorrected = 0
    for mc in controllers:
        ce, ue = _read(mc / "ce_count"), _read(mc / "ue_count")
        try:
            corrected += int(ce) if ce is not None else 0
            uncorrected += int(ue) if ue is not None else 0
        except ValueError:
            log.warning("unreadable EDAC counter", extra={"controller": str(mc)})
    return corrected, uncorrected


def read_host(paths: HostPaths, disks: list[str]) -> HostReading:
    proc = paths.proc
    pressure: dict[str, PressureLine] = {}
    for resource in ("cpu", "memory", "io"):
        line = _parsed(f"/proc/pressure/{resource}", _read(proc / "pressure" / resource), procfs.parse_pressure)
        if line is not None:
            pressure[resource] = line
    diskstats = _read(proc / "diskstats")
    vmstat = _read(proc / "vmstat")
    return HostReading(
        cpu=_parsed("/proc/stat", _read(proc / "stat"), procfs.parse_cpu_times),
        load=_parsed("/proc/loadavg", _read(proc / "loadavg"), procfs.parse_loadavg),
        meminfo=_parsed("/proc/meminfo", _read(proc / "meminfo"), procfs.parse_meminfo),
        pressure=pressure,
        disk=_parsed("/proc/diskstats", diskstats, lambda text: procfs.parse_diskstats(text, disks)),
        # /proc/net/dev is per network namespace: these are the agent's own namespace's interfaces.
        net=_parsed("/proc/net/dev", _read(proc / "net" / "dev"), procfs.parse_net_dev),
        oom_kills=_parsed("/proc/vmstat", vmstat, lambda text: procfs.parse_vmstat(text, "oom_kill")),
        edac=read_edac(paths.edac),
        machine_checks=_parsed(
            "/proc/interrupts", _read(proc / "interrupts"), lambda text: procfs.parse_interrupt_total(text, "MCE")
        ),
    )


def online_cpus() -> int:
    """CPUs this process may run on (what containers here can use)."""
    return len(os.sched_getaffinity(0)) or os.cpu_count() or 1
