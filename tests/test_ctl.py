"""ferryctl against a real API server on a unix socket, backed by in-test fake services.

The fakes mimic only the service interfaces (API-shape tests); end-to-end runs against a real
containerd come from the lead. ferryctl's `main()` calls asyncio.run, so it runs in a worker thread
while the server runs on the test's loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.api import ApiServer, build_app, serve
from agent.ctl.args import memory_size
from agent.ctl.main import main
from agent.errors import ImageNotFound, RegistryAuthError
from agent.metrics import AgentMetrics
from agent.model import (
    ContainerState,
    ContainerSummary,
    CreateRequest,
    ImageSummary,
    LayerProgress,
    PullProgress,
)
from core.errors import ContainerNotFound


class FakeImages:
    def __init__(self) -> None:
        self.images: dict[str, ImageSummary] = {}
        self.removed: list[str] = []

    async def pull(self, ref: str, progress: PullProgress | None = None) -> ImageSummary:
        progress = progress if progress is not None else PullProgress(ref=ref)
        if ref.startswith("private/"):
            raise RegistryAuthError(f"{ref}: the registry refused our credentials")
        progress.status = "fetching"
        progress.layers = [LayerProgress("sha256:" + "a" * 64, 1000), LayerProgress("sha256:" + "b" * 64, 10, 10,
                                                                                    "exists")]
        for _ in range(3):
            await asyncio.sleep(0.1)
            progress.layers[0].done += 250
        progress.layers[0].done, progress.status = 1000, "done"
        self.images[ref] = ImageSummary(ref, "sha256:" + "c" * 64, "application/json", 2048, 1000, 1)
        return self.images[ref]

    async def import_archive(self, body: AsyncIterator[bytes], name: str | None = None) -> list[ImageSummary]:
        """The archive's bytes become the image's "digest" (the real thing: tests/test_image_archives.py)."""
        data = b"".join([chunk async for chunk in body])
        name = name or "archive:1"
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.images[name] = ImageSummary(name, digest, "application/json", len(data))
        return [self.images[name]]

    async def export(self, name: str) -> tuple[int, AsyncIterator[bytes]]:
        if name not in self.images:
            raise ImageNotFound(f"image {name} is not pulled on this host")
        data = f"archive of {name}\n".encode()

        async def body() -> AsyncIterator[bytes]:
            yield data

        return len(data), body()

    async def list(self) -> list[ImageSummary]:
        return list(self.images.values())

    async def remove(self, name: str) -> None:
        if name not in self.images:
            raise ImageNotFound(f"image {name} is not pulled on this host")
        del self.images[name]
        self.removed.append(name)


class FakeContainers:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.items: dict[str, ContainerSummary] = {}
        self.requests: list[CreateRequest] = []

    def add(self, cid: str, state: ContainerState) -> None:
        self.items[cid] = ContainerSummary(cid, "app:1", state, 7 if state == ContainerState.RUNNING else None,
                                           None, {}, "2024-01-01T00:00:00Z")

    def _get(self, cid: str) -> ContainerSummary:
        if cid not in self.items:
            raise ContainerNotFound(f"no container {cid}")
        return self.items[cid]

    async def create(self, req: CreateRequest) -> ContainerSummary:
        self.requests.append(req)
        self.add(req.id, ContainerState.CREATED)
        return self.items[req.id]

    async def start(self, container_id: str) -> ContainerSummary:
        self._get(container_id)
        self.add(container_id, ContainerState.RUNNING)
        return self.items[container_id]

    async def stop(self, container_id: str, timeout: float | None = None) -> ContainerSummary:  # noqa: ASYNC109
        self._get(container_id)
        self.add(container_id, ContainerState.STOPPED)
        return self.items[container_id]

    async def delete(self, container_id: str, force: bool = False) -> None:
        self._get(container_id)
        del self.items[container_id]

    async def list(self) -> list[ContainerSummary]:
        return list(self.items.values())

    async def inspect(self, container_id: str) -> dict[str, Any]:
        return {"id": self._get(container_id).id}

    def log_path(self, container_id: str) -> Path:
        return self.log_dir / f"{container_id}.log"


class FakeAgent:
    def __init__(self, log_dir: Path) -> None:
        self.metrics = AgentMetrics()
        self.images = FakeImages()
        self.containers = FakeContainers(log_dir)


@pytest.fixture
def agent(short_dir: Path) -> FakeAgent:
    return FakeAgent(short_dir)


@pytest.fixture
async def server(agent: FakeAgent, short_dir: Path) -> AsyncIterator[ApiServer]:
    srv = await serve(build_app(agent), f"unix://{short_dir}/agent.sock")
    yield srv
    await srv.close()


async def ctl(server: ApiServer, *argv: str) -> int:
    return await asyncio.to_thread(main, ["--agent", server.url, *argv])


async def test_json_ps(server: ApiServer, agent: FakeAgent, capsys: pytest.CaptureFixture[str]) -> None:
    agent.containers.add("web", ContainerState.RUNNING)
    agent.containers.add("old", ContainerState.STOPPED)
    assert await ctl(server, "--json", "ps", "-a") == 0
    out = json.loads(capsys.readouterr().out)
    assert sorted(c["id"] for c in out["containers"]) == ["old", "web"]
    assert await ctl(server, "--json", "ps") == 0  # running only without -a
    assert [c["id"] for c in json.loads(capsys.readouterr().out)["containers"]] == ["web"]


async def test_human_ps_and_images(server: ApiServer, agent: FakeAgent, capsys: pytest.CaptureFixture[str]) -> None:
    agent.containers.add("web", ContainerState.RUNNING)
    agent.images.images["registry.local/app:1"] = ImageSummary("registry.local/app:1", "sha256:" + "f" * 64,
                                                               "application/json", 5 << 20)
    assert await ctl(server, "ps") == 0
    out = capsys.readouterr().out
    assert "ID" in out and "web" in out and "running" in out
    assert await ctl(server, "images") == 0
    out = capsys.readouterr().out
    assert "registry.local/app:1" in out and "ffffffffffff" in out and "5.0 MiB" in out


async def test_error_exit_and_message(server: ApiServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert await ctl(server, "stop", "ghost") == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "error: container_not_found: no container ghost\n"
    # the API's id check, made before anything is sent
    assert await ctl(server, "rm", "-f", "bad/../id") == 2
    assert "invalid container id 'bad/../id'" in capsys.readouterr().err


async def test_unreachable_agent(short_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = await asyncio.to_thread(main, ["--agent", f"unix://{short_dir}/none.sock", "ps"])
    assert code == 6  # no answer, told apart from a refusal (1)
    assert capsys.readouterr().err.startswith("error: agent_unreachable: cannot talk to the agent at unix://")


async def test_env_var_address(
    server: ApiServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FERRYMAN_AGENT", server.url)
    assert await asyncio.to_thread(main, ["--json", "ps", "-a"]) == 0
    assert json.loads(capsys.readouterr().out) == {"containers": []}


async def test_run(server: ApiServer, agent: FakeAgent, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--json", "run", "--name", "web-1", "--env", "A=1", "-e", "B=x=y", "--label", "team=infra",
            "--cpus", "0.5", "--memory", "64M", "app:1", "sh", "-c", "echo hi", "--flag"]
    assert await ctl(server, *argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["id"] == "web-1" and out["state"] == "running"
    req = agent.containers.requests[0]
    assert req.args == ("sh", "-c", "echo hi", "--flag")
    assert req.env == {"A": "1", "B": "x=y"} and req.labels == {"team": "infra"}
    assert req.resources.cpus == 0.5 and req.resources.memory == 64 << 20


async def test_run_generates_id(server: ApiServer, agent: FakeAgent, capsys: pytest.CaptureFixture[str]) -> None:
    assert await ctl(server, "run", "registry.local:5000/team/app:1.2") == 0
    cid = capsys.readouterr().out.strip()
    assert cid.startswith("app-") and cid in agent.containers.items


async def test_run_bad_pair(server: ApiServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert await ctl(server, "run", "--env", "NOVALUE", "app:1") == 2
    assert "KEY=VALUE" in capsys.readouterr().err


async def test_pull(server: ApiServer, agent: FakeAgent, capsys: pytest.CaptureFixture[str]) -> None:
    assert await ctl(server, "--json", "pull", "registry.local/app:1") == 0
    assert json.loads(capsys.readouterr().out)["name"] == "registry.local/app:1"
    assert await ctl(server, "pull", "registry.local/app:2") == 0  # progress bars on stderr
    assert capsys.readouterr().out.startswith("pulled registry.local/app:2 sha256:")


async def test_pull_failure(server: ApiServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert await ctl(server, "pull", "private/app:1") == 1
    assert capsys.readouterr().err.endswith(
        "error: registry_auth_failed: private/app:1: the registry refused our credentials\n"
    )


async def test_stop_rm_rmi_logs(server: ApiServer, agent: FakeAgent, capsys: pytest.CaptureFixture[str]) -> None:
    agent.containers.add("web", ContainerState.RUNNING)
    agent.containers.log_path("web").write_bytes(b"one\ntwo\nthree\n")
    assert await ctl(server, "logs", "--tail", "2", "web") == 0
    assert capsys.readouterr().out == "two\nthree\n"
    assert await ctl(server, "stop", "--timeout", "1", "web") == 0
    assert capsys.readouterr().out.strip() == "web stopped"
    assert await ctl(server, "rm", "web") == 0
    assert agent.containers.items == {}
    agent.images.images["registry.local:5000/team/app:1.2"] = ImageSummary("x", "sha256:0", "m", 1)
    assert await ctl(server, "rmi", "registry.local:5000/team/app:1.2") == 0
    assert agent.images.removed == ["registry.local:5000/team/app:1.2"]


@pytest.mark.parametrize(("text", "expected"), [("512", 512), ("64M", 64 << 20), ("1.5g", 3 << 29),
                                                ("64MiB", 64 << 20), ("2k", 2048)])
def test_parse_memory(text: str, expected: int) -> None:
    assert memory_size(text) == expected


def test_usage_error_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--memory", "lots", "app:1"]) == 2
    assert "invalid memory size" in capsys.readouterr().err
