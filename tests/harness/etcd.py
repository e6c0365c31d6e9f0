"""Real etcd members for tests: a cluster of one or three on loopback, each with its own data dir.

Every member listens for clients and peers on 127.0.0.1 ports picked free at start; nothing leaves
the machine. With `netns=` and `host=` the members run inside that network namespace instead, on
that address (a mesh's fabric, where coordinators in the mesh reach them).

A member can be stopped (SIGTERM), killed (SIGKILL) and started again from its data
dir, which is how the HA tests take a member (or the quorum) away and give it back.

    async with EtcdCluster(tmp / "etcd", size=3) as cluster:
        cluster.endpoints          # ["127.0.0.1:PORT", ...], for [store] etcd_endpoints
        await cluster.members[0].kill()
        await cluster.members[0].start()
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import secrets
import signal
import ssl
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import aiohttp

from tests.harness.daemons import log_tail, start_daemon, terminate
from tests.harness.netns import acall_in_netns, nsenter_argv
from tests.harness.registry import free_port, require_binary

ETCD = "etcd"
HOST = "127.0.0.1"


@dataclass(frozen=True)
class EtcdTlsFiles:
    """Client TLS for every member (peers stay plain on loopback): the members' certificate (SAN
    127.0.0.1) and, with client-cert-auth on, the client certificate the harness itself uses."""

    ca_file: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        ctx.load_cert_chain(str(self.client_cert), str(self.client_key))
        return ctx


class EtcdMember:
    """One member: `start` (first boot joins the new cluster; later boots reuse the data dir)."""

    def __init__(self, cluster: EtcdCluster, index: int) -> None:
        self.cluster = cluster
        self.name = f"m{index}"
        self.client_port = free_port(HOST)  # inside a netns of its own every port is free anyway
        self.peer_port = free_port(HOST)
        self.data_dir = cluster.base / self.name
        self.log_path = cluster.base / f"{self.name}.log"
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.cluster.host}:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"{'https' if self.cluster.tls else 'http'}://{self.endpoint}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.cluster.host}:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def argv(self) -> list[str]:
        c = self.cluster
        return [
            *nsenter_argv(self.cluster.netns),
            require_binary(ETCD),
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.client_url}",
            f"--advertise-client-urls={self.client_url}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={c.initial_cluster}",
            "--initial-cluster-state=new",
            f"--initial-cluster-token={c.token}",
            f"--heartbeat-interval={c.heartbeat_ms}",
            f"--election-timeout={c.election_ms}",
            "--logger=zap",
            "--log-outputs=stderr",
            *self._tls_flags(),
        ]

    def _tls_flags(self) -> list[str]:
        tls = self.cluster.tls
        if tls is None:
            return []
        return [
            f"--cert-file={tls.server_cert}",
            f"--key-file={tls.server_key}",
            f"--trusted-ca-file={tls.ca_file}",
            "--client-cert-auth",
        ]

    async def healthy(self) -> bool:
        """The member answers /health with true: it is up and sees a leader with a quorum."""
        tls = self.cluster.tls
        if self.cluster.netns is not None:
            return await acall_in_netns(self.cluster.netns, self._healthy_blocking)
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session,
                session.get(f"{self.client_url}/health", ssl=tls.client_context() if tls else False) as resp,
            ):
                body = await resp.text()
        except (aiohttp.ClientError, TimeoutError):
            return False
        with contextlib.suppress(ValueError):
            return bool(json.loads(body).get("health") == "true")
        return False

    def _healthy_blocking(self) -> bool:
        tls = self.cluster.tls
        conn: http.client.HTTPConnection
        if tls is not None:
            ctx = tls.client_context()
            conn = http.client.HTTPSConnection(self.cluster.host, self.client_port, timeout=2, context=ctx)
        else:
            conn = http.client.HTTPConnection(self.cluster.host, self.client_port, timeout=2)
        try:
            conn.request("GET", "/health")
            body = conn.getresponse().read()
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()
        with contextlib.suppress(ValueError):
            return bool(json.loads(body).get("health") == "true")
        return False

    async def start(self, *, wait_healthy: bool = True, within: float = 30.0) -> None:
        """Start the process; with `wait_healthy`, return once it reports healthy (a member of three
        reports healthy only once a quorum is up: start the others with wait_healthy=False first)."""
        if self.running:
            raise RuntimeError(f"etcd {self.name} is already running")
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)

        async def ready() -> bool:
            return not wait_healthy or await self.healthy()

        self.proc = await start_daemon(
            f"etcd {self.name}", self.argv(), self.log_path, ready, within=within, stop_within=5.0
        )

    async def stop(self, within: float = 10.0) -> int | None:
        """SIGTERM (SIGKILL after `within` s); the exit code, None if it was not running."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        return await terminate(proc, within)

    async def kill(self) -> int | None:
        """SIGKILL at once (a crash: no clean leave, the data dir stays as it was)."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL)
        return await proc.wait()

    def log(self) -> str:
        return log_tail(self.log_path)


class EtcdCluster:
    """`size` members (1 or 3) under `base`; an async context manager that stops them all."""

    def __init__(
        self,
        base: Path,
        size: int = 1,
        *,
        heartbeat_ms: int = 50,
        election_ms: int = 500,
        tls: EtcdTlsFiles | None = None,
        netns: str | None = None,
        host: str = HOST,
    ) -> None:
        if size not in (1, 3):
            raise ValueError(f"an etcd test cluster has 1 or 3 members, not {size}")
        self.base = base
        self.tls = tls
        self.netns = netns
        self.host = host
        self.token = f"ferryman-test-{secrets.token_hex(4)}"
        self.heartbeat_ms = heartbeat_ms
        self.election_ms = election_ms
        self.members = [EtcdMember(self, i) for i in range(size)]

    @property
    def initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    async def start(self, within: float = 30.0) -> None:
        """Start every member and wait until each is healthy; everything is stopped on failure."""
        try:
            for m in self.members:
                await m.start(wait_healthy=False, within=within)
            await self.wait_healthy(within)
        except BaseException:
            await self.stop()
            raise

    async def wait_healthy(self, within: float = 30.0, members: list[EtcdMember] | None = None) -> None:
        """Until every running member (or those given) reports healthy; RuntimeError with the logs."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        waiting = [m for m in (members or self.members) if m.running]
        while waiting:
            waiting = [m for m in waiting if not await m.healthy()]
            if not waiting:
                return
            if loop.time() >= deadline:
                logs = "\n".join(f"--- {m.name}\n{m.log()[-3000:]}" for m in waiting)
                raise RuntimeError(f"etcd members {[m.name for m in waiting]} not healthy in {within:g}s:\n{logs}")
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        """Kill every member: at teardown the data dirs are thrown away, and a graceful stop of all
        three at once costs seconds (each leader tries to hand over to members that are leaving)."""
        await asyncio.gather(*(m.kill() for m in self.members))

    async def __aenter__(self) -> EtcdCluster:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
