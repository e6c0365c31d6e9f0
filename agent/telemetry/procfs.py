"""Pure parsers for the kernel's text interfaces (/proc, /sys): text in, numbers out.

They never touch the filesystem, so tests feed them both real files and crafted text. Malformed
input raises `TelemetryParseError` naming the source; a field the kernel does not provide is None.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from core.errors import FerrymanError

SECTOR_BYTES = 512
"""/proc/diskstats counts 512-byte sectors whatever the device's real sector size."""


class TelemetryParseError(FerrymanError):
    """A kernel file did not have the expected shape."""

    code = "telemetry_parse_error"
    http_status = 500


@dataclass(frozen=True)
class CpuTimes:
    """The aggregate `cpu` line of /proc/stat, in USER_HZ ticks."""

    busy: int
    total: int


def parse_cpu_times(stat: str) -> CpuTimes:
    for line in stat.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            try:
                values = [int(v) for v in fields[1:]]
            except ValueError as exc:
                raise TelemetryParseError(f"/proc/stat: bad cpu line {line!r}") from exc
            if len(values) < 4:
                raise TelemetryParseError(f"/proc/stat: cpu line has {len(values)} fields, expected >= 4")
            # user nice system idle iowait irq softirq steal guest guest_nice: guest time is already
            # inside user/nice, so it is left out of the total; idle and iowait are not busy.
            counted = values[:8]
            idle = counted[3] + (counted[4] if len(counted) > 4 else 0)
            total = sum(counted)
            return CpuTimes(busy=total - idle, total=total)
    raise TelemetryParseError("/proc/stat: no aggregate cpu line")


def cpu_utilisation(before: CpuTimes, after: CpuTimes) -> float | None:
    """Busy share of all CPUs between two readings (0..1); None when no time passed."""
    total = after.total - before.total
    if total <= 0:
        return None
    return min(max((after.busy - before.busy) / total, 0.0), 1.0)


def parse_loadavg(text: str) -> tuple[float, float, float]:
    fields = text.split()
    try:
        return float(fields[0]), float(fields[1]), float(fields[2])
    except (IndexError, ValueError) as exc:
        raise TelemetryParseError(f"/proc/loadavg: unexpected content {text.strip()!r}") from exc


def parse_meminfo(text: str) -> dict[str, int]:
    """Every /proc/meminfo entry in bytes (kB values converted); page counts stay counts."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        if not sep:
            continue
        parts = rest.split()
        if not parts:
            continue
        try:
            value = int(parts[0])
        except ValueError as exc:
            raise TelemetryParseError(f"/proc/meminfo: bad value in {line!r}") from exc
        out[name.strip()] = value * 1024 if len(parts) > 1 and parts[1] == "kB" else value
    if "MemTotal" not in out:
        raise TelemetryParseError("/proc/meminfo: no MemTotal")
    return out


@dataclass(frozen=True)
class PressureLine:
    some: float | None
    full: float | None


def parse_pressure(text: str) -> PressureLine:
    """avg10 of the `some` and `full` lines of a /proc/pressure/* file (percent)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        fields = line.split()
        if not fields or fields[0] not in ("some", "full"):
            continue
        for item in fields[1:]:
            key, _, number = item.partition("=")
            if key == "avg10":
                try:
                    values[fields[0]] = float(number)
                except ValueError as exc:
                    raise TelemetryParseError(f"pressure: bad avg10 in {line!r}") from exc
    if "some" not in values:
        raise TelemetryParseError(f"pressure: no 'some' line in {text.strip()!r}")
    return PressureLine(some=values["some"], full=values.get("full"))


@dataclass(frozen=True)
class IoBytes:
    """Cumulative byte counters of a set of devices or interfaces."""

    read: int
    written: int


def parse_diskstats(text: str, disks: Iterable[str]) -> IoBytes:
    """Bytes read and written by the named whole disks (partitions would count the same bytes twice)."""
    wanted = set(disks)
    read = written = 0
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 10 or fields[2] not in wanted:
            continue
        try:
            # major minor name reads merged sectors_read ms writes merged sectors_written ...
            read += int(fields[5]) * SECTOR_BYTES
            written += int(fields[9]) * SECTOR_BYTES
        except ValueError as exc:
            raise TelemetryParseError(f"/proc/diskstats: bad line {line!r}") from exc
    return IoBytes(read, written)


def parse_net_dev(text: str, exclude: Iterable[str] = ("lo",)) -> IoBytes:
    """Bytes received (`read`) and sent (`written`) by every interface but the excluded ones."""
    skip = set(exclude)
    rx = tx = 0
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        if not sep or "|" in line:
            continue  # the two header lines
        name = name.strip()
        if name in skip:
            continue
        fields = rest.split()
        try:
            rx += int(fields[0])
            tx += int(fields[8])
        except (IndexError, ValueError) as exc:
            raise TelemetryParseError(f"/proc/net/dev: bad line {line!r}") from exc
    return IoBytes(rx, tx)


def parse_vmstat(text: str, key: str) -> int | None:
    """One counter of /proc/vmstat (e.g. oom_kill); None when this kernel has no such counter."""
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0] == key:
            try:
                return int(fields[1])
            except ValueError as exc:
                raise TelemetryParseError(f"/proc/vmstat: bad {key} line {line!r}") from exc
    return None


def parse_interrupt_total(text: str, name: str) -> int | None:
    """The count of one /proc/interrupts row summed over CPUs (e.g. `MCE`, machine check
    exceptions on x86); None when this kernel has no such row."""
    for line in text.splitlines():
        label, _, rest = line.strip().partition(":")
        if label != name:
            continue
        total = 0
        for field in rest.split():
            if not field.isdigit():
                break  # the description after the per-CPU counts
            total += int(field)
        return total
    return None


def rate(before: int, after: int, seconds: float) -> float | None:
    """Per-second rate of a cumulative counter; None when no time passed or the counter went back
    (a device or interface vanished between readings)."""
    if seconds <= 0 or after < before:
        return None
    return (after - before) / seconds


# ---- cgroup files (v1 and v2)


def parse_cgroup_int(text: str) -> int | None:
    """A cgroup counter or limit; None for `max` (unlimited)."""
    value = text.strip()
    if value == "max":
        return None
    try:
        return int(value)
    except ValueError as exc:
        raise TelemetryParseError(f"cgroup: expected a number or 'max', got {value!r}") from exc


UNLIMITED_V1 = 1 << 62
"""cgroup v1 reports 'no memory limit' as a page-rounded LONG_MAX; anything this large is unlimited."""


def parse_memory_limit_v1(text: str) -> int | None:
    value = parse_cgroup_int(text)
    return None if value is None or value >= UNLIMITED_V1 else value


def parse_cpu_max(text: str) -> float | None:
    """cgroup v2 cpu.max (`quota period` or `max period`) as millicores; None when unlimited."""
    fields = text.split()
    if len(fields) != 2:
        raise TelemetryParseError(f"cpu.max: unexpected content {text.strip()!r}")
    if fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError as exc:
        raise TelemetryParseError(f"cpu.max: unexpected content {text.strip()!r}") from exc
    return quota * 1000 / period if period > 0 else None


def cpu_quota_v1(quota_text: str, period_text: str) -> float | None:
    """cgroup v1 cpu.cfs_quota_us / cpu.cfs_period_us as millicores; None when unlimited (-1)."""
    try:
        quota, period = int(quota_text.strip()), int(period_text.strip())
    except ValueError as exc:
        raise TelemetryParseError(f"cpu.cfs_quota_us/period: {quota_text.strip()!r}/{period_text.strip()!r}") from exc
    if quota < 0 or period <= 0:
        return None
    return quota * 1000 / period


def parse_cpu_stat_usage_us(text: str) -> int:
    """cgroup v2 cpu.stat usage_usec."""
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0] == "usage_usec":
            try:
                return int(fields[1])
            except ValueError as exc:
                raise TelemetryParseError(f"cpu.stat: bad line {line!r}") from exc
    raise TelemetryParseError("cpu.stat: no usage_usec")
