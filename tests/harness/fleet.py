"""A mesh whose agents can migrate to each other: a fleet CA, host certificates, peers and work dirs."""

from __future__ import annotations

import asyncio
import http.client
import json
import secrets
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.checkpoint.criuconf import MASKED_DIRS
from core.security.pki import HostCertPaths, init_ca, issue_client, issue_host
from tests.harness.coordinator import COORDINATOR_NAME, CoordinatorPki, CoordinatorProcess, new_token
from tests.harness.mesh import AGENT_NAMESPACE, Mesh, MeshHost
from tests.harness.netns import acall_in_netns
from tests.harness.workloads import MemhogStatus, bundle_rootfs, memhog_image

PEER_PORT = 7443
BLOB_PORT = 7445
HTTP_PORT = 8080


def fleet_config(mesh: Mesh, host: MeshHost, idle_timeout: float) -> str:
    """TLS files, peers and the [migration] table; `host.settings["migration"]` overrides its keys and
    `host.settings["capacity"]` adds a [capacity] table. The migration mode is the production default
    (`auto`): a test about one mode passes `mode=` with its migration."""
    pki = mesh.dir / "pki" / host.name
    migration: dict[str, object] = {
        "work_dir": str(mesh.tmpfs_dir / host.name),
        "idle_timeout": idle_timeout,
        "decision_timeout": 60.0,
        **host.settings.get("migration", {}),
    }
    migration_toml = "".join(f"{k} = {json.dumps(v)}\n" for k, v in migration.items())
    capacity_keys = host.settings.get("capacity") or {}
    capacity = "".join(f"{k} = {json.dumps(v)}\n" for k, v in capacity_keys.items())
    capacity = f"\n[capacity]\n{capacity}" if capacity else ""
    peers = "".join(
        f'\n[[peers]]\nname = "{h.name}"\naddress = "{h.address}:{PEER_PORT}"\n'
        + (
            f'blobs = "{h.address}:{BLOB_PORT}"\n'
            if "sharing" in h.settings and host.settings.get("blob_peers", True)
            else ""
        )
        for h in mesh.hosts
        if h is not host
    )
    return (
        f'\n[tls]\nca_file = "{pki / "ca.pem"}"\ncert_file = "{pki / "host.pem"}"\n'
        f'key_file = "{pki / "host-key.pem"}"\n'
        f"\n[migration]\n{migration_toml}" + peers + capacity + sharing_config(host)
    )


def sharing_config(host: MeshHost) -> str:
    """A [sharing] table when `host.settings["sharing"]` is set (its keys override): the host serves
    its blobs on <address>:BLOB_PORT, and its peers list that address (fleet_config's [[peers]])."""
    if "sharing" not in host.settings:
        return ""
    keys = {"listen": f"{host.address}:{BLOB_PORT}", **host.settings["sharing"]}
    return "\n[sharing]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())


def issue_fleet_certs(mesh_dir: Path, hosts: list[tuple[str, str]]) -> None:
    ca = mesh_dir / "pki" / "ca"
    init_ca(ca)
    for name, address in hosts:
        issue_host(ca, name, mesh_dir / "pki" / name, addresses=[address])


class OpsListeningHost(MeshHost):
    """A mesh host whose agent also serves its API to ops certificates on <address>:<ops_port> (tls_listen)."""

    def __init__(self, mesh: Mesh, index: int, ops_port: int) -> None:
        super().__init__(mesh, index)
        self.ops_port = ops_port

    def agent_config_text(self) -> str:
        # The mesh writes the [api] table itself; tls_listen joins it there.
        text = super().agent_config_text()
        return text.replace("\n[api]\n", f'\n[api]\ntls_listen = "{self.address}:{self.ops_port}"\n', 1)


@asynccontextmanager
async def fleet(
    base: Path,
    hosts: int = 2,
    idle_timeout: float = 10.0,
    *,
    extra_config: Callable[[MeshHost], str] | None = None,
    ops_port: int | None = None,
    before_agents: Callable[[Mesh], Awaitable[None]] | None = None,
    agent_within: float = 30.0,
    **mesh_kw: Any,
) -> AsyncIterator[Mesh]:
    """A started mesh whose agents listen for peers over mTLS on <address>:7443.

    `extra_config(host)` adds TOML tables to each agent's config, `ops_port` gives every agent an ops
    listener (`[api] tls_listen`) on that port, and `before_agents(mesh)` runs once the fleet
    certificates exist, before any agent starts (e.g. to start a coordinator). `agent_within`: how long
    an agent may take to answer its health check (an emulated VM needs minutes).
    """
    mesh = Mesh(
        base,
        hosts,
        peer_port=PEER_PORT,
        start_agents=False,
        agent_extra_config=lambda h: fleet_config(mesh, h, idle_timeout) + (extra_config(h) if extra_config else ""),
        **mesh_kw,
    )
    if ops_port is not None:
        mesh.hosts = [OpsListeningHost(mesh, h.index, ops_port) for h in mesh.hosts]
    try:
        await mesh.start()
        issue_fleet_certs(mesh.dir, [(h.name, h.address) for h in mesh.hosts])
        if before_agents is not None:
            await before_agents(mesh)
        await asyncio.gather(*(h.start_agent(agent_within) for h in mesh.hosts))
        yield mesh
    except Exception:
        mesh.report_logs()
        raise
    finally:
        # Also the containers' network namespaces and the tmpfs work dirs: the mesh owns both.
        await mesh.stop()


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
    processes: int = 1,
    fork_every_ms: int = 0,
    restart_policy: dict[str, Any] | None = None,
) -> str:
    """memhog on `host`; with a service address it also serves HTTP there (see memhog_image)."""
    repo = f"test/memhog-{secrets.token_hex(3)}"
    http_port = HTTP_PORT if service_ip else None
    image = memhog_image(
        resident_mib, rewrite_mbps, http_port=http_port, processes=processes, fork_every_ms=fork_every_ms
    )
    await image.build().push(mesh.push_host, repo, "v1")
    ref = f"{mesh.registry_host}/{repo}:v1"
    await api(host, "POST", "/v1/images/pull", {"ref": ref})
    body: dict[str, Any] = {"id": name, "image": ref}
    if service_ip:
        body["service_ip"] = service_ip
    if labels:
        body["labels"] = labels
    if restart_policy:
        body["restart_policy"] = restart_policy
    await api(host, "POST", "/v1/containers?start=1", body, expect=201)
    # memhog writes its first status once every page is filled: from then on its resident size is the
    # one asked for (a migration's admission and page counts depend on it; first touches are slow here).
    await memhog_status(host, name, within=60)
    return ref


async def memhog_status(host: MeshHost, name: str, within: float = 10.0, status: str = "status") -> MemhogStatus:
    path = bundle_rootfs(host.containerd.state, host.containerd.namespace, name) / "tmp" / status
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        try:
            return MemhogStatus.parse(path.read_text())
        except (OSError, KeyError, ValueError):
            await asyncio.sleep(0.05)
    raise AssertionError(f"no memhog status on {host.name} at {path}")


async def verify_memory(host: MeshHost, name: str, within: float = 20.0, status_file: str = "status") -> str:
    """Ask memhog to check every page against its generation; returns "ok" or "corrupt:<page>"."""
    rootfs = bundle_rootfs(host.containerd.state, host.containerd.namespace, name)
    (rootfs / "tmp" / f"{status_file}.verify").write_text("1")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        status = await memhog_status(host, name, status=status_file)
        if status.verified != "none" and not (rootfs / "tmp" / f"{status_file}.verify").exists():
            return status.verified
        await asyncio.sleep(0.1)
    raise AssertionError(f"memhog on {host.name} never verified its memory")


def memhog_gaps(host: MeshHost, name: str, status: str = "status") -> list[tuple[int, int]]:
    """memhog's pauses of 5 ms or more: (realtime µs the pause ended, its length in µs), oldest first."""
    path = bundle_rootfs(host.containerd.state, host.containerd.namespace, name) / "tmp" / f"{status}.gaps"
    try:
        text = path.read_text()
    except OSError:
        return []
    return [(int(end), int(gap)) for end, gap in (line.split() for line in text.splitlines() if line.strip())]


def task_states(host: MeshHost) -> dict[str, str]:
    out = host.ctr("tasks", "ls").stdout.splitlines()[1:]
    return {line.split()[0]: line.split()[-1] for line in out if line.strip()}


def task_pid(host: MeshHost, container: str) -> str:
    """The host pid of the container's init, as `ctr tasks ls` shows it."""
    tasks = dict(line.split()[:2] for line in host.ctr("tasks", "ls").stdout.splitlines()[1:] if line.strip())
    return tasks[container]


def task_cgroups(host: MeshHost, container: str) -> dict[str, str]:
    """Controller -> cgroup of the container's init, as the kernel reports it (cgroup v1 or v2)."""
    groups: dict[str, str] = {}
    for line in Path(f"/proc/{task_pid(host, container)}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") or [""]:
            groups[controller] = path
    return groups


def masked_dirs(host: MeshHost, container: str) -> dict[str, tuple[bool, list[str]]]:
    """Mount point -> (read-only, entries) for the masked directories in the container's init."""
    pid = task_pid(host, container)
    found = {}
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        mountpoint, options = fields[4], fields[5].split(",")
        if mountpoint in MASKED_DIRS:
            entries = sorted(e.name for e in Path(f"/proc/{pid}/root{mountpoint}").iterdir())
            found[mountpoint] = ("ro" in options, entries)
    return found


def assert_masked(host: MeshHost, container: str) -> None:
    """Every directory runc masks on this host is masked in the container: empty and read-only."""
    expected = {path: (True, []) for path in MASKED_DIRS if Path(path).is_dir()}
    assert expected, "this host has none of the masked directories: the check would check nothing"
    assert masked_dirs(host, container) == expected


def expected_cgroup(host: MeshHost, container: str) -> str:
    """Where the agent puts a container: <cgroup_parent>/<namespace>/<id>."""
    return f"{host.containerd.cgroup_parent}/{AGENT_NAMESPACE}/{container}"


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


# ----- a fleet with a coordinator ---------------------------------------------------------------------

COORDINATOR_PORT = 7543
OPS_PORT = 7444
FERRYCTL = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "ferryctl"


class MeshCoordinatorPki(CoordinatorPki):
    """The coordinator's certificates from the mesh's own fleet CA (the agents' CA), for its fabric address."""

    def __init__(self, mesh: Mesh) -> None:  # no super().__init__: that would make a second CA
        self.root = mesh.dir / "pki"
        self.ca_dir = self.root / "ca"
        # 127.0.0.1 too: the root namespace reaches it through a loopback relay (tests/harness/localfleet.py).
        addresses = [mesh.gateway, "127.0.0.1"]
        self.server = issue_host(self.ca_dir, COORDINATOR_NAME, self.root / COORDINATOR_NAME, addresses)
        self.ops_client = issue_client(self.ca_dir, "coordinator-ops", self.root / "coordinator-ops")
        self._issued = {}


@dataclass
class CoordinatedFleet:
    """A mesh whose agents register with, and push telemetry to, a coordinator in the fabric netns."""

    mesh: Mesh
    coordinator: CoordinatorProcess
    pki: CoordinatorPki
    token: str

    @property
    def operator(self) -> HostCertPaths:
        return self.pki.operator("alice")

    def notice_file(self, host: MeshHost, kind: str = "drain") -> Path:
        """The file whose appearance the agent's sampler reports (kind: drain, maintenance, preempt)."""
        return host.dir / f"{kind}-notice"

    async def call(self, method: str, path: str, body: Any = None, expect: int | None = 200) -> Any:
        """One ops request to the coordinator, made from inside the fabric netns (never from the root one)."""
        status, data = await acall_in_netns(self.mesh.fabric.netns, self._call_blocking, method, path, body)
        if expect is not None and status != expect:
            raise AssertionError(f"{method} {path}: {status} {data}")
        return data

    def _call_blocking(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        # The coordinator's certificate carries its fabric address: the name check applies as usual.
        ctx = self.pki.client_ssl(self.operator)
        conn = http.client.HTTPSConnection(self.coordinator.host, self.coordinator.port, timeout=30, context=ctx)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            if raw and (resp.getheader("Content-Type") or "").startswith("application/json"):
                return resp.status, json.loads(raw)
            return resp.status, raw.decode(errors="replace")
        finally:
            conn.close()

    async def ferryctl(self, *args: str, within: float = 120.0, auth: str = "cert") -> subprocess.CompletedProcess[str]:
        """`ferryctl --coordinator ...` run in the fabric netns, as an operator certificate or the token."""
        if auth == "cert":
            creds = ["--cert", str(self.operator.cert_file), "--key", str(self.operator.key_file)]
        else:
            creds = ["--token", self.token]
        argv = [
            str(FERRYCTL),
            "--coordinator",
            self.coordinator.url,
            "--ca",
            str(self.pki.server.ca_file),
            *creds,
            *args,
        ]
        return await self.mesh.aexec_in(self.mesh.fabric, argv, within=within)

    async def host(self, name: str) -> dict[str, Any]:
        return dict(await self.call("GET", f"/v1/hosts/{name}"))

    async def wait_for(
        self, what: str, check: Callable[[], Awaitable[Any]], within: float = 30.0, period: float = 0.3
    ) -> Any:
        """Poll `check` until it returns something truthy; AssertionError naming `what` after `within` s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            value = await check()
            if value:
                return value
            if loop.time() >= deadline:
                raise AssertionError(f"{what}: not within {within:g}s\n{self.coordinator.logs()[-3000:]}")
            await asyncio.sleep(period)


def coordinator_agent_config(mesh: Mesh, host: MeshHost, telemetry_period: float) -> str:
    """The agent's [coordinator], [telemetry] and [capacity] tables for a coordinated fleet."""
    files = {k: str(host.dir / f"{k}-notice") for k in ("drain", "maintenance", "preempt")}
    return (
        f'\n[coordinator]\nurl = "https://{mesh.gateway}:{COORDINATOR_PORT}"\nserver_name = "{COORDINATOR_NAME}"\n'
        f"request_timeout = 5.0\n"
        f"\n[telemetry]\nperiod = {telemetry_period}\n"
        f'drain_notice_file = "{files["drain"]}"\nmaintenance_file = "{files["maintenance"]}"\n'
        f'preemption_file = "{files["preempt"]}"\n'
        "\n[capacity]\ncpu_millis = 4000\nmemory_bytes = 2147483648\ndisk_bytes = 10737418240\n"
    )


@asynccontextmanager
async def coordinated_fleet(
    base: Path,
    hosts: int = 3,
    *,
    coordinator: Mapping[str, Mapping[str, Any] | Any] | None = None,
    coordinator_for: Callable[[Mesh], Mapping[str, Mapping[str, Any]]] | None = None,
    telemetry_period: float = 0.5,
    sharing: Mapping[str, Any] | None = None,
    idle_timeout: float = 10.0,
    **mesh_kw: Any,
) -> AsyncIterator[CoordinatedFleet]:
    """A fleet of `hosts` agents and a coordinator in the fabric netns, everything over mTLS.

    The coordinator gets short heartbeat, tick and poll periods (override any key with `coordinator`);
    `coordinator_for(mesh)` adds tables that depend on the mesh (its subnet, its fabric namespace),
    called once the mesh exists, before the coordinator starts. Agents get a [coordinator] table,
    fast telemetry and an ops listener. Waits until every host has
    registered and pushed telemetry. `sharing`: every agent serves its blobs with these [sharing]
    keys and lists no peer's blob address: peers are found through the coordinator's layer tracker.
    `mesh_kw` go to the Mesh (e.g. with_client).
    """
    token = new_token()
    holder: dict[str, CoordinatedFleet] = {}

    async def start_coordinator(mesh: Mesh) -> None:
        if sharing is not None:
            for host in mesh.hosts:
                host.settings["sharing"] = dict(sharing)
                host.settings["blob_peers"] = False
        pki = MeshCoordinatorPki(mesh)
        workdir = mesh.dir / "coordinator"
        workdir.mkdir()
        overrides: dict[str, Any] = {
            "heartbeat": {"suspect_after": 3.0, "down_after": 6.0, "check_period": 0.5},
            "model": {"tick_period": 1.0},
            "migrations": {"poll_period": 0.3, "timeout": 120.0},
            "reservations": {"sweep_period": 1.0},
            "agents": {"request_timeout": 10.0},
        }
        more = dict(coordinator or {})
        for key, value in (coordinator_for(mesh) if coordinator_for else {}).items():
            more[key] = {**more.get(key, {}), **value}
        for key, value in more.items():
            overrides[key] = {**overrides.get(key, {}), **value} if isinstance(value, Mapping) else value
        proc = CoordinatorProcess(
            workdir,
            pki,
            host=mesh.gateway,
            port=COORDINATOR_PORT,
            netns=mesh.fabric.netns,
            tokens=(token,),
            overrides=overrides,
        )
        await proc.start()
        holder["fleet"] = CoordinatedFleet(mesh, proc, pki, token)

    try:
        async with fleet(
            base,
            hosts,
            idle_timeout,
            extra_config=lambda h: coordinator_agent_config(h.mesh, h, telemetry_period),
            ops_port=OPS_PORT,
            before_agents=start_coordinator,
            **mesh_kw,
        ) as mesh:
            f = holder["fleet"]

            async def all_registered() -> bool:
                hosts_now = (await f.call("GET", "/v1/hosts"))["hosts"]
                return len(hosts_now) == len(mesh.hosts) and all(
                    h["state"] == "ready" and h["api_url"] for h in hosts_now
                )

            await f.wait_for("every agent registered", all_registered, within=30)
            try:
                yield f
            finally:
                await f.coordinator.stop()
    finally:
        if "fleet" in holder:
            await holder["fleet"].coordinator.stop()  # a no-op when already stopped
