"""Health checks on a real containerd: the agent probes containers from inside their network namespace.

Each test runs an in-process agent. The workloads are busybox: `httpd` for HTTP and TCP, shell
commands for exec; the gRPC health server is tests/harness/grpchealth.py, run on the host inside the
container's network namespace (no gRPC server fits a busybox image). Every container here has its
own network namespace with only a loopback, so a probe of 127.0.0.1 that passes went into it: the
host's loopback has nothing on these ports.

Transitions are followed through `GET /v1/containers/{id}/health?after=SEQ&wait=S`, the way a
deployment would; the time from a transition (`since`) to its answer is printed, not asserted
(bench/ holds speed targets).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from agent.api import build_app
from agent.app import Agent
from agent.config import AgentConfig
from agent.health.spec import parse_health
from agent.model import CreateRequest
from tests.harness.agent import agent_config, running_agent
from tests.harness.containerd import PrivateContainerd
from tests.harness.grpchealth import GrpcHealthServer
from tests.harness.images import build_test_image
from tests.harness.registry import DockerRegistry

WAIT = 20.0
"""Seconds a test waits for a transition before it fails."""
HTTPD = "mkdir -p /www && echo ok > /www/healthz && exec httpd -f -p 8080 -h /www"


@pytest.fixture(scope="module")
async def image_ref(registry: DockerRegistry) -> str:
    name = f"test/health-{secrets.token_hex(4)}"
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


@pytest.fixture
async def http(agent: Agent) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(build_app(agent))) as client:  # type: ignore[arg-type]
        yield client


async def run(agent: Agent, image: str, script: str, health: dict[str, Any]) -> str:
    cid = f"h-{secrets.token_hex(4)}"
    args = ("/bin/sh", "-c", script)
    await agent.containers.create(CreateRequest(id=cid, image=image, args=args, health=parse_health(health, "health")))
    await agent.containers.start(cid)
    return cid


async def health(http: TestClient[Any, Any], cid: str, after: int | None = None, wait: float = 0) -> dict[str, Any]:
    query = "" if after is None else f"?after={after}&wait={wait}"
    resp = await http.get(f"/v1/containers/{cid}/health{query}")
    assert resp.status == 200, await resp.text()
    return dict(await resp.json())


async def until(http: TestClient[Any, Any], cid: str, status: str, within: float = WAIT) -> dict[str, Any]:
    """Follow the container's transitions through the wait endpoint until it is `status`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    state = await health(http, cid)
    while state["status"] != status:
        left = deadline - loop.time()
        if left <= 0:
            raise AssertionError(f"{cid} never became {status}: {state}")
        state = await health(http, cid, after=state["seq"], wait=min(left, 5.0))
        if state["status"] == status:
            lag = dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(state["since"])
            print(f"{cid}: {status} reported {lag.total_seconds() * 1000:.1f} ms after the transition")
    return state


async def ctr_exec(containerd: PrivateContainerd, agent: Agent, cid: str, *argv: str) -> None:
    ns = agent.config.containerd.namespace
    exec_id = f"t{secrets.token_hex(3)}"
    await asyncio.to_thread(containerd.ctr, "tasks", "exec", "--exec-id", exec_id, cid, *argv, namespace=ns)


async def test_http_check_turns_unhealthy_and_back(
    agent: Agent, http: TestClient[Any, Any], containerd: PrivateContainerd, image_ref: str
) -> None:
    check = {"http": {"port": 8080, "path": "/healthz"}, "interval": 0.2, "timeout": 2, "retries": 2}
    cid = await run(agent, image_ref, HTTPD, check)
    healthy = await until(http, cid, "healthy")
    assert healthy["last"]["result"] == "pass" and healthy["last"]["output"] == "HTTP 200 OK: ok"
    assert healthy["check"]["http"] == {"port": 8080, "host": "127.0.0.1", "path": "/healthz", "status": [200, 399]}
    await ctr_exec(containerd, agent, cid, "rm", "/www/healthz")
    unhealthy = await until(http, cid, "unhealthy")
    assert unhealthy["failing_streak"] == 2 and unhealthy["seq"] > healthy["seq"]
    assert unhealthy["last"]["output"].startswith("HTTP 404"), unhealthy["last"]
    await ctr_exec(containerd, agent, cid, "sh", "-c", "echo ok > /www/healthz")
    back = await until(http, cid, "healthy")
    assert back["failing_streak"] == 0
    inspected = await (await http.get(f"/v1/containers/{cid}")).json()
    assert inspected["health"]["status"] == "healthy"
    assert inspected["labels"]["io.ferryman.health"].startswith('{"http":')
    metrics = await (await http.get("/metrics")).text()
    assert 'ferryman_health_transitions_total{from="healthy",to="unhealthy"} 1.0' in metrics
    assert 'ferryman_health_probes_total{kind="http",result="fail"}' in metrics


async def test_tcp_check_and_its_start_period(agent: Agent, http: TestClient[Any, Any], image_ref: str) -> None:
    open_port = {"tcp": {"port": 8080}, "interval": 0.2, "retries": 1}
    served = await run(agent, image_ref, HTTPD, open_port)
    await until(http, served, "healthy")
    # Nothing listens on 9: every probe fails, but none counts for the first 2 seconds of the run.
    closed = {"tcp": {"port": 9}, "interval": 0.2, "retries": 1, "start_period": 2}
    cid = await run(agent, image_ref, "exec sleep 300", closed)
    started = dt.datetime.fromisoformat((await agent.containers.inspect(cid))["restart"]["started_at"])
    await asyncio.sleep(1.0)
    state = await health(http, cid)
    assert (state["status"], state["failing_streak"]) == ("starting", 0), state
    assert state["last"]["result"] == "fail" and "connect 127.0.0.1:9" in state["last"]["output"], state
    unhealthy = await until(http, cid, "unhealthy")
    assert (dt.datetime.fromisoformat(unhealthy["since"]) - started).total_seconds() >= 2.0
    assert unhealthy["failing_streak"] == 1


async def test_exec_check_exit_status_output_and_timeout(
    agent: Agent, http: TestClient[Any, Any], containerd: PrivateContainerd, image_ref: str
) -> None:
    check = {"exec": {"command": ["sh", "-c", "cat /tmp/ok"]}, "interval": 0.2, "retries": 2}
    cid = await run(agent, image_ref, "echo fine > /tmp/ok; exec sleep 300", check)
    healthy = await until(http, cid, "healthy")
    assert (healthy["last"]["exit_code"], healthy["last"]["output"]) == (0, "fine")
    await ctr_exec(containerd, agent, cid, "rm", "/tmp/ok")
    unhealthy = await until(http, cid, "unhealthy")
    assert unhealthy["last"]["exit_code"] == 1 and "No such file" in unhealthy["last"]["output"]

    slow = {"exec": {"command": ["sleep", "30"]}, "interval": 0.2, "timeout": 0.3, "retries": 1}
    cid = await run(agent, image_ref, "exec sleep 300", slow)
    state = await until(http, cid, "unhealthy")
    assert "no answer within the timeout (0.3 s)" in state["last"]["output"]
    # Timed-out probes' processes are killed and reaped: besides the container's own, at most the
    # probe under way runs, though several timed out meanwhile.
    await asyncio.sleep(1.5)
    pids = await agent.containerd.tasks.pids(cid)
    assert 1 <= len(pids) <= 2, pids
    fails = agent.metrics.registry.get_sample_value("ferryman_health_probes_total", {"kind": "exec", "result": "fail"})
    assert fails is not None and fails >= 4


async def test_grpc_health_protocol(agent: Agent, http: TestClient[Any, Any], image_ref: str) -> None:
    check = {"grpc": {"port": 50051}, "interval": 0.2, "retries": 1, "start_period": 30}
    cid = await run(agent, image_ref, "exec sleep 300", check)
    pid = (await agent.containers.inspect(cid))["pid"]
    server = await asyncio.to_thread(GrpcHealthServer, pid, 50051)
    try:
        healthy = await until(http, cid, "healthy")
        assert healthy["last"]["output"] == "SERVING"
        await asyncio.to_thread(server.set, "NOT_SERVING")
        unhealthy = await until(http, cid, "unhealthy")
        assert unhealthy["last"]["output"] == "NOT_SERVING"
    finally:
        await asyncio.to_thread(server.close)
    state = await health(http, cid)  # the server is gone: refused, still unhealthy
    assert state["status"] == "unhealthy" and state["last"]["result"] == "fail"


async def test_checks_stop_with_the_container(agent: Agent, http: TestClient[Any, Any], image_ref: str) -> None:
    cid = await run(agent, image_ref, HTTPD, {"tcp": {"port": 8080}, "interval": 0.1})
    healthy = await until(http, cid, "healthy")
    # A waiter learns of the stop as it happens.
    waiter = asyncio.create_task(health(http, cid, after=healthy["seq"], wait=10))
    await agent.containers.stop(cid, timeout=0)
    stopped = await asyncio.wait_for(waiter, 10)
    assert stopped["status"] == "stopped"
    probes = agent.metrics.registry.get_sample_value("ferryman_health_probes_total", {"kind": "tcp", "result": "pass"})
    await asyncio.sleep(0.5)
    after = agent.metrics.registry.get_sample_value("ferryman_health_probes_total", {"kind": "tcp", "result": "pass"})
    assert after == probes
    await agent.containers.start(cid)
    assert (await until(http, cid, "healthy"))["seq"] > stopped["seq"]


async def test_checks_survive_an_agent_restart(
    config: AgentConfig, containerd: PrivateContainerd, image_ref: str
) -> None:
    """Checks come back from the labels; a container that died while the agent was down is not probed."""
    ns = config.containerd.namespace
    check = {"tcp": {"port": 8080}, "interval": 0.2}
    async with running_agent(config, keep=True) as agent:
        await agent.images.pull(image_ref)
        alive = await run(agent, image_ref, HTTPD, check)
        dead = await run(agent, image_ref, HTTPD, check)
    containerd.ctr("tasks", "kill", "-s", "KILL", dead, namespace=ns)
    await asyncio.sleep(0.5)
    async with running_agent(config) as agent, TestClient(TestServer(build_app(agent))) as http:  # type: ignore[arg-type]
        state = await until(http, alive, "healthy")
        assert state["last"]["output"] == "connected to tcp://127.0.0.1:8080"
        await asyncio.sleep(0.5)
        gone = await health(http, dead)
        assert (gone["status"], gone["last"]) == ("stopped", None)


@pytest.mark.parametrize(
    ("check", "needle"),
    [
        ("tcp", "body.health: expected an object"),
        ({"interval": 1}, "expected exactly one of http, tcp, grpc, exec, got none"),
        (
            {"tcp": {"port": 1}, "exec": {"command": ["true"]}},
            "expected exactly one of http, tcp, grpc, exec, got tcp, exec",
        ),
        ({"tcp": {"port": 0}}, "body.health.tcp.port: expected a positive integer"),
        ({"tcp": {"port": 70000}}, "body.health.tcp.port: must be at most 65535"),
        ({"tcp": {"port": 80, "host": "localhost"}}, "body.health.tcp.host: expected an IP address"),
        ({"http": {"port": 80, "path": "healthz"}}, "body.health.http.path: expected an absolute path"),
        ({"http": {"port": 80, "status": [500, 200]}}, "body.health.http.status: expected [lowest, highest]"),
        ({"exec": {"command": []}}, "body.health.exec.command: expected a non-empty array"),
        ({"exec": {"command": "true"}}, "body.health.exec.command: expected a non-empty array"),
        ({"grpc": {"port": 1, "service": 3}}, "body.health.grpc.service: expected a string"),
        ({"tcp": {"port": 1}, "interval": 0}, "body.health.interval: expected a positive finite number"),
        ({"tcp": {"port": 1}, "interval": 0.001}, "body.health.interval: must be at least 0.05 s"),
        ({"tcp": {"port": 1}, "retries": 1.5}, "body.health.retries: expected a positive integer"),
        ({"tcp": {"port": 1}, "start_period": -1}, "body.health.start_period: expected a positive finite number"),
        ({"tcp": {"port": 1}, "every": 1}, "body.health: unknown fields ['every']"),
        ({"tcp": {"port": 1, "path": "/"}}, "body.health.tcp: unknown fields ['path']"),
        ({"exec": {"command": ["x" * 4000]}}, "body.health: the check takes more than 3072 bytes"),
    ],
)
async def test_bad_checks_are_refused_and_nothing_is_created(
    agent: Agent, http: TestClient[Any, Any], image_ref: str, check: Any, needle: str
) -> None:
    resp = await http.post("/v1/containers?start=1", json={"id": "h-bad", "image": image_ref, "health": check})
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["code"] == "invalid_request" and needle in error["message"], error
    assert await agent.containers.list() == []


async def test_health_endpoint_errors(agent: Agent, http: TestClient[Any, Any], image_ref: str) -> None:
    resp = await http.get("/v1/containers/nope/health")
    assert (resp.status, (await resp.json())["error"]["code"]) == (404, "container_not_found")
    await agent.containers.create(CreateRequest(id="h-plain", image=image_ref, args=("true",)))
    resp = await http.get("/v1/containers/h-plain/health")
    assert (resp.status, (await resp.json())["error"]["code"]) == (404, "no_health_check")
    assert (await (await http.get("/v1/containers/h-plain")).json())["health"] is None
    resp = await http.get("/v1/containers/h-plain/health?after=1&wait=1000")
    assert resp.status == 400 and "wait: must be at most 300" in (await resp.json())["error"]["message"]


async def test_a_container_a_migration_holds_is_not_probed(
    agent: Agent, http: TestClient[Any, Any], containerd: PrivateContainerd, image_ref: str
) -> None:
    check = {"exec": {"command": ["test", "-f", "/tmp/ok"]}, "interval": 0.1, "retries": 1}
    cid = await run(agent, image_ref, "touch /tmp/ok; exec sleep 300", check)
    healthy = await until(http, cid, "healthy")
    held = {cid}
    agent.health._migrating = held.__contains__  # what MigrationService.migrating says during a move
    await asyncio.sleep(0.3)  # a probe under way when the hold began ends
    await ctr_exec(containerd, agent, cid, "rm", "/tmp/ok")  # every probe would fail now
    counter = ("ferryman_health_probes_total", {"kind": "exec", "result": "skipped"})
    skipped = agent.metrics.registry.get_sample_value(*counter)
    await asyncio.sleep(0.5)
    state = await health(http, cid)
    assert (state["status"], state["seq"], state["failing_streak"]) == ("healthy", healthy["seq"], 0), state
    more = agent.metrics.registry.get_sample_value(*counter)
    assert skipped is not None and more is not None and more > skipped
    held.clear()  # the hold ends: the probes count again
    assert (await until(http, cid, "unhealthy"))["last"]["exit_code"] == 1


async def test_shutdown_answers_waiting_callers(agent: Agent, image_ref: str) -> None:
    cid = await run(agent, image_ref, HTTPD, {"tcp": {"port": 8080}, "interval": 0.1})
    app = build_app(agent)  # type: ignore[arg-type]
    async with TestClient(TestServer(app)) as http:
        healthy = await until(http, cid, "healthy")
        waiter = asyncio.create_task(health(http, cid, after=healthy["seq"], wait=60))
        await asyncio.sleep(0.2)
        assert not waiter.done()
        await app.shutdown()  # what the server's close runs first
        state = await asyncio.wait_for(waiter, 5)
        assert (state["status"], state["seq"]) == ("healthy", healthy["seq"])
