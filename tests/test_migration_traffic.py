"""Traffic follows a migrated container: a client in a third namespace sees only the pause.

The container has a service address (its own netns + routed /32 on its host). During the live
migration a client keeps calling its HTTP server and holds a long-lived TCP session to its echo
server; afterwards the session still works and the address answers from the target host.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.harness import netns as nsh
from tests.harness.fleet import HTTP_PORT, api, fleet, longest_outage, migrate, probe, task_states
from tests.harness.images import ImageBuilder, busybox_layer
from tests.harness.mesh import Mesh, Node

ECHO_PORT = 9000
SERVICE = (
    "/bin/sh",
    "-c",
    f"mkdir -p /www && echo served > /www/index.html && httpd -p {HTTP_PORT} -h /www && "
    f"exec nc -ll -p {ECHO_PORT} -e cat",
)


@pytest.fixture
async def mesh(base_dir: Path) -> AsyncIterator[Mesh]:
    async with fleet(base_dir, hosts=2, with_client=True, with_routed_client=True) as m:
        yield m


async def start_service(mesh: Mesh, name: str, ip: str, client: Node | None = None) -> socket.socket:
    """SERVICE on h1 with service address `ip`; returns a TCP connection to its echo port from
    `client` (the mesh's client by default)."""
    client = client or mesh.client
    assert client is not None
    h1 = mesh["h1"]
    repo = f"test/{name}-{secrets.token_hex(3)}"
    await ImageBuilder([busybox_layer()], cmd=SERVICE).build().push(mesh.push_host, repo, "v1")
    ref = f"{mesh.registry_host}/{repo}:v1"
    await api(h1, "POST", "/v1/images/pull", {"ref": ref})
    await api(h1, "POST", "/v1/containers?start=1", {"id": name, "image": ref, "service_ip": ip}, expect=201)
    for _ in range(100):
        with contextlib.suppress(OSError):
            return await nsh.acall_in_netns(client.netns, socket.create_connection, (ip, ECHO_PORT), 1.0)
        await asyncio.sleep(0.1)
    raise AssertionError("the echo server never accepted")


async def test_client_sees_only_the_pause_and_tcp_survives(mesh: Mesh) -> None:
    h1, h2, client = mesh["h1"], mesh["h2"], mesh.client
    assert client is not None
    ip = str(mesh.subnet.network_address + 100)
    sock = await start_service(mesh, "svc", ip)
    stop, samples = threading.Event(), []
    prober = asyncio.create_task(nsh.acall_in_netns(client.netns, probe, ip, stop, samples))
    try:
        sock.settimeout(10)
        sock.sendall(b"before\n")
        assert sock.recv(64) == b"before\n"
        await asyncio.sleep(0.5)
        record = await migrate(h1, "svc", "h2")
        if record["state"] != "COMMIT":
            log = h1.containerd.state / "io.containerd.runtime.v2.task" / "ferryman" / "svc" / "criu-dump.log"
            print(log.read_text()[-3000:] if log.exists() else "no dump log")
        assert record["state"] == "COMMIT", record.get("error")
        await asyncio.sleep(1.0)
        sock.sendall(b"after\n")  # the same TCP connection, now served from h2
        assert sock.recv(64) == b"after\n"
    finally:
        stop.set()
        await prober
        if sock is not None:
            sock.close()
    outage = longest_outage(samples)
    print(
        f"\nclient-visible pause: {outage * 1000:.0f} ms; agent-measured downtime {record['stats']['downtime_ms']} ms"
    )
    assert samples[-1][1], "the service must answer at the end"
    assert sum(1 for _, ok in samples if ok) > 20
    assert outage < 10.0  # bounded: a pause, not an outage
    assert task_states(h2) == {"svc": "RUNNING"} and "svc" not in task_states(h1)
    routes = json.loads(json.dumps(await api(h2, "GET", "/v1/network")))
    assert ip in json.dumps(routes)


def stream_lines(sock: socket.socket, stop: threading.Event, sent: list[bytes]) -> None:
    """Send a numbered line every 5 ms until `stop`: some of them while the container is frozen."""
    for n in range(100_000):
        if stop.is_set():
            return
        line = b"%d\n" % n
        sock.sendall(line)
        sent.append(line)
        stop.wait(0.005)


def read_echoes(sock: socket.socket, stop: threading.Event, sent: list[bytes], within: float) -> bytes:
    """What the echo server sent back: until the writer stopped and all it sent came back, or `within` s."""
    got = b""
    sock.settimeout(0.5)
    deadline = time.monotonic() + within
    while not (stop.is_set() and got == b"".join(sent)) and time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
    return got


@pytest.mark.parametrize(
    ("mode", "target_failpoints", "owner"),
    [("precopy", None, "h2"), ("lazy", None, "h2"), ("lazy", "target.corrupt_images=corrupt", "h1")],
    ids=["precopy", "lazy", "rollback"],
)
async def test_tcp_stream_loses_no_byte(mesh: Mesh, mode: str, target_failpoints: str | None, owner: str) -> None:
    """A client that keeps writing through the migration gets every byte echoed, in order: nothing
    the frozen source's kernel acknowledged is lost to the restored copy. After a rollback the
    address is routed to the source's copy again."""
    h1, h2, client = mesh["h1"], mesh["h2"], mesh.client
    assert client is not None
    if target_failpoints:
        await h2.stop_agent()
        h2.agent_env = {"FERRYMAN_FAILPOINTS": target_failpoints}
        await h2.start_agent()
    ip = str(mesh.subnet.network_address + 101)
    sock = await start_service(mesh, "echo", ip)
    stop, sent = threading.Event(), []
    writer = asyncio.create_task(asyncio.to_thread(stream_lines, sock, stop, sent))
    reader = asyncio.create_task(asyncio.to_thread(read_echoes, sock, stop, sent, 60.0))
    try:
        await asyncio.sleep(0.3)
        record = await migrate(h1, "echo", "h2", mode=mode)
        assert record["state"] == ("COMMIT" if owner == "h2" else "ROLLBACK"), record.get("error")
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        await writer
    try:
        echoed = await asyncio.wait_for(reader, 70)
    finally:
        sock.close()
    want = b"".join(sent)
    assert len(sent) > 100
    where = _first_difference(echoed, want)
    assert echoed == want, f"echoed {len(echoed)} of {len(want)} bytes, first difference at byte {where}"
    assert task_states(mesh[owner]) == {"echo": "RUNNING"}
    assert ip in json.dumps(await api(mesh[owner], "GET", "/v1/network"))
    routes = h1.exec(["ip", "-o", "route", "show", "proto", "77"], check=True).stdout
    assert "fmh" not in routes and "blackhole" not in routes, routes  # released by a rollback, removed by a commit
    assert not [name for name in nsh.link_names(h1.netns) if name.startswith("fmh")]  # no hold device left


def lockstep(sock: socket.socket, stop: threading.Event, replies: list[float]) -> None:
    """Request, wait for the reply, 1 ms pause, again: the time of every good reply in `replies`."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(20)
    for n in range(10_000_000):
        if stop.is_set():
            return
        line = b"%08d\n" % n
        sock.sendall(line)
        got = b""
        while len(got) < len(line):
            chunk = sock.recv(len(line) - len(got))
            assert chunk, "the connection closed"
            got += chunk
        assert got == line, (got, line)
        replies.append(time.monotonic())
        time.sleep(0.001)


@pytest.mark.parametrize(
    ("mode", "client"), [("precopy", "client"), ("lazy", "client"), ("precopy", "routed-client")]
)
async def test_clients_hear_from_the_restored_copy_at_once(mesh: Mesh, mode: str, client: str) -> None:
    """What a client sends during the freeze is kept on the source and handed to the restored copy
    once it holds the address: the client's request is answered then, not at its next
    retransmission, whose timer doubled on every try while the copy was frozen (0.2, 0.6, 1.4,
    3.0 s...). The freeze is stretched to about 2 s, so a client left to its own timer would wait
    0.6 s or more past the resume; the margin allowed here is half that. The client is on the
    hosts' segment, or on another subnet behind a router."""
    h1 = mesh["h1"]
    await h1.stop_agent()
    h1.agent_env = {"FERRYMAN_FAILPOINTS": "source.restored=sleep:1.5"}  # the decision waits, frozen
    await h1.start_agent()
    ip = str(mesh.subnet.network_address + 103)
    sock = await start_service(mesh, "chatty", ip, mesh.node(client))
    stop, replies = threading.Event(), []
    talker = asyncio.create_task(asyncio.to_thread(lockstep, sock, stop, replies))
    try:
        await asyncio.sleep(0.5)
        record = await migrate(h1, "chatty", "h2", mode=mode)
        assert record["state"] == "COMMIT", record.get("error")
        await asyncio.sleep(1.0)
    finally:
        stop.set()
        await talker
        sock.close()
    stats = record["stats"]
    assert stats["held_packets"] >= 1, stats  # the client's request (and its retransmissions) during the freeze
    gap_ms = max(b - a for a, b in itertools.pairwise(replies)) * 1000
    assert stats["downtime_ms"] > 1500, stats
    assert gap_ms < stats["downtime_ms"] + 300, (gap_ms, stats["downtime_ms"])


def _first_difference(a: bytes, b: bytes) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _udp_listener() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", 0))
    sock.settimeout(1.5)
    return sock


def _heard(listener: socket.socket) -> bool:
    """Whether anything arrived within the listener's timeout; takes in all that did."""
    heard = False
    while True:
        try:
            listener.recv(64)
        except TimeoutError:
            return heard
        heard = True


def _send_udp(address: tuple[str, int]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as out:
        for _ in range(5):
            with contextlib.suppress(OSError):  # no carrier: the kernel may refuse outright
                out.sendto(b"from the source copy's namespace", address)
            time.sleep(0.05)


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
async def test_the_frozen_copy_is_silent_until_the_decision(mesh: Mesh, outcome: str) -> None:
    """A frozen task's kernel still runs its TCP timers: its retransmissions, timestamped ahead of
    the restored copy's, made clients discard the restored copy's replies. From the freeze on nothing
    sent in the source copy's network namespace leaves it; a rollback gives it its network back.
    (Sent from a helper in that namespace, standing in for the frozen kernel.)"""
    h1, h2, client = mesh["h1"], mesh["h2"], mesh.client
    assert client is not None
    release = mesh.dir / "release-source.frozen"
    await h1.stop_agent()
    h1.agent_env = {"FERRYMAN_FAILPOINTS": f"source.frozen=until:{release}"}
    await h1.start_agent()
    if outcome == "rollback":
        await h2.stop_agent()
        h2.agent_env = {"FERRYMAN_FAILPOINTS": "target.restore=error"}
        await h2.start_agent()
    ip = str(mesh.subnet.network_address + 102)
    (await start_service(mesh, "quiet", ip)).close()
    netns = (await api(h1, "GET", "/v1/containers/quiet"))["network"]["netns"]
    listener = await nsh.acall_in_netns(client.netns, _udp_listener)
    to_client = (client.address, listener.getsockname()[1])
    try:
        await nsh.acall_in_netns(netns, _send_udp, to_client)
        assert await asyncio.to_thread(_heard, listener)  # before: it gets through
        task = asyncio.create_task(migrate(h1, "quiet", "h2", mode="precopy"))
        for _ in range(600):  # until the source copy is frozen (held at the failpoint)
            if task_states(h1).get("quiet") == "PAUSED":
                break
            await asyncio.sleep(0.05)
        assert task_states(h1).get("quiet") == "PAUSED"
        await nsh.acall_in_netns(netns, _send_udp, to_client)
        assert not await asyncio.to_thread(_heard, listener)  # frozen: nothing leaves
        release.touch()
        record = await asyncio.wait_for(task, 120)
        if outcome == "commit":
            assert record["state"] == "COMMIT", record.get("error")
            assert not Path(netns).exists()  # the source copy's namespace is gone
        else:
            assert record["state"] == "ROLLBACK", record.get("error")
            assert task_states(h1) == {"quiet": "RUNNING"}
            await nsh.acall_in_netns(netns, _send_udp, to_client)
            assert await asyncio.to_thread(_heard, listener)  # rolled back: its network is back
            assert ip in json.dumps(await api(h1, "GET", "/v1/network"))
    finally:
        listener.close()
