"""The telemetry pusher against a real aiohttp coordinator stand-in over mutual TLS (fleet CA from
core/security/pki.py): registration, a coordinator restart with a bounded backlog, refusals."""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from google.protobuf import json_format

from agent.config import CoordinatorConfig, TelemetryConfig
from agent.metrics import AgentMetrics
from agent.telemetry.push import TelemetryPusher
from agent.telemetry.sampler import Sampler
from agent.telemetry.service import TelemetryService
from core.http.validate import PROTOBUF
from core.replicas import spread
from core.security.pki import HostCertPaths, init_ca, issue_host
from core.security.tls import client_context, peer_identity, server_context
from proto.ferryman.v1 import fleet_pb2 as pb


@dataclass
class Fleet:
    coordinator: HostCertPaths
    agent: HostCertPaths
    ca_dir: Path


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    ca = init_ca(tmp_path / "ca")
    return Fleet(
        coordinator=issue_host(ca.directory, "coord", tmp_path / "coord", addresses=["127.0.0.1"]),
        agent=issue_host(ca.directory, "h1", tmp_path / "h1"),
        ca_dir=ca.directory,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Coordinator:
    """A minimal coordinator: strict protobuf JSON (binary protobuf for telemetry), the client's
    certificate identity, and a memory of registered hosts that a restart wipes (so the agent must
    register again)."""

    files: HostCertPaths
    port: int
    registrations: list[pb.Registration] = field(default_factory=list)
    batches: list[pb.TelemetryBatch] = field(default_factory=list)
    status: int = 200
    known: set[str] = field(default_factory=set)
    runner: web.AppRunner | None = None
    follows: str | None = None
    """A replica that does not lead: every request gets 503 not_leader naming this URL."""
    hints: str | None = None
    """A follower that serves every request and names this URL as the leader (Ferryman-Leader)."""
    json_only: bool = False
    """A coordinator from before binary pushes: telemetry as JSON only, 400 for anything else."""
    content_types: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    """Every request's method and path, answered or not (this stand-in has no telemetry stream: 404)."""
    arrivals: list[float] = field(default_factory=list)
    """When each of `paths` arrived (monotonic)."""
    sheds: bool = False
    """A leader that leaves telemetry to its followers: every push gets 503 push_elsewhere."""
    busy: int = 0
    """Registrations still to refuse as a busy coordinator does: 503 registrations_busy, Retry-After 1."""

    def _peer(self, request: web.Request) -> str:
        assert request.transport is not None
        return peer_identity(request.transport.get_extra_info("ssl_object"))

    def _not_leader(self) -> web.Response:
        error = {"code": "not_leader", "message": "this replica does not lead", "leader": self.follows}
        return web.json_response({"error": error}, status=503)

    async def register(self, request: web.Request) -> web.Response:
        if self.follows is not None:
            return self._not_leader()
        if self.busy:
            self.busy -= 1
            error = {"code": "registrations_busy", "message": "32 registrations are under way here"}
            return web.json_response({"error": error}, status=503, headers={"Retry-After": "1"})
        reg = json_format.Parse(await request.text(), pb.Registration())  # unknown fields: an error
        assert reg.host == self._peer(request)
        self.registrations.append(reg)
        self.known.add(reg.host)
        return web.json_response({}, headers={"Ferryman-Leader": self.hints} if self.hints else None)

    async def telemetry(self, request: web.Request) -> web.Response:
        if self.follows is not None:
            return self._not_leader()
        if self.sheds:
            error = {"code": "push_elsewhere", "message": "this replica leads and leaves telemetry to the others"}
            return web.json_response({"error": error}, status=503)
        if self.status != 200:
            return web.Response(status=self.status, text="broken")
        self.content_types.append(request.content_type)
        if self.json_only:
            try:
                batch = json_format.Parse(await request.text(), pb.TelemetryBatch())
            except (json_format.ParseError, UnicodeDecodeError) as exc:
                return web.json_response({"error": {"message": f"request body is not valid JSON: {exc}"}}, status=400)
        else:
            assert request.content_type == PROTOBUF  # pushes go in protobuf's binary encoding
            batch = pb.TelemetryBatch.FromString(await request.read())
        assert batch.host == self._peer(request)
        if batch.host not in self.known:
            return web.json_response(json_format.MessageToDict(pb.TelemetryAck(accepted=0, reregister=True)))
        self.batches.append(batch)
        return web.json_response(json_format.MessageToDict(pb.TelemetryAck(accepted=len(batch.samples))))

    async def start(self) -> None:
        self.known = set()  # a restarted coordinator forgot every host

        @web.middleware
        async def record(request: web.Request, handler: Any) -> web.StreamResponse:
            self.paths.append(f"{request.method} {request.path}")
            self.arrivals.append(time.monotonic())
            response: web.StreamResponse = await handler(request)
            return response

        app = web.Application(middlewares=[record])
        app.router.add_post("/v1/register", self.register)
        app.router.add_post("/v1/telemetry", self.telemetry)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port, ssl_context=server_context(self.files))
        await site.start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def samples(self) -> list[pb.TelemetrySample]:
        return [s for b in self.batches for s in b.samples]


@pytest.fixture
async def coordinator(fleet: Fleet) -> AsyncIterator[Coordinator]:
    coord = Coordinator(fleet.coordinator, free_port())
    await coord.start()
    yield coord
    await coord.stop()


async def registration() -> pb.Registration:
    return pb.Registration(host="h1", capacity=pb.Capacity(cpu_millis=2000), telemetry_period_s=5.0)


def make_pusher(
    fleet: Fleet, port: int, telemetry: TelemetryConfig, metrics: AgentMetrics, server_name: str = "coord"
) -> TelemetryPusher:
    coordinator = CoordinatorConfig(url=f"https://127.0.0.1:{port}", server_name=server_name, request_timeout=5.0)
    return TelemetryPusher("h1", coordinator, telemetry, client_context(fleet.agent), registration, metrics)


async def until(condition: Callable[[], bool], what: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def pushes(metrics: AgentMetrics, result: str) -> float:
    return metrics.telemetry_pushes.labels(result=result)._value.get()


def coordinator_up(metrics: AgentMetrics, port: int) -> float | None:
    """ferryman_telemetry_coordinator_up for the pusher's url, None before its first flush."""
    url = f"https://127.0.0.1:{port}"
    return metrics.registry.get_sample_value("ferryman_telemetry_coordinator_up", {"coordinator": url})


async def test_backlog_survives_a_coordinator_restart(fleet: Fleet, coordinator: Coordinator, tmp_path: Path) -> None:
    metrics = AgentMetrics()
    config = TelemetryConfig(buffer_max_samples=5, batch_max=2, drain_notice_file=str(tmp_path / "drain"))
    pusher = make_pusher(fleet, coordinator.port, config, metrics)
    service = TelemetryService(Sampler(config), metrics, period=60.0, pusher=pusher)
    assert coordinator_up(metrics, coordinator.port) is None  # no flush yet: no series to alert on
    await pusher.start()
    try:
        first = await service.tick()
        await until(lambda: len(coordinator.samples()) == 1, "the first sample")
        assert [r.host for r in coordinator.registrations] == ["h1"]
        assert coordinator.samples()[0].ts == first.ts
        await until(lambda: coordinator_up(metrics, coordinator.port) == 1, "coordinator_up 1")

        await coordinator.stop()
        (tmp_path / "drain").write_text("host drains at 03:00Z")  # an event taken while the coordinator is away
        taken = []
        for _ in range(8):  # the sampler keeps going; the buffer holds the last 5
            taken.append(await service.tick())
            await asyncio.sleep(0.01)
        await until(lambda: pushes(metrics, "failed") >= 1, "a failed push")
        await until(lambda: pusher.buffered == 5 and pusher.dropped == 3, "the bounded buffer")
        assert coordinator.samples() == [first]
        assert coordinator_up(metrics, coordinator.port) == 0

        await coordinator.start()
        taken.append(await service.tick())  # the next sample finds the coordinator back
        await until(lambda: pusher.buffered == 0, "the backlog to drain")
        await until(lambda: coordinator_up(metrics, coordinator.port) == 1, "coordinator_up 1 again")

        arrived = coordinator.samples()[1:]
        expected = taken[-5:]  # 9 taken while away or just after, 5 kept, the oldest 4 dropped
        assert [s.ts for s in arrived] == [s.ts for s in expected]
        assert arrived == expected  # whole samples, not just their stamps
        assert all(a.ts < b.ts for a, b in itertools.pairwise(coordinator.samples()))
        assert sum(b.dropped for b in coordinator.batches) == 4
        assert coordinator.batches[1].dropped == 4  # told once, in the first batch after the gap
        assert all(len(b.samples) <= 2 for b in coordinator.batches)
        assert len(coordinator.registrations) == 2  # the restarted coordinator asked for it
        assert pusher.dropped == 0
        assert metrics.telemetry_dropped._value.get() == 4
        # The drain notice was in a dropped sample or a delivered one; if delivered, exactly once.
        notices = [e for s in coordinator.samples() for e in s.events if e.kind == pb.DRAIN_NOTICE]
        dropped_notice = any(e.kind == pb.DRAIN_NOTICE for s in taken[:4] for e in s.events)
        assert len(notices) == (0 if dropped_notice else 1)
    finally:
        await pusher.close()


async def test_wrong_coordinator_identity_and_errors_keep_the_buffer(fleet: Fleet, coordinator: Coordinator) -> None:
    metrics = AgentMetrics()
    config = TelemetryConfig(buffer_max_samples=10)
    sample = pb.TelemetrySample(ts=time.time(), cpus=2)

    # A valid fleet certificate for another name is not the coordinator.
    impostor = make_pusher(fleet, coordinator.port, config, metrics, server_name="not-coord")
    await impostor.start()
    try:
        impostor.offer(sample)
        assert await impostor.flush() is False
        assert impostor.buffered == 1 and not impostor.registered
        assert coordinator.registrations == []
    finally:
        await impostor.close()

    # The right coordinator failing a push: the samples stay until it works again.
    pusher = make_pusher(fleet, coordinator.port, config, metrics)
    await pusher.start()
    try:
        coordinator.status = 500
        pusher.offer(sample)
        await until(lambda: pushes(metrics, "failed") >= 2, "the refused push")
        assert pusher.buffered == 1 and pusher.registered
        coordinator.status = 200
        assert await pusher.flush() is True
        assert pusher.buffered == 0 and coordinator.samples() == [sample]
    finally:
        await pusher.close()


async def test_a_coordinator_that_refuses_binary_gets_json(fleet: Fleet, coordinator: Coordinator) -> None:
    """A coordinator from before binary pushes (a rollback of the coordinator alone) answers 400 to
    one: the same batch goes again as JSON, and the next pushes go as JSON straight away."""
    metrics = AgentMetrics()
    coordinator.json_only = True
    pusher = make_pusher(fleet, coordinator.port, TelemetryConfig(buffer_max_samples=10), metrics)
    await pusher.start()
    try:
        first, second = (pb.TelemetrySample(ts=time.time() + i, cpus=2) for i in range(2))
        pusher.offer(first)
        assert await pusher.flush() is True
        pusher.offer(second)
        assert await pusher.flush() is True
        assert coordinator.samples() == [first, second] and pusher.buffered == 0
        assert coordinator.content_types == [PROTOBUF, "application/json", "application/json"]
        assert pushes(metrics, "failed") == 0
    finally:
        await pusher.close()


async def test_a_coordinator_without_the_stream_gets_posts(fleet: Fleet, coordinator: Coordinator) -> None:
    """A coordinator from before the telemetry stream answers its upgrade 404: the push goes by POST,
    and so do the next ones, without asking again (STREAM_RETRY)."""
    pusher = make_pusher(fleet, coordinator.port, TelemetryConfig(buffer_max_samples=10), AgentMetrics())
    await pusher.start()
    try:
        sent = [pb.TelemetrySample(ts=time.time() + i, cpus=2) for i in range(3)]
        for s in sent:
            pusher.offer(s)
            assert await pusher.flush() is True
        assert coordinator.samples() == sent and pusher.buffered == 0 and not pusher.streaming
        assert coordinator.paths == [
            "POST /v1/register",
            "GET /v1/telemetry/stream",  # asked once, 404
            "POST /v1/telemetry",
            "POST /v1/telemetry",
            "POST /v1/telemetry",
        ]
    finally:
        await pusher.close()


async def test_stale_samples_age_out(fleet: Fleet) -> None:
    metrics = AgentMetrics()
    pusher = make_pusher(fleet, free_port(), TelemetryConfig(buffer_max_age=30.0), metrics)
    now = time.time()
    pusher.offer(pb.TelemetrySample(ts=now - 60))
    pusher.offer(pb.TelemetrySample(ts=now - 10))
    assert pusher.buffered == 1 and pusher.dropped == 1
    assert metrics.telemetry_buffered._value.get() == 1


async def test_the_pusher_follows_the_leader_across_replicas(fleet: Fleet, tmp_path: Path) -> None:
    """urls: a replica that is down, a follower naming the leader, the leader. Pushes reach the
    leader; while no replica can take them they stay buffered, and go out once the leader is back."""
    dead = free_port()  # nothing listens there
    leader = Coordinator(fleet.coordinator, free_port())
    follower = Coordinator(fleet.coordinator, free_port(), follows=f"https://127.0.0.1:{leader.port}")
    urls = tuple(f"https://127.0.0.1:{p}" for p in (dead, follower.port, leader.port))
    config = CoordinatorConfig(urls=urls, server_name="coord", request_timeout=5.0)
    metrics = AgentMetrics()
    pusher = TelemetryPusher("h1", config, TelemetryConfig(), client_context(fleet.agent), registration, metrics)
    await leader.start()
    await follower.start()
    await pusher.start()
    try:
        pusher.offer(pb.TelemetrySample(ts=time.time()))
        await until(lambda: len(leader.samples()) == 1, "the sample at the leader")
        assert [r.host for r in leader.registrations] == ["h1"]
        assert follower.registrations == [] and follower.batches == []
        # It stays with the leader: the next push goes straight there.
        pusher.offer(pb.TelemetrySample(ts=time.time()))
        await until(lambda: len(leader.samples()) == 2, "the second sample")
        # The leader goes away; the follower still names it: nothing is lost, the buffer holds it.
        await leader.stop()
        failed = pushes(metrics, "failed")
        pusher.offer(pb.TelemetrySample(ts=time.time()))
        await until(lambda: pushes(metrics, "failed") > failed, "a failed flush")
        assert pusher.buffered == 1
        await leader.start()  # back (it forgot the host: the agent registers again)
        pusher.offer(pb.TelemetrySample(ts=time.time()))
        await until(lambda: len(leader.samples()) == 4 and pusher.buffered == 0, "both samples at the leader")
        assert [r.host for r in leader.registrations] == ["h1", "h1"]
        assert follower.registrations == [] and follower.batches == []
    finally:
        await pusher.close()
        await follower.stop()
        await leader.stop()


async def test_a_follower_that_serves_a_push_sends_the_next_ones_to_the_leader(fleet: Fleet) -> None:
    """Only the leader scores: a follower takes the registration and names the leader, and the
    samples go to the leader (which asks for a registration of its own)."""
    leader = Coordinator(fleet.coordinator, free_port())
    follower = Coordinator(fleet.coordinator, free_port(), hints=f"https://127.0.0.1:{leader.port}")
    urls = (f"https://127.0.0.1:{follower.port}", f"https://127.0.0.1:{leader.port}")
    config = CoordinatorConfig(urls=urls, server_name="coord", request_timeout=5.0)
    pusher = TelemetryPusher("h1", config, TelemetryConfig(), client_context(fleet.agent), registration)
    await leader.start()
    await follower.start()
    await pusher.start()
    try:
        pusher.offer(pb.TelemetrySample(ts=time.time()))
        await until(lambda: len(leader.samples()) == 1 and pusher.buffered == 0, "the sample at the leader")
        assert [r.host for r in follower.registrations] == ["h1"] and follower.batches == []
        assert [r.host for r in leader.registrations] == ["h1"]
    finally:
        await pusher.close()
        await follower.stop()
        await leader.stop()


async def test_a_leader_that_leaves_telemetry_to_others_sends_the_batch_to_the_next_replica(
    fleet: Fleet,
) -> None:
    """The leader registers the host but answers a push with push_elsewhere: the same batch goes to
    the next replica at once (no failed push, nothing lost), and the pushes stay there."""
    leader = Coordinator(fleet.coordinator, free_port(), sheds=True)
    follower = Coordinator(fleet.coordinator, free_port())
    urls = [f"https://127.0.0.1:{leader.port}", f"https://127.0.0.1:{follower.port}"]
    if spread("h1", 2):  # the agent starts at the leader
        urls.reverse()
    config = CoordinatorConfig(urls=tuple(urls), server_name="coord", request_timeout=5.0)
    metrics = AgentMetrics()
    pusher = TelemetryPusher("h1", config, TelemetryConfig(), client_context(fleet.agent), registration, metrics)
    await leader.start()
    await follower.start()
    await pusher.start()
    try:
        follower.known.add("h1")  # registered on the leader: the follower knows it from the store
        pusher.offer(pb.TelemetrySample(ts=time.time()))
        await until(lambda: len(follower.samples()) == 1 and pusher.buffered == 0, "the sample at the follower")
        assert [r.host for r in leader.registrations] == ["h1"] and leader.batches == []
        assert pusher.coordinator == f"https://127.0.0.1:{follower.port}"
        assert pushes(metrics, "failed") == 0
        pusher.offer(pb.TelemetrySample(ts=time.time()))
        await until(lambda: len(follower.samples()) == 2, "the second sample at the follower")
        assert leader.paths.count("POST /v1/telemetry") == 1
    finally:
        await pusher.close()
        await follower.stop()
        await leader.stop()


async def test_a_busy_coordinator_is_asked_again_after_its_retry_after(fleet: Fleet, coordinator: Coordinator) -> None:
    """A coordinator with as many registrations under way as it takes answers 503 with Retry-After:
    the agent sends nothing before that pause is over (samples arriving meanwhile wait in the
    buffer), and comes back within twice the pause (its random part spreads a starting fleet)."""
    coordinator.busy = 1
    metrics = AgentMetrics()
    pusher = make_pusher(fleet, coordinator.port, TelemetryConfig(buffer_max_samples=10), metrics)
    await pusher.start()
    try:
        sent = [pb.TelemetrySample(ts=time.time() + i, cpus=2) for i in range(4)]
        pusher.offer(sent[0])
        await until(lambda: pushes(metrics, "deferred") == 1, "the refused registration")
        for s in sent[1:]:
            pusher.offer(s)  # each wakes the pusher, as the sampler does
            await asyncio.sleep(0.2)
        assert coordinator.paths == ["POST /v1/register"]
        await until(lambda: pusher.buffered == 0, "the samples pushed after the pause")
        assert coordinator.paths[:2] == ["POST /v1/register", "POST /v1/register"]
        waited = coordinator.arrivals[1] - coordinator.arrivals[0]
        assert 1.0 <= waited <= 2.5, f"asked again {waited:.2f} s after a Retry-After of 1 s"
        assert coordinator.samples() == sent and pushes(metrics, "failed") == 0
    finally:
        await pusher.close()
