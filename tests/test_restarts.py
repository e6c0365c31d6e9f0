"""Restart policies on a real containerd: the agent starts exited containers again, as docker would.

Each test runs an in-process agent whose restart supervisor follows containerd's exit events. Exits
are real (busybox `sh -c 'exit 1'`); "not restarted" is checked after waiting longer than the
backoff would have (`SETTLE`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from agent.api import build_app
from agent.app import Agent
from agent.config import AgentConfig
from agent.model import ContainerState, CreateRequest, RestartName, RestartPolicy
from tests.harness.agent import agent_config, running_agent
from tests.harness.containerd import PrivateContainerd
from tests.harness.images import build_test_image
from tests.harness.registry import DockerRegistry

SETTLE = 1.5
"""Seconds after which a restart that was going to happen has happened (the backoff starts at 0.1 s
and these runs are short: at most 0.1 + 0.2 + 0.4 s of delays)."""


@pytest.fixture(scope="module")
async def image_ref(registry: DockerRegistry) -> str:
    name = f"test/restart-{secrets.token_hex(4)}"
    await build_test_image().build().push(registry.host, name, "v1")
    return f"{registry.host}/{name}:v1"


@pytest.fixture
def config(containerd: PrivateContainerd, registry: DockerRegistry, workdir: Path) -> AgentConfig:
    return agent_config(containerd, [registry.registry_config()], workdir)


@pytest.fixture
async def agent(config: AgentConfig, image_ref: str) -> AsyncIterator[Agent]:
    async with running_agent(config) as a:
        await a.images.pull(image_ref)
        yield a


def cid() -> str:
    return f"r-{secrets.token_hex(4)}"


async def run(agent: Agent, image: str, script: str, policy: RestartPolicy) -> str:
    c = cid()
    args = ("/bin/sh", "-c", script)
    await agent.containers.create(CreateRequest(id=c, image=image, args=args, restart_policy=policy))
    await agent.containers.start(c)
    return c


async def inspect_until(agent: Agent, c: str, done: Any, within: float = 15) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        info = await agent.containers.inspect(c)
        if done(info):
            return info
        if loop.time() > deadline:
            raise AssertionError(f"{c} never got there: state {info['state']}, restart {info['restart']}")
        await asyncio.sleep(0.05)


def stopped_after(count: int) -> Any:
    return lambda info: info["state"] == "stopped" and info["restart"]["count"] == count


async def test_on_failure_restarts_exactly_max_retries_then_stays_exited(agent: Agent, image_ref: str) -> None:
    c = await run(agent, image_ref, "echo run; exit 1", RestartPolicy(RestartName.ON_FAILURE, 2))
    await inspect_until(agent, c, stopped_after(2))
    await asyncio.sleep(SETTLE)
    info = await agent.containers.inspect(c)
    assert (info["state"], info["exit_status"]) == ("stopped", 1)
    assert info["restart"]["count"] == 2 and info["restart"]["last_exit_status"] == 1
    assert info["restart"]["policy"] == {"name": "on-failure", "max_retries": 2}
    assert agent.containers.log_path(c).read_text() == "run\n" * 3  # the first run and two restarts
    [summary] = [s for s in await agent.containers.list() if s.id == c]
    assert (summary.restart_count, summary.restart_policy.spelling) == (2, "on-failure:2")


async def test_no_and_on_failure_after_success_stay_exited(agent: Agent, image_ref: str) -> None:
    failed = await run(agent, image_ref, "exit 1", RestartPolicy())
    succeeded = await run(agent, image_ref, "exit 0", RestartPolicy(RestartName.ON_FAILURE))
    for c in (failed, succeeded):
        await inspect_until(agent, c, lambda info: info["state"] == "stopped")
    await asyncio.sleep(SETTLE)
    for c, status in ((failed, 1), (succeeded, 0)):
        info = await agent.containers.inspect(c)
        assert (info["state"], info["exit_status"], info["restart"]["count"]) == ("stopped", status, 0)


async def test_always_restarts_after_exit_0_until_an_operator_stops_it(agent: Agent, image_ref: str) -> None:
    c = await run(agent, image_ref, "echo run; sleep 0.2", RestartPolicy(RestartName.ALWAYS))
    info = await inspect_until(agent, c, lambda info: info["restart"]["count"] >= 2)
    assert info["restart"]["last_exit_status"] == 0
    # The stop lands whenever it does: in a run, or between runs with a restart waiting out its delay.
    stopped = await agent.containers.stop(c, timeout=1)
    await asyncio.sleep(SETTLE)
    info = await agent.containers.inspect(c)
    assert info["state"] == "stopped" and info["restart"]["count"] == stopped.restart_count
    assert info["restart"]["operator_stopped_at"] is not None
    # The operator's start brings it back, and the count starts over.
    started = await agent.containers.start(c)
    assert started.restart_count == 0 and started.state == ContainerState.RUNNING


async def test_stopping_a_long_running_unless_stopped_container_is_not_undone(agent: Agent, image_ref: str) -> None:
    c = await run(agent, image_ref, "exec sleep 300", RestartPolicy(RestartName.UNLESS_STOPPED))
    stopped = await agent.containers.stop(c, timeout=0)
    assert stopped.exit_status == 137
    await asyncio.sleep(SETTLE)
    info = await agent.containers.inspect(c)
    assert (info["state"], info["restart"]["count"]) == ("stopped", 0)


async def test_after_an_agent_restart_exits_it_missed_are_restarted(
    config: AgentConfig, containerd: PrivateContainerd, image_ref: str
) -> None:
    """Containers keep running while the agent is down. What exited meanwhile comes back when the agent
    does; so does a container whose task is gone (a reboot); one an operator stopped does not."""
    ns = config.containerd.namespace
    always = RestartPolicy(RestartName.ALWAYS)
    async with running_agent(config, keep=True) as agent:
        await agent.images.pull(image_ref)
        killed, lost, stopped = [await run(agent, image_ref, "exec sleep 300", always) for _ in range(3)]
        await agent.containers.stop(stopped, timeout=0)
    containerd.ctr("tasks", "kill", "-s", "KILL", killed, namespace=ns)
    containerd.ctr("tasks", "kill", "-s", "KILL", lost, namespace=ns)
    await asyncio.sleep(0.5)  # both exit
    containerd.ctr("tasks", "rm", lost, namespace=ns)
    # Slow re-reads: what comes back here comes back from the agent's first read at start.
    slow = dataclasses.replace(config, restart=dataclasses.replace(config.restart, resync_interval=3600.0))
    async with running_agent(slow) as agent:
        back = await inspect_until(agent, killed, lambda info: info["state"] == "running")
        assert (back["restart"]["count"], back["restart"]["last_exit_status"]) == (1, 137)
        back = await inspect_until(agent, lost, lambda info: info["state"] == "running")
        assert (back["restart"]["count"], back["restart"]["last_exit_status"]) == (1, None)
        await asyncio.sleep(SETTLE)
        info = await agent.containers.inspect(stopped)
        assert (info["state"], info["restart"]["count"]) == ("stopped", 0)


@pytest.mark.parametrize(
    ("policy", "needle"),
    [
        ("always", "body.restart_policy: expected an object"),
        ({"name": "sometimes"}, "body.restart_policy.name: expected one of no, on-failure, always, unless-stopped"),
        ({"name": "always", "max_retries": 3}, "only on-failure has a retry limit"),
        ({"name": "on-failure", "max_retries": 0}, "omit it for no limit"),
        ({"name": "on-failure", "max_retries": -1}, "expected a positive integer"),
        ({"name": "on-failure", "max_retries": "3"}, "expected a positive integer"),
        ({"max_retries": 3}, "missing required fields ['name']"),
        ({"name": "no", "delay": 1}, "unknown fields ['delay']"),
    ],
)
async def test_bad_policies_are_refused_and_nothing_is_created(
    agent: Agent, image_ref: str, policy: Any, needle: str
) -> None:
    async with TestClient(TestServer(build_app(agent))) as http:  # type: ignore[arg-type]
        resp = await http.post(
            "/v1/containers?start=1", json={"id": cid(), "image": image_ref, "restart_policy": policy}
        )
        assert resp.status == 400
        error = (await resp.json())["error"]
        assert error["code"] == "invalid_request" and needle in error["message"], error
    assert await agent.containers.list() == []


async def test_the_policy_is_shown_over_http(agent: Agent, image_ref: str) -> None:
    c = cid()
    body = {"id": c, "image": image_ref, "args": ["sleep", "300"], "restart_policy": {"name": "on-failure"}}
    async with TestClient(TestServer(build_app(agent))) as http:  # type: ignore[arg-type]
        resp = await http.post("/v1/containers?start=1", json=body)
        assert resp.status == 201, await resp.text()
        created = await resp.json()
        assert (created["restart_policy"], created["restart_count"]) == ({"name": "on-failure", "max_retries": None}, 0)
        listed = await (await http.get("/v1/containers")).json()
        assert [x["restart_policy"]["name"] for x in listed["containers"]] == ["on-failure"]
        inspected = await (await http.get(f"/v1/containers/{c}")).json()
        assert inspected["restart"]["policy"] == {"name": "on-failure", "max_retries": None}
        assert inspected["labels"]["io.ferryman.restart-policy"] == "on-failure"
