"""One telemetry sample of this host: the kernel's counters turned into levels and rates, the
containers, the events since the previous sample, and the capacity held by reservations."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from agent.config import TelemetryConfig
from agent.telemetry import procfs
from agent.telemetry.containers import ContainerReading
from agent.telemetry.events import CounterDelta, EdacErrors, NoticeFile
from agent.telemetry.host import HostPaths, HostReading, online_cpus, read_host, whole_disks
from agent.telemetry.notices import (
    AwsNotices,
    AzureNotices,
    CloudNotices,
    Dedup,
    GceNotices,
    MetadataClient,
    NoticeSource,
    SmartHealth,
    SystemdShutdown,
)
from core.errors import FerrymanError
from proto.ferryman.v1 import fleet_pb2 as pb

log = logging.getLogger(__name__)

ContainerSource = Callable[[], Awaitable[list[ContainerReading]]]
ReservedSource = Callable[[], pb.Capacity]
LayerCostsSource = Callable[[], Mapping[str, float]]
"""LayerCosts fields measured so far (agent/composition/costs.py CostMeter.measured)."""


class Sampler:
    """Takes samples; rates are over the time since the previous call, so the first sample has none."""

    def __init__(
        self,
        config: TelemetryConfig,
        containers: ContainerSource | None = None,
        reserved: ReservedSource | None = None,
        paths: HostPaths | None = None,
        layer_costs: LayerCostsSource | None = None,
    ) -> None:
        self._paths = paths or HostPaths()
        self._containers = containers
        self._reserved = reserved
        self._layer_costs = layer_costs
        self._notices = [
            NoticeFile(config.drain_notice_file, pb.DRAIN_NOTICE),
            NoticeFile(config.maintenance_file, pb.MAINTENANCE),
            NoticeFile(config.preemption_file, pb.PREEMPTION),
        ]
        self._oom = CounterDelta(pb.OOM_KILL, "processes killed by the OOM killer")
        self._edac = EdacErrors()
        self._machine_checks = CounterDelta(pb.HW_ERROR, "machine check exceptions")
        self._disks = whole_disks(self._paths.sys_block)
        self._cloud = cloud_notices(config)
        nc = config.notices
        self._systemd = SystemdShutdown(nc.systemd_shutdown_file) if nc.systemd_shutdown_file else None
        self._systemd_seen = Dedup()
        self._smart = SmartHealth(nc.smartctl, self._disks, nc.smart_interval)
        self._cpus = online_cpus()
        self._previous: tuple[HostReading, float] | None = None

    async def sample(self) -> pb.TelemetrySample:
        ts = time.time()
        reading, notices = await asyncio.to_thread(self._read_blocking, ts)
        notices.extend(await self._cloud.poll(ts))
        now = time.monotonic()
        sample = pb.TelemetrySample(ts=ts, cpus=self._cpus)
        _levels(sample, reading)
        if self._previous is not None:
            before, at = self._previous
            _rates(sample, before, reading, now - at)
        self._previous = (reading, now)
        events = [*notices]
        if (oom := self._oom.update(reading.oom_kills, ts)) is not None:
            events.append(oom)
        events.extend(self._edac.update(reading.edac, ts))
        if (mce := self._machine_checks.update(reading.machine_checks, ts)) is not None:
            events.append(mce)
        sample.events.extend(events)
        for event in events:
            log.info("host event", extra={"kind": pb.HostEventKind.Name(event.kind), "detail": event.detail})
        if self._containers is not None:
            try:
                containers = await self._containers()
            except (FerrymanError, OSError) as exc:
                # containerd away: the host part of the sample is still worth sending.
                log.warning("cannot read containers for telemetry", extra={"error": str(exc)})
            else:
                for c in containers:
                    usage = pb.ContainerUsage(
                        id=c.id, image=c.image, memory_bytes=c.memory_bytes, cpu_millis=c.cpu_millis, labels=c.labels
                    )
                    if c.packets_in_per_s is not None:
                        usage.packets_in_per_s = c.packets_in_per_s
                    sample.containers.append(usage)
        if self._reserved is not None:
            sample.reserved.CopyFrom(self._reserved())
        if self._layer_costs is not None and (costs := self._layer_costs()):
            sample.layer_costs.CopyFrom(pb.LayerCosts(**costs))
        return sample

    def _read_blocking(self, ts: float) -> tuple[HostReading, list[pb.HostEvent]]:
        reading = read_host(self._paths, self._disks)
        notices = [event for notice in self._notices if (event := notice.poll(ts)) is not None]
        if self._systemd is not None:
            notices.extend(n.event(ts) for n in self._systemd_seen.new(self._systemd.read_blocking()))
        notices.extend(self._smart.read_blocking(ts))
        return reading, notices

    async def close(self) -> None:
        await self._cloud.close()


def cloud_notices(config: TelemetryConfig) -> CloudNotices:
    """The metadata sources configured in [telemetry.notices] (none on a bare-metal host)."""
    nc = config.notices
    client = MetadataClient(nc.request_timeout)
    sources: list[NoticeSource] = []
    if nc.aws_metadata_url:
        sources.append(AwsNotices(client, nc.aws_metadata_url))
    if nc.azure_scheduled_events_url:
        sources.append(AzureNotices(client, nc.azure_scheduled_events_url, nc.azure_vm_name))
    if nc.gce_metadata_url:
        sources.append(GceNotices(client, nc.gce_metadata_url))
    return CloudNotices(sources, client)


def _levels(sample: pb.TelemetrySample, reading: HostReading) -> None:
    if reading.load is not None:
        sample.load1, sample.load5, sample.load15 = reading.load
    if reading.meminfo is not None:
        sample.memory_total_bytes = reading.meminfo["MemTotal"]
        if "MemAvailable" in reading.meminfo:
            sample.memory_available_bytes = reading.meminfo["MemAvailable"]
    pressure = reading.pressure
    if "cpu" in pressure and pressure["cpu"].some is not None:
        sample.pressure.cpu_some = pressure["cpu"].some
    for name in ("memory", "io"):
        if name in pressure:
            line = pressure[name]
            if line.some is not None:
                setattr(sample.pressure, f"{name}_some", line.some)
            if line.full is not None:
                setattr(sample.pressure, f"{name}_full", line.full)


def _rates(sample: pb.TelemetrySample, before: HostReading, after: HostReading, seconds: float) -> None:
    if before.cpu is not None and after.cpu is not None:
        util = procfs.cpu_utilisation(before.cpu, after.cpu)
        if util is not None:
            sample.cpu_util = util
    pairs = (
        (before.disk, after.disk, "disk_read_bps", "disk_write_bps"),
        (before.net, after.net, "net_rx_bps", "net_tx_bps"),
    )
    for old, new, read_field, write_field in pairs:
        if old is None or new is None:
            continue
        if (r := procfs.rate(old.read, new.read, seconds)) is not None:
            setattr(sample, read_field, r)
        if (w := procfs.rate(old.written, new.written, seconds)) is not None:
            setattr(sample, write_field, w)
