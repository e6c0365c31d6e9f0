"""What a fleet peer, an operator's certificate or an idle connection can do to an agent's peer port.

Each case is a probe that once got through (see docs/security.md): the test plays the attacker from
another host's network namespace with real certificates of the fleet CA, against a real agent, and
checks what it got back and that nothing was created or written on the target.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from agent.config import AgentConfig, TlsConfig, load_config
from agent.model import CreateRequest
from agent.peers import PeerEndpoint
from agent.peers.routing import encode_preamble
from agent.runtime.spec import build_spec
from agent.stream import Control, TlsSocket
from core.security.pki import issue_client, issue_host
from core.security.tls import client_context
from tests.harness.fleet import PEER_PORT, api, fleet
from tests.harness.mesh import Mesh, MeshHost
from tests.harness.netns import acall_in_netns

T = TypeVar("T")


@pytest.fixture
async def mesh(base_dir: Path) -> AsyncIterator[Mesh]:
    async with fleet(base_dir, hosts=3, idle_timeout=4.0) as m:
        yield m


async def from_host(host: MeshHost, probe: Callable[[], Awaitable[T]]) -> T:
    """Run `probe` in its own event loop inside `host`'s network namespace (where the peers are)."""
    return await acall_in_netns(host.netns, lambda: asyncio.run(probe()))


def config_as(mesh: Mesh, host: MeshHost, tls: TlsConfig | None = None) -> AgentConfig:
    config = load_config(host.agent_config_path)
    return dataclasses.replace(config, tls=tls) if tls is not None else config


async def session(config: AgentConfig, name: str, session_id: str, first: dict[str, Any]) -> Any:
    """Open a migration session to h2 as `name`, send `first` as it is (not through our codec), and
    return the first control message back, or the exception that ended the session."""
    port = PeerEndpoint(config, name)
    try:
        channel = await port.connect("h2", "migration", session_id)
    except Exception as exc:  # refused: what the attacker sees
        return exc
    try:
        await channel.send_control(first)
        async with asyncio.timeout(20):
            reply = await channel.receive()
        return reply.body if isinstance(reply, Control) else reply
    except Exception as exc:
        return exc
    finally:
        with contextlib.suppress(Exception):
            await channel.close()


def prepare(migration: str, container_id: str = "web", spec: dict[str, Any] | None = None) -> dict[str, Any]:
    if spec is None:
        spec = build_spec({"config": {"Cmd": ["/bin/sh"]}}, CreateRequest(id=container_id, image="x"))
    return {
        "type": "prepare",
        "migration": migration,
        "container": {"id": container_id, "image": "r/app:1", "labels": {}, "spec": spec, "runtime": ""},
        "estimated_bytes": 0,
        "options": {"downtime_target_ms": 300, "mode": "precopy", "reservation": ""},
    }


def everything_under(*roots: Path) -> set[str]:
    return {str(p) for root in roots if root.exists() for p in root.rglob("*")}


def target_dirs(mesh: Mesh) -> tuple[Path, Path]:
    h2 = mesh["h2"]
    return h2.agent_state_dir, mesh.tmpfs_dir / "h2"


async def test_only_listed_agents_may_open_sessions(mesh: Mesh) -> None:
    h1, h2 = mesh["h1"], mesh["h2"]
    ca = mesh.dir / "pki" / "ca"
    ops = mesh.dir / "pki" / "ops-alice"
    issue_client(ca, "alice", ops)
    stranger = mesh.dir / "pki" / "h9"
    issue_host(ca, "h9", stranger, addresses=[h1.address])  # a fleet host, but not one of h2's [[peers]]
    query = {"type": "query", "migration": "mig-probe"}

    # A listed peer gets an answer (it never started this migration: "rollback").
    answer = await from_host(h1, lambda: session(config_as(mesh, h1), "h1", "mig-probe", query))
    assert answer == {"type": "decision", "decision": "rollback"}, answer
    # An operator's certificate and an unlisted host get nothing: refused before the stream.
    ops_tls = TlsConfig(
        ca_file=str(ops / "ca.pem"), cert_file=str(ops / "client.pem"), key_file=str(ops / "client-key.pem")
    )
    refused = await from_host(h1, lambda: session(config_as(mesh, h1, ops_tls), "alice", "mig-probe", query))
    assert isinstance(refused, Exception), refused
    h9_tls = TlsConfig(
        ca_file=str(stranger / "ca.pem"), cert_file=str(stranger / "host.pem"), key_file=str(stranger / "host-key.pem")
    )
    refused = await from_host(h1, lambda: session(config_as(mesh, h1, h9_tls), "h9", "mig-probe", query))
    assert isinstance(refused, Exception), refused
    log = h2.agent_log.read_text()
    assert "only agents open peer sessions" in log and "is not one of this agent's [[peers]]" in log


async def test_peer_ids_and_specs_are_checked_before_anything_is_made(mesh: Mesh) -> None:
    h1 = mesh["h1"]
    before = everything_under(*target_dirs(mesh))
    config = config_as(mesh, h1)

    # An id with a path in it never gets past the preamble.
    refused = await from_host(h1, lambda: session(config, "h1", "../../x", prepare("../../x")))
    assert isinstance(refused, Exception), refused
    # Nor in the message: a container id, or a migration id other than the session's.
    reply = await from_host(h1, lambda: session(config, "h1", "mig-a", prepare("mig-a", "../../x")))
    assert reply["type"] == "failed" and "container id" in reply["error"], reply
    reply = await from_host(h1, lambda: session(config, "h1", "mig-b", prepare("mig-c")))
    assert reply["type"] == "failed" and "mig-b" in reply["error"], reply
    # A spec asking for more than the agent gives its own containers.
    spec = build_spec({"config": {"Cmd": ["/bin/sh"]}}, CreateRequest(id="web", image="x"))
    spec["process"]["capabilities"]["bounding"].append("CAP_SYS_ADMIN")
    reply = await from_host(h1, lambda: session(config, "h1", "mig-d", prepare("mig-d", spec=spec)))
    assert reply["type"] == "failed" and "CAP_SYS_ADMIN" in reply["error"], reply
    spec = build_spec({"config": {"Cmd": ["/bin/sh"]}}, CreateRequest(id="web", image="x"))
    spec["mounts"].append({"destination": "/host", "type": "bind", "source": "/", "options": ["rbind"]})
    reply = await from_host(h1, lambda: session(config, "h1", "mig-e", prepare("mig-e", spec=spec)))
    assert reply["type"] == "failed" and "mounts" in reply["error"], reply

    assert everything_under(*target_dirs(mesh)) == before  # no record, work dir or file anywhere
    assert not Path("/x").exists() and not (mesh.dir / "x").exists()
    assert (await api(mesh["h2"], "GET", "/v1/migrations"))["migrations"] == []
    assert (await api(mesh["h2"], "GET", "/v1/containers"))["containers"] == []


def _idle_tcp(address: str, count: int) -> list[socket.socket]:
    return [socket.create_connection((address, PEER_PORT), timeout=5) for _ in range(count)]


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the other end closes `sock` within `seconds` (EOF or reset), sending nothing."""
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, ssl.SSLError):
        return True
    except TimeoutError:
        return False


async def test_idle_and_silent_connections_hold_nothing(mesh: Mesh) -> None:
    h1, h2, h3 = mesh["h1"], mesh["h2"], mesh["h3"]
    config = config_as(mesh, h1)

    def idle_from_h3() -> list[bool]:
        idle = _idle_tcp(h2.address, 12)  # never a TLS byte
        # Four from one address wait in their handshake; the rest are closed on arrival.
        return [_closed_within(s, 1.0) for s in idle[4:]]

    def silent_from_h1() -> list[TlsSocket]:
        # Authenticated as a listed peer, then silent: no preamble.
        context = client_context(config.tls)
        silent = []
        for _ in range(2):
            sock = socket.create_connection((h2.address, PEER_PORT), timeout=5)
            silent.append(TlsSocket.handshake(sock, context, server_side=False, server_hostname="h2", timeout=5))
        return silent

    closed_at_once = await acall_in_netns(h3.netns, idle_from_h3)
    assert all(closed_at_once), closed_at_once
    silent = await acall_in_netns(h1.netns, silent_from_h1)
    try:
        # Meanwhile the API answers and a listed peer's session goes through, from another address.
        started = time.monotonic()
        assert (await api(h2, "GET", "/healthz"))["status"] == "ok"
        healthz_s = time.monotonic() - started
        query = {"type": "query", "migration": "mig-probe"}
        answer = await from_host(h1, lambda: session(config, "h1", "mig-probe", query))
        assert answer == {"type": "decision", "decision": "rollback"}, answer
        assert healthz_s < 5, healthz_s  # it took 19.7 s when handshakes shared the default pool
        # The silent ones are cut at the handshake-and-preamble deadline (10 s by default).
        for tls in silent:
            buf = memoryview(bytearray(1))
            tls.set_timeout(20)
            with contextlib.suppress(OSError):
                assert tls.recv_into(buf) == 0
    finally:
        for tls in silent:
            tls.close()
    assert "peer connections from this address are in their handshake" in h2.agent_log.read_text()


async def test_a_preamble_that_is_not_an_object_is_closed(mesh: Mesh) -> None:
    h1, h2 = mesh["h1"], mesh["h2"]
    context = client_context(config_as(mesh, h1).tls)

    def send_preamble(body: bytes) -> bool:
        sock = socket.create_connection((h2.address, PEER_PORT), timeout=5)
        tls = TlsSocket.handshake(sock, context, server_side=False, server_hostname="h2", timeout=5)
        try:
            tls.sendall(b"FMP1" + len(body).to_bytes(2, "big") + body)
            tls.set_timeout(5)
            try:
                return tls.recv_into(memoryview(bytearray(1))) == 0
            except OSError:
                return True  # reset: closed too
        finally:
            tls.close()

    for body in (b"[]", b'"migration"', b"{not json", json.dumps({"kind": 7, "7": "x"}).encode()):
        assert await acall_in_netns(h1.netns, send_preamble, body), body
    good = encode_preamble("migration", "mig-ok")
    assert good.startswith(b"FMP1")
