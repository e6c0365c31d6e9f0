"""Reservations on an agent: booking, admission, expiry, persistence, the HTTP API, and the ops-only
mutual-TLS listener. Capacity is a configured [capacity] (HostCapacity), not this host's size, so the
numbers are exact; containers come in as readings (the e2e file runs real ones)."""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest
from google.protobuf import json_format

from agent.api import build_app, serve
from agent.config import CapacityConfig
from agent.metrics import AgentMetrics
from agent.reservations import (
    STATE_FILE,
    Amount,
    CapacityReserved,
    InsufficientCapacity,
    ReservationNotFound,
    Reservations,
)
from agent.telemetry.capacity import HostCapacity
from agent.telemetry.containers import ContainerReading
from core.errors import InvalidRequest
from core.security.pki import init_ca, issue_client, issue_host
from core.security.tls import client_context
from proto.ferryman.v1 import fleet_pb2 as pb

MiB = 1 << 20
GiB = 1 << 30


class Host:
    """A configured capacity and the containers running on it."""

    def __init__(self, state_dir: Path, cpu_millis: int = 4000, memory: int = 4 * GiB, disk: int = 100 * GiB) -> None:
        self.capacity = HostCapacity(
            CapacityConfig(cpu_millis=cpu_millis, memory_bytes=memory, disk_bytes=disk), str(state_dir)
        )
        self.containers: list[ContainerReading] = []

    async def capacity_now(self) -> Amount:
        return Amount.of(self.capacity.current())

    async def usage(self) -> list[ContainerReading]:
        return list(self.containers)

    def reservations(self, state_dir: Path) -> Reservations:
        return Reservations("h1", state_dir, self.capacity_now, self.usage)


def res(rid: str, cpu: int = 0, memory: int = 0, disk: int = 0, ttl: float = 60.0) -> pb.Reservation:
    return pb.Reservation(
        id=rid,
        host="h1",
        capacity=pb.Capacity(cpu_millis=cpu, memory_bytes=memory, disk_bytes=disk),
        expires_at=time.time() + ttl,
        purpose=f"migration:{rid}",
    )


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[tuple[Host, Reservations]]:
    h = Host(tmp_path)
    r = h.reservations(tmp_path)
    await r.open()
    yield h, r
    await r.close()


async def test_reserve_refuses_what_is_not_free(host: tuple[Host, Reservations]) -> None:
    h, r = host
    await r.reserve(res("a", cpu=1000, memory=2 * GiB))
    h.containers.append(ContainerReading("web", "img", {}, 100 * MiB, GiB, 50.0, 1000.0))  # limits count
    h.containers.append(ContainerReading("job", "img", {}, 300 * MiB, None, 700.0, None))  # use counts
    # Free now: cpu 4000-1000-1000-700 = 1300m, memory 4G-2G-1G-300M = 724M.
    with pytest.raises(InsufficientCapacity, match=re.escape("memory 800.0 MiB > 724.0 MiB free")) as info:
        await r.reserve(res("b", cpu=500, memory=800 * MiB))
    assert info.value.http_status == 409
    assert [x.id for x in r.held()] == ["a"]  # nothing booked by the refusal
    await r.reserve(res("b", cpu=1300, memory=724 * MiB))
    assert r.reserved() == Amount(2300, 2 * GiB + 724 * MiB, 0)
    assert await r.free() == Amount(0, 0, 100 * GiB)
    # A renewal replaces the old booking instead of counting it twice.
    renewed = await r.reserve(res("b", cpu=1300, memory=724 * MiB, ttl=120))
    assert renewed.expires_at > time.time() + 100
    assert await r.release("b") is True
    assert await r.release("b") is False
    assert r.reserved() == Amount(1000, 2 * GiB, 0)


async def test_admission_against_reservations(host: tuple[Host, Reservations]) -> None:
    h, r = host
    await r.reserve(res("mig", cpu=3000, memory=3 * GiB))
    # A plain container must fit next to the reservation.
    await r.admit(pb.Capacity(cpu_millis=500, memory_bytes=512 * MiB))
    with pytest.raises(CapacityReserved, match=re.escape("memory 2048.0 MiB > 1024.0 MiB free")):
        await r.admit(pb.Capacity(memory_bytes=2 * GiB))
    # The migration's PREPARE is charged to its reservation, partly, then beyond it.
    await r.admit(pb.Capacity(cpu_millis=2000, memory_bytes=2 * GiB), "mig")
    assert r.held()[0].claimed == Amount(2000, 2 * GiB, 0)
    await r.admit(pb.Capacity(cpu_millis=1500, memory_bytes=1536 * MiB), "mig")  # 1 GiB left + 512 MiB free
    assert r.held()[0].holding == Amount(3500, 3584 * MiB, 0)
    await r.admit(pb.Capacity(cpu_millis=400), "mig")  # beyond it: nobody else reserved cpu
    await r.reserve(res("other", cpu=100))
    with pytest.raises(CapacityReserved, match=re.escape("cpu 1m > 0m free")):
        await r.admit(pb.Capacity(cpu_millis=1), "mig")  # the rest of the pool is now someone else's
    await r.release("other")
    with pytest.raises(ReservationNotFound):
        await r.admit(pb.Capacity(cpu_millis=1), "gone")
    # Fully booked: even a container without limits is refused.
    h.containers.append(ContainerReading("fill", "img", {}, 0, 512 * MiB, 0.0, 100.0))
    with pytest.raises(CapacityReserved, match="no cpu left"):
        await r.admit(pb.Capacity())
    await r.release("mig")
    await r.admit(pb.Capacity())
    # Nothing reserved, nothing protected: even an overcommitting container is admitted.
    await r.admit(pb.Capacity(cpu_millis=10_000, memory_bytes=100 * GiB))
    await r.reserve(res("disk-only", disk=GiB))
    await r.admit(pb.Capacity(cpu_millis=10_000))  # cpu is not what it holds
    with pytest.raises(CapacityReserved, match="disk"):
        await r.admit(pb.Capacity(disk_bytes=100 * GiB))


async def test_concurrent_reservations_never_double_book(host: tuple[Host, Reservations]) -> None:
    _, r = host
    results = await asyncio.gather(
        *(r.reserve(res(f"p{i}", cpu=300, memory=GiB // 2)) for i in range(20)), return_exceptions=True
    )
    booked = [x for x in results if not isinstance(x, BaseException)]
    refused = [x for x in results if isinstance(x, InsufficientCapacity)]
    assert len(booked) == 8 and len(refused) == 12  # memory: 8 x 512 MiB = 4 GiB
    assert r.reserved().memory_bytes == 4 * GiB


async def test_bad_reservations(host: tuple[Host, Reservations]) -> None:
    _, r = host
    cases = {
        "must match": pb.Reservation(id="../x", capacity=pb.Capacity(), expires_at=time.time() + 5),
        "is for host": pb.Reservation(id="x", host="h2", capacity=pb.Capacity(), expires_at=time.time() + 5),
        "no capacity": pb.Reservation(id="x", expires_at=time.time() + 5),
        "in the past": res("x", ttl=-1),
        "more than": res("x", ttl=10 * 86400),
        # NaN compares false both ways: it passed the two range checks and never expired.
        "finite": pb.Reservation(id="x", capacity=pb.Capacity(), expires_at=float("nan")),
    }
    for message, reservation in cases.items():
        with pytest.raises(InvalidRequest, match=message):
            await r.reserve(reservation)
    assert r.held() == []


async def test_expiry_and_persistence(tmp_path: Path) -> None:
    h = Host(tmp_path)
    first = h.reservations(tmp_path)
    await first.open()
    try:
        await first.reserve(res("short", memory=GiB, ttl=0.5))
        await first.reserve(res("long", cpu=1000, memory=GiB, ttl=60))
        await first.admit(pb.Capacity(memory_bytes=256 * MiB), "long")
        saved = json.loads((tmp_path / STATE_FILE).read_text())
        assert sorted(x["id"] for x in saved["reservations"]) == ["long", "short"]
    finally:
        await first.close()  # an agent stop

    second = h.reservations(tmp_path)  # the restarted agent
    await second.open()
    try:
        assert {x.id for x in second.held()} == {"long", "short"}
        assert next(x for x in second.held() if x.id == "long").claimed.memory_bytes == 256 * MiB
        await asyncio.sleep(1.6)  # past the short TTL and one sweep
        assert [x.id for x in second.held()] == ["long"]
        saved = json.loads((tmp_path / STATE_FILE).read_text())
        assert [x["id"] for x in saved["reservations"]] == ["long"]  # the sweep persisted it
    finally:
        await second.close()


async def test_a_reservation_held_for_one_request_is_kept_in_memory_only(
    host: tuple[Host, Reservations], tmp_path: Path
) -> None:
    """`held_for` (a placed create carrying its reservation): the room is protected while the block
    runs and charged to it, never written to the state file, and given back however the block ends."""
    _, r = host
    await r.reserve(res("kept", memory=GiB))
    async with r.held_for(res("req", cpu=1000, memory=2 * GiB)) as held:
        assert held.id == "req" and {x.id for x in r.held()} == {"kept", "req"}
        with pytest.raises(CapacityReserved):  # 4 GiB - 1 - 2 reserved: another 1.5 GiB is refused
            await r.admit(pb.Capacity(memory_bytes=1536 * MiB))
        await r.admit(pb.Capacity(memory_bytes=1536 * MiB), "req")
        saved = json.loads((tmp_path / STATE_FILE).read_text())
        assert [x["id"] for x in saved["reservations"]] == ["kept"]
    assert [x.id for x in r.held()] == ["kept"]
    with pytest.raises(InsufficientCapacity):
        async with r.held_for(res("big", memory=4 * GiB)):
            raise AssertionError("a reservation that does not fit runs nothing")
    with pytest.raises(RuntimeError):
        async with r.held_for(res("failing", memory=GiB)):
            raise RuntimeError("the create failed")
    assert [x.id for x in r.held()] == ["kept"]
    assert [x["id"] for x in json.loads((tmp_path / STATE_FILE).read_text())["reservations"]] == ["kept"]


async def test_corrupt_state_is_kept_aside(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_text("{not json")
    r = Host(tmp_path).reservations(tmp_path)
    await r.open()
    try:
        assert r.held() == []
        aside = list(tmp_path.glob(f"{STATE_FILE}.corrupt-*"))
        assert len(aside) == 1 and aside[0].read_text() == "{not json"
    finally:
        await r.close()


# ------------------------------------------------------------------ HTTP API and the ops listener


@pytest.fixture
async def api(
    host: tuple[Host, Reservations], short_dir: Path, tmp_path: Path
) -> AsyncIterator[tuple[str, tuple[str, int], Path]]:
    """The agent API with real reservations on a unix socket and on the ops mTLS listener."""
    _, r = host
    ca = init_ca(tmp_path / "ca")
    agent_files = issue_host(ca.directory, "h1", tmp_path / "h1", addresses=["127.0.0.1"])
    # Only the pieces the reservation routes use; the container and image routes answer elsewhere.
    agent = SimpleNamespace(images=None, containers=None, metrics=AgentMetrics(), reservations=r)
    server = await serve(build_app(agent), f"unix://{short_dir}/agent.sock", "127.0.0.1:0", agent_files)
    assert server.tls_address is not None
    yield f"{short_dir}/agent.sock", server.tls_address, ca.directory
    await server.close()


async def test_reservation_routes(api: tuple[str, tuple[str, int], Path]) -> None:
    sock, _, _ = api
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sock)) as s:
        body = json.loads(json_format_of(res("m1", cpu=1000, memory=GiB)))
        async with s.post("http://agent/v1/reservations", json=body) as resp:
            assert resp.status == 201
            held = await resp.json()
            assert held["id"] == "m1" and held["capacity"]["memory_bytes"] == GiB and held["claimed"]["cpu_millis"] == 0
        too_big = json.loads(json_format_of(res("m2", memory=8 * GiB)))
        async with s.post("http://agent/v1/reservations", json=too_big) as resp:
            assert resp.status == 409
            assert (await resp.json())["error"]["code"] == "insufficient_capacity"
        async with s.post("http://agent/v1/reservations", json={**body, "colour": "red"}) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["code"] == "invalid_request"
        async with s.get("http://agent/v1/reservations") as resp:
            listing = await resp.json()
            assert [x["id"] for x in listing["reservations"]] == ["m1"]
            assert listing["reserved"]["memory_bytes"] == GiB and listing["free"]["memory_bytes"] == 3 * GiB
        async with s.delete("http://agent/v1/reservations/m1") as resp:
            assert resp.status == 204
        async with s.delete("http://agent/v1/reservations/m1") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["code"] == "reservation_not_found"


@pytest.mark.parametrize(
    "expires",
    [b'"NaN"', b'"Infinity"', b'"-Infinity"', b"NaN", b"Infinity", b"1e999", b"-1e999", b"1e300", b"-5"],
)
async def test_non_finite_expiry_is_refused_and_holds_nothing(
    api: tuple[str, tuple[str, int], Path], expires: bytes
) -> None:
    # The probe's case: expiresAt "NaN" was a 201, hidden from listings, never expired, held capacity.
    sock, _, _ = api
    raw = b'{"id": "nan1", "capacity": {"memory_bytes": "1073741824"}, "expiresAt": ' + expires + b"}"
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sock)) as s:
        headers = {"Content-Type": "application/json"}
        async with s.post("http://agent/v1/reservations", data=raw, headers=headers) as resp:
            assert resp.status == 400, await resp.text()
            error = (await resp.json())["error"]
            assert error["code"] == "invalid_request"
        async with s.get("http://agent/v1/reservations") as resp:
            listing = await resp.json()
    assert listing["reservations"] == []
    assert listing["reserved"] == {"cpu_millis": 0.0, "memory_bytes": 0, "disk_bytes": 0}
    assert listing["free"]["memory_bytes"] == 4 * GiB


def json_format_of(message: pb.Reservation) -> str:
    return json_format.MessageToJson(message, preserving_proto_field_name=True)


async def test_ops_listener_admits_ops_certificates_only(
    api: tuple[str, tuple[str, int], Path], tmp_path: Path
) -> None:
    _, (host, port), ca_dir = api
    url = f"https://{host}:{port}/v1/reservations"
    ops = issue_client(ca_dir, "ops1", tmp_path / "ops")
    other_agent = issue_host(ca_dir, "h2", tmp_path / "h2")

    async def get(ctx: ssl.SSLContext) -> tuple[int, dict[str, object]]:
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s,
            s.get(url, server_hostname="h1") as resp,
        ):
            return resp.status, await resp.json()

    status, body = await get(client_context(ops))
    assert status == 200 and body["reservations"] == []

    status, body = await get(client_context(other_agent))  # a valid fleet certificate, but an agent's
    assert status == 403
    assert body["error"]["code"] == "peer_identity"  # type: ignore[index]

    no_cert = ssl.create_default_context(cafile=str(ca_dir / "ca.pem"))
    with pytest.raises(aiohttp.ClientError):
        await get(no_cert)
