"""The installed `ferryman-agent` daemon and `ferryctl`, end to end on real containerd and a real registry."""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from tests.harness.containerd import PrivateContainerd
from tests.harness.images import build_test_image
from tests.harness.registry import DockerRegistry

BIN = Path(sys.executable).parent


@dataclass
class Daemon:
    proc: asyncio.subprocess.Process
    socket: Path
    namespace: str
    log: Path

    @property
    def address(self) -> str:
        return f"unix://{self.socket}"

    async def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = await asyncio.create_subprocess_exec(
            str(BIN / "ferryctl"),
            "--agent",
            self.address,
            *args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        res = subprocess.CompletedProcess(args, proc.returncode or 0, out.decode(), err.decode())
        if check and res.returncode != 0:
            raise AssertionError(f"ferryctl {' '.join(args)} failed: {res.stderr}")
        return res

    def session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(self.socket)))


@pytest.fixture
async def daemon(containerd: PrivateContainerd, registry: DockerRegistry, workdir: Path) -> AsyncIterator[Daemon]:
    namespace = f"e2e-{secrets.token_hex(3)}"
    socket = workdir / "agent.sock"
    config = workdir / "agent.toml"
    config.write_text(
        f'host_name = "e2e"\nstate_dir = "{workdir / "state"}"\n'
        f'[containerd]\nsocket = "{containerd.socket}"\nnamespace = "{namespace}"\n'
        f'runc_root = "{containerd.runc_root}"\n'
        f'[api]\nlisten = "unix://{socket}"\n'
        f'[runtime]\nlog_dir = "{workdir / "logs"}"\ncgroup_parent = "{containerd.cgroup_parent}"\n'
        "stop_timeout = 2.0\n"
        f'[[registries]]\nhost = "{registry.host}"\nplain_http = true\n'
    )
    log = workdir / "agent.log"
    with log.open("wb") as sink:
        proc = await asyncio.create_subprocess_exec(
            str(BIN / "ferryman-agent"), "--config", str(config), stdout=sink, stderr=sink
        )
    d = Daemon(proc, socket, namespace, log)
    try:
        for _ in range(200):
            if socket.exists():
                break
            if proc.returncode is not None:
                raise AssertionError(f"agent exited: {log.read_text()}")
            await asyncio.sleep(0.05)
        yield d
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 30)
        for line in containerd.ctr("containers", "ls", "-q", namespace=namespace).stdout.split():
            containerd.ctr("tasks", "kill", "-s", "KILL", line, namespace=namespace, check=False)
            containerd.ctr("tasks", "rm", "-f", line, namespace=namespace, check=False)
            containerd.ctr("containers", "rm", line, namespace=namespace, check=False)


async def pushed_image(registry: DockerRegistry) -> str:
    """The busybox test image under a new name in the registry; its reference."""
    name = f"test/e2e-{secrets.token_hex(3)}"
    await build_test_image().build().push(registry.host, name, "v1")
    return f"{registry.host}/{name}:v1"


async def test_pull_run_ps_logs_stop_rm_through_ferryctl(
    daemon: Daemon, containerd: PrivateContainerd, registry: DockerRegistry
) -> None:
    ref = await pushed_image(registry)

    pulled = json.loads((await daemon.ctl("--json", "pull", ref)).stdout)
    assert pulled["name"] == ref and pulled["layers_fetched"] == 4
    assert ref in containerd.ctr("images", "ls", "-q", namespace=daemon.namespace).stdout

    await daemon.ctl("run", "--name", "web", "--env", "WHO=ops", ref, "/bin/sh", "-c", "echo hello $WHO; sleep 300")
    ps = json.loads((await daemon.ctl("--json", "ps")).stdout)
    containers = ps["containers"] if isinstance(ps, dict) else ps
    [web] = [c for c in containers if c["id"] == "web"]
    assert web["state"] == "running" and web["pid"] > 0
    human = (await daemon.ctl("ps")).stdout
    assert "web" in human and "running" in human

    for _ in range(100):
        logs = (await daemon.ctl("logs", "web")).stdout
        if "hello ops" in logs:
            break
        await asyncio.sleep(0.05)
    assert "hello ops" in logs

    await daemon.ctl("stop", "--timeout", "1", "web")
    ps = json.loads((await daemon.ctl("--json", "ps", "-a")).stdout)
    containers = ps["containers"] if isinstance(ps, dict) else ps
    assert [c["state"] for c in containers if c["id"] == "web"] == ["stopped"]
    await daemon.ctl("rm", "web")
    assert "web" not in containerd.ctr("containers", "ls", "-q", namespace=daemon.namespace).stdout
    assert "web" not in containerd.ctr("snapshots", "ls", namespace=daemon.namespace).stdout


async def test_api_errors_progress_and_metrics(daemon: Daemon, registry: DockerRegistry) -> None:
    ref = await pushed_image(registry)
    async with daemon.session() as http:
        async with http.post("http://agent/v1/images/pull?stream=1", json={"ref": ref}) as resp:
            assert resp.status == 200
            lines = [json.loads(line) async for line in resp.content if line.strip()]
        assert lines[-1]["status"] == "done"
        assert lines[-1]["image"]["name"] == ref

        async with http.get("http://agent/v1/containers/nope") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["code"] == "container_not_found"
        async with http.post("http://agent/v1/containers", json={"id": "x", "image": 5}) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["code"] == "invalid_request"
        async with http.post("http://agent/v1/images/pull", json={"ref": ref.removesuffix(":v1") + ":missing"}) as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["code"] == "manifest_not_found"
        async with http.get("http://agent/healthz") as resp:
            assert resp.status == 200
        async with http.get("http://agent/metrics") as resp:
            text = await resp.text()
        assert "ferryman_pull_bytes_total" in text and 'ferryman_pulls_total{result="ok"} 1.0' in text

    bad = await daemon.ctl("rm", "nope", check=False)
    assert bad.returncode == 1 and "container_not_found" in bad.stderr


async def test_sigterm_leaves_containers_running(
    daemon: Daemon, containerd: PrivateContainerd, registry: DockerRegistry
) -> None:
    ref = await pushed_image(registry)
    await daemon.ctl("pull", ref)
    await daemon.ctl("run", "--name", "survivor", ref, "/bin/sleep", "300")
    daemon.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(daemon.proc.wait(), 30) == 0
    assert "RUNNING" in containerd.ctr("tasks", "ls", namespace=daemon.namespace).stdout
    assert '"msg"' in daemon.log.read_text()  # structured JSON logs


async def test_restart_policy_through_ferryctl(
    daemon: Daemon, containerd: PrivateContainerd, registry: DockerRegistry
) -> None:
    ref = await pushed_image(registry)
    await daemon.ctl("pull", ref)

    bad = await daemon.ctl("run", "--name", "bad", "--restart", "on-failure:0", ref, check=False)
    assert bad.returncode == 2 and "body.restart_policy.max_retries" in bad.stderr, bad
    assert "bad" not in containerd.ctr("containers", "ls", "-q", namespace=daemon.namespace).stdout

    await daemon.ctl("run", "--name", "flaky", "--restart", "on-failure:2", ref, "/bin/sh", "-c", "exit 1")
    for _ in range(300):
        info = json.loads((await daemon.ctl("inspect", "flaky")).stdout)
        if info["state"] == "stopped" and info["restart"]["count"] == 2:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)  # longer than a third restart's backoff (0.4 s)
    info = json.loads((await daemon.ctl("inspect", "flaky")).stdout)
    assert (info["state"], info["exit_status"]) == ("stopped", 1)
    assert info["restart"]["policy"] == {"name": "on-failure", "max_retries": 2}
    assert (info["restart"]["count"], info["restart"]["last_exit_status"]) == (2, 1)
    [listed] = json.loads((await daemon.ctl("--json", "ps", "-a")).stdout)["containers"]
    assert (listed["restart_policy"]["name"], listed["restart_count"]) == ("on-failure", 2)


async def test_health_check_through_ferryctl(
    daemon: Daemon, containerd: PrivateContainerd, registry: DockerRegistry
) -> None:
    ref = await pushed_image(registry)
    await daemon.ctl("pull", ref)

    bad = await daemon.ctl("run", "--name", "bad", "--health-tcp", "0", ref, check=False)
    assert bad.returncode == 2 and "body.health.tcp.port: expected a positive integer" in bad.stderr, bad
    assert "bad" not in containerd.ctr("containers", "ls", "-q", namespace=daemon.namespace).stdout

    await daemon.ctl(
        "run", "--name", "checked", "--health-cmd", "test -f /tmp/ok", "--health-interval", "100ms",
        ref, "/bin/sh", "-c", "touch /tmp/ok; exec sleep 300",
    )  # fmt: skip
    for _ in range(200):
        info = json.loads((await daemon.ctl("inspect", "checked")).stdout)
        if info["health"]["status"] == "healthy":
            break
        await asyncio.sleep(0.05)
    assert info["health"]["status"] == "healthy", info["health"]
    assert info["health"]["check"]["exec"] == {"command": ["/bin/sh", "-c", "test -f /tmp/ok"]}
    async with daemon.session() as http, http.get("http://agent/metrics") as resp:
        assert 'ferryman_health_containers{status="healthy"} 1.0' in await resp.text()
