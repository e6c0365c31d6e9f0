"""A real agent (test containerd, its mTLS ops listener, its telemetry pusher) with a real coordinator
process: the agent registers and heartbeats by itself, and the coordinator's placements are held,
refused and released by the agent's own reservation book (agent/reservations.py), over mutual TLS.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.api import build_app, serve
from agent.app import Agent
from agent.config import ApiConfig, CapacityConfig, TelemetryConfig, TlsConfig
from agent.config import CoordinatorConfig as AgentCoordinatorConfig
from coordinator.agents import AgentCallError, AgentClient
from coordinator.config import CoordinatorConfig, OpsTlsConfig
from coordinator.config import CoordinatorTlsConfig as ServerTls
from coordinator.model import Capacity, Host
from proto.ferryman.v1 import fleet_pb2 as pb
from tests.harness.agent import agent_config, running_agent
from tests.harness.containerd import PrivateContainerd
from tests.harness.coordinator import COORDINATOR_NAME, CoordinatorPki, CoordinatorProcess, free_port

MiB = 1 << 20
POLL = 0.05


@pytest.fixture
def pki(workdir: Path) -> CoordinatorPki:
    return CoordinatorPki(workdir / "pki")


@pytest.fixture
async def coordinator(workdir: Path, pki: CoordinatorPki) -> AsyncIterator[CoordinatorProcess]:
    proc = CoordinatorProcess(workdir, pki)
    await proc.start()
    try:
        yield proc
    finally:
        assert await proc.stop() == 0, proc.logs()


@pytest.fixture
async def node1(
    containerd: PrivateContainerd, workdir: Path, pki: CoordinatorPki, coordinator: CoordinatorProcess
) -> AsyncIterator[tuple[Agent, str]]:
    certs = pki.agent("node1")
    tls_listen = f"127.0.0.1:{free_port()}"
    config = dataclasses.replace(
        agent_config(containerd, [], workdir),
        host_name="node1",
        tls=TlsConfig(ca_file=str(certs.ca_file), cert_file=str(certs.cert_file), key_file=str(certs.key_file)),
        api=ApiConfig(listen=f"unix://{workdir}/agent.sock", tls_listen=tls_listen),
        coordinator=AgentCoordinatorConfig(url=coordinator.url, server_name=COORDINATOR_NAME),
        capacity=CapacityConfig(cpu_millis=2000, memory_bytes=1024 * MiB, disk_bytes=10 << 30),
        telemetry=TelemetryConfig(
            period=0.2,
            drain_notice_file=str(workdir / "drain"),
            maintenance_file=str(workdir / "maintenance"),
            preemption_file=str(workdir / "preempt"),
        ),
    )
    async with running_agent(config) as agent:
        server = await serve(build_app(agent), config.api.listen, config.api.tls_listen, config.tls)
        try:
            yield agent, f"https://{tls_listen}"
        finally:
            await server.close()


async def _wait_for_host(ops: Any, name: str) -> dict[str, Any]:
    for _ in range(int(20 / POLL)):
        status, host = await ops.get(f"/v1/hosts/{name}")
        if status == 200 and host["telemetry_samples"] >= 2:
            return host
        await asyncio.sleep(POLL)
    raise AssertionError(f"{name} never registered and pushed telemetry")


async def test_agent_registers_and_holds_the_coordinators_reservations(
    coordinator: CoordinatorProcess, pki: CoordinatorPki, node1: tuple[Agent, str]
) -> None:
    agent, api_url = node1
    async with coordinator.client(pki.operator("alice")) as ops:
        host = await _wait_for_host(ops, "node1")
        assert host["state"] == "ready" and host["api_url"] == api_url
        assert host["capacity"] == {"cpu_millis": 2000, "memory_bytes": 1024 * MiB, "disk_bytes": 10 << 30}

        status, reservation = await ops.post(
            "/v1/reservations", {"capacity": {"cpu_millis": 500, "memory_bytes": 512 * MiB}, "purpose": "test"}
        )
        assert status == 201, reservation
        assert reservation["host"] == "node1" and reservation["held_by_agent"] is True
        assert [h.id for h in agent.reservations.held()] == [reservation["id"]]

        # Something the coordinator does not know about takes most of the rest on the agent itself:
        # the coordinator's next placement fits its own books but the agent refuses it, so nothing stays booked.
        await agent.reservations.reserve(
            pb.Reservation(
                id="local-1",
                host="node1",
                capacity=pb.Capacity(memory_bytes=400 * MiB),
                expires_at=time.time() + 600,
                purpose="other",
            )
        )
        status, refused = await ops.post("/v1/reservations", {"capacity": {"memory_bytes": 256 * MiB}, "host": "node1"})
        assert status == 409 and refused["error"]["code"] == "no_target", refused
        _, listed = await ops.get("/v1/reservations")
        assert [r["id"] for r in listed["reservations"]] == [reservation["id"]]
        assert sorted(h.id for h in agent.reservations.held()) == sorted([reservation["id"], "local-1"])

        status, _ = await ops.request("DELETE", f"/v1/reservations/{reservation['id']}")
        assert status == 204
        assert [h.id for h in agent.reservations.held()] == ["local-1"]


async def test_agent_client_speaks_to_the_real_ops_listener(
    coordinator: CoordinatorProcess, pki: CoordinatorPki, node1: tuple[Agent, str], workdir: Path
) -> None:
    _, api_url = node1
    config = CoordinatorConfig(
        tls=ServerTls(ca_file=str(pki.server.ca_file), cert_file="", key_file=""),
        ops_tls=OpsTlsConfig(cert_file=str(pki.ops_client.cert_file), key_file=str(pki.ops_client.key_file)),
    )
    client = AgentClient.from_config(config)
    host = Host(name="node1", capacity=Capacity(), api_url=api_url)
    try:
        assert await client.list_containers(host) == []
        # 404 on release is fine (already gone on the agent).
        await client.release_reservation(host, "never-held")
        # An agent certificate is not an ops identity: the agent's listener refuses it.
        as_agent = AgentClient.from_config(
            dataclasses.replace(
                config,
                ops_tls=OpsTlsConfig(
                    cert_file=str(pki.agent("node2").cert_file), key_file=str(pki.agent("node2").key_file)
                ),
            )
        )
        try:
            with pytest.raises(AgentCallError, match="node2 has role agent"):
                await as_agent.list_containers(host)
        finally:
            await as_agent.close()
        # The name in the agent's certificate must be the host we meant: node1's listener is not "node3".
        impostor = dataclasses.replace(host, name="node3")
        with pytest.raises(AgentCallError, match=r"node3.*(certificate|hostname)"):
            await client.list_containers(impostor)
    finally:
        await client.close()
