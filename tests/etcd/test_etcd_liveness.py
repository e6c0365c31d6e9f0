"""Liveness when agents push to a follower: the leader sees the heartbeats through etcd.

Two replicas' registries on one real etcd member, each with its own store (as two coordinator
processes hold), on a clock the test moves: the follower takes every push and flushes the summaries;
the leader runs the liveness checks on what etcd has.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from coordinator.config import CoordinatorConfig
from coordinator.etcd.kv import EtcdKV
from coordinator.etcd.store import EtcdStore
from coordinator.metrics import CoordinatorMetrics
from coordinator.model import Capacity, Host, HostHealth
from coordinator.registry import HostRegistry
from coordinator.wire import parse_message
from proto.ferryman.v1 import fleet_pb2
from tests.conftest import require
from tests.harness.etcd import EtcdCluster


@pytest.fixture
async def cluster(workdir: Path) -> AsyncIterator[EtcdCluster]:
    require("etcd")
    async with EtcdCluster(workdir / "etcd", size=1) as c:
        yield c


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _batch(host: str, ts: float) -> fleet_pb2.TelemetryBatch:
    sample = {"ts": ts, "cpu_util": 0.2, "containers": [{"id": "c1", "memory_bytes": 1 << 30}]}
    return parse_message(json.dumps({"host": host, "samples": [sample]}).encode(), fleet_pb2.TelemetryBatch)


async def test_a_host_pushing_to_a_follower_stays_ready_on_the_leader(cluster: EtcdCluster) -> None:
    prefix = f"/t-{secrets.token_hex(6)}/"
    clock = Clock(1000.0)
    config = CoordinatorConfig()  # suspect after 20 s of silence, down after 60 s
    stores = [EtcdStore(EtcdKV(cluster.endpoints), prefix) for _ in range(2)]
    follower, leader = (HostRegistry(s, config, clock, CoordinatorMetrics()) for s in stores)
    try:
        await stores[1].register_host(Host("h1", Capacity(4000, 4 << 30, 0), last_heartbeat=1000.0))
        for _ in range(8):  # 80 s of pushes every 10 s, all to the follower
            clock.now += 10.0
            ack = await follower.push(_batch("h1", clock.now))
            assert (ack.accepted, ack.reregister) == (1, False)
            await stores[0].flush_telemetry()
            assert await leader.check_liveness() == []
        host = await leader.get("h1")
        assert (host.health, host.last_heartbeat, host.used.memory_bytes) == (HostHealth.READY, 1080.0, 1 << 30)

        # The follower dies with a push held back: the leader marks the host suspect 20 s after the
        # last push that reached etcd, and ready again once a push reaches it through another replica.
        clock.now += 10.0
        await follower.push(_batch("h1", clock.now))
        clock.now = 1080.0 + config.heartbeat.suspect_after
        assert await leader.check_liveness() == [("h1", HostHealth.READY, HostHealth.SUSPECT)]
        clock.now += 1.0
        await leader.push(_batch("h1", clock.now))
        assert await leader.check_liveness() == []
        assert (await leader.get("h1")).health is HostHealth.READY
    finally:
        for s in stores:
            await s.close()


async def test_an_unregistered_host_is_asked_to_register_by_any_replica(cluster: EtcdCluster) -> None:
    store = EtcdStore(EtcdKV(cluster.endpoints), f"/t-{secrets.token_hex(6)}/")
    registry = HostRegistry(store, CoordinatorConfig(), Clock(1000.0), CoordinatorMetrics())
    try:
        ack = await registry.push(_batch("h9", 999.0))
        assert (ack.accepted, ack.reregister) == (0, True)
        await store.flush_telemetry()
        assert await store.list_hosts() == []  # nothing was held back for it
    finally:
        await store.close()
