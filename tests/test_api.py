"""API shape tests: a real aiohttp server over in-test fake services.

The fakes below only mimic the service interfaces (ImageService, ContainerService) so the HTTP layer
can be checked in isolation: routes, status codes, error JSON, validation, streaming. End-to-end tests
against a real containerd and registry are the lead's (they exercise the real services).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import socket
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from agent.api import build_app, parse_listen, serve
from agent.api.server import OPENAPI_PATH, TcpAddress, UnixAddress
from agent.errors import ContainerdUnavailable, ImageNotFound, ManifestNotFound
from agent.metrics import AgentMetrics
from agent.model import (
    ContainerState,
    ContainerSummary,
    CreateRequest,
    ImageSummary,
    LayerProgress,
    PullProgress,
    RestartName,
    RestartPolicy,
)
from core.errors import AlreadyExists, ConfigError, Conflict, ContainerNotFound
from core.logs import JsonFormatter
from core.workloads import of_start
from tests.harness import rawhttp

# ------------------------------------------------------------------ fakes (API-shape tests only)


class FakeImages:
    """Mimics ImageService: pull mutates the progress object over a few ticks, like the real engine."""

    def __init__(self) -> None:
        self.images: dict[str, ImageSummary] = {}
        self.step = 0.05
        self.pull_cancelled = asyncio.Event()
        self.removed: list[str] = []

    async def pull(self, ref: str, progress: PullProgress | None = None) -> ImageSummary:
        progress = progress if progress is not None else PullProgress(ref=ref)
        try:
            await asyncio.sleep(self.step)
            if ref.startswith("missing/"):
                raise ManifestNotFound(f"{ref}: manifest unknown")
            if ref == "boom":
                raise RuntimeError("secret internal detail")
            progress.status = "fetching"
            progress.layers = [LayerProgress("sha256:" + "a" * 64, 100), LayerProgress("sha256:" + "b" * 64, 60)]
            for _ in range(5):
                await asyncio.sleep(self.step)
                for layer in progress.layers:
                    layer.status = "downloading"
                    layer.done = min(layer.size, layer.done + 20)
            for layer in progress.layers:
                layer.done, layer.status = layer.size, "unpacked"
            progress.status = "done"
        except asyncio.CancelledError:
            self.pull_cancelled.set()
            raise
        summary = ImageSummary(ref, "sha256:" + "c" * 64, "application/vnd.oci.image.index.v1+json", 4096,
                               160, 2)
        self.images[ref] = summary
        return summary

    async def list(self) -> list[ImageSummary]:
        return list(self.images.values())

    async def remove(self, name: str) -> None:
        if name not in self.images:
            raise ImageNotFound(f"image {name} is not pulled on this host")
        del self.images[name]
        self.removed.append(name)


class FakeContainers:
    """Mimics ContainerService with an in-memory table."""

    def __init__(self, log_dir: Path, images: FakeImages) -> None:
        self.log_dir = log_dir
        self.images = images
        self.items: dict[str, ContainerSummary] = {}
        self.requests: list[CreateRequest] = []
        self.stop_timeouts: list[float | None] = []
        self.down: Exception | None = None

    def _set(self, cid: str, state: ContainerState, pid: int | None = None, exit_status: int | None = None) -> None:
        old = self.items[cid]
        self.items[cid] = ContainerSummary(old.id, old.image, state, pid, exit_status, old.labels, old.created_at)

    def _get(self, cid: str) -> ContainerSummary:
        if cid not in self.items:
            raise ContainerNotFound(f"no container {cid}")
        return self.items[cid]

    async def create(self, req: CreateRequest) -> ContainerSummary:
        if req.image not in self.images.images:
            raise ImageNotFound(f"image {req.image} is not pulled on this host")
        if req.id in self.items:
            raise AlreadyExists(f"container {req.id} already exists")
        self.requests.append(req)
        self.items[req.id] = ContainerSummary(req.id, req.image, ContainerState.CREATED, None, None,
                                              dict(req.labels), "2024-01-01T00:00:00Z")
        return self.items[req.id]

    async def start(self, container_id: str) -> ContainerSummary:
        if self._get(container_id).state == ContainerState.RUNNING:
            raise Conflict(f"container {container_id} is already running")
        self._set(container_id, ContainerState.RUNNING, pid=4242)
        return self.items[container_id]

    async def stop(self, container_id: str, timeout: float | None = None) -> ContainerSummary:  # noqa: ASYNC109
        self._get(container_id)
        self.stop_timeouts.append(timeout)
        self._set(container_id, ContainerState.STOPPED, exit_status=143)
        return self.items[container_id]

    async def delete(self, container_id: str, force: bool = False) -> None:
        if self._get(container_id).state == ContainerState.RUNNING and not force:
            raise Conflict(f"container {container_id} is running; stop it first or use force")
        del self.items[container_id]

    async def list(self) -> list[ContainerSummary]:
        if self.down is not None:
            raise self.down
        return list(self.items.values())

    async def inspect(self, container_id: str) -> dict[str, Any]:
        if container_id == "explode":
            raise KeyError("secret internal detail")
        return {"id": self._get(container_id).id, "spec": {"process": {"args": ["sh"]}}}

    def log_path(self, container_id: str) -> Path:
        return self.log_dir / f"{container_id}.log"


class FakeAgent:
    def __init__(self, log_dir: Path) -> None:
        self.metrics = AgentMetrics()
        self.images = FakeImages()
        self.containers = FakeContainers(log_dir, self.images)
        self.closed = False

    async def close(self) -> None:
        self.closed = True


# ------------------------------------------------------------------ fixtures


@pytest.fixture
def agent(tmp_path: Path) -> FakeAgent:
    return FakeAgent(tmp_path)


@pytest.fixture
def app(agent: FakeAgent) -> web.Application:
    return build_app(agent)


@pytest.fixture
async def client(app: web.Application) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    async with TestClient(TestServer(app)) as c:
        yield c


def _pulled(agent: FakeAgent, name: str = "registry.local:5000/team/app:1.2") -> str:
    agent.images.images[name] = ImageSummary(name, "sha256:" + "d" * 64, "application/json", 10)
    return name


async def _error(resp: aiohttp.ClientResponse, status: int, code: str) -> str:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return str(body["error"]["message"])


# ------------------------------------------------------------------ containers


async def test_create_full_body_and_list(client: TestClient[Any, Any], agent: FakeAgent) -> None:
    image = _pulled(agent)
    body = {
        "id": "web-1",
        "image": image,
        "args": ["sh", "-c", "echo hi"],
        "env": {"A": "1", "B": "x=y"},
        "workdir": "/srv",
        "user": "1000:1000",
        "labels": {"team": "infra"},
        "resources": {"cpus": 0.5, "memory": 67108864},
        "restart_policy": {"name": "on-failure", "max_retries": 3},
    }
    resp = await client.post("/v1/containers", json=body)
    assert resp.status == 201
    created = await resp.json()
    assert created["id"] == "web-1" and created["state"] == "created"
    req = agent.containers.requests[0]
    assert req.args == ("sh", "-c", "echo hi")
    assert req.env == {"A": "1", "B": "x=y"}
    assert req.resources.cpus == 0.5 and req.resources.memory == 67108864
    assert (req.workdir, req.user, req.labels) == ("/srv", "1000:1000", {"team": "infra"})
    assert req.restart_policy == RestartPolicy(RestartName.ON_FAILURE, 3)
    # the workload signature of the request as sent (core/workloads.py), for the start history
    assert req.signature == of_start(f"image:{image}", ["sh", "-c", "echo hi"], {"team": "infra"}).id

    resp = await client.get("/v1/containers")
    assert resp.status == 200
    listed = await resp.json()
    assert [c["id"] for c in listed["containers"]] == ["web-1"]
    assert set(listed["containers"][0]) == {
        "id", "image", "state", "pid", "exit_status", "labels", "created_at", "restart_policy", "restart_count"
    }


async def test_create_minimal_with_start(client: TestClient[Any, Any], agent: FakeAgent) -> None:
    image = _pulled(agent)
    resp = await client.post("/v1/containers?start=1", json={"id": "a", "image": image})
    assert resp.status == 201
    assert (await resp.json())["state"] == "running"
    req = agent.containers.requests[0]
    assert req.args is None and req.env == {} and req.resources.cpus is None


async def test_lifecycle_start_stop_delete(client: TestClient[Any, Any], agent: FakeAgent) -> None:
    image = _pulled(agent)
    assert (await client.post("/v1/containers", json={"id": "c1", "image": image})).status == 201
    resp = await client.post("/v1/containers/c1/start")
    assert resp.status == 200 and (await resp.json())["pid"] == 4242
    await _error(await client.post("/v1/containers/c1/start"), 409, "conflict")
    await _error(await client.delete("/v1/containers/c1"), 409, "conflict")
    resp = await client.post("/v1/containers/c1/stop?timeout=2.5")
    assert resp.status == 200
    assert (await resp.json())["state"] == "stopped"
    assert agent.containers.stop_timeouts == [2.5]
    resp = await client.delete("/v1/containers/c1")
    assert resp.status == 204
    await _error(await client.get("/v1/containers/c1"), 404, "container_not_found")


async def test_force_delete_running(client: TestClient[Any, Any], agent: FakeAgent) -> None:
    image = _pulled(agent)
    await client.post("/v1/containers?start=true", json={"id": "c2", "image": image})
    assert (await client.delete("/v1/containers/c2?force=1")).status == 204
    assert agent.containers.items == {}


async def test_inspect(client: TestClient[Any, Any], agent: FakeAgent) -> None:
    image = _pulled(agent)
    await client.post("/v1/containers", json={"id": "c3", "image": image})
    resp = await client.get("/v1/containers/c3")
    assert resp.status == 200
    assert (await resp.json())["spec"]["process"]["args"] == ["sh"]


async def test_not_found_codes(client: TestClient[Any, Any]) -> None:
    await _error(await client.post("/v1/containers/nope/start"), 404, "container_not_found")
    await _error(await client.post("/v1/containers/nope/stop"), 404, "container_not_found")
    await _error(await client.delete("/v1/containers/nope"), 404, "container_not_found")
    await _error(await client.get("/v1/containers/nope/logs"), 404, "container_not_found")
    await _error(await client.post("/v1/containers", json={"id": "x", "image": "nothere"}), 404,
                 "image_not_found")


async def test_unknown_route_and_method(client: TestClient[Any, Any]) -> None:
    msg = await _error(await client.get("/v1/nothing/here"), 404, "not_found")
    assert "/v1/nothing/here" in msg
    await _error(await client.get("/"), 404, "not_found")
    resp = await client.put("/v1/containers")
    await _error(resp, 405, "method_not_allowed")
    assert "POST" in resp.headers["Allow"]


async def test_already_exists(client: TestClient[Any, Any], agent: FakeAgent) -> None:
    image = _pulled(agent)
    await client.post("/v1/containers", json={"id": "dup", "image": image})
    await _error(await client.post("/v1/containers", json={"id": "dup", "image": image}), 409, "already_exists")


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "JSON object"),
        (b"[1, 2]", "got array"),
        (b'"just a string"', "got string"),
        (b"\xff\xfe", "not valid JSON"),
    ],
)
async def test_create_bad_json(client: TestClient[Any, Any], raw: bytes, needle: str) -> None:
    resp = await client.post("/v1/containers", data=raw, headers={"Content-Type": "application/json"})
    assert needle in await _error(resp, 400, "invalid_request")


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"id": "a", "image": "i", "command": ["sh"]}, "unknown fields ['command']"),
        ({"id": "a", "image": "i", "resources": {"disk": 1}}, "unknown fields ['disk']"),
        ({"image": "i"}, "missing required fields ['id']"),
        ({"id": "a"}, "missing required fields ['image']"),
        ({"id": 5, "image": "i"}, "body.id"),
        ({"id": "", "image": "i"}, "body.id"),
        ({"id": "a", "image": ["i"]}, "body.image"),
        ({"id": "a", "image": "i", "args": "sh -c true"}, "body.args"),
        ({"id": "a", "image": "i", "args": ["sh", 1]}, "body.args"),
        ({"id": "a", "image": "i", "args": []}, "body.args"),
        ({"id": "a", "image": "i", "env": ["A=1"]}, "body.env"),
        ({"id": "a", "image": "i", "env": {"A": 1}}, "body.env"),
        ({"id": "a", "image": "i", "env": {"A=B": "1"}}, "body.env"),
        ({"id": "a", "image": "i", "labels": {"k": None}}, "body.labels"),
        ({"id": "a", "image": "i", "workdir": 3}, "body.workdir"),
        ({"id": "a", "image": "i", "resources": {"memory": "64M"}}, "body.resources.memory"),
        ({"id": "a", "image": "i", "resources": {"memory": 1.5}}, "body.resources.memory"),
        ({"id": "a", "image": "i", "resources": {"cpus": True}}, "body.resources.cpus"),
        ({"id": "a", "image": "i", "resources": {"cpus": -1}}, "body.resources.cpus"),
        ({"id": "a", "image": "i", "resources": [1]}, "body.resources"),
        ({"id": "../etc", "image": "i"}, "invalid container id"),
        ({"id": "a\n", "image": "i"}, "invalid container id"),
        ({"id": "x" * 65, "image": "i"}, "invalid container id"),
        ({"id": "a", "image": "i", "restart_policy": "always"}, "body.restart_policy: expected an object"),
        ({"id": "a", "image": "i", "restart_policy": {"name": "never"}}, "body.restart_policy.name"),
        ({"id": "a", "image": "i", "restart_policy": {"name": "on-failure", "max_retries": 1.5}}, "max_retries"),
    ],
)
async def test_create_validation(
    client: TestClient[Any, Any], agent: FakeAgent, body: dict[str, Any], needle: str
) -> None:
    _pulled(agent, "i")
    msg = await _error(await client.post("/v1/containers", json=body), 400, "invalid_request")
    assert needle in msg
    assert agent.containers.requests == []  # nothing reached the service


_DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    ("path", "raw", "status", "needle"),
    [
        # json.loads recursed into these until RecursionError: a 500 before the depth limit.
        ("/v1/containers", b'{"id": "a", "image": "i", "labels": ' + _DEEP + b"}", 400, "deeper than 32"),
        ("/v1/containers", b'{"id": "a", "image": "i", "env": {"x": ' * 40 + b"1" + b"}" * 80, 400, "deeper"),
        ("/v1/images/pull", _DEEP, 400, "deeper than 32"),
        ("/v1/reservations", b'{"capacity": ' + _DEEP + b"}", 400, "deeper than 32"),
        ("/v1/network/publish", b"[" * 2000 + b"]" * 2000, 400, "deeper than 32"),
        # Past Python's 4300-digit int limit json.loads raises a plain ValueError: a 500 before.
        ("/v1/containers", b'{"id": "a", "image": "i", "resources": {"memory": ' + b"9" * 5000 + b"}}", 400,
         "not valid JSON"),
        ("/v1/containers", b'{"id": "a", "a": 1, "id": "b", "image": "i"}', 400, "duplicate key 'id'"),
        # A lone surrogate escape parses into a str no file or protobuf can encode (found by the fuzz suite).
        ("/v1/containers", b'{"id": "a", "image": "i", "labels": {"k": "\\ud800"}}', 400, "surrogate"),
        ("/v1/containers", b'{"id": "a", "image": "' + b"x" * (1 << 20) + b'"}', 413, "larger than"),
    ],
)
async def test_bodies_are_bounded(
    client: TestClient[Any, Any], agent: FakeAgent, path: str, raw: bytes, status: int, needle: str
) -> None:
    resp = await client.post(path, data=raw, headers={"Content-Type": "application/json"})
    code = "request_too_large" if status == 413 else "invalid_request"
    assert needle in await _error(resp, status, code)
    assert agent.containers.requests == []


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        # 2**63 does not fit the int64 in containerd's spec (nor SQLite); 1 PiB is the sane maximum.
        ("/v1/containers", {"id": "a", "image": "i", "resources": {"memory": 1 << 63}}, "body.resources.memory"),
        ("/v1/containers", {"id": "a", "image": "i", "resources": {"memory": (1 << 50) + 1}}, "body.resources.memory"),
        ("/v1/containers", {"id": "a", "image": "i", "resources": {"cpus": 1e300}}, "body.resources.cpus"),
        ("/v1/reservations", {"id": "r1", "capacity": {"memory_bytes": str((1 << 64) - 1)}, "expiresAt": 2e9},
         "body.capacity.memory_bytes"),
        ("/v1/reservations", {"id": "r1", "capacity": {"cpu_millis": 10**8}, "expiresAt": 2e9},
         "body.capacity.cpu_millis"),
        ("/v1/migrations", {"container": "a", "target": "b", "max_iterations": 1 << 64}, "body.max_iterations"),
    ],
)
async def test_integers_are_bounded(
    client: TestClient[Any, Any], agent: FakeAgent, path: str, body: dict[str, Any], needle: str
) -> None:
    _pulled(agent, "i")
    msg = await _error(await client.post(path, json=body), 400, "invalid_request")
    assert needle in msg
    assert agent.containers.requests == []


@pytest.mark.parametrize("number", [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999"])
async def test_non_finite_numbers_are_refused(client: TestClient[Any, Any], agent: FakeAgent, number: bytes) -> None:
    # Python's json takes NaN/Infinity literals and makes 1e999 inf; a NaN cpus passed `<= 0` (201).
    _pulled(agent, "i")
    raw = b'{"id": "a", "image": "i", "resources": {"cpus": ' + number + b"}}"
    resp = await client.post("/v1/containers", data=raw, headers={"Content-Type": "application/json"})
    assert "finite" in await _error(resp, 400, "invalid_request")
    assert agent.containers.requests == []


async def test_query_numbers_are_bounded(client: TestClient[Any, Any], agent: FakeAgent) -> None:
    image = _pulled(agent)
    await client.post("/v1/containers", json={"id": "q", "image": image})
    # A grace period of 1e300 s overflowed the event loop's timer; a tail of 10**30 lines is a typo.
    assert "timeout" in await _error(await client.post("/v1/containers/q/stop?timeout=1e300"), 400, "invalid_request")
    assert "tail" in await _error(await client.get("/v1/containers/q/logs?tail=" + "9" * 30), 400, "invalid_request")


async def test_query_validation(client: TestClient[Any, Any], agent: FakeAgent) -> None:
    image = _pulled(agent)
    await client.post("/v1/containers", json={"id": "q", "image": image})
    await _error(await client.post("/v1/containers/q/stop?timeout=soon"), 400, "invalid_request")
    await _error(await client.post("/v1/containers/q/stop?timeout=-1"), 400, "invalid_request")
    await _error(await client.post("/v1/containers/q/stop?timeout=nan"), 400, "invalid_request")
    await _error(await client.delete("/v1/containers/q?force=maybe"), 400, "invalid_request")
    await _error(await client.get("/v1/containers/q/logs?tail=1.5"), 400, "invalid_request")
    await _error(await client.post("/v1/containers?start=2", json={"id": "z", "image": image}), 400,
                 "invalid_request")
    await _error(await client.get("/v1/containers/bad..%0Aid"), 400, "invalid_request")


async def test_unexpected_error_is_generic_500(
    client: TestClient[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="core.http.errors"):
        msg = await _error(await client.get("/v1/containers/explode"), 500, "internal")
    assert "secret" not in msg
    records = [r for r in caplog.records if r.name == "core.http.errors"]
    assert records and records[0].exc_info is not None  # the traceback is logged, not returned


# ------------------------------------------------------------------ images


async def test_pull_blocking(client: TestClient[Any, Any]) -> None:
    resp = await client.post("/v1/images/pull", json={"ref": "registry.local/app:1"})
    assert resp.status == 200
    body = await resp.json()
    assert body["name"] == "registry.local/app:1"
    assert set(body) == {"name", "digest", "media_type", "size", "bytes_fetched", "layers_fetched", "bytes_from_peers"}


async def test_pull_blocking_error(client: TestClient[Any, Any]) -> None:
    resp = await client.post("/v1/images/pull", json={"ref": "missing/app:1"})
    await _error(resp, 404, "manifest_not_found")


async def _ndjson(resp: aiohttp.ClientResponse) -> list[dict[str, Any]]:
    assert resp.status == 200
    assert resp.content_type == "application/x-ndjson"
    lines = (await resp.read()).decode().splitlines()
    assert lines and all(line.strip() for line in lines)
    return [json.loads(line) for line in lines]


async def test_pull_stream(client: TestClient[Any, Any]) -> None:
    resp = await client.post("/v1/images/pull?stream=1", json={"ref": "registry.local/app:1"})
    lines = await _ndjson(resp)
    *progress, final = lines
    assert final["status"] == "done"
    assert final["image"]["name"] == "registry.local/app:1"
    assert len(progress) >= 2  # the fake pull takes ~0.3 s and lines come every 0.2 s
    for snap in progress:
        assert set(snap) == {"ref", "layers", "status", "error", "total", "done"}
    assert progress[-1]["done"] == progress[-1]["total"] == 160
    assert all(layer["status"] == "unpacked" for layer in progress[-1]["layers"])


async def test_pull_stream_by_accept_header(client: TestClient[Any, Any]) -> None:
    resp = await client.post("/v1/images/pull", json={"ref": "r/a:1"}, headers={"Accept": "application/x-ndjson"})
    assert (await _ndjson(resp))[-1]["status"] == "done"


async def test_pull_stream_failure(client: TestClient[Any, Any]) -> None:
    lines = await _ndjson(await client.post("/v1/images/pull?stream=1", json={"ref": "missing/app:1"}))
    assert lines[-1] == {
        "status": "failed",
        "error": {"code": "manifest_not_found", "message": "missing/app:1: manifest unknown"},
    }
    lines = await _ndjson(await client.post("/v1/images/pull?stream=1", json={"ref": "boom"}))
    assert lines[-1] == {"status": "failed", "error": {"code": "internal", "message": "internal server error"}}


async def test_pull_validation(client: TestClient[Any, Any]) -> None:
    for body in ({}, {"ref": ""}, {"ref": 3}, {"ref": "a", "platform": "x"}):
        await _error(await client.post("/v1/images/pull?stream=1", json=body), 400, "invalid_request")
    await _error(await client.post("/v1/images/pull", data=b"nope"), 400, "invalid_request")


async def test_pull_stream_disconnect_cancels_pull(client: TestClient[Any, Any], agent: FakeAgent) -> None:
    agent.images.step = 0.5  # long enough that the pull is still running when we hang up
    resp = await client.post("/v1/images/pull?stream=1", json={"ref": "r/slow:1"})
    assert json.loads(await resp.content.readline())["ref"] == "r/slow:1"
    resp.close()  # drop the connection mid-stream
    await asyncio.wait_for(agent.images.pull_cancelled.wait(), 5)


async def test_images_list_and_remove(client: TestClient[Any, Any], agent: FakeAgent) -> None:
    name = _pulled(agent, "registry.local:5000/team/app:1.2")
    other = _pulled(agent, "docker.io/library/alpine@sha256:" + "e" * 64)
    resp = await client.get("/v1/images")
    assert resp.status == 200
    assert sorted(i["name"] for i in (await resp.json())["images"]) == sorted([name, other])
    assert (await client.delete(f"/v1/images/{name}")).status == 204
    assert (await client.delete("/v1/images/docker.io%2Flibrary%2Falpine%40sha256%3A" + "e" * 64)).status == 204
    assert agent.images.removed == [name, other]
    await _error(await client.delete(f"/v1/images/{name}"), 404, "image_not_found")


# ------------------------------------------------------------------ logs


async def _running(client: TestClient[Any, Any], agent: FakeAgent, cid: str) -> Path:
    image = _pulled(agent)
    resp = await client.post("/v1/containers?start=1", json={"id": cid, "image": image})
    assert resp.status == 201
    return agent.containers.log_path(cid)


async def test_logs_tail(client: TestClient[Any, Any], agent: FakeAgent) -> None:
    path = await _running(client, agent, "l1")
    assert await (await client.get("/v1/containers/l1/logs")).read() == b""  # no file yet
    path.write_bytes(b"one\ntwo\nthree\nfour\n")
    resp = await client.get("/v1/containers/l1/logs")
    assert resp.status == 200 and resp.content_type == "text/plain"
    assert await resp.read() == b"one\ntwo\nthree\nfour\n"
    assert await (await client.get("/v1/containers/l1/logs?tail=2")).read() == b"three\nfour\n"
    assert await (await client.get("/v1/containers/l1/logs?tail=0")).read() == b""
    assert await (await client.get("/v1/containers/l1/logs?tail=99")).read() == b"one\ntwo\nthree\nfour\n"
    path.write_bytes(b"a\nb\npartial")
    assert await (await client.get("/v1/containers/l1/logs?tail=2")).read() == b"b\npartial"


async def test_logs_tail_large_file(client: TestClient[Any, Any], agent: FakeAgent) -> None:
    path = await _running(client, agent, "l2")
    lines = [f"line {i:06d} {'x' * 50}\n".encode() for i in range(5000)]  # > several read chunks
    path.write_bytes(b"".join(lines))
    assert await (await client.get("/v1/containers/l2/logs?tail=3000")).read() == b"".join(lines[-3000:])
    assert await (await client.get("/v1/containers/l2/logs")).read() == b"".join(lines)


async def test_logs_follow_until_stop(client: TestClient[Any, Any], agent: FakeAgent) -> None:
    path = await _running(client, agent, "l3")
    path.write_bytes(b"before\n")
    resp = await client.get("/v1/containers/l3/logs?follow=1")
    assert await resp.content.readline() == b"before\n"
    with path.open("ab") as fh:
        fh.write(b"after\n")
    assert await asyncio.wait_for(resp.content.readline(), 5) == b"after\n"
    with path.open("ab") as fh:
        fh.write(b"last words\n")
    await client.post("/v1/containers/l3/stop")
    # The stream ends by itself once the container has stopped, with nothing lost.
    rest = await asyncio.wait_for(resp.read(), 5)
    assert rest == b"last words\n"


async def test_logs_follow_stopped_container_ends(client: TestClient[Any, Any], agent: FakeAgent) -> None:
    path = await _running(client, agent, "l4")
    await client.post("/v1/containers/l4/stop")
    path.write_bytes(b"done\n")
    resp = await client.get("/v1/containers/l4/logs?follow=1&tail=5")
    assert await asyncio.wait_for(resp.read(), 5) == b"done\n"


# ------------------------------------------------------------------ health, metrics


async def test_healthz(client: TestClient[Any, Any], agent: FakeAgent) -> None:
    resp = await client.get("/healthz")
    assert resp.status == 200 and await resp.json() == {"status": "ok"}
    agent.containers.down = ContainerdUnavailable("containerd socket does not answer")
    resp = await client.get("/healthz")
    assert resp.status == 503
    body = await resp.json()
    assert body["status"] == "unavailable" and body["error"]["code"] == "containerd_unavailable"


async def test_metrics(client: TestClient[Any, Any], agent: FakeAgent) -> None:
    await _running(client, agent, "m1")
    await _running(client, agent, "m2")
    await client.post("/v1/containers/m2/stop")
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    text = await resp.text()
    for name in ("ferryman_containers", "ferryman_pulls", "ferryman_pull_bytes", "ferryman_pull_duration_seconds",
                 "ferryman_layer_duration_seconds"):
        assert f"# TYPE {name}" in text
    assert 'ferryman_containers{state="running"} 1.0' in text
    assert 'ferryman_containers{state="stopped"} 1.0' in text
    assert 'ferryman_containers{state="paused"} 0.0' in text
    # With containerd down the series go away instead of going stale; the scrape still succeeds.
    agent.containers.down = ContainerdUnavailable("down")
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert "ferryman_containers{" not in await resp.text()


# ------------------------------------------------------------------ openapi


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _app_routes(app: web.Application) -> set[tuple[str, str]]:
    out = set()
    for route in app.router.routes():
        if route.method == "HEAD":
            continue  # aiohttp adds HEAD next to every GET
        out.add((route.method.lower(), route.resource.canonical))  # type: ignore[union-attr]
    return out


async def test_openapi_served_and_matches_routes(client: TestClient[Any, Any], app: web.Application) -> None:
    resp = await client.get("/openapi.yaml")
    assert resp.status == 200
    doc = yaml.safe_load(await resp.text())
    assert doc == yaml.safe_load(OPENAPI_PATH.read_text())
    assert str(doc["openapi"]).startswith("3.0")
    assert doc["info"]["title"] and doc["info"]["version"]

    documented = {
        (method, path)
        for path, item in doc["paths"].items()
        for method in item
        if method in {"get", "post", "put", "delete", "patch"}
    }
    registered = _app_routes(app)
    assert registered - documented == set(), "routes missing from openapi.yaml"
    assert documented - registered == set(), "openapi.yaml documents routes the app does not have"

    for ref in set(_refs(doc)):
        assert _resolve(doc, ref) is not None, ref

    # Every path parameter in a route is declared, and every operation documents its errors with the schema.
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method not in {"get", "post", "put", "delete", "patch"}:
                continue
            params = [_resolve(doc, p["$ref"]) if "$ref" in p else p
                      for p in item.get("parameters", []) + op.get("parameters", [])]
            declared = {p["name"] for p in params if p["in"] == "path"}
            wanted = {seg[1:-1] for seg in path.split("/") if seg.startswith("{")}
            assert declared == wanted, (method, path)
            assert op.get("operationId"), (method, path)
            assert op["responses"], (method, path)
            if path.startswith("/v1/"):
                errors = [code for code in op["responses"] if code.startswith(("4", "5"))]
                assert errors, (method, path)
                for code in errors:
                    resp_obj = op["responses"][code]
                    resp_obj = _resolve(doc, resp_obj["$ref"]) if "$ref" in resp_obj else resp_obj
                    assert resp_obj["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/Error"
                    }


def test_openapi_request_schemas_match_validation() -> None:
    doc = yaml.safe_load(OPENAPI_PATH.read_text())
    create = doc["components"]["schemas"]["CreateContainerRequest"]
    assert set(create["properties"]) == {
        "id", "image", "args", "env", "workdir", "user", "labels", "resources", "service_ip", "publish_service",
        "restart_policy", "reservation", "health", "volumes",
    }
    assert create["additionalProperties"] is False
    assert set(doc["components"]["schemas"]["Resources"]["properties"]) == {"cpus", "memory"}
    policy = doc["components"]["schemas"]["RestartPolicy"]
    assert set(policy["properties"]) == {"name", "max_retries"} and policy["additionalProperties"] is False
    assert policy["properties"]["name"]["enum"] == [n.value for n in RestartName]
    assert set(doc["components"]["schemas"]["PullRequest"]["properties"]) == {"ref"}


# ------------------------------------------------------------------ serving on a unix socket


async def test_serve_unix_socket(short_dir: Path, agent: FakeAgent) -> None:
    sock_path = short_dir / "run" / "ferryman" / "agent.sock"  # parents do not exist yet
    server = await serve(build_app(agent), f"unix://{sock_path}")
    try:
        st = sock_path.stat()
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660
        async with (
            aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock_path))) as s,
            s.get("http://agent/healthz") as resp,
        ):
            assert resp.status == 200
        # A second agent must not steal a live socket.
        with pytest.raises(ConfigError, match="in use"):
            await serve(build_app(agent), f"unix://{sock_path}")
    finally:
        await server.close()
    assert not sock_path.exists()


async def test_serve_replaces_stale_socket(short_dir: Path, agent: FakeAgent) -> None:
    sock_path = short_dir / "agent.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_path))
    stale.close()  # a dead agent's leftover: the file stays, nobody listens
    assert sock_path.exists()
    server = await serve(build_app(agent), f"unix://{sock_path}")
    try:
        async with (
            aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock_path))) as s,
            s.get("http://agent/v1/containers") as resp,
        ):
            assert resp.status == 200
    finally:
        await server.close()


async def test_serve_refuses_non_socket(short_dir: Path, agent: FakeAgent) -> None:
    path = short_dir / "agent.sock"
    path.write_text("precious")
    with pytest.raises(ConfigError, match="not a socket"):
        await serve(build_app(agent), f"unix://{path}")
    assert path.read_text() == "precious"


async def test_serve_tcp_port_zero(agent: FakeAgent) -> None:
    server = await serve(build_app(agent), "tcp://127.0.0.1:0")
    try:
        assert server.url.startswith("tcp://127.0.0.1:") and not server.url.endswith(":0")
        port = server.url.rsplit(":", 1)[1]
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/healthz") as resp:
            assert resp.status == 200
    finally:
        await server.close()


@pytest.mark.parametrize("name", sorted(rawhttp.MALFORMED))
async def test_aiohttp_own_refusals_are_json(agent: FakeAgent, name: str) -> None:
    # aiohttp's HTTP parser answered these in text/plain before any middleware ran.
    server = await serve(build_app(agent), "tcp://127.0.0.1:0")
    try:
        host, port = server.url.removeprefix("tcp://").rsplit(":", 1)
        resp = await rawhttp.exchange(host, int(port), rawhttp.MALFORMED[name])
        await asyncio.sleep(0.1)  # the server's side of the connection sees our close and ends
    finally:
        await server.close()
    assert 400 <= resp.status < 500, (resp.status, resp.body)
    assert resp.headers["content-type"].startswith("application/json"), resp.body
    error = resp.json()["error"]
    assert set(error) == {"code", "message"} and error["code"] and error["message"]


async def test_shutdown_ends_follow_streams(short_dir: Path, agent: FakeAgent) -> None:
    app = build_app(agent)
    server = await serve(app, "tcp://127.0.0.1:0")
    port = server.url.rsplit(":", 1)[1]
    image = _pulled(agent)
    await agent.containers.create(CreateRequest(id="f", image=image))
    await agent.containers.start("f")
    agent.containers.log_path("f").write_bytes(b"x\n")
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/v1/containers/f/logs?follow=1") as r:
        assert await r.content.readline() == b"x\n"
        loop = asyncio.get_running_loop()
        started = loop.time()
        await server.close()
        # The follower noticed the shutdown; it did not hold the server for its grace period.
        assert loop.time() - started < 3
        with contextlib.suppress(aiohttp.ClientError):
            await r.read()


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("unix:///run/ferryman/agent.sock", UnixAddress("/run/ferryman/agent.sock")),
        ("tcp://127.0.0.1:7070", TcpAddress("127.0.0.1", 7070)),
        ("tcp://[::1]:7070", TcpAddress("::1", 7070)),
        ("tcp://localhost:0", TcpAddress("localhost", 0)),
    ],
)
def test_parse_listen(listen: str, expected: object) -> None:
    assert parse_listen(listen) == expected


@pytest.mark.parametrize(
    "listen", ["http://127.0.0.1:80", "tcp://127.0.0.1", "tcp://:80", "tcp://h:99999", "unix://", "/run/x.sock",
               "unix://relative/x.sock", "tcp://h:80/path"]
)
def test_parse_listen_rejects(listen: str) -> None:
    with pytest.raises(ConfigError):
        parse_listen(listen)


# ------------------------------------------------------------------ JSON logs


def test_json_log_formatter() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("ferryman.test.json")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    try:
        logger.info("pulled %s", "app:1", extra={"ref": "app:1", "bytes": 10, "path": Path("/x"), "level": "clash"})
        try:
            raise ValueError("bad")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["msg"] == "pulled app:1" and first["level"] == "INFO" and first["logger"] == "ferryman.test.json"
    assert first["ref"] == "app:1" and first["bytes"] == 10 and first["path"] == "/x"
    assert first["extra_level"] == "clash"  # an extra cannot overwrite a standard field
    assert first["ts"].endswith("Z") and "T" in first["ts"]
    assert second["level"] == "ERROR" and "ValueError: bad" in second["exc"]
    assert os.linesep not in stream.getvalue().splitlines()[0]
