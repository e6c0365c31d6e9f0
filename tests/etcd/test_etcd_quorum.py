"""etcd loses its quorum under three coordinator daemons, then gets it back.

Three members, three daemons (the shipped model, `leader_ttl` 2 s) and a real agent pusher
(agent/telemetry/push.py) listing every replica. Two members killed: within the lease no replica
acts, a leader-only request is refused on every replica (503) and leaves nothing behind, and the
agent keeps pushing and holds what it could not deliver. The members restarted: one leader again,
the refused request goes through, and the agent's samples all arrive.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from google.protobuf import json_format

from agent.config import CoordinatorConfig, TelemetryConfig
from agent.telemetry.push import TelemetryPusher
from core.security.tls import client_context
from proto.ferryman.v1 import fleet_pb2 as pb
from tests.conftest import require
from tests.harness.coordinator import (
    CoordinatorPki,
    CoordinatorProcess,
    etcd_replicas,
    registration,
    sample,
    scoring_overrides,
    single_leader,
)
from tests.harness.etcd import EtcdCluster

LEASE = 2.0  # scoring_overrides' leader_ttl


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> CoordinatorPki:
    return CoordinatorPki(tmp_path_factory.mktemp("quorum-pki"))


@pytest.fixture
async def cluster(workdir: Path) -> AsyncIterator[EtcdCluster]:
    require("etcd")
    async with EtcdCluster(workdir / "etcd", size=3) as running:
        yield running


@pytest.fixture
async def replicas(
    workdir: Path, pki: CoordinatorPki, cluster: EtcdCluster
) -> AsyncIterator[list[CoordinatorProcess]]:
    async with etcd_replicas(workdir, pki, cluster=cluster, overrides=scoring_overrides("always")) as procs:
        yield procs


async def _health(proc: CoordinatorProcess, pki: CoordinatorPki) -> dict[str, object]:
    async with proc.client(pki.operator()) as ops:
        status, body = await ops.get("/healthz")
    assert status == 200, body
    return body


async def _drain(proc: CoordinatorProcess, pki: CoordinatorPki, host: str) -> tuple[int, dict[str, object]]:
    async with proc.client(pki.operator()) as ops:
        return await ops.post(f"/v1/hosts/{host}/drain", {})


async def test_without_quorum_no_replica_decides_and_agents_carry_on(
    cluster: EtcdCluster, replicas: list[CoordinatorProcess], pki: CoordinatorPki
) -> None:
    leader = await single_leader(replicas, pki)
    config = CoordinatorConfig(urls=tuple(p.url for p in replicas), request_timeout=3.0)

    async def reg() -> pb.Registration:
        return json_format.ParseDict(registration("worker"), pb.Registration())

    pusher = TelemetryPusher("worker", config, TelemetryConfig(), client_context(pki.agent("worker")), reg)
    await pusher.start()
    try:
        now = time.time()
        for t in range(5):
            pusher.offer(json_format.ParseDict(sample(now - 30 + t), pb.TelemetrySample()))
        assert await pusher.flush() and pusher.buffered == 0

        await cluster.members[1].kill()
        await cluster.members[2].kill()
        loop = asyncio.get_running_loop()
        lost = loop.time()
        # The leader stops acting by its deadline; no follower can win a lease without a quorum.
        while any([(await _health(p, pki))["acting"] for p in replicas]):
            assert loop.time() - lost < LEASE + 3.0, "a replica still acts without a quorum"
            await asyncio.sleep(0.2)
        for p in replicas:  # every replica still answers, and none decides
            status, body = await _drain(p, pki, "worker")
            assert status == 503, body
            assert body["error"]["code"] in ("not_leader", "store_unavailable"), body  # type: ignore[index]
        # The agent carries on: what it cannot deliver it holds.
        for t in range(5):
            pusher.offer(json_format.ParseDict(sample(now - 20 + t), pb.TelemetrySample()))
        await pusher.flush()
        assert any([(await _health(p, pki))["acting"] for p in replicas]) is False

        await asyncio.gather(*(m.start(wait_healthy=False) for m in cluster.members[1:]))
        await cluster.wait_healthy()
        back = await single_leader(replicas, pki, within=20.0)
        status, body = await _drain(back, pki, "worker")
        assert status in (200, 202), body
        async with back.client(pki.operator()) as ops:
            _, host = await ops.get("/v1/hosts/worker")
        assert host["admin"] in ("draining", "drained"), host
        deadline = loop.time() + 15
        while pusher.buffered:  # every sample held through the outage is delivered
            assert loop.time() < deadline, pusher.buffered
            await pusher.flush()
            await asyncio.sleep(0.2)
        held = 0
        for p in replicas:
            async with p.client(pki.operator()) as ops:
                _, seen = await ops.get("/v1/hosts/worker")
            held += int(seen["telemetry_samples"])
        assert held == 10, held
        print(f"leader before {leader.url}, after {back.url}")
    finally:
        await pusher.close()
