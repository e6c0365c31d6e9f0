"""A mesh whose agents can migrate to each other: a fleet CA, host certificates, peers and work dirs."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import secrets
import shutil
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from agent.security.pki import init_ca, issue_host
from tests.harness.mesh import Mesh, MeshHost
from tests.harness.workloads import MemhogStatus, bundle_rootfs, memhog_image

PEER_PORT = 7443
HTTP_PORT = 8080


def fleet_config(mesh: Mesh, host: MeshHost, idle_timeout: float) -> str:
    """TLS files, peers and the [migration] table; `host.settings["migration"]` overrides its keys."""
    pki = mesh.dir / "pki" / host.name
    migration: dict[str, object] = {
        "work_dir": f"/dev/shm/ferryman-{mesh.prefix}-{host.name}",
        "idle_timeout": idle_timeout,
        "decision_timeout": 60.0,
        "mode": "precopy",  # the default for tests written before post-copy; they pass mode= to change it
        **host.settings.get("migration", {}),
    }
    migration_toml = "".join(f"{k} = {json.dumps(v)}\n" for k, v in migration.items())
    peers = "".join(
        f'\n[[peers]]\nname = "{h.name}"\naddress = "{h.address}:{PEER_PORT}"\n' for h in mesh.hosts if h is not host
    )
    return (
        f'\n[tls]\nca_file = "{pki / "ca.pem"}"\ncert_file = "{pki / "host.pem"}"\n'
        f'key_file = "{pki / "host-key.pem"}"\n'
        f"\n[migration]\n{migration_toml}" + peers
    )


def issue_fleet_certs(mesh_dir: Path, hosts: list[tuple[str, str]]) -> None:
    ca = mesh_dir / "pki" / "ca"
    init_ca(ca)
    for name, address in hosts:
        issue_host(ca, name, mesh_dir / "pki" / name, addresses=[address])


@asynccontextmanager
async def fleet(base: Path, hosts: int = 2, idle_timeout: float = 10.0, **mesh_kw: Any) -> AsyncIterator[Mesh]:
    """A started mesh whose agents listen for peers over mTLS on <address>:7443."""
    mesh = Mesh(
        base / f"fleet-{secrets.token_hex(2)}",
        hosts,
        peer_port=PEER_PORT,
        start_agents=False,
        agent_extra_config=lambda h: fleet_config(mesh, h, idle_timeout),
        **mesh_kw,
    )
    try:
        await mesh.start()
        issue_fleet_certs(mesh.dir, [(h.name, h.address) for h in mesh.hosts])
        await asyncio.gather(*(h.start_agent() for h in mesh.hosts))
        yield mesh
    finally:
        # Deleting through the agents also removes the containers' network namespaces (/run/netns).
        for host in mesh.hosts:
            if host.agent_running:
                with contextlib.suppress(Exception):
                    for c in (await api(host, "GET", "/v1/containers"))["containers"]:
                        await api(host, "DELETE", f"/v1/containers/{c['id']}?force=1", expect=None)
        await mesh.stop()
        for host in mesh.hosts:  # the tmpfs work dirs live outside the mesh dir
            shutil.rmtree(f"/dev/shm/ferryman-{mesh.prefix}-{host.name}", ignore_errors=True)


async def api(host: MeshHost, method: str, path: str, body: Any = None, expect: int | None = 200) -> Any:
    async with host.session() as http, http.request(method, path, json=body) as resp:
        data = await resp.json() if resp.content_type == "application/json" else await resp.text()
        if expect is not None and resp.status != expect:
            raise AssertionError(f"{method} {path} on {host.name}: {resp.status} {data}")
        return data


async def migrate(source: MeshHost, container: str, target: str, **options: Any) -> dict[str, Any]:
    """Start a migration through the source's API and follow it to its end; returns the final record."""
    body = {"container": container, "target": target, **options}
    last: dict[str, Any] = {}
    async with source.session() as http, http.post("/v1/migrations?stream=1", json=body) as resp:
        if resp.status != 200 and resp.status != 202:
            raise AssertionError(f"migrate on {source.name}: {resp.status} {await resp.text()}")
        async for line in resp.content:
            if line.strip():
                last = json.loads(line)
    return last


async def run_memhog(
    host: MeshHost,
    mesh: Mesh,
    name: str,
    resident_mib: int = 16,
    rewrite_mbps: float = 1,
    service_ip: str | None = None,
    labels: dict[str, str] | None = None,
) -> str:
    """memhog on `host`; with a service address it also serves HTTP there (see memhog_image)."""
    repo = f"test/memhog-{secrets.token_hex(3)}"
    image = memhog_image(resident_mib, rewrite_mbps, http_port=HTTP_PORT if service_ip else None)
    await image.build().push(mesh.push_host, repo, "v1")
    ref = f"{mesh.registry_host}/{repo}:v1"
    await api(host, "POST", "/v1/images/pull", {"ref": ref})
    body: dict[str, Any] = {"id": name, "image": ref}
    if service_ip:
        body["service_ip"] = service_ip
    if labels:
        body["labels"] = labels
    await api(host, "POST", "/v1/containers?start=1", body, expect=201)
    return ref


async def memhog_status(host: MeshHost, name: str, within: float = 10.0) -> MemhogStatus:
    path = bundle_rootfs(host.containerd.state, host.containerd.namespace, name) / "tmp" / "status"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        try:
            return MemhogStatus.parse(path.read_text())
        except (OSError, KeyError, ValueError):
            await asyncio.sleep(0.05)
    raise AssertionError(f"no memhog status on {host.name} at {path}")


async def verify_memory(host: MeshHost, name: str, within: float = 20.0) -> str:
    """Ask memhog to check every page against its generation; returns "ok" or "corrupt:<page>"."""
    rootfs = bundle_rootfs(host.containerd.state, host.containerd.namespace, name)
    (rootfs / "tmp" / "status.verify").write_text("1")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        status = await memhog_status(host, name)
        if status.verified != "none" and not (rootfs / "tmp" / "status.verify").exists():
            return status.verified
        await asyncio.sleep(0.1)
    raise AssertionError(f"memhog on {host.name} never verified its memory")


def task_states(host: MeshHost) -> dict[str, str]:
    out = host.ctr("tasks", "ls").stdout.splitlines()[1:]
    return {line.split()[0]: line.split()[-1] for line in out if line.strip()}


def http_get(host: str, timeout: float) -> bool:
    conn = http.client.HTTPConnection(host, HTTP_PORT, timeout=timeout)
    try:
        conn.request("GET", "/")
        return conn.getresponse().read().strip() == b"served"
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def probe(host: str, stop: threading.Event, samples: list[tuple[float, bool]]) -> None:
    """The client: a request every few ms (each with a short timeout) until told to stop, 60 s at most."""
    started = time.monotonic()
    while not stop.is_set() and time.monotonic() - started < 60:
        ok = http_get(host, 0.2)
        samples.append((time.monotonic(), ok))
        time.sleep(0.005)


def longest_outage(samples: list[tuple[float, bool]]) -> float:
    """Seconds between the last success before a failure run and the first success after it."""
    worst, last_ok = 0.0, None
    for stamp, ok in samples:
        if ok:
            if last_ok is not None:
                worst = max(worst, stamp - last_ok)
            last_ok = stamp
    return worst
