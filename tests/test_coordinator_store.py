"""The SQLite store on real files: schema versioning, bounded telemetry, atomic reservations, persistence."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sqlite3
from pathlib import Path

import pytest

from coordinator.model import (
    Capacity,
    ContainerUsage,
    Decision,
    Drain,
    Host,
    HostAdmin,
    HostHealth,
    HostNotFound,
    InsufficientCapacity,
    Migration,
    MigrationState,
    Prediction,
    Reservation,
)
from coordinator.sqlite_store import SCHEMA_VERSION, SqliteStore
from coordinator.store import TelemetryUpdate
from core.errors import ConfigError

GiB = 1 << 30


def _host(name: str, memory: int = 4 * GiB) -> Host:
    return Host(name=name, capacity=Capacity(4000, memory, 100 * GiB), layer_digests=("sha256:a",), labels={"z": "1"})


def _reservation(rid: str, host: str, memory: int, expires_at: float = 1e12) -> Reservation:
    return Reservation(id=rid, host=host, capacity=Capacity(0, memory, 0), expires_at=expires_at, purpose="t")


async def test_schema_is_versioned_and_wal(workdir: Path) -> None:
    store = await SqliteStore.open(workdir / "c.db")
    try:
        assert await store.schema_version() == SCHEMA_VERSION
    finally:
        await store.close()
    with sqlite3.connect(workdir / "c.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(ConfigError, match="newer than this coordinator"):
        await SqliteStore.open(workdir / "c.db")
    (workdir / "junk.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(ConfigError, match="not a usable coordinator database"):
        await SqliteStore.open(workdir / "junk.db")


async def test_telemetry_is_bounded_by_count_and_age(workdir: Path) -> None:
    store = await SqliteStore.open(workdir / "c.db")
    try:
        await store.register_host(_host("h1"))
        with pytest.raises(HostNotFound):
            await store.record_telemetry(
                TelemetryUpdate("nope", [(1.0, {})], 1.0, Capacity(), (), {}), keep=10, max_age=100
            )
        now = 10_000.0
        samples = [(now - 500 + i, {"ts": now - 500 + i, "i": i}) for i in range(500)]
        usage = (ContainerUsage(id="web", image="busybox", memory_bytes=GiB, cpu_millis=250.0),)
        update = TelemetryUpdate("h1", samples, now, Capacity(250, GiB, 0), usage, {"io_some": 3.0})
        assert await store.record_telemetry(update, keep=100, max_age=1000) == 500
        kept = await store.telemetry("h1")
        assert len(kept) == 100 and kept[-1][1]["i"] == 499 and kept[0][1]["i"] == 400
        await store.record_telemetry(dataclasses.replace(update, samples=[], received_at=now + 450), 100, 500)
        assert [s["i"] for _, s in await store.telemetry("h1")] == list(range(450, 500))
        host = await store.get_host("h1")
        assert host is not None and host.used == Capacity(250, GiB, 0) and host.containers == usage
        assert host.pressure == {"io_some": 3.0} and host.last_heartbeat == now + 450
    finally:
        await store.close()


async def test_free_capacity_counts_usage_and_active_reservations(workdir: Path) -> None:
    store = await SqliteStore.open(workdir / "c.db")
    try:
        await store.register_host(_host("h1"))
        await store.record_telemetry(TelemetryUpdate("h1", [], 100.0, Capacity(1000, GiB, 0), (), {}), 10, 100)
        await store.reserve(_reservation("r1", "h1", GiB, expires_at=200.0), now=100.0)
        await store.reserve(_reservation("r2", "h1", GiB), now=100.0)
        assert await store.free_capacity("h1", 150.0) == Capacity(3000, GiB, 100 * GiB)
        with pytest.raises(InsufficientCapacity, match="free"):
            await store.reserve(_reservation("r3", "h1", 2 * GiB), now=150.0)
        # r1 expired at 200: its capacity counts as free again even before a sweep removes it.
        await store.reserve(_reservation("r3", "h1", 2 * GiB), now=250.0)
        assert [r.id for r in await store.expired_reservations(250.0)] == ["r1"]
        assert [r.id for r in await store.list_reservations(250.0)] == ["r2", "r3"]
        released = await store.release("r2")
        assert released is not None and released.capacity.memory_bytes == GiB
        assert await store.release("r2") is None
        with pytest.raises(HostNotFound):
            await store.reserve(_reservation("r9", "ghost", 1), now=250.0)
    finally:
        await store.close()


async def test_concurrent_reserves_from_two_connections_never_overbook(workdir: Path) -> None:
    """Two store instances (two connections, two threads) on one file: BEGIN IMMEDIATE serialises them."""
    path = workdir / "c.db"
    a = await SqliteStore.open(path)
    b = await SqliteStore.open(path)
    try:
        await a.register_host(_host("h1", memory=10 * GiB))

        async def attempt(i: int) -> bool:
            store = a if i % 2 else b
            try:
                await store.reserve(_reservation(f"r{i}", "h1", GiB), now=1.0)
            except InsufficientCapacity:
                return False
            return True

        results = await asyncio.gather(*(attempt(i) for i in range(100)))
        assert sum(results) == 10
        held = await a.list_reservations(1.0)
        assert sum(r.capacity.memory_bytes for r in held) == 10 * GiB
    finally:
        await a.close()
        await b.close()


async def test_everything_persists_across_reopen(workdir: Path) -> None:
    path = workdir / "c.db"
    store = await SqliteStore.open(path)
    migration = Migration(
        id="m1",
        container="web",
        source="h1",
        target="h2",
        state=MigrationState.RUNNING,
        attempt=1,
        created_at=5.0,
        updated_at=6.0,
        tried_targets=("h2",),
        history=(("pending", 5.0, "manual"), ("running", 6.0, "to h2")),
    )
    try:
        await store.register_host(_host("h1"))
        await store.register_host(_host("h2"))
        await store.set_admin("h2", HostAdmin.DRAINING)
        await store.set_health("h1", HostHealth.SUSPECT)
        await store.reserve(_reservation("r1", "h2", GiB), now=1.0)
        await store.put_migration(migration)
        await store.record_predictions([Prediction("h1", 1.0, 0.1, "v1"), Prediction("h1", 2.0, 0.7, "v1")])
        decision = await store.record_decision(Decision(ts=2.0, host="h1", kind="drain", probability=0.7))
        assert decision.id > 0
        await store.put_drain(Drain(id="d1", host="h2", reason="ops", started_at=3.0))
        # Re-registration keeps the admin state and resets health.
        await store.register_host(_host("h2"))
    finally:
        await store.close()

    store = await SqliteStore.open(path)
    try:
        hosts = {h.name: h for h in await store.list_hosts()}
        assert hosts["h2"].admin is HostAdmin.DRAINING and hosts["h2"].state == "draining"
        assert hosts["h1"].health is HostHealth.SUSPECT and hosts["h1"].labels == {"z": "1"}
        assert hosts["h1"].layer_digests == ("sha256:a",)
        assert [r.id for r in await store.list_reservations()] == ["r1"]
        assert await store.get_migration("m1") == migration
        assert [m.id for m in await store.list_migrations(active_only=True)] == ["m1"]
        assert (await store.latest_predictions())["h1"].probability == 0.7
        assert (await store.list_decisions("h1"))[0].kind == "drain"
        assert [d.id for d in await store.list_drains("h2")] == ["d1"]
        await store.put_migration(dataclasses.replace(migration, state=MigrationState.COMMITTED, updated_at=7.0))
        assert await store.list_migrations(active_only=True) == []
    finally:
        await store.close()


async def test_a_container_record_from_a_newer_replica_is_read(workdir: Path) -> None:
    """A newer coordinator (a rolling upgrade of replicas) may store container fields this one does
    not know: they are ignored, not a failure to read the host."""
    store = await SqliteStore.open(workdir / "c.db")
    try:
        await store.register_host(_host("h1"))
        usage = (ContainerUsage(id="web", image="busybox", memory_bytes=GiB, cpu_millis=250.0),)
        await store.record_telemetry(TelemetryUpdate("h1", [], 1.0, Capacity(250, GiB, 0), usage, {}), 10, 100)
    finally:
        await store.close()
    newer = [{**dataclasses.asdict(usage[0]), "a_field_from_a_newer_release": 1}]
    with sqlite3.connect(workdir / "c.db") as conn:
        assert conn.execute("UPDATE hosts SET containers = ? WHERE name = 'h1'", (json.dumps(newer),)).rowcount == 1
    store = await SqliteStore.open(workdir / "c.db")
    try:
        host = await store.get_host("h1")
        assert host is not None and host.containers == usage
    finally:
        await store.close()
