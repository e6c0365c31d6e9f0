"""What the running containers use and may use, from their cgroups (v2 or v1).

Containers live in the cgroup `<cgroup_parent>/<namespace>/<id>` (agent/runtime/service.py). Memory is
memory.current (v2) or memory.usage_in_bytes (v1); limits are memory.max / cpu.max (v2) or
memory.limit_in_bytes / cpu.cfs_quota_us (v1). CPU use is the rate of the cgroup's usage counter
between two readings.

A container with a service address also has its request rate measured, as the packets per second
its network takes in: the rate of its veth's counter between two readings (ServiceNetwork.packets_in;
nothing runs in the container or on its path). Packets, not requests: a small request over a kept-
alive connection is one or two packets (the request, the ACK of the answer), a fresh connection
about six, an upload one per 1.4 KB or so. For a workload whose requests keep their shape from
run to run the rate is proportional to its requests, which is what the chain usage model takes (a
stage's rate now over its rate in the last run, docs/chains.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.model import ContainerState, ContainerSummary
from agent.telemetry import procfs
from agent.telemetry.procfs import TelemetryParseError
from core.errors import FerrymanError

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
MIN_RATE_WINDOW = 1.0
"""Seconds: a CPU rate over a shorter window is noise, so the previous rate is kept instead."""
ACTIVE = (ContainerState.RUNNING, ContainerState.PAUSED)
"""States whose memory is held (a paused container keeps all of it)."""

PacketsSource = Callable[[Sequence[str]], Awaitable[dict[str, int]]]
"""The packets each of the given containers has received so far (ServiceNetwork.packets_in); a
container without a network of its own is left out."""


@dataclass(frozen=True)
class CounterMark:
    """A counter's last reading and the rate measured up to it (None: not measured yet)."""

    count: int
    at: float
    rate: float | None = None


def counter_rate(previous: CounterMark | None, count: int, now: float) -> CounterMark:
    """The rate of a cumulative counter (per second) from its previous reading to `count` at `now`.
    A window under MIN_RATE_WINDOW keeps the previous reading and its rate (a second reader, the
    admission's, must not shorten telemetry's window into noise); a counter that went back (the
    veth was made again) starts over, unmeasured."""
    if previous is None or count < previous.count:
        return CounterMark(count, now)
    elapsed = now - previous.at
    if elapsed < MIN_RATE_WINDOW:
        return previous
    return CounterMark(count, now, (count - previous.count) / elapsed)


@dataclass(frozen=True)
class ContainerReading:
    id: str
    image: str
    labels: dict[str, str]
    memory_bytes: int
    memory_limit: int | None
    """None: no limit."""
    cpu_millis: float
    cpu_limit_millis: float | None
    packets_in_per_s: float | None = None
    """The packets per second its network took in since the reading before (None: it has no
    network of its own, or no earlier reading to measure from)."""

    @property
    def committed_memory(self) -> int:
        """What the container may use: its limit, or what it uses now when it has none."""
        return self.memory_limit if self.memory_limit is not None else self.memory_bytes

    @property
    def committed_cpu_millis(self) -> float:
        return self.cpu_limit_millis if self.cpu_limit_millis is not None else self.cpu_millis


@dataclass(frozen=True)
class _CgroupFiles:
    memory_bytes: int
    memory_limit: int | None
    cpu_limit_millis: float | None
    cpu_usage_ns: int | None


def _text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def read_cgroup(root: Path, relative: str) -> _CgroupFiles | None:
    """One container's cgroup files (blocking); None when the cgroup is gone (it just stopped)."""
    rel = relative.lstrip("/")
    try:
        if (root / "cgroup.controllers").exists():  # the unified (v2) hierarchy
            base = root / rel
            current = _text(base / "memory.current")
            if current is None:
                return None
            limit_text, cpu_max = _text(base / "memory.max"), _text(base / "cpu.max")
            cpu_stat = _text(base / "cpu.stat")
            return _CgroupFiles(
                memory_bytes=procfs.parse_cgroup_int(current) or 0,
                memory_limit=procfs.parse_cgroup_int(limit_text) if limit_text is not None else None,
                cpu_limit_millis=procfs.parse_cpu_max(cpu_max) if cpu_max is not None else None,
                cpu_usage_ns=procfs.parse_cpu_stat_usage_us(cpu_stat) * 1000 if cpu_stat is not None else None,
            )
        memory = root / "memory" / rel
        usage = _text(memory / "memory.usage_in_bytes")
        if usage is None:
            return None
        limit_text = _text(memory / "memory.limit_in_bytes")
        quota, period = _text(root / "cpu" / rel / "cpu.cfs_quota_us"), _text(root / "cpu" / rel / "cpu.cfs_period_us")
        acct = _text(root / "cpuacct" / rel / "cpuacct.usage")
        return _CgroupFiles(
            memory_bytes=procfs.parse_cgroup_int(usage) or 0,
            memory_limit=procfs.parse_memory_limit_v1(limit_text) if limit_text is not None else None,
            cpu_limit_millis=procfs.cpu_quota_v1(quota, period) if quota is not None and period is not None else None,
            cpu_usage_ns=procfs.parse_cgroup_int(acct) if acct is not None else None,
        )
    except TelemetryParseError:
        return None


class ContainerUsageReader:
    """Reads the active containers' use and limits; keeps the last CPU counters to turn them into rates."""

    def __init__(
        self,
        list_containers: Callable[[], Awaitable[list[ContainerSummary]]],
        cgroup_parent: str,
        namespace: str,
        cgroup_root: Path = CGROUP_ROOT,
        packets_in: PacketsSource | None = None,
    ) -> None:
        self._list = list_containers
        self._packets_in = packets_in
        self._packets: dict[str, CounterMark] = {}
        self._prefix = f"{cgroup_parent.rstrip('/')}/{namespace}"
        self._root = cgroup_root
        self._cpu: dict[str, tuple[int, float, float]] = {}  # id -> (usage ns, monotonic s, last rate)

    async def read(self) -> list[ContainerReading]:
        active = [c for c in await self._list() if c.state in ACTIVE]
        files = await asyncio.to_thread(
            lambda: [(c, read_cgroup(self._root, f"{self._prefix}/{c.id}")) for c in active]
        )
        packets: dict[str, int] = {}
        if self._packets_in is not None:
            try:
                packets = await self._packets_in([c.id for c in active])
            except FerrymanError as exc:  # usage without rates beats no usage (admission reads it too)
                log.warning("cannot read the containers' packet counters", extra={"error": str(exc)})
        now = time.monotonic()
        out: list[ContainerReading] = []
        seen: set[str] = set()
        for summary, cg in files:
            if cg is None:
                continue
            seen.add(summary.id)
            out.append(
                ContainerReading(
                    id=summary.id,
                    image=summary.image,
                    labels=dict(summary.labels),
                    memory_bytes=cg.memory_bytes,
                    memory_limit=cg.memory_limit,
                    cpu_millis=self._cpu_rate(summary.id, cg.cpu_usage_ns, now),
                    cpu_limit_millis=cg.cpu_limit_millis,
                    packets_in_per_s=self._packet_rate(summary.id, packets.get(summary.id), now),
                )
            )
        for gone in set(self._cpu) - seen:
            del self._cpu[gone]
        for gone in set(self._packets) - seen:
            del self._packets[gone]
        return out

    def _packet_rate(self, container_id: str, count: int | None, now: float) -> float | None:
        if count is None:
            self._packets.pop(container_id, None)
            return None
        mark = counter_rate(self._packets.get(container_id), count, now)
        self._packets[container_id] = mark
        return mark.rate

    def _cpu_rate(self, container_id: str, usage_ns: int | None, now: float) -> float:
        if usage_ns is None:
            return 0.0
        previous = self._cpu.get(container_id)
        if previous is None:
            self._cpu[container_id] = (usage_ns, now, 0.0)
            return 0.0
        last_ns, last_at, last_rate = previous
        elapsed = now - last_at
        if elapsed < MIN_RATE_WINDOW:
            return last_rate
        # ns of CPU per s of wall time, / 1e6 -> millicores.
        rate = max(usage_ns - last_ns, 0) / elapsed / 1e6
        self._cpu[container_id] = (usage_ns, now, rate)
        return rate
