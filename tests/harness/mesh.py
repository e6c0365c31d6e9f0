"""An N-host "fleet" on one machine: one network namespace per host, wired to a bridge, each with its
own containerd and ferryman agent, plus one registry every host can pull from.

Layout (id = 4 random hex digits, prefix = "fm<id>"; every name below starts with the prefix):

    netns <prefix>-fab   bridge <prefix>-br = 10.A.B.1/24, docker-registry on 10.A.B.1:5000
    netns <prefix>-hN    eth0 = 10.A.B.(10+N), default route via .1; containerd + agent run here
    netns <prefix>-cl    eth0 = 10.A.B.250 (optional client)
    netns <prefix>-rc    eth0 = 192.168.250.2/30, default via 192.168.250.1 on the fabric (optional
                         routed client: another subnet, a router between it and the hosts)
    veth  eth0 (in hN) <-> <prefix>-hN (in fab, a bridge port)

Nothing is added to the root namespace's network: the veths are created directly inside the
namespaces, and the only root-namespace listener is a second docker-registry on 127.0.0.1 that
shares the fabric registry's storage, so the test process can push over loopback
(`push_host`) what the hosts then pull from `registry_host`.

Agents are configured by TOML (see MeshHost.agent_config_text): their containerd, dirs, the mesh
registry as plain HTTP, the API on a unix socket in the host dir, `peer_listen = <address>:<peer_port>`
when the mesh has a peer_port, plus whatever the `agent_extra_config` hook returns.

Everything a mesh makes is named after it or lives in its dir, so that teardown and `cleanup_stale()`
find all of it: the containers' network namespaces are bound in <dir>/hN/netns (the agents' [network]
netns_dir), not in the machine's /run/netns, and tmpfs scratch (migration work dirs) goes to
/dev/shm/ferryman-<prefix> (`Mesh.tmpfs_dir`).

Only network namespaces are entered (nsenter --net): mounts made by the hosts' containerds stay in
the root mount namespace, where teardown (and the tests) can see them.

A crashed run leaves namespaces and daemons behind; `cleanup_stale()` removes those whose owner is
gone. Ownership is a flock on /run/ferryman-mesh/<prefix>.json held by the process running the mesh.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from tests.harness import netns as nsh
from tests.harness.containerd import SHIM_NAME, PrivateContainerd, unmount_under
from tests.harness.registry import DockerRegistry, free_port

PREFIX_RE = re.compile(r"^fm[0-9a-f]{4}-")
STATE_DIR = Path("/run/ferryman-mesh")
REGISTRY_PORT = 5000
CLIENT_OCTET = 250
MAX_HOSTS = 99
AGENT_BIN = Path(sys.executable).parent / "ferryman-agent"
AGENT_NAMESPACE = "ferryman"

AgentExtraConfig = Callable[["MeshHost"], str]


class Node:
    """A network namespace of the mesh with one address on the fabric."""

    def __init__(self, name: str, netns: str, address: str) -> None:
        self.name = name
        self.netns = netns
        self.address = address

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.address} netns={self.netns}>"

    def exec(
        self, argv: Sequence[str], *, check: bool = False, timeout: float = 30, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside this node's network namespace (blocking)."""
        return nsh.run(argv, netns=self.netns, check=check, timeout=timeout, input=input)

    async def aexec(
        self, argv: Sequence[str], *, check: bool = False, within: float = 30, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return await nsh.arun(argv, netns=self.netns, check=check, within=within, input=input)


def _toml_str(value: str) -> str:
    # JSON string escapes are valid TOML basic-string escapes.
    return json.dumps(value)


def _split_toml(text: str) -> tuple[str, str]:
    """(top-level key lines, the rest from the first table header on)."""
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.lstrip().startswith("["):
            return "".join(lines[:i]), "".join(lines[i:])
    return text, ""


def _ensure_nl(text: str) -> str:
    return text if not text or text.endswith("\n") else text + "\n"


class MeshHost(Node):
    """One host of the mesh: a netns with a private containerd and (optionally running) agent."""

    def __init__(self, mesh: Mesh, index: int) -> None:
        name = f"h{index}"
        super().__init__(name, f"{mesh.prefix}-{name}", str(mesh.subnet.network_address + 10 + index))
        self.mesh = mesh
        self.index = index
        self.fabric_link = f"{mesh.prefix}-{name}"
        """The bridge-side end of this host's veth (in the fabric netns); link_down sets it down."""
        self.dir = mesh.dir / name
        self.containerd = PrivateContainerd(self.dir / "containerd", AGENT_NAMESPACE, netns=self.netns)
        self.agent_config_path = self.dir / "agent.toml"
        self.api_socket = self.dir / "agent.sock"
        self.agent_log = self.dir / "agent.log"
        self.agent_state_dir = self.dir / "agent-state"
        self.netns_dir = self.dir / "netns"
        """Where the agent binds its containers' network namespaces ([network] netns_dir)."""
        self.container_log_dir = self.dir / "logs"
        self.agent_proc: subprocess.Popen[bytes] | None = None
        self.agent_env: dict[str, str] = {}
        """Extra environment for the agent process (e.g. FERRYMAN_FAILPOINTS), applied at its next start."""
        self.settings: dict[str, Any] = {}
        """Free-form per-host settings for config hooks (see tests/harness/fleet.py)."""

    @property
    def peer_address(self) -> str | None:
        """host:port where this host's agent listens for peers (mesh peer_port), or None."""
        return f"{self.address}:{self.mesh.peer_port}" if self.mesh.peer_port is not None else None

    # ----- agent config --------------------------------------------------------------------------

    def agent_config_text(self) -> str:
        """The agent's TOML: this host's containerd and dirs, the mesh registry, plus the extra hook's text.

        The hook's text may hold top-level keys and tables; its top-level keys are placed before our
        first table so they stay top-level. It must not repeat a table defined here ([containerd],
        [api], [pull], [runtime], [network]); [api] gets peer_listen = <address>:<peer_port> when the mesh has a
        peer_port.
        """
        ctrd = self.containerd
        top = f"host_name = {_toml_str(self.name)}\nstate_dir = {_toml_str(str(self.agent_state_dir))}\n"
        api = f"listen = {_toml_str(f'unix://{self.api_socket}')}\n"
        if self.peer_address is not None:
            api += f"peer_listen = {_toml_str(self.peer_address)}\n"
        tables = (
            "\n[containerd]\n"
            f"socket = {_toml_str(ctrd.socket)}\n"
            f"namespace = {_toml_str(AGENT_NAMESPACE)}\n"
            f"runc_root = {_toml_str(str(ctrd.runc_root))}\n"
            f"content_root = {_toml_str(str(ctrd.root / 'io.containerd.content.v1.content'))}\n"
            f"\n[api]\n{api}"
            "\n[pull]\n"
            "read_timeout = 10.0\n"
            "retries = 2\n"
            "\n[runtime]\n"
            f"log_dir = {_toml_str(str(self.container_log_dir))}\n"
            f"cgroup_parent = {_toml_str(ctrd.cgroup_parent)}\n"
            "stop_timeout = 2.0\n"
            "\n[network]\n"
            f"netns_dir = {_toml_str(str(self.netns_dir))}\n"
            "\n[[registries]]\n"
            f"host = {_toml_str(self.mesh.registry_host)}\n"
            "plain_http = true\n"
        )
        extra = self.mesh.agent_extra_config(self) if self.mesh.agent_extra_config else ""
        extra_top, extra_tables = _split_toml(extra)
        text = top + _ensure_nl(extra_top) + tables + ("\n" + _ensure_nl(extra_tables) if extra_tables else "")
        try:
            tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"agent config for {self.name} is not valid TOML ({exc}):\n{text}") from exc
        return text

    def write_agent_config(self) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.agent_config_path.write_text(self.agent_config_text())
        return self.agent_config_path

    # ----- agent lifecycle -----------------------------------------------------------------------

    @property
    def agent_running(self) -> bool:
        return self.agent_proc is not None and self.agent_proc.poll() is None

    def log_events(self, message: str) -> list[dict[str, Any]]:
        """The agent's log records with this message (the agent logs JSON lines)."""
        events = []
        for line in self.agent_log.read_text(errors="replace").splitlines():
            if f'"{message}"' in line:
                try:
                    events.append(json.loads(line))
                except ValueError:
                    continue
        return events

    def agent_log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.agent_log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def start_agent(self, within: float = 30.0) -> None:
        """(Re)write the config and start `ferryman-agent` in this host's netns; wait for /healthz."""
        if self.agent_running:
            raise RuntimeError(f"agent on {self.name} already running")
        self.agent_proc = None
        if not os.access(AGENT_BIN, os.X_OK):
            raise RuntimeError(f"{AGENT_BIN} not found: install the package into the venv")
        self.write_agent_config()
        # A killed agent leaves its socket: the health probe below must not talk to a dead file.
        self.api_socket.unlink(missing_ok=True)
        argv = [*nsh.nsenter_argv(self.netns), str(AGENT_BIN), "--config", str(self.agent_config_path)]
        with self.agent_log.open("ab") as log:
            # Popen (not asyncio's) keeps the process usable from sync code and other event loops.
            self.agent_proc = await asyncio.to_thread(
                subprocess.Popen,
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C meant for the test/CLI must not kill it before teardown
                env={**os.environ, **self.agent_env, "FERRYMAN_TEST_HARNESS": "1"},
            )
        try:
            await self._wait_agent_ready(within)
        except BaseException:
            await self.stop_agent(within=5)
            raise

    async def _wait_agent_ready(self, within: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        async with self.session() as session:
            while loop.time() < deadline:
                if self.agent_proc is None or self.agent_proc.poll() is not None:
                    raise RuntimeError(f"agent on {self.name} exited: see {self.agent_log}\n{self.agent_log_tail()}")
                if await self._healthy(session):
                    return
                await asyncio.sleep(0.05)
        raise RuntimeError(f"agent on {self.name} not healthy within {within}s\n{self.agent_log_tail()}")

    async def _healthy(self, session: aiohttp.ClientSession) -> bool:
        if not self.api_socket.exists():
            return False
        try:
            async with session.get("/healthz", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                if resp.status != 200:
                    return False
        except (aiohttp.ClientError, OSError, TimeoutError):
            return False
        # With a peer port the agent is only useful to the fleet once peers can connect to it.
        if self.mesh.peer_port is not None:
            return await nsh.can_connect(self.netns, self.address, self.mesh.peer_port, within=1.0)
        return True

    async def stop_agent(self, within: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after `within` seconds; returns the exit code (None if none was running)."""
        proc, self.agent_proc = self.agent_proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)  # in case a test froze it with SIGSTOP
                proc.terminate()
            try:
                await asyncio.to_thread(proc.wait, within)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait, 10)
        return proc.returncode

    async def kill_agent(self, sig: int = signal.SIGKILL, *, wait: bool = True, within: float = 10.0) -> int | None:
        """Send `sig` to the agent; with `wait`, wait for it to exit and forget it (returns the exit code).

        Use wait=False for signals that do not end it (SIGSTOP, SIGHUP...).
        """
        proc = self.agent_proc
        if proc is None or proc.poll() is not None:
            self.agent_proc = None
            return proc.returncode if proc is not None else None
        proc.send_signal(sig)
        if not wait:
            return None
        await asyncio.to_thread(proc.wait, within)
        self.agent_proc = None
        return proc.returncode

    async def restart_agent(self, within: float = 30.0) -> None:
        await self.stop_agent()
        await self.start_agent(within)

    async def configure(self, key: str, value: Any) -> None:
        """`settings[key] = value` (e.g. the [sharing] table), restarting the agent if that changed it."""
        if self.settings.get(key) != value:
            self.settings[key] = value
            await self.restart_agent()

    # ----- clients -------------------------------------------------------------------------------

    def session(self, **kw: Any) -> aiohttp.ClientSession:
        """An aiohttp session to this host's agent API; use relative URLs ("/v1/images")."""
        return aiohttp.ClientSession(
            base_url="http://agent", connector=aiohttp.UnixConnector(path=str(self.api_socket)), **kw
        )

    def ctr(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        """`ctr` against this host's containerd, run in its netns (namespace "ferryman" by default)."""
        return self.containerd.ctr(*args, **kw)

    async def actr(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return await self.containerd.actr(*args, **kw)

    async def forget_image(self, ref: str, digests: Sequence[str]) -> None:
        """Image `ref` and blobs `digests` gone from this host's containerd: the next pull is cold."""
        await self.actr("images", "rm", "--sync", ref)
        held = set((await self.actr("content", "ls", "-q")).stdout.split())
        left = [d for d in digests if d in held]
        if left:
            await self.actr("content", "rm", *left)


async def _concurrently(*coros: Coroutine[Any, Any, Any]) -> None:
    """Run all; on the first failure cancel the rest (each start cleans up after itself) and raise it.

    The first error is raised as itself (callers and tests match on its type); the whole group,
    with any others, is its __cause__.
    """
    try:
        async with asyncio.TaskGroup() as group:
            for coro in coros:
                group.create_task(coro)
    except BaseExceptionGroup as eg:
        raise eg.exceptions[0] from eg


def _live_subnets() -> set[str]:
    subnets: set[str] = set()
    for path in STATE_DIR.glob("fm*.json"):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            subnets.add(json.loads(path.read_text()).get("subnet", ""))
    return subnets


def _pick_id() -> str:
    taken = {name[:6] for name in nsh.list_netns() if PREFIX_RE.match(name)}
    for _ in range(100):
        mesh_id = secrets.token_hex(2)
        if f"fm{mesh_id}" not in taken and not (STATE_DIR / f"fm{mesh_id}.json").exists():
            return mesh_id
    raise RuntimeError("no free mesh id")


def _pick_subnet() -> ipaddress.IPv4Network:
    # Mesh subnets never meet (each lives only inside its own namespaces), so a clash would be
    # harmless; avoiding live ones just keeps logs and captures unambiguous.
    taken = _live_subnets()
    for _ in range(100):
        net = ipaddress.IPv4Network(f"10.{random.randint(210, 250)}.{random.randint(0, 255)}.0/24")
        if str(net) not in taken:
            return net
    raise RuntimeError("no free 10.x subnet")


ROUTED_CLIENT_ADDRESS = "192.168.250.2"
ROUTED_CLIENT_GATEWAY = "192.168.250.1"


class Mesh:
    """N hosts (+ optional client) on a private bridge; see the module docstring for the layout."""

    def __init__(
        self,
        base_dir: Path,
        hosts: int,
        *,
        with_client: bool = False,
        with_routed_client: bool = False,
        start_agents: bool = True,
        agent_extra_config: AgentExtraConfig | None = None,
        peer_port: int | None = None,
        keep_dir: bool = False,
        label: str = "",
    ) -> None:
        if not 1 <= hosts <= MAX_HOSTS:
            raise ValueError(f"hosts must be 1..{MAX_HOSTS}, got {hosts}")
        self.id = _pick_id()
        self.prefix = f"fm{self.id}"
        self.dir = Path(os.path.realpath(base_dir)) / self.prefix
        self.subnet = _pick_subnet()
        self.gateway = str(self.subnet.network_address + 1)
        self.start_agents = start_agents
        self.agent_extra_config = agent_extra_config
        self.peer_port = peer_port
        """When set, each agent gets [api] peer_listen = <its address>:<peer_port>, and start_agent
        also waits until that port accepts connections."""
        self.keep_dir = keep_dir
        self.label = label
        """Who runs the mesh, recorded in its state file (`scripts/mesh up` finds its own meshes by it)."""
        self.tmpfs_dir = Path("/dev/shm") / f"ferryman-{self.prefix}"
        """Scratch on tmpfs for the hosts (e.g. migration work dirs), removed with the mesh."""
        self.bridge = f"{self.prefix}-br"
        self.fabric = Node("fabric", f"{self.prefix}-fab", self.gateway)
        self.registry_host = f"{self.gateway}:{REGISTRY_PORT}"
        """What hosts pull from (an address inside the fabric)."""
        self.push_port = free_port()
        self.push_host = f"127.0.0.1:{self.push_port}"
        """Where the test process pushes (same storage as registry_host)."""
        self.hosts = [MeshHost(self, i) for i in range(1, hosts + 1)]
        self.client: Node | None = None
        if with_client:
            self.client = Node("client", f"{self.prefix}-cl", str(self.subnet.network_address + CLIENT_OCTET))
        self.routed_client: Node | None = None
        if with_routed_client:
            self.routed_client = Node("routed-client", f"{self.prefix}-rc", ROUTED_CLIENT_ADDRESS)
        self.registry = DockerRegistry(
            self.dir / "registry" / "fabric", self.gateway, port=REGISTRY_PORT, netns=self.fabric.netns
        )
        self.push_registry = DockerRegistry(self.dir / "registry" / "push", "127.0.0.1", port=self.push_port)
        self.netns_inodes: dict[str, int] = {}
        """Inode of each namespace, recorded at start: identifies its processes even after the name is gone."""
        self._state_path = STATE_DIR / f"{self.prefix}.json"
        self._lock_fd: int | None = None
        self._claimed = False
        """True from a successful claim of the id until stop(): only then are names with our prefix ours."""
        self._started = False
        self._made_dir = False

    # ----- lookup --------------------------------------------------------------------------------

    @property
    def nodes(self) -> list[Node]:
        """Every namespace with an address: the hosts, the client, the fabric."""
        clients = [c for c in (self.client, self.routed_client) if c is not None]
        return [*self.hosts, *clients, self.fabric]

    def netns_names(self) -> list[str]:
        return [node.netns for node in self.nodes]

    def __getitem__(self, name: str) -> MeshHost:
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(name)

    def node(self, target: Node | str) -> Node:
        """A node from itself, its name ("h1", "client", "fabric") or its netns name."""
        if isinstance(target, Node):
            return target
        for node in self.nodes:
            if target in (node.name, node.netns):
                return node
        raise KeyError(f"no node {target!r} in mesh {self.prefix}")

    def image_ref(self, repository: str, tag: str) -> str:
        """The reference the hosts pull by."""
        return f"{self.registry_host}/{repository}:{tag}"

    # ----- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            raise RuntimeError(f"mesh {self.prefix} already started")
        self._started = True
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        for binary in ("ip", "nsenter"):
            if shutil.which(binary) is None:
                raise RuntimeError(f"{binary} not found: run scripts/setup-host")
        self._claim()
        self.dir.mkdir(parents=True)
        self._made_dir = True
        await self._create_network()
        storage = self.dir / "registry" / "storage"
        storage.mkdir(parents=True)
        for reg in (self.registry, self.push_registry):
            # Two registry processes, one storage: the filesystem driver keeps no state in memory
            # unless a blob-descriptor cache is configured, which DockerRegistry does not do.
            reg.workdir.mkdir(parents=True)
            (reg.workdir / "storage").symlink_to(storage)
        await _concurrently(
            self.registry.start(), self.push_registry.start(), *(h.containerd.start() for h in self.hosts)
        )
        if self.start_agents:
            await _concurrently(*(h.start_agent() for h in self.hosts))

    def _claim(self) -> None:
        """Record the mesh in /run/ferryman-mesh under a flock that lives as long as this process."""
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        state = {
            "id": self.id,
            "pid": os.getpid(),
            "label": self.label,
            "dir": str(self.dir),
            "tmpfs_dir": str(self.tmpfs_dir),
            "subnet": str(self.subnet),
            "netns": self.netns_names(),
            "containerds": [
                {"workdir": str(h.containerd.workdir), "cgroup_parent": h.containerd.cgroup_parent} for h in self.hosts
            ],
        }
        # Lock a temp file first, then link it into place: cleanup_stale must never see the final
        # name unlocked while this process is alive.
        tmp = STATE_DIR / f".{self.prefix}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, json.dumps(state).encode())
            os.link(tmp, self._state_path)  # FileExistsError: another mesh took this id meanwhile
        except BaseException:
            os.close(fd)
            raise
        finally:
            tmp.unlink(missing_ok=True)
        self._lock_fd = fd
        self._claimed = True

    def _release(self, keep_state: bool) -> None:
        if self._lock_fd is None:
            return
        if not keep_state:
            # Unlink while still locked, so no cleanup_stale ever sees our file unlocked.
            self._state_path.unlink(missing_ok=True)
        # With keep_state, the now unlocked file hands what is left over to cleanup_stale().
        os.close(self._lock_fd)
        self._lock_fd = None

    async def _create_network(self) -> None:
        names = self.netns_names()
        await nsh.aip_batch(f"netns add {name}" for name in names)
        for name in names:
            inode = nsh.netns_inode(name)
            if inode is None:
                raise RuntimeError(f"netns {name} was not created")
            self.netns_inodes[name] = inode
        # No IPv6 on the new links (lo keeps ::1): no DAD waits, no router solicitations on the fabric.
        await asyncio.gather(
            *(asyncio.to_thread(nsh.set_sysctls, n, {"net.ipv6.conf.default.disable_ipv6": "1"}) for n in names)
        )
        prefixlen = self.subnet.prefixlen
        fabric = [
            "link set lo up",
            f"link add {self.bridge} type bridge forward_delay 0",
            f"addr add {self.gateway}/{prefixlen} dev {self.bridge}",
            f"link set {self.bridge} up",
        ]
        members: list[tuple[Node, str]] = [(h, h.fabric_link) for h in self.hosts]
        if self.client is not None:
            members.append((self.client, f"{self.prefix}-cl"))
        for node, link in members:
            # Created inside the namespaces: no interface ever appears in the root namespace.
            fabric += [
                f"link add {link} type veth peer name eth0 netns {node.netns}",
                f"link set {link} master {self.bridge} up",
            ]
        if self.routed_client is not None:
            # A router between the hosts' subnet and the client's: the fabric forwards between them.
            fabric += [
                f"link add {self.routed_client.netns} type veth peer name eth0 netns {self.routed_client.netns}",
                f"addr add {ROUTED_CLIENT_GATEWAY}/30 dev {self.routed_client.netns}",
                f"link set {self.routed_client.netns} up",
            ]
            await asyncio.to_thread(nsh.set_sysctls, self.fabric.netns, {"net.ipv4.ip_forward": "1"})
        await nsh.aip_batch(fabric, netns=self.fabric.netns)
        if self.routed_client is not None:
            await nsh.aip_batch(
                [
                    "link set lo up",
                    f"addr add {ROUTED_CLIENT_ADDRESS}/30 dev eth0",
                    "link set eth0 up",
                    f"route add default via {ROUTED_CLIENT_GATEWAY}",
                ],
                netns=self.routed_client.netns,
            )
        await asyncio.gather(
            *(
                nsh.aip_batch(
                    [
                        "link set lo up",
                        f"addr add {node.address}/{prefixlen} dev eth0",
                        "link set eth0 up",
                        f"route add default via {self.gateway}",
                    ],
                    netns=node.netns,
                )
                for node, _ in members
            )
        )

    async def stop(self) -> None:
        """Tear everything down in order; safe after a failed start and when called again.

        Every step runs even when an earlier one failed; the first error is raised at the end.
        """
        if not self._claimed:
            return  # nothing was created (or a previous stop finished): the prefix may be someone else's now
        errors: list[BaseException] = []

        async def step(*coros: Coroutine[Any, Any, Any]) -> None:
            results = await asyncio.gather(*coros, return_exceptions=True)
            errors.extend(r for r in results if isinstance(r, BaseException))

        await step(*(h.stop_agent() for h in self.hosts))
        await step(*(h.containerd.stop() for h in self.hosts))
        await step(self.registry.stop(), self.push_registry.stop())
        await step(asyncio.to_thread(self._kill_leftovers))
        await step(self._delete_network())
        await step(asyncio.to_thread(self._remove_dir))
        self._release(keep_state=bool(errors))
        self._claimed = False
        if errors:
            raise errors[0]

    def leftover_pids(self) -> list[int]:
        """Processes still inside one of this mesh's namespaces (also once the names are deleted)."""
        return nsh.pids_in_netns(self.netns_inodes.values())

    def _kill_leftovers(self) -> None:
        # Whatever outlived its owner's stop (e.g. a process started with exec_in that never ended).
        _kill_and_wait(self.leftover_pids())

    async def _delete_network(self) -> None:
        existing = set(nsh.list_netns())
        if self.fabric.netns in existing:
            links = [h.fabric_link for h in self.hosts] + ([f"{self.prefix}-cl"] if self.client else [])
            links += [self.routed_client.netns] if self.routed_client else []
            await nsh.aip_batch((f"link del {name}" for name in [*links, self.bridge]), self.fabric.netns, check=False)
        for name in self.netns_names():
            if name in existing:
                await nsh.aip("netns", "del", name, check=False)

    def _remove_dir(self) -> None:
        if not self._made_dir:
            return
        # Never rmtree through a mount; this also unbinds the containers' network namespaces.
        unmount_under(self.dir)
        shutil.rmtree(self.tmpfs_dir, ignore_errors=True)
        if not self.keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    async def __aenter__(self) -> Mesh:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None and exc_type is not asyncio.CancelledError:
            self.report_logs()
        await self.stop()

    def report_logs(self) -> None:
        """The agents' warnings, errors and last lines on stderr, before a failing test's mesh (and
        its directory) goes: pytest shows them with the failure."""
        sys.stderr.write("".join(agent_log_digest(h.agent_log) for h in self.hosts))

    # ----- faults and probes ---------------------------------------------------------------------

    def _fabric_link(self, target: Node | str) -> str:
        node = self.node(target)
        if isinstance(node, MeshHost):
            return node.fabric_link
        if node is self.client:
            return f"{self.prefix}-cl"
        raise ValueError(f"{node.name} has no link to the fabric")

    async def link_down(self, target: MeshHost | Node | str) -> None:
        """Pull the host's cable: its bridge port goes down, its eth0 loses carrier (routes stay)."""
        await nsh.aip("link", "set", self._fabric_link(target), "down", netns=self.fabric.netns)

    async def link_up(self, target: MeshHost | Node | str, *, forget_failures: bool = True) -> None:
        """Plug the cable back in.

        With `forget_failures`, neighbour (ARP) entries left INCOMPLETE or FAILED by traffic sent while
        the link was down are flushed everywhere: otherwise a new packet waits for the next ARP retry
        (up to 1 s later), and a probe with a short timeout right after link_up may still fail.
        """
        await nsh.aip("link", "set", self._fabric_link(target), "up", netns=self.fabric.netns)
        if forget_failures:
            flush = ("neigh", "flush", "all", "nud", "incomplete", "nud", "failed")
            await asyncio.gather(*(nsh.aip(*flush, netns=node.netns, check=False) for node in self.nodes))

    def exec_in(
        self,
        target: Node | str,
        argv: Sequence[str],
        *,
        check: bool = False,
        timeout: float = 30,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` in a node's (or any named) network namespace via nsenter --net (blocking)."""
        return nsh.run(argv, netns=self._netns_of(target), check=check, timeout=timeout, input=input)

    async def aexec_in(
        self,
        target: Node | str,
        argv: Sequence[str],
        *,
        check: bool = False,
        within: float = 30,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return await nsh.arun(argv, netns=self._netns_of(target), check=check, within=within, input=input)

    def _netns_of(self, target: Node | str) -> str:
        try:
            return self.node(target).netns
        except KeyError:
            if isinstance(target, str) and nsh.netns_path(target).exists():
                return target
            raise

    async def shape_registry(self, rate: str) -> None:
        """Limit what the registry sends to `rate` (tc syntax, e.g. "100mbit"): a tbf on the bridge in
        the fabric namespace, which only the fabric's own traffic (the registry's) passes; frames
        between hosts go bridge port to port, unshaped."""
        tbf = ["tc", "qdisc", "replace", "dev", self.bridge, "root", "tbf", "rate", rate, "burst", "64kb"]
        await self.aexec_in(self.fabric, [*tbf, "latency", "50ms"], check=True)

    async def registry_sent(self) -> int:
        """Bytes the registry has sent through `shape_registry`'s qdisc."""
        res = await self.aexec_in(self.fabric, ["tc", "-s", "-j", "qdisc", "show", "dev", self.bridge], check=True)
        return int(json.loads(res.stdout)[0]["bytes"])

    async def ping(self, src: Node | str, dst: Node | str, *, within: int = 1) -> bool:
        """One ICMP echo from `src` to `dst` (a node, node name or an address), answered within `within` s."""
        address = dst if isinstance(dst, str) and _is_ip(dst) else self.node(dst).address
        argv = ["busybox", "ping", "-q", "-c", "1", "-W", str(within), address]
        res = await self.aexec_in(src, argv, within=within + 10)
        return res.returncode == 0

    async def can_connect(self, src: Node | str, host: str, port: int, within: float = 1.0) -> bool:
        """A TCP connect from inside `src` to host:port."""
        return await nsh.can_connect(self._netns_of(src), host, port, within)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _kill_and_wait(pids: Sequence[int], within: float = 10.0) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() and not _is_zombie(pid) for pid in pids):
        time.sleep(0.05)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


# ----- leftovers of crashed runs ------------------------------------------------------------------


def _owner_alive(path: Path) -> bool:
    """True while some process holds the flock of a mesh state file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the lock if we got it
    return False


def _cmdline(pid: int) -> list[str]:
    try:
        return [os.fsdecode(a) for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return []


def _pids_using_dir(directory: str) -> list[int]:
    """Processes with an argument inside `directory` (the root-namespace push registry, daemons)."""
    inside = directory.rstrip("/") + "/"
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and any(arg.startswith(inside) for arg in _cmdline(int(entry.name))):
            found.append(int(entry.name))
    return found


def _check_prefix(prefix: str) -> None:
    if not re.fullmatch(r"fm[0-9a-f]{0,4}", prefix):
        raise ValueError(f"prefix must be 'fm' plus up to 4 hex digits, got {prefix!r}")


async def cleanup_stale(prefix: str = "fm") -> list[str]:
    """Remove what crashed meshes left behind; returns the mesh prefixes cleaned.

    Only names matching fm<4 hex>- that also start with `prefix` are considered, and a mesh whose
    owner process still holds its state-file lock is never touched.
    """
    _check_prefix(prefix)
    candidates: set[str] = set()
    for name in [*nsh.list_netns(), *nsh.link_names()]:
        if PREFIX_RE.match(name) and name.startswith(prefix):
            candidates.add(name[:6])
    for path in STATE_DIR.glob("fm*.json"):
        if re.fullmatch(r"fm[0-9a-f]{4}\.json", path.name) and path.name.startswith(prefix):
            candidates.add(path.name[:6])
    cleaned: list[str] = []
    for mesh_prefix in sorted(candidates):
        if _owner_alive(STATE_DIR / f"{mesh_prefix}.json"):
            continue
        await _reap(mesh_prefix)
        cleaned.append(mesh_prefix)
    # Temp files of a claim interrupted before its link (their names embed a prefix too).
    for tmp in STATE_DIR.glob(f".{prefix}*.tmp"):
        if not _owner_alive(tmp):
            tmp.unlink(missing_ok=True)
    return cleaned


async def _reap(mesh_prefix: str) -> None:
    state_path = STATE_DIR / f"{mesh_prefix}.json"
    state: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads(state_path.read_text())
        if isinstance(loaded, dict):
            state = loaded
    recorded = state.get("dir")
    # Only an absolute dir named after the mesh is ours to delete.
    directory: str | None = None
    if isinstance(recorded, str) and Path(recorded).is_absolute() and Path(recorded).name == mesh_prefix:
        directory = recorded.rstrip("/")
    tmpfs = state.get("tmpfs_dir")
    tmpfs_dir = tmpfs if tmpfs == f"/dev/shm/ferryman-{mesh_prefix}" else None
    names = [n for n in nsh.list_netns() if n.startswith(f"{mesh_prefix}-")]
    inodes = [i for i in (nsh.netns_inode(n) for n in names) if i is not None]

    def ours() -> list[int]:
        found = set(nsh.pids_in_netns(inodes))
        if directory is not None:
            found.update(_pids_using_dir(directory))
        return sorted(found)

    def not_shims(pids: list[int]) -> list[int]:
        return [pid for pid in pids if SHIM_NAME not in Path((_cmdline(pid) or [""])[0]).name]

    # Daemons first, but not the shims: PrivateContainerd.stop() finds them (and their sockets and
    # containers) through their command lines.
    await asyncio.to_thread(lambda: _kill_and_wait(not_shims(ours())))
    containerds = state.get("containerds", []) if directory is not None else []
    for entry in containerds if isinstance(containerds, list) else []:
        with contextlib.suppress(Exception):
            workdir, cgroup = str(entry["workdir"]), str(entry["cgroup_parent"])
            if workdir.startswith(f"{directory}/") and cgroup.startswith("/ferryman-test-"):
                ctrd = PrivateContainerd(Path(workdir))
                ctrd.cgroup_parent = cgroup  # so stop() also kills its containers and removes their cgroups
                await ctrd.stop()
    await asyncio.to_thread(lambda: _kill_and_wait(ours()))
    await asyncio.to_thread(_remove_network_and_dirs, mesh_prefix, names, directory, tmpfs_dir)
    state_path.unlink(missing_ok=True)


def _remove_network_and_dirs(mesh_prefix: str, names: list[str], directory: str | None, tmpfs_dir: str | None) -> None:
    for name in names:
        nsh.del_netns(name)
    for link in nsh.link_names():
        if link.startswith(f"{mesh_prefix}-"):
            nsh.ip("link", "del", link, check=False)
    if directory is not None and Path(directory).exists():
        unmount_under(Path(directory))  # also the containers' network namespaces (hN/netns)
        shutil.rmtree(directory, ignore_errors=True)
    if tmpfs_dir is not None:
        shutil.rmtree(tmpfs_dir, ignore_errors=True)


def agent_log_digest(log: Path, since: float = 0.0, most: int = 60) -> str:
    """An agent log's warnings and errors and its last lines, for a failing test's report; empty when
    the file is gone or was not written since `since` (a time.time())."""
    try:
        if log.stat().st_mtime < since:
            return ""
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    notable = [n for n, line in enumerate(lines) if '"level": "WARNING"' in line or '"level": "ERROR"' in line]
    keep = sorted({*notable[-most:], *range(max(len(lines) - 15, 0), len(lines))})
    return f"----- {log} (warnings, errors and the last lines)\n" + "".join(f"{lines[n]}\n" for n in keep)

