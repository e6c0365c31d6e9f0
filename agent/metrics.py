"""Prometheus metrics of one agent, in a registry of its own (no process-global collectors)."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Iterator

from google.protobuf.message import Message
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.cache.stats import CacheCounters
from agent.migration.record import MigrationRecord
from agent.migration.states import State
from agent.stream.options import StreamTotals
from core.config import MIGRATION_MODES
from proto.ferryman.v1 import fleet_pb2 as pb

_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# Downtime targets are tens to hundreds of ms; a bad round can freeze for many seconds.
_DOWNTIME_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2.5, 5, 10, 30, 60)
_MIGRATION_BUCKETS = (1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
# MigrationOptions allows 1..64 pre-copy rounds.
_ITERATION_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 48, 64)
MIGRATION_ROLES = ("source", "target")
_RESULTS = {State.COMMIT: "committed", State.ROLLBACK: "rolled_back", State.NEEDS_OPERATOR: "needs_operator"}
"""The `result` label of a finished migration, by its terminal state."""
_SOURCE_MODES = tuple(m for m in MIGRATION_MODES if m != "auto")
"""The modes a source records (it resolves `auto` before it starts); a target records none ("")."""


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.pull_bytes = Counter(
            "ferryman_pull_bytes", "Layer bytes downloaded from registries", registry=self.registry
        )
        self.peer_bytes = Counter(
            "ferryman_peer_bytes",
            "Blob bytes fetched from (in) or served to (out) fleet peers",
            ["direction"],
            registry=self.registry,
        )
        self.tracker_calls = Counter(
            "ferryman_tracker_calls",
            "Calls to the coordinator's layer tracker (holders, announce) by result (ok, failed: the static "
            "[[peers]] served instead)",
            ["call", "result"],
            registry=self.registry,
        )
        self.peers_dropped = Counter(
            "ferryman_peers_dropped",
            "Peers dropped from a blob download, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.pulls = Counter("ferryman_pulls", "Image pulls by result", ["result"], registry=self.registry)
        self.pull_duration = Histogram(
            "ferryman_pull_duration_seconds",
            "Whole-image pull time",
            ["result"],
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.layer_duration = Histogram(
            "ferryman_layer_duration_seconds",
            "Per-layer time by phase (fetch, unpack)",
            ["phase"],
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.containers = Gauge(
            "ferryman_containers",
            "Containers in this agent's namespace by state",
            ["state"],
            registry=self.registry,
        )
        self.migrations = Counter(
            "ferryman_migrations",
            "Finished migrations by this agent's role, result (committed, rolled_back, needs_operator) and mode "
            "(precopy, lazy, hybrid; empty on a target, which is not told)",
            ["role", "result", "mode"],
            registry=self.registry,
        )
        self.migration_downtime_missed = Counter(
            "ferryman_migration_downtime_target_missed",
            "Committed migrations whose downtime exceeded their downtime target, by mode (source)",
            ["mode"],
            registry=self.registry,
        )
        self.migration_downtime_target = Gauge(
            "ferryman_migration_downtime_target_seconds",
            "This agent's default downtime target ([migration] downtime_target_ms; a migration may ask for another)",
            registry=self.registry,
        )
        self.migration_downtime = Histogram(
            "ferryman_migration_downtime_seconds",
            "Time the workload was frozen, measured on the source",
            buckets=_DOWNTIME_BUCKETS,
            registry=self.registry,
        )
        self.migration_duration = Histogram(
            "ferryman_migration_duration_seconds",
            "Whole-migration time from start to decision, measured on the source",
            buckets=_MIGRATION_BUCKETS,
            registry=self.registry,
        )
        self.migration_bytes = Counter(
            "ferryman_migration_bytes",
            "Checkpoint bytes a source sent, before (raw) and after (wire) compression",
            ["kind"],
            registry=self.registry,
        )
        self.migration_iterations = Histogram(
            "ferryman_migration_iterations",
            "Pre-copy rounds per migration, counted on the source",
            buckets=_ITERATION_BUCKETS,
            registry=self.registry,
        )
        self.migrations_active = Gauge(
            "ferryman_migrations_active",
            "Migrations in progress on this agent by role",
            ["role"],
            registry=self.registry,
        )
        # The series the alerts read exist from the start at 0: increase() over a series born at 1
        # would miss the first rollback or missed target of each kind.
        for result in _RESULTS.values():
            for mode in _SOURCE_MODES:
                self.migrations.labels(role="source", result=result, mode=mode)
            self.migrations.labels(role="target", result=result, mode="")
        for mode in _SOURCE_MODES:
            self.migration_downtime_missed.labels(mode=mode)
        self.streams = StreamTotals()
        """The peer port's stream totals (PeerEndpoint adds every session's frames here)."""
        self.registry.register(_StreamCollector(self.streams))
        self._add_telemetry_metrics()
        self.cache = CacheCounters(self.registry)
        """The layer cache's hits, fetches and evictions (agent/cache)."""

    def _add_telemetry_metrics(self) -> None:
        """Host telemetry (agent/telemetry): the latest sample as gauges, and the pusher's counters."""
        r = self.registry
        self.host_cpu_utilisation = Gauge(
            "ferryman_host_cpu_utilisation", "Busy share of all CPUs over the last period (0..1)", registry=r
        )
        self.host_load = Gauge(
            "ferryman_host_load", "Load average by window (1, 5, 15 minutes)", ["window"], registry=r
        )
        self.host_memory_total = Gauge("ferryman_host_memory_total_bytes", "MemTotal", registry=r)
        self.host_memory_available = Gauge("ferryman_host_memory_available_bytes", "MemAvailable", registry=r)
        self.host_pressure = Gauge(
            "ferryman_host_pressure_avg10_percent",
            "Pressure stall information avg10 by resource (cpu, memory, io) and kind (some, full)",
            ["resource", "kind"],
            registry=r,
        )
        self.host_disk = Gauge(
            "ferryman_host_disk_bytes_per_second", "Whole-disk throughput by direction (read, write)", ["direction"],
            registry=r,
        )
        self.host_network = Gauge(
            "ferryman_host_network_bytes_per_second",
            "Throughput of the agent namespace's interfaces but lo, by direction (rx, tx)",
            ["direction"],
            registry=r,
        )
        self.container_memory = Gauge(
            "ferryman_container_memory_bytes", "Memory use of each active container", ["container"], registry=r
        )
        self.container_cpu = Gauge(
            "ferryman_container_cpu_millicores", "CPU use of each active container", ["container"], registry=r
        )
        self.host_events = Counter(
            "ferryman_host_events", "Host events seen (drain_notice, maintenance, oom_kill, ...)", ["kind"], registry=r
        )
        self.reserved = Gauge(
            "ferryman_reserved",
            "Capacity held by reservations (cpu_millis, memory_bytes, disk_bytes)",
            ["resource"],
            registry=r,
        )
        self.telemetry_buffered = Gauge(
            "ferryman_telemetry_buffered_samples", "Samples waiting for the coordinator", registry=r
        )
        self.telemetry_dropped = Counter(
            "ferryman_telemetry_dropped_samples", "Samples lost to the telemetry buffer's bounds", registry=r
        )
        self.telemetry_pushes = Counter(
            "ferryman_telemetry_pushes",
            "Telemetry flushes to the coordinator by result (ok, failed, deferred: it asked to come back later)",
            ["result"],
            registry=r,
        )
        self.telemetry_coordinator_up = Gauge(
            "ferryman_telemetry_coordinator_up",
            "1 if the last telemetry flush reached the coordinator, 0 if it failed (no series without a coordinator)",
            ["coordinator"],
            registry=r,
        )

    def observe_sample(self, sample: pb.TelemetrySample) -> None:
        """Export one telemetry sample; a field the sample lacks reads NaN (unknown, not zero)."""
        nan = math.nan

        def opt(name: str, msg: Message | None = None) -> float:
            source = msg if msg is not None else sample
            return float(getattr(source, name)) if source.HasField(name) else nan

        self.host_cpu_utilisation.set(opt("cpu_util"))
        for window in ("1", "5", "15"):
            self.host_load.labels(window=window).set(opt(f"load{window}"))
        self.host_memory_total.set(opt("memory_total_bytes"))
        self.host_memory_available.set(opt("memory_available_bytes"))
        for resource, kinds in (("cpu", ("some",)), ("memory", ("some", "full")), ("io", ("some", "full"))):
            for kind in kinds:
                self.host_pressure.labels(resource=resource, kind=kind).set(opt(f"{resource}_{kind}", sample.pressure))
        self.host_disk.labels(direction="read").set(opt("disk_read_bps"))
        self.host_disk.labels(direction="write").set(opt("disk_write_bps"))
        self.host_network.labels(direction="rx").set(opt("net_rx_bps"))
        self.host_network.labels(direction="tx").set(opt("net_tx_bps"))
        # Gone containers must not linger as stale series.
        self.container_memory.clear()
        self.container_cpu.clear()
        for c in sample.containers:
            self.container_memory.labels(container=c.id).set(c.memory_bytes)
            self.container_cpu.labels(container=c.id).set(c.cpu_millis)
        for event in sample.events:
            self.host_events.labels(kind=pb.HostEventKind.Name(event.kind).lower()).inc()
        for resource in ("cpu_millis", "memory_bytes", "disk_bytes"):
            self.reserved.labels(resource=resource).set(getattr(sample.reserved, resource))

    def observe_migration(self, record: MigrationRecord) -> None:
        """Count one finished migration; the migration service calls this once per terminal record."""
        if not record.done:
            return  # progress records carry partial numbers; only the final one is counted
        result = _RESULTS[record.state]
        self.migrations.labels(role=record.role, result=result, mode=record.options.mode).inc()
        if record.role != "source":
            # The source measures downtime, bytes and rounds; counting the target's copy as well
            # would double every fleet-wide sum.
            return
        stats = record.stats
        if stats.downtime_ms > 0:  # zero: rolled back before the freeze, nobody waited
            self.migration_downtime.observe(stats.downtime_ms / 1000)
        if stats.downtime_target_missed and record.state == State.COMMIT:
            self.migration_downtime_missed.labels(mode=record.options.mode).inc()
        total_s = stats.total_ms / 1000 if stats.total_ms > 0 else _elapsed(record.started_at, record.updated_at)
        if total_s is not None:
            self.migration_duration.observe(total_s)
        self.migration_bytes.labels(kind="raw").inc(max(stats.bytes_raw, 0))
        self.migration_bytes.labels(kind="wire").inc(max(stats.bytes_wire, 0))
        if stats.iterations > 0:
            self.migration_iterations.observe(stats.iterations)

    def set_active_migrations(self, records: Iterable[MigrationRecord]) -> None:
        """Refresh the active gauge from the service's records (at scrape time, like the containers gauge)."""
        counts = dict.fromkeys(MIGRATION_ROLES, 0)
        for record in records:
            if not record.done:
                counts[record.role] = counts.get(record.role, 0) + 1
        for role, count in counts.items():  # every role, so one that emptied reads 0
            self.migrations_active.labels(role=role).set(count)


class _StreamCollector(Collector):
    """`ferryman_stream_bytes_total{direction,kind}`, read from the totals at scrape time: a counter the
    channels' event loop moves frame by frame, with no metric call on the frame path."""

    def __init__(self, totals: StreamTotals) -> None:
        self._totals = totals

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "ferryman_stream_bytes",
            "Peer stream bytes of every session by direction (sent, received) and kind "
            "(payload: plaintext before compression; wire: sealed frames)",
            labels=["direction", "kind"],
        )
        for direction, counters in (("sent", self._totals.sent), ("received", self._totals.received)):
            family.add_metric([direction, "payload"], counters.payload_bytes)
            family.add_metric([direction, "wire"], counters.wire_bytes)
        yield family


def _elapsed(start: str, end: str) -> float | None:
    """Seconds between two ISO-8601 stamps; None if either does not parse (an old or hand-edited record)."""
    try:
        return max((dt.datetime.fromisoformat(end) - dt.datetime.fromisoformat(start)).total_seconds(), 0.0)
    except ValueError:
        return None
