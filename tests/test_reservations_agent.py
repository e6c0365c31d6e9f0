"""Reservations and telemetry in a real agent on the test containerd: `ferryctl run` refused on a
host full of reservations, containers in the samples, and a real OOM kill reported as an event."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.api import build_app, serve
from agent.api.handlers import parse_create
from agent.app import Agent
from agent.config import CapacityConfig, TelemetryConfig
from agent.ctl.main import main as ferryctl
from agent.model import ContainerState, CreateRequest, Resources
from agent.reservations import Amount, CapacityReserved, ReservationNotFound
from core.errors import InvalidRequest
from proto.ferryman.v1 import fleet_pb2 as pb
from tests.harness.agent import agent_config, running_agent
from tests.harness.containerd import PrivateContainerd
from tests.harness.images import build_test_image
from tests.harness.registry import DockerRegistry

MiB = 1 << 20


@pytest.fixture(scope="module")
async def image_ref(registry: DockerRegistry) -> str:
    name = f"test/res-{secrets.token_hex(4)}"
    await build_test_image().build().push(registry.host, name, "v1")
    return f"{registry.host}/{name}:v1"


@pytest.fixture
async def agent(
    containerd: PrivateContainerd, registry: DockerRegistry, workdir: Path, image_ref: str
) -> AsyncIterator[Agent]:
    config = dataclasses.replace(
        agent_config(containerd, [registry.registry_config()], workdir),
        capacity=CapacityConfig(cpu_millis=2000, memory_bytes=1024 * MiB, disk_bytes=10 << 30),
        telemetry=TelemetryConfig(
            period=60.0,  # the test takes samples itself
            drain_notice_file=str(workdir / "drain"),
            maintenance_file=str(workdir / "maintenance"),
            preemption_file=str(workdir / "preempt"),
        ),
    )
    async with running_agent(config) as a:
        await a.images.pull(image_ref)
        yield a


async def wait_running(agent: Agent, cid: str) -> None:
    for _ in range(200):
        if {c.id: c.state for c in await agent.containers.list()}.get(cid) == ContainerState.RUNNING:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{cid} never ran")


async def test_run_refused_on_a_reserved_host(
    agent: Agent, image_ref: str, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert agent.telemetry.pusher is None  # no coordinator configured: metrics only
    await agent.reservations.reserve(
        pb.Reservation(
            id="mig-1",
            capacity=pb.Capacity(cpu_millis=1000, memory_bytes=900 * MiB),
            expires_at=time.time() + 120,
            purpose="migration:mig-1",
        )
    )
    sock = Path("/tmp") / f"fmra-{secrets.token_hex(4)}.sock"
    server = await serve(build_app(agent), f"unix://{sock}")
    try:
        argv = ["--agent", server.url, "run", "--name", "big", "-m", "256M", image_ref, "sleep", "300"]
        assert await asyncio.to_thread(ferryctl, argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: capacity_reserved: host test-host cannot admit")
        assert "memory 256.0 MiB > 124.0 MiB free" in err and "1 reservation(s) hold" in err
        assert [c.id for c in await agent.containers.list()] == []  # nothing made, nothing leaked

        argv = ["--agent", server.url, "run", "--name", "small", "-m", "64M", "--cpus", "0.5", image_ref]
        argv += ["sleep", "300"]
        assert await asyncio.to_thread(ferryctl, argv) == 0
        await wait_running(agent, "small")
    finally:
        await server.close()

    # The running container's limit now counts: 1024 - 900 reserved - 64 = 60 MiB free.
    free = await agent.reservations.free()
    assert free.memory_bytes == 60 * MiB and free.cpu_millis == 500
    with pytest.raises(CapacityReserved):
        await agent.containers.create(CreateRequest(id="c2", image=image_ref, resources=Resources(memory=100 * MiB)))
    # The migration's PREPARE takes its need out of the reservation instead.
    await agent.reservations.admit(Amount(cpu_millis=1000, memory_bytes=512 * MiB), "mig-1")

    await agent.telemetry.tick()
    await asyncio.sleep(1.1)  # a CPU rate needs a window
    sample = await agent.telemetry.tick()
    assert sample.reserved == pb.Capacity(cpu_millis=1000, memory_bytes=900 * MiB)
    (usage,) = [c for c in sample.containers if c.id == "small"]
    assert 0 < usage.memory_bytes <= 64 * MiB and usage.image == image_ref
    assert await agent.reservations.release("mig-1") is True
    await agent.containers.create(CreateRequest(id="c2", image=image_ref, resources=Resources(memory=100 * MiB)))


async def test_oom_kill_and_drain_notice_become_events(agent: Agent, image_ref: str, workdir: Path) -> None:
    await agent.telemetry.tick()  # baseline of the kernel's OOM counter
    cid = f"oom-{secrets.token_hex(3)}"
    # busybox dd allocates its whole block: 64 MiB in a 16 MiB cgroup without swap is an OOM kill.
    await agent.containers.create(
        CreateRequest(
            id=cid,
            image=image_ref,
            args=("/bin/sh", "-c", "dd if=/dev/zero of=/dev/null bs=64M count=1; sleep 300"),
            resources=Resources(memory=16 * MiB),
        )
    )
    await agent.containers.start(cid)
    (workdir / "drain").write_text("provider: host drains at 2030-01-01T03:00Z")
    kinds: list[str] = []
    for _ in range(50):
        sample = await agent.telemetry.tick()
        kinds += [pb.HostEventKind.Name(e.kind) for e in sample.events]
        if "OOM_KILL" in kinds:
            break
        await asyncio.sleep(0.1)
    assert "OOM_KILL" in kinds and kinds.count("DRAIN_NOTICE") == 1
    assert agent.metrics.host_events.labels(kind="oom_kill")._value.get() >= 1


async def test_a_container_placed_by_the_coordinator_is_charged_to_its_reservation(
    agent: Agent, image_ref: str
) -> None:
    """POST /v1/containers with `reservation`: the room the coordinator reserved for this container is
    used for it, where any other container is refused; an unknown reservation creates nothing."""
    reservation = pb.Reservation(
        id="place-1", capacity=pb.Capacity(cpu_millis=1000, memory_bytes=900 * MiB), expires_at=time.time() + 120
    )
    await agent.reservations.reserve(reservation)
    big = Resources(cpus=1.0, memory=512 * MiB)
    with pytest.raises(CapacityReserved):
        await agent.containers.create(CreateRequest(id="other", image=image_ref, resources=big))
    with pytest.raises(ReservationNotFound):
        await agent.containers.create(CreateRequest(id="lost", image=image_ref, resources=big, reservation="nope"))
    assert [c.id for c in await agent.containers.list()] == []
    await agent.containers.create(CreateRequest(id="placed", image=image_ref, resources=big, reservation="place-1"))
    assert [c.id for c in await agent.containers.list()] == ["placed"]
    [held] = agent.reservations.held()
    assert held.claimed.memory_bytes == 512 * MiB
    with pytest.raises(InvalidRequest, match="reservation id"):
        parse_create({"id": "x", "image": image_ref, "reservation": "../etc"})


async def test_a_create_carrying_its_reservation_holds_it_for_that_request(
    agent: Agent, image_ref: str, short_dir: Path
) -> None:
    """The coordinator's create of a container it placed carries the reservation itself: held for the
    request (so the assembly's time cannot be taken by another run) and charged, gone once the
    container runs; refused (409 insufficient_capacity) before anything is made when it does not
    fit; a malformed one is a 400 that holds and makes nothing."""

    def placed(cid: str, memory: int, **reservation: Any) -> dict[str, Any]:
        held = {"id": f"rsv-{cid}", "host": "test-host", "capacity": {"memory_bytes": str(memory)}}
        held |= {"expires_at": time.time() + 120, **reservation}
        spec = {"id": cid, "image": image_ref, "args": ["sleep", "300"], "resources": {"memory": 256 * MiB}}
        return {**spec, "reservation": held}

    server = await serve(build_app(agent), f"unix://{short_dir}/agent.sock")
    try:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=f"{short_dir}/agent.sock")) as s:
            async with s.post("http://agent/v1/containers?start=1", json=placed("placed", 512 * MiB)) as resp:
                assert resp.status == 201, await resp.text()
            async with s.post("http://agent/v1/containers", json=placed("big", 2048 * MiB)) as resp:
                assert resp.status == 409
                assert (await resp.json())["error"]["code"] == "insufficient_capacity"
            async with s.post("http://agent/v1/containers", json=placed("bad", 64 * MiB, colour="red")) as resp:
                assert resp.status == 400
                assert "body.reservation" in (await resp.json())["error"]["message"]
    finally:
        await server.close()
    await wait_running(agent, "placed")
    assert [c.id for c in await agent.containers.list()] == ["placed"]
    assert agent.reservations.held() == []
    assert not agent.reservations.path.exists() or "rsv-" not in agent.reservations.path.read_text()
