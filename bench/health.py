"""How soon a caller learns of a health transition, through the agent's wait endpoint.

An in-process agent on a private containerd runs busybox httpd containers with an HTTP check
(interval 0.1 s, retries 1). Each round starts one, follows it through
`GET /v1/containers/{id}/health?after=SEQ&wait=S` until healthy, removes the checked file (it turns
unhealthy), then puts it back (healthy again). For each transition: the time from the status change
(the health's `since`) to the waiting caller's answer. Docker Compose polls every 500 ms (a
250 ms wait on average, 475 ms at p95) for the same news.
Also printed: the time from the start request to the healthy answer.

Run as root from the repo: .venv/bin/python bench/health.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import secrets
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.api import build_app
from agent.health.spec import parse_health
from agent.model import CreateRequest
from tests.harness.agent import agent_config, running_agent
from tests.harness.containerd import PrivateContainerd, scratch_dir
from tests.harness.images import build_test_image
from tests.harness.registry import DockerRegistry

HTTPD = "mkdir -p /www && echo ok > /www/healthz && exec httpd -f -p 8080 -h /www"
CHECK = {"http": {"port": 8080, "path": "/healthz"}, "interval": 0.1, "timeout": 1, "retries": 1}


async def until(http: TestClient[Any, Any], cid: str, status: str, seq: int) -> tuple[dict[str, Any], float]:
    """Wait for `status` after `seq`; the health and the ms from its transition to this answer."""
    while True:
        resp = await http.get(f"/v1/containers/{cid}/health?after={seq}&wait=30")
        state = dict(await resp.json())
        answered = dt.datetime.now(dt.UTC)
        if state["status"] == status:
            return state, (answered - dt.datetime.fromisoformat(state["since"])).total_seconds() * 1000
        seq = state["seq"]


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1] if len(values) >= 2 else values[0]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    async with scratch_dir() as base:
        registry = DockerRegistry(base / "registry")
        ctrd = PrivateContainerd(base / "containerd")
        await registry.start()
        await ctrd.start()
        try:
            await build_test_image().build().push(registry.host, "bench/health", "v1")
            ref = f"{registry.host}/bench/health:v1"
            config = agent_config(ctrd, [registry.registry_config()], base / "agent", namespace="bench")
            async with running_agent(config) as agent, TestClient(TestServer(build_app(agent))) as http:  # type: ignore[arg-type]
                await agent.images.pull(ref)
                lags: list[float] = []
                to_healthy: list[float] = []
                for n in range(args.rounds):
                    cid = f"bench-{secrets.token_hex(3)}"
                    req = CreateRequest(cid, ref, args=("/bin/sh", "-c", HTTPD), health=parse_health(CHECK, "health"))
                    await agent.containers.create(req)
                    began = time.perf_counter()
                    await agent.containers.start(cid)
                    state, lag = await until(http, cid, "healthy", 0)
                    to_healthy.append((time.perf_counter() - began) * 1000)
                    lags.append(lag)
                    ns = config.containerd.namespace
                    for argv, status in ((["rm", "/www/healthz"], "unhealthy"), (["touch", "/www/healthz"], "healthy")):
                        exec_id = f"b{secrets.token_hex(3)}"
                        await asyncio.to_thread(
                            ctrd.ctr, "tasks", "exec", "--exec-id", exec_id, cid, *argv, namespace=ns
                        )
                        state, lag = await until(http, cid, status, state["seq"])
                        lags.append(lag)
                    await agent.containers.delete(cid, force=True)
                    answered = ", ".join(f"{x:.2f}" for x in lags[-3:])
                    print(f"round {n + 1}: healthy {to_healthy[-1]:.0f} ms after start; answers after {answered} ms")
                print(
                    f"start to healthy: p50 {statistics.median(to_healthy):.0f} ms, p95 {p95(to_healthy):.0f} ms; "
                    f"transition to answer: p50 {statistics.median(lags):.2f} ms, max {max(lags):.2f} ms "
                    f"({len(lags)} transitions); a 500 ms poll: 250 ms mean, 475 ms p95"
                )
                print(f"bench health: {p95(lags):.1f} ms (target <= 50)")
        finally:
            await ctrd.stop()
            await registry.stop()


if __name__ == "__main__":
    asyncio.run(main())
