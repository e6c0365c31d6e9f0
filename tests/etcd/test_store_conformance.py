"""One suite, every backend: the coordinator's store concerns on SQLite and on a real etcd.

Each case takes a `store` (one client) or `clients` (three independent clients of one backend: three
SQLite connections to one file, or three etcd connections under one key prefix, as three coordinator
replicas would hold). Telemetry samples are per replica on etcd (memory), so the telemetry cases use
one client. The etcd members are real (tests/harness/etcd.py), one per module, each test under its own
key prefix; the HA cases (tests/test_etcd_store.py) start three.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from coordinator.catalog.model import CatalogChanged, CatalogEntry, CatalogEntryExists
from coordinator.chains.states import ChainRecord
from coordinator.chains.states import Event as ChainEvent
from coordinator.chains.states import State as ChainState
from coordinator.config import CoordinatorConfig
from coordinator.deployments.states import ComponentRecord, DeploymentRecord
from coordinator.deployments.states import Event as DeploymentEvent
from coordinator.deployments.states import State as DeploymentState
from coordinator.etcd.kv import EtcdKV
from coordinator.etcd.store import EtcdStore
from coordinator.metrics import CoordinatorMetrics
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
    NoTarget,
    Prediction,
    Reservation,
    StartRecord,
)
from coordinator.placement import Need, Placer
from coordinator.reservations import ReservationService
from coordinator.sqlite_store import SqliteStore
from coordinator.store import ModelSlots, Store, StoredModel, TelemetryUpdate
from tests.conftest import require
from tests.harness.coordinator import NoAgents
from tests.harness.etcd import EtcdCluster

GiB = 1 << 30
BACKENDS = ["sqlite", "etcd"]


@pytest.fixture(scope="module")
async def etcd(base_dir: Path) -> AsyncIterator[EtcdCluster]:
    require("etcd")
    async with EtcdCluster(base_dir / f"etcd-{secrets.token_hex(3)}", size=1) as cluster:
        yield cluster


async def _open(backend: str, where: Path, cluster: EtcdCluster, n: int) -> list[Store]:
    if backend == "sqlite":
        return [await SqliteStore.open(where / "c.db") for _ in range(n)]
    prefix = f"/t-{secrets.token_hex(6)}/"
    return [EtcdStore(EtcdKV(cluster.endpoints), prefix) for _ in range(n)]


@pytest.fixture(params=BACKENDS)
async def clients(request: pytest.FixtureRequest, workdir: Path, etcd: EtcdCluster) -> AsyncIterator[list[Store]]:
    opened = await _open(request.param, workdir, etcd, 3)
    try:
        yield opened
    finally:
        for s in opened:
            await s.close()


@pytest.fixture
def store(clients: list[Store]) -> Store:
    return clients[0]


def _host(name: str, memory: int = 4 * GiB, **kw: Any) -> Host:
    return Host(name=name, capacity=Capacity(4000, memory, 100 * GiB), **kw)


def _rsv(rid: str, host: str, memory: int, expires_at: float = 2000.0, created_at: float = 1000.0) -> Reservation:
    return Reservation(rid, host, Capacity(100, memory, 0), expires_at, "test", created_at)


def _push(host: str, at: float, samples: list[float], used: int = 0) -> TelemetryUpdate:
    return TelemetryUpdate(
        host,
        [(ts, {"ts": ts}) for ts in samples],
        at,
        Capacity(10, used, 0),
        (ContainerUsage("c1", "img", used),),
        {"memory": 1.5},
    )


# ----- hosts


async def test_register_keeps_admin_state_and_marks_ready(store: Store) -> None:
    first = await store.register_host(_host("h2", api_url="https://h2", labels={"a": "b"}))
    assert first.health is HostHealth.READY and first.api_url == "https://h2"
    await store.register_host(_host("h1"))
    await store.set_admin("h2", HostAdmin.DRAINING)
    await store.set_health("h2", HostHealth.DOWN)
    again = await store.register_host(_host("h2", memory=8 * GiB, api_url="https://h2b", registered_at=5.0))
    assert (again.admin, again.health, again.capacity.memory_bytes) == (HostAdmin.DRAINING, HostHealth.READY, 8 * GiB)
    got = await store.get_host("h2")
    assert got is not None
    assert (got.api_url, got.labels, got.registered_at, got.admin) == ("https://h2b", {}, 5.0, HostAdmin.DRAINING)
    assert [h.name for h in await store.list_hosts()] == ["h1", "h2"]
    assert await store.get_host("h9") is None
    with pytest.raises(HostNotFound):
        await store.set_health("h9", HostHealth.DOWN)
    with pytest.raises(HostNotFound):
        await store.set_admin("h9", HostAdmin.DRAINED)


async def test_every_client_sees_the_same_hosts(clients: list[Store]) -> None:
    await clients[0].register_host(_host("h1"))
    await clients[1].set_admin("h1", HostAdmin.DRAINED)
    got = await clients[2].get_host("h1")
    assert got is not None and got.admin is HostAdmin.DRAINED


# ----- telemetry (one client: samples are per replica on etcd)


async def test_telemetry_refreshes_the_summary_and_is_bounded(store: Store) -> None:
    with pytest.raises(HostNotFound):
        await store.record_telemetry(_push("h9", 100.0, [99.0]), keep=10, max_age=60)
    await store.register_host(_host("h1"))
    await store.set_health("h1", HostHealth.SUSPECT)
    assert await store.record_telemetry(_push("h1", 100.0, [30.0, 95.0, 96.0], used=GiB), keep=10, max_age=60) == 3
    host = await store.get_host("h1")
    assert host is not None
    assert (host.health, host.last_heartbeat, host.used.memory_bytes) == (HostHealth.READY, 100.0, GiB)
    assert host.containers == (ContainerUsage("c1", "img", GiB),) and host.pressure == {"memory": 1.5}
    # 30.0 is older than max_age at 100.0; then only the newest `keep` stay.
    assert [ts for ts, _ in await store.telemetry("h1")] == [95.0, 96.0]
    await store.record_telemetry(_push("h1", 101.0, [97.0, 98.0, 99.0]), keep=3, max_age=60)
    assert [ts for ts, _ in await store.telemetry("h1")] == [97.0, 98.0, 99.0]
    assert [s for _, s in await store.telemetry("h1", since=98.0)] == [{"ts": 98.0}, {"ts": 99.0}]
    await store.register_host(_host("h2"))
    await store.record_telemetry(_push("h2", 101.0, [100.0]), keep=3, max_age=60)
    everything = await store.telemetry_all(since=99.0)
    assert {h: [ts for ts, _ in s] for h, s in everything.items()} == {"h1": [99.0], "h2": [100.0]}


# ----- telemetry summaries: held back per client on etcd, visible to the others after a flush


async def test_a_flushed_summary_reaches_every_client(clients: list[Store]) -> None:
    a, b, _ = clients
    await a.register_host(_host("h1"))
    await a.record_telemetry(_push("h1", 100.0, [99.0], used=GiB), keep=10, max_age=60)
    own = await a.get_host("h1")  # the client that took the push sees it at once
    assert own is not None and (own.last_heartbeat, own.used.memory_bytes) == (100.0, GiB)
    await a.record_telemetry(_push("h1", 105.0, [104.0], used=2 * GiB), keep=10, max_age=60)
    await a.flush_telemetry()
    seen = await b.get_host("h1")
    assert seen is not None and (seen.last_heartbeat, seen.used.memory_bytes) == (105.0, 2 * GiB)
    assert (await b.free_capacity("h1", 105.0)).memory_bytes == 2 * GiB
    await a.flush_telemetry()  # nothing held back: nothing written, no error


async def test_a_heartbeat_only_push_keeps_the_last_summary(clients: list[Store]) -> None:
    a, b, _ = clients
    await a.register_host(_host("h1"))
    await a.record_telemetry(_push("h1", 100.0, [99.0], used=GiB), keep=10, max_age=60)
    beat = TelemetryUpdate("h1", [], 110.0, Capacity(), (), {}, heartbeat_only=True)
    assert await a.record_telemetry(beat, keep=10, max_age=60) == 0  # held back with the push before it
    await a.flush_telemetry()
    await a.record_telemetry(dataclasses.replace(beat, received_at=120.0), keep=10, max_age=60)  # alone
    await a.flush_telemetry()
    seen = await b.get_host("h1")
    assert seen is not None
    assert (seen.last_heartbeat, seen.used.memory_bytes, seen.pressure) == (120.0, GiB, {"memory": 1.5})
    assert seen.containers == (ContainerUsage("c1", "img", GiB),)


async def test_a_flush_keeps_what_other_clients_changed_meanwhile(clients: list[Store]) -> None:
    """The leader marks a host suspect and drains it while a follower holds its pushes back: the
    follower's flush refreshes the heartbeat and usage, and the host is ready, still draining."""
    follower, leader, reader = clients
    await follower.register_host(_host("h1"))
    await follower.record_telemetry(_push("h1", 100.0, [99.0]), keep=10, max_age=60)
    await follower.flush_telemetry()
    await leader.set_health("h1", HostHealth.SUSPECT)
    await leader.set_admin("h1", HostAdmin.DRAINING)
    await follower.record_telemetry(_push("h1", 130.0, [129.0], used=GiB), keep=10, max_age=60)
    await follower.flush_telemetry()
    host = await reader.get_host("h1")
    assert host is not None
    assert (host.health, host.admin, host.last_heartbeat, host.used.memory_bytes) == (
        HostHealth.READY,
        HostAdmin.DRAINING,
        130.0,
        GiB,
    )


async def test_a_flush_of_many_hosts_and_pushes_from_two_clients(clients: list[Store]) -> None:
    """More hosts than one etcd transaction may put, pushed to two clients at once: every host ends
    with its newest heartbeat."""
    a, b, reader = clients
    names = [f"h{i:03d}" for i in range(300)]
    await asyncio.gather(*(a.register_host(_host(name)) for name in names))
    for round_ in range(3):
        for i, name in enumerate(names):
            taker = (a, b)[(i + round_) % 2]  # agents moving between replicas
            await taker.record_telemetry(_push(name, 100.0 + round_, [], used=round_ * GiB), keep=10, max_age=60)
        await asyncio.gather(a.flush_telemetry(), b.flush_telemetry())
    hosts = await reader.list_hosts()
    assert [h.name for h in hosts] == names
    assert {(h.last_heartbeat, h.used.memory_bytes, h.health) for h in hosts} == {(102.0, 2 * GiB, HostHealth.READY)}


async def test_etcd_a_summary_held_back_longer_does_not_move_the_heartbeat_back(etcd: EtcdCluster) -> None:
    """Two replicas hold back pushes of one host (it moved between them): the older summary, flushed
    last, leaves the newer one in place."""
    prefix = f"/t-{secrets.token_hex(6)}/"
    slow, fast = EtcdStore(EtcdKV(etcd.endpoints), prefix), EtcdStore(EtcdKV(etcd.endpoints), prefix)
    try:
        await slow.register_host(_host("h1"))
        await slow.record_telemetry(_push("h1", 135.0, [134.0], used=2 * GiB), keep=10, max_age=60)
        await fast.record_telemetry(_push("h1", 140.0, [139.0], used=3 * GiB), keep=10, max_age=60)
        await fast.flush_telemetry()
        await slow.flush_telemetry()
        host = await fast.get_host("h1")
        assert host is not None and (host.last_heartbeat, host.used.memory_bytes) == (140.0, 3 * GiB)
    finally:
        await slow.close()
        await fast.close()


async def test_etcd_writes_held_back_summaries_in_few_transactions(etcd: EtcdCluster) -> None:
    """The point of holding summaries back: 300 hosts pushing 3 times cost 3 transactions of at most
    126 hosts each, not 900 (etcd's revision counts transactions)."""
    store = EtcdStore(EtcdKV(etcd.endpoints), f"/t-{secrets.token_hex(6)}/")
    try:
        names = [f"h{i:03d}" for i in range(300)]
        for name in names:
            await store.register_host(_host(name))
        await store.list_hosts()  # every host known: a push needs no read
        before = (await store.kv.range(b"/nothing/")).revision
        for at in (100.0, 101.0, 102.0):
            for name in names:
                await store.record_telemetry(_push(name, at, [at]), keep=10, max_age=60)
        assert (await store.kv.range(b"/nothing/")).revision == before  # held back: nothing written yet
        await store.flush_telemetry()
        assert (await store.kv.range(b"/nothing/")).revision == before + 3  # ceil(300 / 126)
        assert {h.last_heartbeat for h in await store.list_hosts()} == {102.0}
    finally:
        await store.close()


# ----- start history (one client: per replica on etcd, like telemetry samples)


async def test_start_history_keeps_hits_and_misses_and_is_bounded(store: Store) -> None:
    first = StartRecord("h1", 10.0, "sig-00000000000000aa", ("sha256:a", "sha256:b"), hits=("sha256:a",))
    await store.record_start(first, keep=3, max_age=100)
    got = await store.starts("h1")
    assert got == [first] and got[0].misses == ("sha256:b",)
    for ts in (50.0, 60.0, 120.0):
        await store.record_start(StartRecord("h1", ts, "sig-00000000000000bb", ("sha256:c",)), keep=3, max_age=100)
    # 10.0 is older than max_age at 120.0
    assert [s.ts for s in await store.starts("h1")] == [50.0, 60.0, 120.0]
    await store.record_start(StartRecord("h1", 130.0, "sig-00000000000000bb", ("sha256:c",)), keep=3, max_age=100)
    assert [s.ts for s in await store.starts("h1")] == [60.0, 120.0, 130.0]
    await store.record_start(
        StartRecord("h2", 125.0, "sig-00000000000000cc", ("sha256:d",), ("sha256:d",), ("sha256:d",), "batch"),
        keep=3,
        max_age=100,
    )
    everything = await store.starts(since=120.0)
    assert [(s.host, s.ts) for s in everything] == [("h1", 120.0), ("h2", 125.0), ("h1", 130.0)]
    assert everything[1].warm_hits == ("sha256:d",) and everything[1].workload_class == "batch"


# ----- reservations


async def test_reserve_counts_usage_and_active_reservations(store: Store) -> None:
    with pytest.raises(HostNotFound):
        await store.reserve(_rsv("r0", "h9", GiB), 1000.0)
    await store.register_host(_host("h1", memory=4 * GiB))
    await store.record_telemetry(_push("h1", 1000.0, [], used=GiB), keep=10, max_age=60)
    await store.reserve(_rsv("r1", "h1", GiB), 1000.0)
    await store.reserve(_rsv("r-old", "h1", GiB, expires_at=999.0), 900.0)  # expired at 1000
    assert (await store.free_capacity("h1", 1000.0)).memory_bytes == 2 * GiB
    await store.reserve(_rsv("r2", "h1", 2 * GiB), 1000.0)
    with pytest.raises(InsufficientCapacity):
        await store.reserve(_rsv("r3", "h1", 1), 1000.0)
    assert await store.get_reservation("r3") is None
    assert [r.id for r in await store.list_reservations(1000.0)] == ["r1", "r2"]
    assert {r.id for r in await store.list_reservations()} == {"r1", "r2", "r-old"}
    assert [r.id for r in await store.expired_reservations(1000.0)] == ["r-old"]


async def test_mark_held_and_release(clients: list[Store]) -> None:
    a, b, _ = clients
    await a.register_host(_host("h1", memory=2 * GiB))
    await a.reserve(_rsv("r1", "h1", 2 * GiB), 1000.0)
    await b.mark_held("r1")
    got = await a.get_reservation("r1")
    assert got is not None and got.held_by_agent
    await b.mark_held("nope")  # nothing to mark: no error
    released = await b.release("r1")
    assert released is not None and released.id == "r1" and released.held_by_agent
    assert await a.release("r1") is None
    assert await a.get_reservation("r1") is None
    assert (await a.free_capacity("h1", 1000.0)).memory_bytes == 2 * GiB
    await a.reserve(_rsv("r2", "h1", 2 * GiB), 1000.0)  # the room is free again


def _placer(store: Store, now: float = 1000.0) -> Placer:
    config = CoordinatorConfig()
    reservations = ReservationService(store, NoAgents(), config, lambda: now, CoordinatorMetrics())
    return Placer(store, reservations, config.placement, lambda: 0.5, lambda: now)


async def test_two_hundred_concurrent_placements_from_three_clients_never_overbook(clients: list[Store]) -> None:
    """Three replicas place at once on hosts of different sizes (the best host changes as they fill)."""
    first = clients[0]
    for name, memory in (("h1", 8 * GiB), ("h2", 5 * GiB), ("h3", 3 * GiB), ("h4", 16 * GiB)):
        await first.register_host(_host(name, memory=memory))
    await first.record_telemetry(_push("h4", 1000.0, [], used=10 * GiB), keep=10, max_age=100)
    await first.record_predictions([Prediction("h1", 999.0, 0.9, "v")])  # h1 is about to be drained
    placers = [_placer(s) for s in clients]

    async def place(i: int) -> str | None:
        size = (GiB // 2) if i % 3 else GiB
        try:
            return (await placers[i % 3].place(Need(Capacity(10, size, 0)), f"p{i}")).host
        except NoTarget:
            return None

    placed = await asyncio.gather(*(place(i) for i in range(200)))
    assert "h1" not in placed
    held: dict[str, int] = defaultdict(int)
    for r in await first.list_reservations(1000.0):
        held[r.host] += r.capacity.memory_bytes
    for host in await first.list_hosts():
        assert held[host.name] + host.used.memory_bytes <= host.capacity.memory_bytes, host.name
    # Everything that could fit did: what is left on each eligible host is below the smallest need.
    for name in ("h2", "h3", "h4"):
        assert (await first.free_capacity(name, 1000.0)).memory_bytes < GiB // 2
    assert sum(p is not None for p in placed) == len(await first.list_reservations(1000.0))


async def test_two_hundred_concurrent_reservations_on_one_host_hold_exactly_what_fits(clients: list[Store]) -> None:
    await clients[0].register_host(_host("h1", memory=12 * GiB))

    async def reserve(i: int) -> bool:
        try:
            await clients[i % 3].reserve(_rsv(f"r{i}", "h1", GiB), 1000.0)
        except InsufficientCapacity:
            return False
        return True

    results = await asyncio.gather(*(reserve(i) for i in range(200)))
    assert sum(results) == 12
    assert len(await clients[1].list_reservations(1000.0)) == 12
    assert (await clients[2].free_capacity("h1", 1000.0)).memory_bytes == 0


# ----- migrations, predictions, decisions, drains


async def test_migrations_round_trip(clients: list[Store]) -> None:
    a, b, _ = clients
    m = Migration("m1", "web", "h1", target="h2", created_at=1.0, updated_at=1.0, history=(("pending", 1.0, ""),))
    await a.put_migration(m)
    await a.put_migration(Migration("m0", "db", "h1", created_at=0.5, state=MigrationState.COMMITTED))
    done = Migration(
        "m1",
        "web",
        "h1",
        target="h3",
        state=MigrationState.RUNNING,
        attempt=2,
        tried_targets=("h2",),
        created_at=1.0,
        updated_at=2.0,
        history=(("pending", 1.0, ""), ("running", 2.0, "to h3")),
    )
    await b.put_migration(done)
    assert await a.get_migration("m1") == done
    assert await a.get_migration("m9") is None
    assert [m.id for m in await b.list_migrations()] == ["m0", "m1"]
    assert [m.id for m in await b.list_migrations(active_only=True)] == ["m1"]


async def test_latest_predictions_and_decisions(clients: list[Store]) -> None:
    a, b, _ = clients
    await a.record_predictions([Prediction("h1", 10.0, 0.1, "v1"), Prediction("h2", 10.0, 0.2, "v1")])
    await b.record_predictions([Prediction("h1", 20.0, 0.7, "v2")])
    assert await a.latest_predictions() == {
        "h1": Prediction("h1", 20.0, 0.7, "v2"),
        "h2": Prediction("h2", 10.0, 0.2, "v1"),
    }
    d1 = await a.record_decision(Decision(1.0, "h1", "drain", 0.7, "v2", "over threshold"))
    d2 = await b.record_decision(Decision(2.0, "h2", "migrate"))
    d3 = await a.record_decision(Decision(3.0, "h1", "undrain"))
    assert 0 < d1.id < d2.id < d3.id
    assert [d.kind for d in await b.list_decisions()] == ["undrain", "migrate", "drain"]
    assert await b.list_decisions("h1", limit=1) == [d3]
    assert (await a.list_decisions("h1"))[1] == d1
    # A tick's worth for a fleet larger than one etcd transaction may hold (128 operations).
    fleet = [Prediction(f"x{i:04}", 30.0, i / 1000, "v3") for i in range(300)]
    await a.record_predictions(fleet)
    latest = await b.latest_predictions()
    assert [latest[p.host] for p in fleet] == fleet


async def test_drains_update_only_their_outcome(clients: list[Store]) -> None:
    a, b, _ = clients
    await a.put_drain(Drain("d1", "h1", "policy", 10.0, probability=0.8, model_version="v"))
    await a.put_drain(Drain("d0", "h2", "ops", 5.0))
    await b.put_drain(Drain("d1", "other", "other", 99.0, state="done", finished_at=20.0))
    assert await a.list_drains("h1") == [
        Drain("d1", "h1", "policy", 10.0, state="done", finished_at=20.0, probability=0.8, model_version="v")
    ]
    assert [d.id for d in await b.list_drains()] == ["d0", "d1"]


# ----- catalog


def _entry(name: str, version: str = "1.0.0") -> CatalogEntry:
    return CatalogEntry.from_dict(
        {
            "name": name,
            "version": version,
            "image": f"registry.test:5000/{name}:{version}",
            "manifest": {
                "required_images": [],
                "data_transfer_protocols": {},
                "dependency_health_check": {"kind": "tcp", "port": 80},
            },
        }
    )


async def test_catalog_writes_land_only_at_the_revision_read(clients: list[Store]) -> None:
    a, b, _ = clients
    empty = await a.catalog()
    assert empty.entries == () and empty.revision == 0
    assert await a.add_catalog_entry(_entry("queue"), 0) == 1
    assert await b.add_catalog_entry(_entry("detect"), 1) == 2
    assert await a.add_catalog_entry(_entry("queue", "2.0.0"), 2) == 3
    with pytest.raises(CatalogChanged):
        await b.add_catalog_entry(_entry("render"), 2)  # read before the last write
    with pytest.raises(CatalogEntryExists):
        await b.add_catalog_entry(_entry("queue"), 3)
    catalog = await b.catalog()
    assert catalog.revision == 3
    assert [e.id for e in catalog.entries] == ["queue@1.0.0", "detect@1.0.0", "queue@2.0.0"]
    assert catalog.get("queue", "2.0.0") == _entry("queue", "2.0.0")
    assert await a.remove_catalog_entries(["queue@1.0.0", "detect@1.0.0"], 3) == 4
    with pytest.raises(CatalogChanged):
        await b.remove_catalog_entries(["queue@2.0.0"], 3)
    after = await b.catalog()
    assert [e.id for e in after.entries] == ["queue@2.0.0"] and after.revision == 4


async def test_concurrent_catalog_writers_at_one_revision_only_one_lands(clients: list[Store]) -> None:
    revision = (await clients[0].catalog()).revision

    async def add(i: int) -> bool:
        try:
            await clients[i % 3].add_catalog_entry(_entry(f"e{i}"), revision)
        except CatalogChanged:
            return False
        return True

    assert sum(await asyncio.gather(*(add(i) for i in range(30)))) == 1
    assert len((await clients[1].catalog()).entries) == 1


async def test_deployments_round_trip(clients: list[Store]) -> None:
    a, b, _ = clients
    parts = (ComponentRecord("detect", "detect@1", "r/detect:1", 0, "10.9.0.2", host="h1", reservation="rsv-1"),)
    first = DeploymentRecord("detect-1", "detect@1", DeploymentState.PLANNED, parts, created_at=2.0, updated_at=2.0)
    older = DeploymentRecord("old-1", "old@1", DeploymentState.FAILED, (), created_at=1.0, updated_at=1.0)
    await a.put_deployment(first)
    await a.put_deployment(older)
    healthy = first.advance(DeploymentEvent.START, 3.0).advance(DeploymentEvent.ALL_HEALTHY, 4.0)
    await b.put_deployment(healthy)  # written whole: the last put is the record
    assert await a.get_deployment("detect-1") == healthy
    assert await b.get_deployment("nope") is None
    assert [r.id for r in await a.list_deployments()] == ["old-1", "detect-1"]  # oldest first


async def test_chains_round_trip(clients: list[Store]) -> None:
    a, b, _ = clients
    manifest = {"version": 1, "name": "counter", "stages": []}
    first = ChainRecord("counter-1", "counter", manifest, ChainState.PENDING, "10.9.0.3", created_at=2.0)
    older = ChainRecord("old-1", "old", manifest, ChainState.ABORTED, "10.9.0.4", created_at=1.0)
    await a.put_chain(first)
    await a.put_chain(older)
    started = first.advance(ChainEvent.START, 3.0, serving="ingest")
    await b.put_chain(started)  # written whole on every transition: the last put is the record
    assert await a.get_chain("counter-1") == started
    assert await b.get_chain("nope") is None
    assert [r.id for r in await a.list_chains()] == ["old-1", "counter-1"]  # oldest first


async def test_model_slots_are_shared_and_replaced_whole(clients: list[Store]) -> None:
    a, b, _ = clients
    assert await a.model_slots() is None
    one, two = StoredModel("1" * 64, b"model one"), StoredModel("2" * 64, bytes(range(256)) * 1000)
    await a.set_model_slots(ModelSlots(one))
    assert await b.model_slots() == ModelSlots(one, None)
    await b.set_model_slots(ModelSlots(two, one))  # activated after one: one is the previous
    assert await a.model_slots() == ModelSlots(two, one)
    await a.set_model_slots(ModelSlots(one, two))  # rolled back
    assert await b.model_slots() == ModelSlots(one, two)
    await a.set_model_slots(ModelSlots(two))
    assert await b.model_slots() == ModelSlots(two, None)


# ----- scaling decisions


async def test_scaling_decisions_are_shared_bounded_and_forgotten(clients: list[Store]) -> None:
    a, b, _ = clients
    assert await b.scaling_decisions("d1") == []
    for i in range(60):  # two leaders in turn, as after a failover
        writer = a if i < 45 else b
        await writer.record_scaling_decision("d1", {"ts": float(i), "component": "c", "inputs": {"need": i}}, 25)
    await a.record_scaling_decision("d2", {"ts": 0.0, "component": "x"}, 25)
    kept = await b.scaling_decisions("d1")
    # the last 25 at least, oldest first; etcd trims every 20 writes of a client, so up to 19 more
    # per client may remain between two trims (SQLite trims at each write)
    assert [d["ts"] for d in kept][-25:] == [float(i) for i in range(35, 60)], kept
    assert 25 <= len(kept) <= 25 + 2 * 19 and len(kept) < 60, len(kept)
    assert kept[-1] == {"ts": 59.0, "component": "c", "inputs": {"need": 59}}
    assert [d["ts"] for d in kept] == sorted(d["ts"] for d in kept)
    await b.forget_scaling_decisions("d1")
    assert await a.scaling_decisions("d1") == [] and len(await a.scaling_decisions("d2")) == 1


async def test_scaling_policy_and_state_are_shared_replaced_and_forgotten(clients: list[Store]) -> None:
    a, b, _ = clients
    assert await b.scaling_policy("d1") is None and await b.scaling_state("d1") is None
    await a.put_scaling_policy("d1", "reactive")
    state = {"policy": "reactive", "components": {"c": {"hpa": {"last_sync": 1.5, "recommendations": [[1.5, 3]]}}}}
    await a.put_scaling_state("d1", state)
    # another leader reads what the last one put, and replaces it
    assert await b.scaling_policy("d1") == "reactive" and await b.scaling_state("d1") == state
    await b.put_scaling_policy("d1", "predictive")
    await b.put_scaling_state("d1", {"policy": "predictive", "components": {}})
    await b.put_scaling_policy("d2", "off")
    assert await a.scaling_policy("d1") == "predictive"
    assert await a.scaling_state("d1") == {"policy": "predictive", "components": {}}
    await a.record_scaling_decision("d1", {"ts": 0.0, "component": "c"}, 25)
    await a.forget_scaling_decisions("d1")
    assert await b.scaling_policy("d1") is None and await b.scaling_state("d1") is None
    assert await b.scaling_decisions("d1") == [] and await b.scaling_policy("d2") == "off"


async def test_a_new_leader_continues_the_scaling_policy_and_its_state(clients: list[Store]) -> None:
    from tests.test_scaling_service import T0, _All, _autoscaler, _behaviour, _record, _Replicas, _trace

    a, b, _ = clients
    kept = _behaviour("d1", _trace(900))
    records = _All(_record("d1"))
    first = _autoscaler(kept, _Replicas(), records, T0 + 900)
    first._store = a
    await first.set_policy("d1", "reactive")
    assert [e["policy"] for e in await first.round()] == ["reactive", "reactive"]  # the HPA's first pass
    # the other replica wins the election 5 s later: same policy, and the HPA's 15 s sync goes on
    second = _autoscaler(kept, _Replicas(), records, T0 + 905)
    second._store = b
    assert await second.policy("d1") == "reactive"
    assert await second.round() == []
    second._clock = lambda: T0 + 916
    assert [e["policy"] for e in await second.round()] == ["reactive", "reactive"]
    assert [e["ts"] for e in await first.history("d1")] == [T0 + 900, T0 + 900, T0 + 916, T0 + 916]
