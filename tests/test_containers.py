"""Containers run by the agent on a real containerd: create, start, logs, stop, delete, list."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.app import Agent
from agent.errors import ImageNotFound
from agent.model import LABEL_MANAGED, LABEL_SIGNATURE, ContainerState, CreateRequest, Resources
from core.errors import Conflict, ContainerNotFound, InvalidRequest
from core.workloads import of_start
from tests.harness.agent import agent_config, running_agent
from tests.harness.containerd import PrivateContainerd
from tests.harness.images import ImageBuilder, build_test_image, busybox_layer, etc_layer
from tests.harness.registry import DockerRegistry


@pytest.fixture(scope="module")
async def image_ref(registry: DockerRegistry) -> str:
    name = f"test/run-{secrets.token_hex(4)}"
    await build_test_image().build().push(registry.host, name, "v1")
    return f"{registry.host}/{name}:v1"


@pytest.fixture
async def agent(
    containerd: PrivateContainerd, registry: DockerRegistry, workdir: Path, image_ref: str
) -> AsyncIterator[Agent]:
    async with running_agent(agent_config(containerd, [registry.registry_config()], workdir)) as a:
        await a.images.pull(image_ref)
        yield a


def cid() -> str:
    return f"c-{secrets.token_hex(4)}"


async def wait_for_state(agent: Agent, container_id: str, state: ContainerState, within: float = 10) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        if {c.id: c.state for c in await agent.containers.list()}.get(container_id) == state:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{container_id} never reached {state}")


async def wait_for_log(agent: Agent, container_id: str, text: str, within: float = 10) -> str:
    path = agent.containers.log_path(container_id)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        content = path.read_text() if path.exists() else ""
        if text in content:
            return content
        await asyncio.sleep(0.05)
    raise AssertionError(f"{text!r} never appeared in {path}")


async def test_run_captures_output_and_shows_in_ctr(
    agent: Agent, containerd: PrivateContainerd, image_ref: str
) -> None:
    c = cid()
    script = 'echo "out $FERRYMAN_TEST $GREETING $(pwd)"; echo err >&2; exec sleep 300'
    req = CreateRequest(
        id=c, image=image_ref, args=("/bin/sh", "-c", script), env={"GREETING": "hi"}, labels={"team": "sre"}
    )
    created = await agent.containers.create(req)
    assert created.state == ContainerState.CREATED
    started = await agent.containers.start(c)
    assert started.state == ContainerState.RUNNING and started.pid
    log = await wait_for_log(agent, c, "err")
    assert "out 1 hi /data" in log  # image env, our env, image working dir
    ns = agent.containerd.namespace
    assert "RUNNING" in containerd.ctr("tasks", "ls", namespace=ns).stdout
    listed = containerd.ctr("containers", "ls", namespace=ns).stdout
    assert c in listed and image_ref in listed
    [summary] = [s for s in await agent.containers.list() if s.id == c]
    assert summary.labels["team"] == "sre" and summary.labels[LABEL_MANAGED] == "true"
    # the workload signature (core/workloads.py), from the image, command and labels when not given
    assert summary.labels[LABEL_SIGNATURE] == of_start(f"image:{image_ref}", req.args or (), {"team": "sre"}).id
    inspected = await agent.containers.inspect(c)
    assert inspected["spec"]["process"]["args"] == ["/bin/sh", "-c", script]


async def test_image_command_runs_by_default(agent: Agent, image_ref: str) -> None:
    c = cid()
    await agent.containers.create(CreateRequest(id=c, image=image_ref))
    await agent.containers.start(c)
    await wait_for_state(agent, c, ContainerState.STOPPED)
    [summary] = [s for s in await agent.containers.list() if s.id == c]
    assert summary.exit_status == 0
    assert agent.containers.log_path(c).read_text() == "keep me\n"


async def test_exit_status_is_reported(agent: Agent, image_ref: str) -> None:
    c = cid()
    await agent.containers.create(CreateRequest(id=c, image=image_ref, args=("/bin/sh", "-c", "exit 3")))
    await agent.containers.start(c)
    await wait_for_state(agent, c, ContainerState.STOPPED)
    stopped = await agent.containers.stop(c)
    assert (stopped.state, stopped.exit_status) == (ContainerState.STOPPED, 3)


async def test_stop_escalates_to_sigkill(agent: Agent, image_ref: str) -> None:
    c = cid()
    script = "trap 'echo ignoring TERM' TERM; echo ready; while true; do sleep 0.1; done"
    await agent.containers.create(CreateRequest(id=c, image=image_ref, args=("/bin/sh", "-c", script)))
    await agent.containers.start(c)
    await wait_for_log(agent, c, "ready")
    stopped = await agent.containers.stop(c, timeout=1.0)
    assert stopped.state == ContainerState.STOPPED
    assert stopped.exit_status == 137  # 128 + SIGKILL
    assert "ignoring TERM" in agent.containers.log_path(c).read_text()


async def test_stop_with_sigterm_is_graceful(agent: Agent, image_ref: str) -> None:
    c = cid()
    script = "trap 'echo bye; exit 0' TERM; echo ready; while true; do sleep 0.1; done"
    await agent.containers.create(CreateRequest(id=c, image=image_ref, args=("/bin/sh", "-c", script)))
    await agent.containers.start(c)
    await wait_for_log(agent, c, "ready")
    stopped = await agent.containers.stop(c, timeout=10)
    assert stopped.exit_status == 0
    assert "bye" in agent.containers.log_path(c).read_text()
    # A stopped container starts again.
    assert (await agent.containers.start(c)).state == ContainerState.RUNNING


async def test_delete_leaves_nothing(agent: Agent, containerd: PrivateContainerd, image_ref: str) -> None:
    c = cid()
    await agent.containers.create(CreateRequest(id=c, image=image_ref, args=("/bin/sleep", "300")))
    await agent.containers.start(c)
    with pytest.raises(Conflict):
        await agent.containers.delete(c)
    await agent.containers.delete(c, force=True)
    ns = agent.containerd.namespace
    assert c not in containerd.ctr("containers", "ls", "-q", namespace=ns).stdout
    assert c not in containerd.ctr("tasks", "ls", namespace=ns).stdout
    assert c not in containerd.ctr("snapshots", "ls", namespace=ns).stdout
    assert not agent.containers.log_path(c).exists()
    assert await agent.containerd.leases.list() == []
    with pytest.raises(ContainerNotFound):
        await agent.containers.inspect(c)


async def test_limits_and_user(agent: Agent, containerd: PrivateContainerd, image_ref: str) -> None:
    c = cid()
    req = CreateRequest(
        id=c,
        image=image_ref,
        user="app",
        args=("/bin/sh", "-c", "echo uid=$(id -u) gid=$(id -g); sleep 300"),
        resources=Resources(cpus=0.5, memory=64 << 20),
    )
    await agent.containers.create(req)
    await agent.containers.start(c)
    assert "uid=1000 gid=1000" in await wait_for_log(agent, c, "uid=")
    cgroup = f"{containerd.cgroup_parent}/{agent.containerd.namespace}/{c}"
    memory = Path("/sys/fs/cgroup/memory", cgroup.lstrip("/"), "memory.limit_in_bytes")
    quota = Path("/sys/fs/cgroup/cpu", cgroup.lstrip("/"), "cpu.cfs_quota_us")
    period = Path("/sys/fs/cgroup/cpu", cgroup.lstrip("/"), "cpu.cfs_period_us")
    assert int(memory.read_text()) == 64 << 20
    assert int(quota.read_text()) / int(period.read_text()) == pytest.approx(0.5)


async def test_bad_requests(agent: Agent, image_ref: str, registry: DockerRegistry) -> None:
    with pytest.raises(InvalidRequest):
        await agent.containers.create(CreateRequest(id="bad id\n", image=image_ref))
    with pytest.raises(InvalidRequest):
        await agent.containers.create(CreateRequest(id=cid(), image=image_ref, labels={"io.ferryman.x": "y"}))
    with pytest.raises(ImageNotFound):
        await agent.containers.create(CreateRequest(id=cid(), image=f"{registry.host}/not/pulled:v1"))
    with pytest.raises(InvalidRequest, match="user"):
        await agent.containers.create(CreateRequest(id=cid(), image=image_ref, user="nosuchuser"))
    with pytest.raises(ContainerNotFound):
        await agent.containers.start("missing")
    # None of the failures left a container or snapshot behind.
    assert await agent.containers.list() == []
    assert [s.name for s in await agent.containerd.snapshots.list() if not s.name.startswith("sha256:")] == []
    assert await agent.containerd.leases.list() == []


async def test_duplicate_id_conflicts(agent: Agent, image_ref: str) -> None:
    c = cid()
    await agent.containers.create(CreateRequest(id=c, image=image_ref))
    with pytest.raises(Conflict):
        await agent.containers.create(CreateRequest(id=c, image=image_ref))
    assert [s.id for s in await agent.containers.list()] == [c]


async def test_image_user_and_numeric_uid_resolve_through_passwd(agent: Agent, registry: DockerRegistry) -> None:
    name = f"test/user-{secrets.token_hex(4)}"
    await (
        ImageBuilder([busybox_layer(), etc_layer()], user="app", cmd=("/bin/sh", "-c", "echo $(id -u):$(id -g)"))
        .build()
        .push(registry.host, name, "v1")
    )
    ref = f"{registry.host}/{name}:v1"
    await agent.images.pull(ref)
    for c, user in ((cid(), None), (cid(), "1000")):
        await agent.containers.create(CreateRequest(id=c, image=ref, user=user))
        await agent.containers.start(c)
        await wait_for_state(agent, c, ContainerState.STOPPED)
        assert agent.containers.log_path(c).read_text() == "1000:1000\n"
