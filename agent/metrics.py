"""Prometheus metrics of one agent, in a registry of its own (no process-global collectors)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from agent.migration.record import MigrationRecord
from agent.migration.states import State

_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# Downtime targets are tens to hundreds of ms; a bad round can freeze for many seconds.
_DOWNTIME_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2.5, 5, 10, 30, 60)
_MIGRATION_BUCKETS = (1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
# MigrationOptions allows 1..64 pre-copy rounds.
_ITERATION_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 48, 64)
MIGRATION_ROLES = ("source", "target")


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.pull_bytes = Counter(
            "ferryman_pull_bytes", "Layer bytes downloaded from registries", registry=self.registry
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
            "Finished migrations by this agent's role and result (committed, rolled_back)",
            ["role", "result"],
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

    def observe_migration(self, record: MigrationRecord) -> None:
        """Count one finished migration; the migration service calls this once per terminal record."""
        if not record.done:
            return  # progress records carry partial numbers; only the final one is counted
        result = "committed" if record.state == State.COMMIT else "rolled_back"
        self.migrations.labels(role=record.role, result=result).inc()
        if record.role != "source":
            # The source measures downtime, bytes and rounds; counting the target's copy as well
            # would double every fleet-wide sum.
            return
        stats = record.stats
        if stats.downtime_ms > 0:  # zero: rolled back before the freeze, nobody waited
            self.migration_downtime.observe(stats.downtime_ms / 1000)
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


def _elapsed(start: str, end: str) -> float | None:
    """Seconds between two ISO-8601 stamps; None if either does not parse (an old or hand-edited record)."""
    try:
        return max((dt.datetime.fromisoformat(end) - dt.datetime.fromisoformat(start)).total_seconds(), 0.0)
    except ValueError:
        return None
