"""A fleet to keep up and use by hand: what `scripts/mesh up` and `scripts/demo` start, and what the
tests of those commands start through them.

It is the tests' coordinated fleet (tests/harness/fleet.py: a fleet CA, host and operator
certificates, agents that peer over mTLS, a coordinator in the fabric namespace with the shipped
drain model), plus what a person at a shell in the root namespace needs:

- images in the mesh registry to run: busybox, and `web` (memhog holding 32 MiB + HTTP on :8080);
- the coordinator on 127.0.0.1, through a relay (the mesh adds nothing to the root namespace's
  network, and the agents' APIs are unix sockets already);
- env files exporting what ferryctl reads (FERRYMAN_AGENT, FERRYMAN_COORDINATOR, FERRYMAN_CA,
  FERRYMAN_CERT, FERRYMAN_KEY; agent/ctl/client.py and agent/ctl/fleet.py) and the mesh's own
  names (MESH_*): <mesh dir>/env for h1's agent, <mesh dir>/env.<host> for each host's.
"""

from __future__ import annotations

import asyncio
import shlex
import signal
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tests.harness.fleet import COORDINATOR_PORT, HTTP_PORT, CoordinatedFleet, coordinated_fleet
from tests.harness.images import DEFAULT_PATH, ImageBuilder, busybox_layer, etc_layer
from tests.harness.mesh import Mesh, MeshHost
from tests.harness.netns import LoopbackRelay, netns_path
from tests.harness.workloads import memhog_image

REPO = Path(__file__).resolve().parents[2]
DRAIN_MODEL = REPO / "models" / "drain" / "drain.onnx"
BIN = Path(sys.executable).parent
"""Where ferryctl is (the venv the harness runs in): the env files put it first on PATH."""
LABEL = "scripts/mesh up"
"""The state-file label of the meshes `scripts/mesh` starts (`scripts/mesh down` and `env` look for it)."""
SERVICE_OCTET = 200
"""Service addresses for the user's containers: .200 to .249 of the mesh subnet (hosts are .11 on,
the client .250), on the hosts' segment, so the client reaches them by ARP like any neighbour."""
WEB_MIB = 32

T = TypeVar("T")


@dataclass(frozen=True)
class Images:
    busybox: str
    """busybox alone: `ferryctl run IMAGE sleep 600`, or `httpd -f -p 8080`."""
    web: str
    """memhog holding WEB_MIB MiB and rewriting 1 MB/s, plus busybox httpd answering "served" on :8080."""


async def push_images(mesh: Mesh) -> Images:
    """Build the images and push them to the mesh registry; their references as the hosts pull them."""
    busybox = ImageBuilder([busybox_layer(), etc_layer()], cmd=("/bin/sh",), env=[f"PATH={DEFAULT_PATH}"])
    web = memhog_image(WEB_MIB, 1, http_port=HTTP_PORT)
    await busybox.push(mesh.push_host, "busybox", "latest")
    await web.push(mesh.push_host, "web", "latest")
    return Images(busybox=mesh.image_ref("busybox", "latest"), web=mesh.image_ref("web", "latest"))


def service_ip(mesh: Mesh, n: int = 0) -> str:
    """The n-th service address for the user's containers (0 to 49)."""
    if not 0 <= n < 50:
        raise ValueError(f"service address index must be 0..49, got {n}")
    return str(mesh.subnet.network_address + SERVICE_OCTET + n)


@dataclass
class LocalFleet:
    fleet: CoordinatedFleet
    images: Images
    relay: LoopbackRelay

    @property
    def mesh(self) -> Mesh:
        return self.fleet.mesh

    @property
    def coordinator_url(self) -> str:
        """The coordinator as the root namespace reaches it (its certificate names 127.0.0.1 too)."""
        return f"https://127.0.0.1:{self.relay.listen_port}"

    def env_file(self, host: MeshHost | None = None) -> Path:
        """<mesh dir>/env (h1's agent), or <mesh dir>/env.<host>."""
        return self.mesh.dir / ("env" if host is None else f"env.{host.name}")

    def env(self, host: MeshHost | None = None) -> dict[str, str]:
        """The variables of an env file: ferryctl's FERRYMAN_* for `host` (default h1), then MESH_*."""
        mesh, operator = self.mesh, self.fleet.operator
        agent = host or mesh.hosts[0]
        values = {
            "FERRYMAN_AGENT": f"unix://{agent.api_socket}",
            "FERRYMAN_COORDINATOR": self.coordinator_url,
            "FERRYMAN_CA": str(operator.ca_file),
            "FERRYMAN_CERT": str(operator.cert_file),
            "FERRYMAN_KEY": str(operator.key_file),
            "MESH_PREFIX": mesh.prefix,
            "MESH_DIR": str(mesh.dir),
        }
        values.update({f"MESH_AGENT_{h.name.upper()}": f"unix://{h.api_socket}" for h in mesh.hosts})
        values.update(
            {
                "MESH_BUSYBOX_IMAGE": self.images.busybox,
                "MESH_WEB_IMAGE": self.images.web,
                "MESH_SERVICE_IP": service_ip(mesh),
                "MESH_REGISTRY_PUSH": mesh.push_host,
            }
        )
        if mesh.client is not None:
            values["MESH_CLIENT_NETNS"] = str(netns_path(mesh.client.netns))
        return values

    def env_text(self, host: MeshHost | None = None) -> str:
        """Shell lines that export env(host), ferryctl first on PATH."""
        agent = host or self.mesh.hosts[0]
        lines = [
            f"# ferryman mesh {self.mesh.prefix}, ferryctl talking to {agent.name}'s agent",
            f'export PATH={shlex.quote(str(BIN))}:"$PATH"',
        ]
        lines += [f"export {key}={shlex.quote(value)}" for key, value in self.env(host).items()]
        return "\n".join(lines) + "\n"

    def write_env_files(self) -> None:
        self.env_file().write_text(self.env_text())
        for host in self.mesh.hosts:
            self.env_file(host).write_text(self.env_text(host))

    def describe(self) -> dict[str, Any]:
        """Everything about the fleet, as `scripts/mesh up --json` prints it."""
        mesh, coordinator = self.mesh, self.fleet.coordinator
        return {
            **describe_mesh(mesh),
            "hosts": [
                {**describe_host(h), "peer_address": h.peer_address, "env_file": str(self.env_file(h))}
                for h in mesh.hosts
            ],
            "coordinator": {
                "url": self.coordinator_url,
                "fabric_url": coordinator.url,
                "netns": mesh.fabric.netns,
                "log": str(coordinator.log_path),
            },
            "images": {"busybox": self.images.busybox, "web": self.images.web},
            "service_ip": service_ip(mesh),
            "env_file": str(self.env_file()),
            "env": self.env(),
        }

    def summary(self) -> str:
        """The description for people: how to reach each part, and what to type."""
        mesh, coordinator = self.mesh, self.fleet.coordinator
        lines = [mesh_summary(mesh)]
        lines.append(f"coordinator  {self.coordinator_url} (relayed to {coordinator.url} in {mesh.fabric.netns})")
        lines.append(f"images       {self.images.busybox}")
        lines.append(f"             {self.images.web} (memhog {WEB_MIB} MiB + HTTP on :{HTTP_PORT})")
        last = service_ip(mesh, 49).rsplit(".", 1)[1]
        lines.append(f"service IPs  {service_ip(mesh)} to .{last} (on the hosts' segment)")
        lines.append("")
        lines.append(f"source {self.env_file()}     (h1's agent; env.h2 ... for the others)")
        lines.append("ferryctl hosts")
        lines.append('ferryctl pull "$MESH_WEB_IMAGE"')
        lines.append('ferryctl run --name web --service-ip "$MESH_SERVICE_IP" "$MESH_WEB_IMAGE"')
        if mesh.client is not None:
            lines.append(f'nsenter --net="$MESH_CLIENT_NETNS" busybox wget -qO- "http://$MESH_SERVICE_IP:{HTTP_PORT}/"')
        if len(mesh.hosts) > 1:
            lines.append("ferryctl migrate web --to h2 --mode precopy     # or lazy, hybrid, auto; --to auto")
        lines.append("ferryctl predictions")
        return "\n".join(lines)


def describe_mesh(mesh: Mesh) -> dict[str, Any]:
    """The mesh's layout (also of a mesh without a fleet: `scripts/mesh up --no-agents`)."""
    return {
        "prefix": mesh.prefix,
        "subnet": str(mesh.subnet),
        "dir": str(mesh.dir),
        "registry_host": mesh.registry_host,
        "push_host": mesh.push_host,
        "hosts": [describe_host(h) for h in mesh.hosts],
        "client": {"address": mesh.client.address, "netns": mesh.client.netns} if mesh.client else None,
    }


def describe_host(host: MeshHost) -> dict[str, Any]:
    return {
        "name": host.name,
        "address": host.address,
        "netns": host.netns,
        "api": f"unix://{host.api_socket}",
        "containerd_socket": host.containerd.socket,
        "agent_config": str(host.agent_config_path),
        "agent_log": str(host.agent_log),
        "agent_running": host.agent_running,
    }


def mesh_summary(mesh: Mesh) -> str:
    lines = [f"mesh {mesh.prefix}  subnet {mesh.subnet}  dir {mesh.dir}"]
    lines.append(f"registry     hosts pull from {mesh.registry_host}; push from here to {mesh.push_host}")
    lines.append(f"{'NAME':<8}{'ADDRESS':<16}{'NETNS':<14}AGENT API")
    for h in mesh.hosts:
        api = f"unix://{h.api_socket}" if h.agent_running else "(agent not started)"
        lines.append(f"{h.name:<8}{h.address:<16}{h.netns:<14}{api}")
    if mesh.client is not None:
        lines.append(f"{'client':<8}{mesh.client.address:<16}{mesh.client.netns:<14}-")
    lines.append(f"enter a host: nsenter --net={netns_path(mesh.hosts[0].netns)} sh")
    return "\n".join(lines)


@asynccontextmanager
async def local_fleet(
    base: Path, hosts: int = 2, *, with_client: bool = False, keep_dir: bool = False
) -> AsyncIterator[LocalFleet]:
    """A coordinated fleet of `hosts` with images, a loopback way to its coordinator and env files.

    Its teardown removes all of it (see tests/harness/mesh.py): agents, containerds, containers and
    their namespaces, coordinator, registry, files.
    """
    async with coordinated_fleet(
        base,
        hosts,
        coordinator={"model": {"path": str(DRAIN_MODEL)}},
        with_client=with_client,
        keep_dir=keep_dir,
        label=LABEL,
    ) as fleet:
        relay = LoopbackRelay(fleet.mesh.fabric.netns, fleet.coordinator.host, COORDINATOR_PORT)
        await relay.start()
        try:
            local = LocalFleet(fleet, await push_images(fleet.mesh), relay)
            local.write_env_files()
            yield local
        finally:
            await relay.stop()


async def cancel_on_signal(
    coro: Coroutine[Any, Any, T],
    on_signal: Callable[[int], None] | None = None,
    signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM),
) -> T | None:
    """Run `coro`; the first of `signals` cancels it, so its `finally`s tear down what it made
    (`on_signal` is told which arrived). Later signals are ignored: nothing interrupts a teardown.
    Returns what `coro` returns, or None when a signal ended it.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(coro)
    received: list[int] = []

    def handle(sig: int) -> None:
        if received:
            return
        received.append(sig)
        if on_signal is not None:
            on_signal(sig)
        task.cancel()

    for sig in signals:
        loop.add_signal_handler(sig, handle, sig)
    try:
        return await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if received and (current is None or not current.cancelling()):
            return None
        raise
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
