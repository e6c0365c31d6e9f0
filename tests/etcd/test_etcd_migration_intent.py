"""A leader that stops inside a migration's start: the next leader moves the container exactly once.

Two coordinator replicas (the real `Coordinator` wiring, each with its own etcd client and election)
on three etcd members, and one set of scripted agents both replicas talk to. The leader stops at
each window of an attempt's start (the orchestrator's fault point): a target reserved and nothing
recorded, the intent recorded and the agent not asked, the agent's answer not recorded. The other
replica takes over, reconciles with the source agent's records, and the container is started once,
committed once, with no reservation left anywhere.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from coordinator.app import Coordinator
from coordinator.auth import TokenHashes
from coordinator.config import CoordinatorConfig, MigrationLimits, StoreConfig
from coordinator.etcd.kv import EtcdKV
from coordinator.etcd.store import EtcdStore
from coordinator.model import Capacity, ContainerUsage, Host, MigrationState, Reservation
from coordinator.store import TelemetryUpdate
from tests.conftest import require
from tests.harness.coordinator import NoAgents
from tests.harness.etcd import EtcdCluster

GiB = 1 << 30


class Agents(NoAgents):
    """Every host's agent: migrations commit after two polls; records list with their options."""

    def __init__(self) -> None:
        self.held: set[str] = set()
        self.released: set[str] = set()
        self.records: dict[str, dict[str, Any]] = {}

    async def hold_reservation(self, host: Host, reservation: Reservation) -> bool:
        self.held.add(reservation.id)
        return True

    async def release_reservation(self, host: Host, reservation_id: str) -> None:
        self.released.add(reservation_id)

    async def start_migration(self, *args: Any) -> dict[str, Any]:
        _, container, target, reservation_id, options = args
        assert not any(r["container"] == container for r in self.records.values()), "started twice"
        record = {
            "id": f"agent-{len(self.records) + 1}",
            "role": "source",
            "container": container,
            "peer": target,
            "state": "PREPARE",
            "options": {**options, "reservation": reservation_id},
            "polls": 0,
        }
        self.records[record["id"]] = record
        return dict(record)

    async def get_migration(self, *args: Any) -> dict[str, Any]:
        record = self.records[args[1]]
        record["polls"] += 1
        if record["polls"] >= 2:
            record["state"] = "COMMIT"
        return dict(record)

    async def list_migrations(self, source: Host) -> list[dict[str, Any]]:
        return [dict(r) for r in self.records.values()]

    async def list_containers(self, host: Host) -> list[dict[str, Any]]:
        return []


@pytest.fixture
async def cluster(workdir: Path) -> AsyncIterator[EtcdCluster]:
    require("etcd")
    async with EtcdCluster(workdir / "etcd", size=3) as c:
        yield c


def _config(cluster: EtcdCluster, prefix: str, i: int, workdir: Path) -> CoordinatorConfig:
    return CoordinatorConfig(
        database=str(workdir / f"c{i}.db"),
        store=StoreConfig(
            backend="etcd",
            etcd_endpoints=tuple(cluster.endpoints),
            etcd_prefix=prefix,
            leader_ttl=2,
            advertise_url=f"https://c{i}.test:7543",
        ),
        migrations=MigrationLimits(poll_period=0.05, timeout=30.0),
    )


async def _acting(replicas: list[Coordinator], within: float = 15.0) -> Coordinator:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        acting = [c for c in replicas if c.acting()]
        if len(acting) == 1:
            return acting[0]
        assert loop.time() < deadline, [c.role for c in replicas]
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("window", ["reserved", "recorded", "accepted"])
async def test_a_leader_stopped_inside_a_start_leaves_one_migration_and_no_reservation(
    cluster: EtcdCluster, workdir: Path, window: str
) -> None:
    prefix = f"/t-{secrets.token_hex(6)}/"
    setup = EtcdStore(EtcdKV(cluster.endpoints), prefix)
    now = time.time()
    for name in ("h1", "h2", "h3"):
        await setup.register_host(Host(name, Capacity(8000, 8 * GiB, 0), api_url=f"https://{name}.test:7444"))
    web = ContainerUsage(id="web", image="busybox", memory_bytes=GiB, cpu_millis=100.0)
    for name, containers in (("h1", (web,)), ("h2", ()), ("h3", ())):
        used = Capacity(100, GiB, 0) if containers else Capacity()
        sample = {"ts": now, "cpu_util": 0.1}
        await setup.record_telemetry(TelemetryUpdate(name, [(now, sample)], now, used, containers, {}), 100, 3600)
    await setup.flush_telemetry()

    agents = Agents()
    replicas: list[Coordinator] = []
    stopped: asyncio.Event = asyncio.Event()

    async def stop_here(phase: str, migration: Any) -> None:
        if phase == window and not stopped.is_set():
            stopped.set()
            await asyncio.Event().wait()  # the leader never gets further: it is stopped from outside

    try:
        for i in range(2):
            store = EtcdStore(EtcdKV(cluster.endpoints), prefix)
            c = Coordinator(_config(cluster, prefix, i, workdir), store, agents, TokenHashes(), None, time.time)
            c.migrations.fault = stop_here
            await c.start()
            replicas.append(c)
        leader = await _acting(replicas)
        migration = await leader.migrations.request("web", "auto", requested_by="test")
        await asyncio.wait_for(stopped.wait(), 10)
        started_before = len(agents.records)
        assert started_before == (1 if window == "accepted" else 0)
        await leader.close()  # stops inside the window: nothing more from it reaches the store
        replicas.remove(leader)
        successor = await _acting(replicas)
        done = await successor.migrations.wait(migration.id, 30)
        assert done.state is MigrationState.COMMITTED, done
        assert len(agents.records) == 1, agents.records  # started once, whichever leader started it
        record = next(iter(agents.records.values()))
        assert done.agent_migration_id == record["id"] and done.attempt == 1, done
        assert done.reservation_id == record["options"]["reservation"]
        assert await setup.list_reservations() == []
        # The agents' copies: the committed one the target drops itself; every other one was released.
        assert agents.held - agents.released == {done.reservation_id}, (agents.held, agents.released)
        states = [h[0] for h in done.history]
        print(f"{window}: {states}")
        if window == "accepted":
            assert "recorded after a change of leader" in done.history[-2][2], done.history
    finally:
        for c in replicas:
            await c.close()
        await setup.close()
