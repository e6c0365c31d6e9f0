"""A health check travels with a live migration: the target probes the restored container.

Two real hosts of a mesh (agents as processes, containerd, CRIU). The container has a service address,
so it runs in the service's network namespace, not an empty one: the HTTP probe of 127.0.0.1 goes
there on both hosts.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.fleet import HTTP_PORT, api, fleet, migrate
from tests.harness.images import ImageBuilder, busybox_layer
from tests.harness.mesh import Mesh, MeshHost

SERVICE = ("/bin/sh", "-c", f"mkdir -p /www && echo ok > /www/healthz && exec httpd -f -p {HTTP_PORT} -h /www")


@pytest.fixture
async def mesh(base_dir: Path) -> AsyncIterator[Mesh]:
    async with fleet(base_dir, hosts=2) as m:
        yield m


async def until_healthy(host: MeshHost, cid: str) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    state = await api(host, "GET", f"/v1/containers/{cid}/health")
    while state["status"] != "healthy":
        assert loop.time() < deadline, state
        state = await api(host, "GET", f"/v1/containers/{cid}/health?after={state['seq']}&wait=5")
    return dict(state)


async def test_the_check_moves_with_the_container(mesh: Mesh) -> None:
    h1, h2 = mesh["h1"], mesh["h2"]
    repo = f"test/healthy-{secrets.token_hex(3)}"
    await ImageBuilder([busybox_layer()], cmd=SERVICE).build().push(mesh.push_host, repo, "v1")
    ref = f"{mesh.registry_host}/{repo}:v1"
    await api(h1, "POST", "/v1/images/pull", {"ref": ref})
    check = {"http": {"port": HTTP_PORT, "path": "/healthz"}, "interval": 0.2, "retries": 2}
    ip = str(mesh.subnet.network_address + 100)
    body = {"id": "web", "image": ref, "service_ip": ip, "health": check}
    await api(h1, "POST", "/v1/containers?start=1", body, expect=201)
    before = await until_healthy(h1, "web")
    assert before["last"]["output"] == "HTTP 200 OK: ok"

    record = await migrate(h1, "web", "h2", mode="precopy")
    assert record["state"] == "COMMIT", record
    after = await until_healthy(h2, "web")
    assert after["check"] == before["check"] and after["last"]["output"] == "HTTP 200 OK: ok"
    await api(h1, "GET", "/v1/containers/web/health", expect=404)  # the source's copy is gone
