"""The leader leaves the agents' telemetry to the followers (`[telemetry] leader_takes_pushes`).

Three coordinator daemons on three etcd members, the shipped model, real agent pushers
(agent/telemetry/push.py) with every replica's URL. While a follower is live the leader refuses
telemetry POSTs and sessions (503 push_elsewhere) and agents move to their next URL with the
refused batch; the leader still scores their hosts from the followers' history shares. Alone, the
leader takes pushes again; a replica that becomes the leader closes its sessions and its agents
move to the replica that follows.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from google.protobuf import json_format

from agent.config import CoordinatorConfig, TelemetryConfig
from agent.telemetry.push import TelemetryPusher
from core.replicas import spread
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


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> CoordinatorPki:
    return CoordinatorPki(tmp_path_factory.mktemp("leader-pushes-pki"))


@pytest.fixture
async def replicas(workdir: Path, pki: CoordinatorPki) -> AsyncIterator[list[CoordinatorProcess]]:
    require("etcd")
    overrides = scoring_overrides("when_alone")
    async with etcd_replicas(workdir, pki, overrides=overrides) as procs:
        yield procs


async def _push_status(proc: CoordinatorProcess, pki: CoordinatorPki, name: str) -> tuple[int, dict[str, Any]]:
    async with proc.client(pki.agent(name)) as agent:
        return await agent.post("/v1/telemetry", {"host": name, "samples": [sample(time.time())]})


async def _until_refused(proc: CoordinatorProcess, pki: CoordinatorPki, name: str) -> dict[str, Any]:
    """The leader's refusal of a push, once it has seen a follower live (one election round)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        status, body = await _push_status(proc, pki, name)
        if status == 503:
            return body
        assert loop.time() < deadline, (status, body)
        await asyncio.sleep(0.2)


def _pusher(name: str, pki: CoordinatorPki, first: CoordinatorProcess, then: CoordinatorProcess) -> TelemetryPusher:
    """An agent's pusher listing both replicas, ordered so that its host name starts it at `first`."""
    urls = [first.url, then.url] if spread(name, 2) == 0 else [then.url, first.url]
    config = CoordinatorConfig(urls=tuple(urls), request_timeout=5.0)

    async def reg() -> pb.Registration:
        return json_format.ParseDict(registration(name), pb.Registration())

    pusher = TelemetryPusher(name, config, TelemetryConfig(), client_context(pki.agent(name)), reg)
    assert pusher.coordinator == first.url
    return pusher


def _offer(pusher: TelemetryPusher, ts: list[float]) -> None:
    for t in ts:
        pusher.offer(json_format.ParseDict(sample(t), pb.TelemetrySample()))


async def _samples(proc: CoordinatorProcess, pki: CoordinatorPki, name: str) -> int:
    """The samples of `name` the replica holds (each replica keeps those pushed to it)."""
    async with proc.client(pki.operator()) as ops:
        status, host = await ops.get(f"/v1/hosts/{name}")
    assert status == 200, host
    return int(host["telemetry_samples"])


async def test_the_leader_leaves_pushes_to_a_live_follower(
    replicas: list[CoordinatorProcess], pki: CoordinatorPki
) -> None:
    leader = await single_leader(replicas, pki)
    followers = [p for p in replicas if p is not leader]
    body = await _until_refused(leader, pki, "roamer")
    assert body["error"]["code"] == "push_elsewhere", body
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:  # no telemetry session either
        async with aiohttp.ClientSession() as session:
            await session.ws_connect(
                leader.url + "/v1/telemetry/stream",
                ssl=pki.client_ssl(pki.agent("roamer")),
                server_hostname="coordinator",
            )
    assert refused.value.status == 503
    for p in replicas:
        async with p.client(pki.operator()) as ops:
            _, health = await ops.get("/healthz")
        assert health["takes_pushes"] is (p is not leader), health

    pusher = _pusher("roamer", pki, leader, followers[0])
    await pusher.start()
    try:
        now = time.time()
        _offer(pusher, [now - 20 + i for i in range(10)])
        assert await pusher.flush()  # registered on the leader, pushed to the follower
        assert pusher.buffered == 0 and pusher.coordinator == followers[0].url
        _offer(pusher, [now - 10 + i for i in range(10)])
        assert await pusher.flush() and pusher.buffered == 0
        assert pusher.streaming and pusher.coordinator == followers[0].url
        assert await _samples(followers[0], pki, "roamer") == 20  # not one batch lost
        assert await _samples(leader, pki, "roamer") == 0

        # The leader scores the host from the follower's share.
        async with leader.client(pki.operator()) as ops:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while True:
                _, prediction = await ops.get("/v1/predictions/roamer")
                if (prediction.get("ts") or 0) >= now:
                    break
                assert loop.time() < deadline, prediction
                await asyncio.sleep(0.2)
            _, metrics = await ops.get("/metrics")
        assert "ferryman_coordinator_pushes_sent_elsewhere_total" in metrics["text"]

        # Alone (the followers stopped, their replica keys gone with their leases): it takes them.
        for p in followers:
            assert await p.stop() == 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while (await _push_status(leader, pki, "roamer"))[0] != 200:
            assert loop.time() < deadline, "the lone leader still refuses pushes"
            await asyncio.sleep(0.2)
        held = await _samples(leader, pki, "roamer")
        _offer(pusher, [time.time() + i * 0.01 for i in range(5)])
        assert await pusher.flush() and pusher.buffered == 0
        assert pusher.coordinator == leader.url
        assert await _samples(leader, pki, "roamer") == held + 5
    finally:
        await pusher.close()


async def test_a_new_leader_sends_its_pushes_to_the_follower(
    replicas: list[CoordinatorProcess], pki: CoordinatorPki
) -> None:
    leader = await single_leader(replicas, pki)
    a, b = (p for p in replicas if p is not leader)
    await _until_refused(leader, pki, "probe")
    pushers = {"on-a": _pusher("on-a", pki, a, b), "on-b": _pusher("on-b", pki, b, a)}
    for pusher in pushers.values():
        await pusher.start()
    try:
        now = time.time()
        for pusher in pushers.values():  # two flushes: the second goes over a telemetry session
            _offer(pusher, [now - 20 + i for i in range(5)])
            assert await pusher.flush()
            _offer(pusher, [now - 15 + i for i in range(5)])
            assert await pusher.flush() and pusher.buffered == 0 and pusher.streaming
        assert await _samples(a, pki, "on-a") == 10 and await _samples(b, pki, "on-b") == 10

        assert await leader.stop() == 0  # a clean stop hands the lead over at once
        new = await single_leader([a, b], pki)
        follower = b if new is a else a
        await _until_refused(new, pki, "probe")
        moved = "on-a" if new is a else "on-b"
        for pusher in pushers.values():
            _offer(pusher, [now - 10 + i for i in range(5)])
            assert await pusher.flush() and pusher.buffered == 0  # the new leader's session closed
            assert pusher.coordinator == follower.url
        # Nothing lost: the moved host's earlier samples stay where they were pushed, the new ones
        # are on the follower.
        assert await _samples(new, pki, moved) == 10
        assert await _samples(follower, pki, moved) == 5
        stayed = "on-b" if moved == "on-a" else "on-a"
        assert await _samples(follower, pki, stayed) == 15
    finally:
        for pusher in pushers.values():
            await pusher.close()
