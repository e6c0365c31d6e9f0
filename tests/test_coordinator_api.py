"""The coordinator daemon as a real process: mTLS, real SQLite, real aiohttp, certificates from pki.py.

Covers: registration identity, bad telemetry, authentication and roles, suspect/down transitions,
the reservation race through the HTTP API, and restart persistence.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yaml
from google.protobuf import json_format

from agent.config import CoordinatorConfig, TelemetryConfig
from agent.telemetry.push import TelemetryPusher
from core.http.validate import PROTOBUF
from core.security.tls import client_context
from proto.ferryman.v1 import fleet_pb2
from tests.harness import rawhttp
from tests.harness.coordinator import (
    COORDINATOR_NAME,
    CoordinatorPki,
    CoordinatorProcess,
    new_token,
    registration,
    sample,
    telemetry_body,
)
from tests.harness.netns import add_netns, aip, can_connect, del_netns, list_netns

POLL = 0.05


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> CoordinatorPki:
    return CoordinatorPki(tmp_path_factory.mktemp("coordinator-pki"))


@pytest.fixture(scope="module")
def token() -> str:
    return new_token()


@pytest.fixture
async def coordinator(workdir: Path, pki: CoordinatorPki, token: str) -> AsyncIterator[CoordinatorProcess]:
    proc = CoordinatorProcess(
        workdir,
        pki,
        tokens=(token,),
        overrides={"heartbeat": {"suspect_after": 600.0, "down_after": 1200.0, "check_period": 0.1}},
    )
    await proc.start()
    try:
        yield proc
    finally:
        code = await proc.stop()
        assert code == 0, proc.logs()


async def _register(proc: CoordinatorProcess, pki: CoordinatorPki, name: str, **extra: object) -> None:
    async with proc.client(pki.agent(name)) as agent:
        status, body = await agent.post("/v1/register", registration(name, **extra))  # type: ignore[arg-type]
    assert status == 200, body


async def test_registration_must_match_the_certificate(coordinator: CoordinatorProcess, pki: CoordinatorPki) -> None:
    async with coordinator.client(pki.agent("h1")) as h1:
        status, body = await h1.post("/v1/register", registration("h1"))
        assert status == 200, body
        assert body["name"] == "h1" and body["state"] == "ready"
        # h1's certificate cannot speak for h2.
        status, body = await h1.post("/v1/register", registration("h2"))
        assert status == 403 and body["error"]["code"] == "forbidden"
        assert "h2" in body["error"]["message"]
    async with coordinator.client(pki.operator("alice")) as ops:
        status, body = await ops.post("/v1/register", registration("alice"))
        assert status == 403, body
        status, body = await ops.get("/v1/hosts")
        assert status == 200
        assert [h["name"] for h in body["hosts"]] == ["h1"]
    async with coordinator.client(None) as anonymous:
        status, body = await anonymous.post("/v1/register", registration("h3"))
        assert status == 401 and body["error"]["code"] == "unauthorized"


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b'{"host": "h1", "samples": [{"ts": 1, "bogus": 2}]}', "bogus"),
        (b'{"host": "h1", "samples": [{"ts": "yesterday"}]}', "ts"),
        (b'{"host": "h1", "samples": [{"ts": 1700000000, "cpu_util": "NaN"}]}', "finite"),
        (b'{"host": "h1", "samples": [{"ts": 1700000000, "net_rx_bps": -5}]}', "negative"),
        (b'{"host": "h1", "samples": [{"ts": 1700000000, "cpus": -1}]}', "cpus"),
        (b'{"host": "h1", "samples": [{"ts": 1700000000, "containers": [{"id": "a", "packetsInPerS": -1}]}]}', "neg"),
        (b'{"host": "h1", "samples": [{"ts": 99999999999}]}', "future"),
        (b'{"host": "h1", "samples": [{"ts": 1700000000, "pressure": {"io_some": 250}}]}', "percentage"),
        (b'{"host": "h1", "samples": [', "invalid TelemetryBatch"),
        (b"", "TelemetryBatch"),
    ],
)
async def test_bad_telemetry_is_refused_and_nothing_is_stored(
    coordinator: CoordinatorProcess, pki: CoordinatorPki, payload: bytes, fragment: str
) -> None:
    await _register(coordinator, pki, "h1")
    async with coordinator.client(pki.operator("alice")) as ops:
        _, before = await ops.get("/v1/hosts/h1")
    async with coordinator.client(pki.agent("h1")) as h1:
        # A good sample in the same batch is not stored either: the batch is all or nothing.
        good = sample(time.time())
        body = payload.replace(b'"samples": [', b'"samples": [' + json.dumps(good).encode() + b", ", 1)
        status, answer = await h1.post("/v1/telemetry", raw=body)
    assert status == 400, answer
    assert answer["error"]["code"] == "invalid_request"
    assert fragment in answer["error"]["message"]
    async with coordinator.client(pki.operator("alice")) as ops:
        _, after = await ops.get("/v1/hosts/h1")
    assert after["telemetry_samples"] == before["telemetry_samples"] == 0
    assert after["last_heartbeat"] == before["last_heartbeat"]


_DEEP = b"[" * 100_000 + b"]" * 100_000


async def test_deep_or_huge_bodies_are_400_and_store_nothing(
    coordinator: CoordinatorProcess, pki: CoordinatorPki
) -> None:
    await _register(coordinator, pki, "h1", memory_bytes=64 << 30)
    place = {"capacity": {"cpu_millis": 100, "memory_bytes": 1 << 30}, "host": "h1"}
    cases: list[tuple[str, str, bytes, str]] = [
        # json.loads recursed into these until RecursionError: a 500 before the depth limit.
        ("ops", "/v1/reservations", b'{"capacity": ' + _DEEP + b"}", "deeper than 32"),
        ("ops", "/v1/migrations", b'{"container": "web", "to": {"a": ' * 50 + b"1" + b"}" * 51, "deeper"),
        ("h1", "/v1/telemetry", b'{"host": "h1", "samples": ' + _DEEP + b"}", "deeper than 32"),
        # A lone surrogate: json.loads makes a str protobuf cannot encode; a 500 (found by the fuzz suite).
        ("h1", "/v1/telemetry", b'{"host": "", "samples": ["\\ud800"]}', "surrogate"),
        # SQLite's INTEGER overflowed at 2**63 (OverflowError, a 500); 1 PiB is the sane maximum.
        (
            "ops",
            "/v1/reservations",
            json.dumps({**place, "capacity": {"memory_bytes": 1 << 63}}).encode(),
            "body.capacity.memory_bytes",
        ),
        (
            "ops",
            "/v1/reservations",
            json.dumps({**place, "capacity": {"disk_bytes": 10**40}}).encode(),
            "body.capacity.disk_bytes",
        ),
        ("ops", "/v1/reservations", json.dumps({**place, "layers": {"sha256:x": 1 << 64}}).encode(), "body.layers"),
        ("ops", "/v1/reservations", b'{"capacity": {"cpu_millis": ' + b"7" * 5000 + b"}}", "not valid JSON"),
        (
            "h1",
            "/v1/register",
            json.dumps(registration("h1", memory_bytes=(1 << 64) - 1)).encode(),
            "Registration.capacity.memory_bytes",
        ),
        (
            "h1",
            "/v1/telemetry",
            json.dumps({"host": "h1", "samples": [sample(time.time(), memory_total_bytes=(1 << 63) + 1)]}).encode(),
            "TelemetryBatch.samples[0].memory_total_bytes",
        ),
    ]
    for who, path, raw, needle in cases:
        identity = pki.operator("alice") if who == "ops" else pki.agent(who)
        async with coordinator.client(identity) as client:
            status, body = await client.post(path, raw=raw)
        assert status == 400, (path, needle, body)
        assert body["error"]["code"] == "invalid_request"
        assert needle in body["error"]["message"], (needle, body)
    async with coordinator.client(pki.operator("alice")) as ops:
        assert (await ops.get("/v1/reservations"))[1] == {"reservations": []}
        _, host = await ops.get("/v1/hosts/h1")
    assert host["telemetry_samples"] == 0
    assert host["capacity"]["memory_bytes"] == 64 << 30


async def test_non_finite_and_out_of_range_numbers_are_400(
    coordinator: CoordinatorProcess, pki: CoordinatorPki
) -> None:
    await _register(coordinator, pki, "h1", memory_bytes=64 << 30)
    now = time.time()
    cases: list[tuple[str, str, bytes, str]] = [
        # An event 1e300 s ahead (or before 1970) was stored as it came: only NaN was refused.
        (
            "h1",
            "/v1/telemetry",
            json.dumps({"host": "h1", "samples": [sample(now, events=[{"ts": 1e300, "kind": "OOM_KILL"}])]}).encode(),
            "events[0].ts",
        ),
        (
            "h1",
            "/v1/telemetry",
            json.dumps({"host": "h1", "samples": [sample(now, events=[{"ts": -1, "kind": "OOM_KILL"}])]}).encode(),
            "events[0].ts",
        ),
        ("h1", "/v1/telemetry", b'{"host": "h1", "samples": [{"ts": NaN}]}', "finite"),
        ("h1", "/v1/telemetry", b'{"host": "h1", "samples": [{"ts": 1e999}]}', "finite"),
        ("h1", "/v1/register", json.dumps(registration("h1", telemetry_period_s="Infinity")).encode(), "finite"),
        ("ops", "/v1/reservations", b'{"capacity": {"cpu_millis": 100}, "host": "h1", "ttl": NaN}', "finite"),
        ("ops", "/v1/reservations", b'{"capacity": {"cpu_millis": 100}, "host": "h1", "ttl": -Infinity}', "finite"),
        ("ops", "/v1/reservations", b'{"capacity": {"cpu_millis": 1e999}, "host": "h1"}', "finite"),
    ]
    for who, path, raw, needle in cases:
        identity = pki.operator("alice") if who == "ops" else pki.agent(who)
        async with coordinator.client(identity) as client:
            status, body = await client.post(path, raw=raw)
        assert status == 400, (path, needle, body)
        assert body["error"]["code"] == "invalid_request"
        assert needle in body["error"]["message"], (needle, body)
    async with coordinator.client(pki.operator("alice")) as ops:
        assert (await ops.get("/v1/reservations"))[1] == {"reservations": []}
        _, host = await ops.get("/v1/hosts/h1")
    assert host["telemetry_samples"] == 0


def _bad_batches(now: float) -> list[tuple[bytes, str, str]]:
    """Binary pushes from h1 the coordinator refuses: (body, error code, what its message names)."""
    nan = fleet_pb2.TelemetryBatch(host="h1", samples=[fleet_pb2.TelemetrySample(ts=now, cpu_util=float("nan"))])
    return [
        (b"\xff\xff\xff\xff", "invalid_request", "not a binary TelemetryBatch"),
        (nan.SerializeToString(), "invalid_request", "TelemetryBatch.samples[0].cpu_util"),  # bounds after the parse
        (telemetry_body("h2", [sample(now)]), "forbidden", "'h2'"),  # another host's samples
    ]


async def test_telemetry_in_binary_protobuf_is_checked_as_json_is(
    coordinator: CoordinatorProcess, pki: CoordinatorPki
) -> None:
    await _register(coordinator, pki, "h1")
    now = time.time()
    async with coordinator.client(pki.agent("h1")) as h1:
        for raw, _, needle in _bad_batches(now):
            status, body = await h1.post("/v1/telemetry", raw=raw, content_type=PROTOBUF)
            assert status in (400, 403), (needle, body)
            assert needle in body["error"]["message"], (needle, body)
        status, body = await h1.post(
            "/v1/telemetry", raw=telemetry_body("h1", [sample(now - 5), sample(now)]), content_type=PROTOBUF
        )
        assert status == 200 and body == {"accepted": 2, "reregister": False}, body
    async with coordinator.client(pki.operator("alice")) as ops:
        _, host = await ops.get("/v1/hosts/h1")
        assert host["telemetry_samples"] == 2  # none of the refused pushes


async def test_an_agent_pushes_over_the_telemetry_stream(
    coordinator: CoordinatorProcess, pki: CoordinatorPki, tmp_path: Path
) -> None:
    """The agent's own pusher against the real daemon: it opens the telemetry session and its pushes
    go there, stored as a POST's are; stopping the coordinator ends the session (1001), and the
    pusher's next push opens a new one."""
    agent = pki.agent("h1")
    link = CoordinatorConfig(url=coordinator.url, server_name=COORDINATOR_NAME, request_timeout=10.0)

    async def reg() -> fleet_pb2.Registration:
        return json_format.ParseDict(registration("h1"), fleet_pb2.Registration())

    pusher = TelemetryPusher("h1", link, TelemetryConfig(), client_context(agent), reg)
    await pusher.start()
    try:
        now = time.time()
        for k in range(3):
            pusher.offer(fleet_pb2.TelemetrySample(ts=now - 10 + 5 * k, cpus=4, cpu_util=0.25))
            assert await pusher.flush() is True
            assert pusher.streaming and pusher.buffered == 0
        async with coordinator.client(pki.operator("alice")) as ops:
            _, host = await ops.get("/v1/hosts/h1")
        assert host["telemetry_samples"] == 3 and host["state"] == "ready", host

        assert await coordinator.stop() == 0  # within STOP_TIMEOUT: the session does not hold it up
        await coordinator.start()
        pusher.offer(fleet_pb2.TelemetrySample(ts=time.time(), cpus=4))
        # The session the old process ended sends this one by POST; the next one opens a new session.
        assert await pusher.flush() is True and pusher.buffered == 0
        pusher.offer(fleet_pb2.TelemetrySample(ts=time.time() + 1, cpus=4))
        assert await pusher.flush() is True and pusher.streaming
        async with coordinator.client(pki.operator("alice")) as ops:
            _, host = await ops.get("/v1/hosts/h1")
        assert host["telemetry_samples"] == 5, host  # SQLite kept the first three
    finally:
        await pusher.close()


async def test_a_bad_message_on_the_telemetry_stream_is_answered_and_the_session_goes_on(
    coordinator: CoordinatorProcess, pki: CoordinatorPki
) -> None:
    await _register(coordinator, pki, "h1")
    now = time.time()
    refused: list[tuple[bytes | str, str, str]] = [
        *_bad_batches(now),
        ("a text message", "invalid_request", "binary TelemetryBatch messages only"),
    ]
    async with (
        coordinator.client(pki.agent("h1")) as h1,
        h1.session.ws_connect(
            coordinator.url + "/v1/telemetry/stream", ssl=h1.ctx, server_hostname=COORDINATOR_NAME
        ) as ws,
    ):
        for message, code, needle in refused:
            if isinstance(message, bytes):
                await ws.send_bytes(message)
            else:
                await ws.send_str(message)
            answer = await ws.receive(timeout=10)
            assert answer.type is aiohttp.WSMsgType.TEXT, (needle, answer)
            error = json.loads(answer.data)["error"]
            assert error["code"] == code and needle in error["message"], (needle, error)
        await ws.send_bytes(telemetry_body("h1", [sample(now - 5), sample(now)]))
        answer = await ws.receive(timeout=10)
        assert answer.type is aiohttp.WSMsgType.BINARY, answer
        assert fleet_pb2.TelemetryAck.FromString(answer.data) == fleet_pb2.TelemetryAck(accepted=2)
    async with coordinator.client(pki.operator("alice")) as ops:
        _, host = await ops.get("/v1/hosts/h1")
        assert host["telemetry_samples"] == 2  # none of the refused messages
        # Only agents open a session: an operator's certificate is refused before the upgrade.
        status, body = await ops.get("/v1/telemetry/stream")
        assert status == 403 and body["error"]["code"] == "forbidden", body


async def test_telemetry_is_stored_only_for_the_callers_own_host(
    coordinator: CoordinatorProcess, pki: CoordinatorPki
) -> None:
    await _register(coordinator, pki, "h1")
    await _register(coordinator, pki, "h2")
    now = time.time()
    batch = {"host": "h1", "samples": [sample(now - 10), sample(now - 5)]}
    async with coordinator.client(pki.agent("h2")) as h2:
        status, body = await h2.post("/v1/telemetry", batch)
        assert status == 403, body
    async with coordinator.client(pki.agent("h1")) as h1:
        status, body = await h1.post("/v1/telemetry", batch)
        assert status == 200 and body == {"accepted": 2, "reregister": False}
        status, body = await h1.post("/v1/telemetry", {"host": "h1", "samples": [sample(now)]})
        assert status == 200 and body["accepted"] == 1
    async with coordinator.client(pki.agent("h9")) as h9:
        status, body = await h9.post("/v1/telemetry", {"host": "h9", "samples": [sample(now)]})
        assert status == 200 and body == {"accepted": 0, "reregister": True}
    async with coordinator.client(pki.operator("alice")) as ops:
        _, host = await ops.get("/v1/hosts/h1")
        assert host["telemetry_samples"] == 3
        _, unknown = await ops.get("/v1/hosts/h9")
        assert unknown["error"]["code"] == "host_not_found"


async def test_only_ops_may_start_a_migration(coordinator: CoordinatorProcess, pki: CoordinatorPki, token: str) -> None:
    await _register(coordinator, pki, "h1")
    request = {"container": "web", "to": "auto"}
    async with coordinator.client(None) as anonymous:
        status, body = await anonymous.post("/v1/migrations", request)
        assert status == 401 and body["error"]["code"] == "unauthorized"
    async with coordinator.client(pki.agent("h1")) as agent:
        status, body = await agent.post("/v1/migrations", request)
        assert status == 403 and body["error"]["code"] == "forbidden"
        status, _ = await agent.get("/v1/hosts")
        assert status == 403
    async with coordinator.client(None, token="not-" + token) as forged:
        status, body = await forged.post("/v1/migrations", request)
        assert status == 401, body
    async with coordinator.client(pki.agent("h1"), token="not-" + token) as agent_with_bad_token:
        status, _ = await agent_with_bad_token.post("/v1/migrations", request)
        assert status == 401
    # Authorised callers get past auth: the container is unknown to the fleet, so 404.
    async with coordinator.client(None, token=token) as ops_token:
        status, body = await ops_token.post("/v1/migrations", request)
        assert status == 404 and body["error"]["code"] == "container_not_found", body
    async with coordinator.client(pki.operator("alice")) as ops_cert:
        status, body = await ops_cert.post("/v1/migrations", request)
        assert status == 404, body
        status, body = await ops_cert.get("/v1/migrations")
        assert status == 200 and body == {"migrations": []}


async def test_aiohttp_own_refusals_are_json(coordinator: CoordinatorProcess, pki: CoordinatorPki) -> None:
    # aiohttp's HTTP parser answered these in text/plain before any middleware ran.
    host, port = coordinator.url.removeprefix("https://").rsplit(":", 1)
    ctx = pki.client_ssl(pki.operator("alice"))
    for name, request in rawhttp.MALFORMED.items():
        resp = await rawhttp.exchange(host, int(port), request, ssl_context=ctx, server_hostname=COORDINATOR_NAME)
        assert 400 <= resp.status < 500, (name, resp.status, resp.body)
        assert resp.headers["content-type"].startswith("application/json"), (name, resp.body)
        error = resp.json()["error"]
        assert set(error) == {"code", "message"} and error["code"] and error["message"], name


async def test_openapi_document_covers_every_route(coordinator: CoordinatorProcess) -> None:
    async with coordinator.client(None) as anonymous:
        status, body = await anonymous.get("/v1/openapi.yaml")
    assert status == 200
    doc = yaml.safe_load(body["text"])
    from coordinator.api.server import build_app  # the routes the server really has

    class _NoCoordinator:
        pass

    app = build_app(_NoCoordinator())  # type: ignore[arg-type]
    routes = {
        (r.method.lower(), r.resource.canonical)
        for r in app.router.routes()
        if r.resource is not None and r.method != "HEAD"
    }
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops if m != "parameters"}
    assert routes == documented


async def test_hosts_go_suspect_then_down_and_come_back(workdir: Path, pki: CoordinatorPki) -> None:
    proc = CoordinatorProcess(
        workdir, pki, overrides={"heartbeat": {"suspect_after": 3.0, "down_after": 6.0, "check_period": 0.1}}
    )
    await proc.start()
    try:
        await _register(proc, pki, "h1")
        seen: list[str] = []
        # Windows of seconds, not fractions: the first look must come before suspect_after on a busy CI.
        async with proc.client(pki.operator("alice")) as ops:
            for _ in range(int(20 / POLL)):
                _, host = await ops.get("/v1/hosts/h1")
                if not seen or seen[-1] != host["state"]:
                    seen.append(host["state"])
                if host["state"] == "down":
                    break
                await asyncio.sleep(POLL)
        assert seen == ["ready", "suspect", "down"]
        async with proc.client(pki.agent("h1")) as h1:
            status, _ = await h1.post("/v1/telemetry", {"host": "h1", "samples": [sample(time.time())]})
            assert status == 200
        async with proc.client(pki.operator("alice")) as ops:
            _, host = await ops.get("/v1/hosts/h1")
            assert host["state"] == "ready"
            _, metrics = await ops.get("/metrics")
            assert 'ferryman_coordinator_hosts{state="ready"}' in metrics["text"]
    finally:
        assert await proc.stop() == 0, proc.logs()


async def test_a_restarted_coordinator_does_not_count_its_own_downtime_as_silence(
    workdir: Path, pki: CoordinatorPki
) -> None:
    # Down longer than suspect_after: the hosts could not report meanwhile, and a drain resumed
    # after the restart must find them eligible (it abandoned its migrations before: no host).
    proc = CoordinatorProcess(
        workdir, pki, overrides={"heartbeat": {"suspect_after": 3.0, "down_after": 60.0, "check_period": 0.1}}
    )
    await proc.start()
    try:
        await _register(proc, pki, "h1")
        assert await proc.stop() == 0, proc.logs()
        await asyncio.sleep(3.5)
        # The coordinator's clock for silence starts no earlier than this: a slow start under load
        # must not eat into the window checked below.
        restarted = time.monotonic()
        await proc.start()
        async with proc.client(pki.operator("alice")) as ops:
            _, host = await ops.get("/v1/hosts/h1")
            assert host["state"] == "ready", host
            while time.monotonic() - restarted < 2.5:  # still within suspect_after (3 s) of the restart
                _, host = await ops.get("/v1/hosts/h1")
                if time.monotonic() - restarted < 2.5:
                    assert host["state"] == "ready", host
                await asyncio.sleep(POLL)
            for _ in range(int(10 / POLL)):  # and silence after it counts as before
                _, host = await ops.get("/v1/hosts/h1")
                if host["state"] == "suspect":
                    break
                await asyncio.sleep(POLL)
            assert host["state"] == "suspect", host
    finally:
        assert await proc.stop() == 0, proc.logs()


async def test_racing_placements_never_overbook_a_host(coordinator: CoordinatorProcess, pki: CoordinatorPki) -> None:
    # Three hosts with room for exactly 4 placements of 1 GiB each (memory is the binding limit).
    for name in ("h1", "h2", "h3"):
        await _register(coordinator, pki, name, cpu_millis=64000, memory_bytes=4 << 30)
    request = {"capacity": {"cpu_millis": 100, "memory_bytes": 1 << 30}, "host": "auto", "purpose": "race"}
    async with coordinator.client(pki.operator("alice")) as ops:
        results = await asyncio.gather(*(ops.post("/v1/reservations", request) for _ in range(200)))
        statuses = defaultdict(int)
        for status, _ in results:
            statuses[status] += 1
        assert dict(statuses) == {201: 12, 409: 188}
        assert all(body["error"]["code"] == "no_target" for status, body in results if status == 409)
        _, listed = await ops.get("/v1/reservations")
        per_host: dict[str, int] = defaultdict(int)
        for reservation in listed["reservations"]:
            per_host[reservation["host"]] += reservation["capacity"]["memory_bytes"]
        assert per_host == {"h1": 4 << 30, "h2": 4 << 30, "h3": 4 << 30}
        _, hosts = await ops.get("/v1/hosts")
        assert all(h["free"]["memory_bytes"] == 0 for h in hosts["hosts"])
        # Released capacity is placeable again, exactly once.
        first = next(body for status, body in results if status == 201)
        status, _ = await ops.request("DELETE", f"/v1/reservations/{first['id']}")
        assert status == 204
        again = await asyncio.gather(*(ops.post("/v1/reservations", request) for _ in range(20)))
        assert sorted(s for s, _ in again) == [201] + [409] * 19
        assert next(b for s, b in again if s == 201)["host"] == first["host"]


async def test_state_survives_a_restart(workdir: Path, pki: CoordinatorPki) -> None:
    proc = CoordinatorProcess(workdir, pki, overrides={"migrations": {"max_attempts": 2, "poll_period": 0.05}})
    await proc.start()
    try:
        for name in ("h1", "h2", "h3", "h4"):
            await _register(proc, pki, name)
        containers = [
            {"id": "web", "image": "busybox", "memory_bytes": 64 << 20, "cpu_millis": 10, "packets_in_per_s": 42.5},
            {"id": "batch", "image": "busybox", "memory_bytes": 8 << 20, "cpu_millis": 5},  # no network: not measured
        ]
        async with proc.client(pki.agent("h1")) as h1:
            status, _ = await h1.post(
                "/v1/telemetry", {"host": "h1", "samples": [sample(time.time(), containers=containers)]}
            )
            assert status == 200
        async with proc.client(pki.operator("alice")) as ops:
            status, reservation = await ops.post(
                "/v1/reservations", {"capacity": {"memory_bytes": 1 << 30}, "host": "h3", "ttl": 3000}
            )
            assert status == 201, reservation
            # h2 runs nothing, so the drain completes at once.
            status, drained = await ops.post("/v1/hosts/h2/drain?wait=5")
            assert status == 200 and drained["host"]["state"] == "drained", drained
            # No agent here has an ops API, so every attempt fails to start: the record shows the retries.
            status, migration = await ops.post("/v1/migrations", {"container": "web", "to": "auto"})
            assert status == 202, migration
            for _ in range(int(10 / POLL)):
                _, migration = await ops.get(f"/v1/migrations/{migration['id']}")
                if migration["done"]:
                    break
                await asyncio.sleep(POLL)
            assert migration["state"] == "abandoned", migration
            assert migration["attempt"] == 2 and len(migration["tried_targets"]) == 2
            assert "h2" not in migration["tried_targets"]  # draining hosts are never targets
            _, before_hosts = await ops.get("/v1/hosts")
            h1_before = next(h for h in before_hosts["hosts"] if h["name"] == "h1")
            rates = {c["id"]: c["packets_in_per_s"] for c in h1_before["containers"]}
            assert rates == {"web": 42.5, "batch": None}, h1_before["containers"]
            _, before_reservations = await ops.get("/v1/reservations")
            _, before_migrations = await ops.get("/v1/migrations")
        assert await proc.stop() == 0, proc.logs()

        await proc.start()
        async with proc.client(pki.operator("alice")) as ops:
            _, after_hosts = await ops.get("/v1/hosts")
            _, after_reservations = await ops.get("/v1/reservations")
            _, after_migrations = await ops.get("/v1/migrations")
            _, decisions = await ops.get("/v1/decisions?host=h1")
        strip = {"last_heartbeat", "free", "reserved"}
        assert [{k: v for k, v in h.items() if k not in strip} for h in after_hosts["hosts"]] == [
            {k: v for k, v in h.items() if k not in strip} for h in before_hosts["hosts"]
        ]
        assert {h["name"]: h["state"] for h in after_hosts["hosts"]}["h2"] == "drained"
        assert after_reservations == before_reservations
        assert [r["id"] for r in after_reservations["reservations"]] == [reservation["id"]]
        assert after_migrations == before_migrations
        kinds = [d["kind"] for d in decisions["decisions"]]
        assert "migrate" in kinds and "retry" in kinds and "give_up" in kinds
    finally:
        assert await proc.stop() == 0, proc.logs()


async def test_a_bad_config_exits_2_with_a_clear_message(workdir: Path, pki: CoordinatorPki) -> None:
    proc = CoordinatorProcess(workdir, pki, overrides={"heartbeat": {"suspect_after": 5.0, "down_after": 1.0}})
    with pytest.raises(RuntimeError, match=r"heartbeat\.down_after must be greater"):
        await proc.start()
    assert proc.proc is None
    wrong_cert = CoordinatorProcess(workdir, pki, overrides={"tls": {"cert_file": str(pki.operator("bob").cert_file)}})
    with pytest.raises(RuntimeError, match="not an agent certificate"):
        await wrong_cert.start()


async def test_a_model_that_fails_to_load_stops_the_start(workdir: Path, pki: CoordinatorPki) -> None:
    broken = workdir / "broken.onnx"
    broken.write_bytes(b"\x08\x07 this is not an onnx model")
    proc = CoordinatorProcess(workdir, pki, overrides={"model": {"path": str(broken)}})
    with pytest.raises(RuntimeError, match=r"exited with 2[\s\S]*cannot load the drain model .*broken\.onnx"):
        await proc.start()


async def test_runs_inside_a_network_namespace(workdir: Path, pki: CoordinatorPki) -> None:
    name = f"fc-{secrets.token_hex(3)}"
    add_netns(name)
    try:
        await aip("link", "set", "lo", "up", netns=name)
        proc = CoordinatorProcess(workdir, pki, netns=name)
        await proc.start()
        try:
            assert await proc.healthz() == 200
            # Its loopback is its own: the root namespace's 127.0.0.1 has nothing on that port.
            assert not await can_connect(None, "127.0.0.1", proc.port)
        finally:
            assert await proc.stop() == 0, proc.logs()
    finally:
        del_netns(name)
    assert name not in list_netns()


async def test_retrain_on_request_is_for_ops_only(coordinator: CoordinatorProcess, pki: CoordinatorPki) -> None:
    async with coordinator.client(pki.agent("h1")) as agent:
        status, body = await agent.post("/v1/model/retrain")
        assert status == 403 and body["error"]["code"] == "forbidden"
    async with coordinator.client(pki.operator("alice")) as ops:
        status, body = await ops.post("/v1/model/retrain")
        assert status == 200, body
        assert body["activated"] is False and body["candidate"] == ""
        assert body["reason"] == "no recorded telemetry before the held-out window"


async def test_a_bad_model_at_runtime_keeps_the_current_one(
    coordinator: CoordinatorProcess, pki: CoordinatorPki, workdir: Path
) -> None:
    broken = workdir / "truncated.onnx"
    broken.write_bytes(b"\x08\x07\x12\x04")
    async with coordinator.client(pki.agent("h1")) as agent:
        status, _ = await agent.post("/v1/model", {"path": str(broken)})
        assert status == 403
    async with coordinator.client(pki.operator("alice")) as ops:
        status, body = await ops.post("/v1/model", {"path": str(broken)})
        assert status == 422 and body["error"]["code"] == "model_load_failed", body
        assert "truncated.onnx" in body["error"]["message"]
        status, body = await ops.post("/v1/model", {"path": str(broken), "force": True})
        assert status == 400 and "force" in body["error"]["message"]
        status, body = await ops.get("/v1/model")
        assert status == 200 and body == {"active": None, "previous": None, "threshold": None}
        status, body = await ops.post("/v1/model/rollback")
        assert status == 409 and body["error"]["code"] == "no_previous_model"
