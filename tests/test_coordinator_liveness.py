"""The liveness check: silent hosts go suspect, then down, never back up by the check itself; the
hosts gauge counts each state. Every combination of health, admin state and silence, on SQLite."""

from __future__ import annotations

import collections
import itertools
from pathlib import Path

import pytest

from coordinator.config import CoordinatorConfig
from coordinator.metrics import CoordinatorMetrics
from coordinator.model import Capacity, Host, HostAdmin, HostHealth
from coordinator.registry import HostRegistry
from coordinator.sqlite_store import SqliteStore
from coordinator.store import TelemetryUpdate

GiB = 1 << 30
RANK = {HostHealth.READY: 0, HostHealth.SUSPECT: 1, HostHealth.DOWN: 2}


def expected(health: HostHealth, heard: float, since: float, now: float, config: CoordinatorConfig) -> HostHealth:
    silent = now - max(heard, since)
    by_silence = (
        HostHealth.DOWN
        if silent >= config.heartbeat.down_after
        else HostHealth.SUSPECT
        if silent >= config.heartbeat.suspect_after
        else HostHealth.READY
    )
    return by_silence if RANK[by_silence] > RANK[health] else health


@pytest.mark.parametrize("started_ago", [5.0, 1000.0])
async def test_each_host_moves_as_its_silence_says(workdir: Path, started_ago: float) -> None:
    config = CoordinatorConfig()
    now = 10_000.0
    clock = [now - started_ago]
    store = await SqliteStore.open(workdir / "c.db")
    try:
        metrics = CoordinatorMetrics()
        registry = HostRegistry(store, config, lambda: clock[0], metrics)
        clock[0] = now
        want: dict[str, HostHealth] = {}
        silences = (0.0, 19.9, 20.0, 20.1, 59.9, 60.0, 500.0)
        for i, (health, admin, silent) in enumerate(itertools.product(list(HostHealth), list(HostAdmin), silences)):
            name = f"h{i:03d}"
            await store.register_host(Host(name, Capacity(1000, GiB, 0)))
            beat = TelemetryUpdate(name, [], now - silent, Capacity(), (), {}, heartbeat_only=True)
            await store.record_telemetry(beat, keep=10, max_age=60)
            if health is not HostHealth.READY:
                await store.set_health(name, health)
            if admin is not HostAdmin.ACTIVE:
                await store.set_admin(name, admin)
            want[name] = expected(health, now - silent, now - started_ago, now, config)
        before = {h.name: h.health for h in await store.list_hosts()}
        changes = await registry.check_liveness()
        after = {h.name: h for h in await store.list_hosts()}
        assert {name: h.health for name, h in after.items()} == want
        assert sorted(changes) == sorted(
            (name, before[name], health) for name, health in want.items() if health is not before[name]
        )
        assert changes or started_ago < config.heartbeat.suspect_after  # the grid has silent hosts
        counts = collections.Counter(h.state for h in after.values())
        for state in ("ready", "suspect", "down", "draining", "drained"):
            assert metrics.hosts.labels(state=state)._value.get() == counts.get(state, 0), state
    finally:
        await store.close()
