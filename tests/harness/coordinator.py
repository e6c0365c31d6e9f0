"""Run `ferryman-coordinator` as a real process for tests, with a fleet CA made by core/security/pki.py.

`CoordinatorPki` issues the coordinator's server certificate (host name "coordinator", role agent),
its ops certificate for calling agents, agent certificates and operator certificates.
`CoordinatorProcess` writes a config, starts the daemon (optionally inside a network namespace,
see tests/harness/netns.py), waits until it answers over TLS, and stops it with SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import secrets
import socket
import ssl
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
from google.protobuf import json_format

from coordinator.auth import hash_token
from coordinator.model import Host, Reservation
from core.security.pki import HostCertPaths, init_ca, issue_client, issue_host
from core.security.tls import client_context
from proto.ferryman.v1 import fleet_pb2
from tests.harness.daemons import log_tail, start_daemon, terminate
from tests.harness.etcd import EtcdCluster
from tests.harness.netns import acall_in_netns, nsenter_argv

REPO = Path(__file__).resolve().parents[2]
PYTHON = REPO / ".venv" / "bin" / "python"
COORDINATOR_NAME = "coordinator"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0


class CoordinatorPki:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca_dir = init_ca(root / "ca").directory
        self.server = issue_host(self.ca_dir, COORDINATOR_NAME, root / "coordinator", ["127.0.0.1", "::1"])
        self.ops_client = issue_client(self.ca_dir, "coordinator-ops", root / "coordinator-ops")
        self._issued: dict[str, HostCertPaths] = {}

    def agent(self, name: str) -> HostCertPaths:
        if name not in self._issued:
            self._issued[name] = issue_host(self.ca_dir, name, self.root / f"agent-{name}", ["127.0.0.1"])
        return self._issued[name]

    def operator(self, name: str = "alice") -> HostCertPaths:
        key = f"ops:{name}"
        if key not in self._issued:
            self._issued[key] = issue_client(self.ca_dir, name, self.root / f"ops-{name}")
        return self._issued[key]

    def client_ssl(self, identity: HostCertPaths | None) -> ssl.SSLContext:
        """A client context verifying the coordinator; presenting `identity`'s certificate if given."""
        if identity is not None:
            return client_context(identity)
        return ssl.create_default_context(cafile=str(self.server.ca_file))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_config(values: Mapping[str, Any]) -> str:
    """TOML for a flat mapping of keys and one level of tables (enough for the coordinator's config)."""
    top = [f"{k} = {_toml_value(v)}" for k, v in values.items() if not isinstance(v, Mapping)]
    tables = [
        f"\n[{k}]\n" + "\n".join(f"{kk} = {_toml_value(vv)}" for kk, vv in v.items())
        for k, v in values.items()
        if isinstance(v, Mapping)
    ]
    return "\n".join(top) + "\n" + "\n".join(tables) + "\n"


class CoordinatorProcess:
    """One coordinator daemon with its own config, database and log file under `workdir`."""

    def __init__(
        self,
        workdir: Path,
        pki: CoordinatorPki,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        netns: str | None = None,
        tokens: tuple[str, ...] = (),
        overrides: Mapping[str, Mapping[str, Any] | Any] | None = None,
    ) -> None:
        self.workdir = workdir
        self.pki = pki
        self.host = host
        self.port = port or free_port(host)
        self.netns = netns
        self.database = workdir / "coordinator.db"
        self.config_path = workdir / "coordinator.toml"
        self.log_path = workdir / "coordinator.log"
        self.proc: asyncio.subprocess.Process | None = None
        tokens_file = workdir / "tokens.sha256"
        tokens_file.write_text("".join(f"{hash_token(t)} token{i}\n" for i, t in enumerate(tokens)))
        values: dict[str, Any] = {
            "listen": f"{host}:{self.port}",
            "database": str(self.database),
            "log_level": "DEBUG",
            "tls": {
                "ca_file": str(pki.server.ca_file),
                "cert_file": str(pki.server.cert_file),
                "key_file": str(pki.server.key_file),
            },
            "ops_tls": {"cert_file": str(pki.ops_client.cert_file), "key_file": str(pki.ops_client.key_file)},
            "auth": {"token_hashes_file": str(tokens_file)},
        }
        for key, value in (overrides or {}).items():
            if isinstance(value, Mapping) and isinstance(values.get(key), dict):
                values[key] = {**values[key], **value}
            else:
                values[key] = value
        self.config_path.write_text(render_config(values))

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    async def start(self) -> None:
        argv = [*nsenter_argv(self.netns), str(PYTHON), "-m", "coordinator.daemon", "--config", str(self.config_path)]

        async def ready() -> bool:
            return await self.healthz() == 200

        self.proc = await start_daemon(
            "coordinator",
            argv,
            self.log_path,
            ready,
            within=START_TIMEOUT,
            stop_within=STOP_TIMEOUT,
            cwd=REPO,
            env={**os.environ},
        )

    async def healthz(self) -> int | None:
        """GET /healthz over TLS from the coordinator's own network namespace; None if unreachable."""
        if self.netns is None:
            return await asyncio.to_thread(self._healthz_blocking)
        return await acall_in_netns(self.netns, self._healthz_blocking)

    def _healthz_blocking(self) -> int | None:
        ctx = self.pki.client_ssl(None)
        # The chain is still verified against the fleet CA; the name is checked by the aiohttp clients.
        ctx.check_hostname = False
        conn = http.client.HTTPSConnection(self.host, self.port, timeout=2.0, context=ctx)
        try:
            conn.request("GET", "/healthz")
            return conn.getresponse().status
        except (OSError, http.client.HTTPException):
            return None
        finally:
            conn.close()

    async def stop(self) -> int | None:
        """SIGTERM and wait (SIGKILL after STOP_TIMEOUT); returns the exit code."""
        proc, self.proc = self.proc, None
        return None if proc is None else await terminate(proc, STOP_TIMEOUT)

    def logs(self) -> str:
        return log_tail(self.log_path)

    @contextlib.asynccontextmanager
    async def client(
        self, identity: HostCertPaths | None = None, token: str | None = None
    ) -> AsyncIterator[CoordinatorClient]:
        """An HTTP client for this coordinator, as `identity` (a certificate) and/or with a bearer token."""
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=30),
            headers=headers,
            connector=aiohttp.TCPConnector(limit=64),
        ) as session:
            yield CoordinatorClient(session, self.url, self.pki.client_ssl(identity))


class CoordinatorClient:
    def __init__(self, session: aiohttp.ClientSession, url: str, ctx: ssl.SSLContext) -> None:
        self.session = session
        self.url = url
        self.ctx = ctx

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, dict[str, Any]]:
        kwargs: dict[str, Any] = {"ssl": self.ctx, "server_hostname": COORDINATOR_NAME}
        if raw is not None:
            kwargs["data"] = raw
            kwargs["headers"] = {"Content-Type": content_type}
        elif body is not None:
            kwargs["json"] = body
        async with self.session.request(method, self.url + path, **kwargs) as resp:
            text = await resp.text()
            if resp.content_type == "application/json" and text:
                return resp.status, json.loads(text)
            return resp.status, {"text": text}

    async def get(self, path: str) -> tuple[int, dict[str, Any]]:
        return await self.request("GET", path)

    async def post(
        self, path: str, body: Any = None, *, raw: bytes | None = None, content_type: str = "application/json"
    ) -> tuple[int, dict[str, Any]]:
        return await self.request("POST", path, body, raw=raw, content_type=content_type)


def new_token() -> str:
    return secrets.token_urlsafe(32)


def registration(name: str, *, cpu_millis: int = 4000, memory_bytes: int = 4 << 30, **extra: Any) -> dict[str, Any]:
    return {
        "host": name,
        "peer_address": "127.0.0.1:7443",
        "capacity": {"cpu_millis": cpu_millis, "memory_bytes": memory_bytes, "disk_bytes": 100 << 30},
        "labels": {"rack": "r1"},
        "agent_version": "test",
        "telemetry_period_s": 5.0,
        **extra,
    }


def sample(ts: float, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "ts": ts,
        "cpu_util": 0.2,
        "load1": 0.5,
        "cpus": 4,
        "memory_total_bytes": 4 << 30,
        "memory_available_bytes": 3 << 30,
        "pressure": {"cpu_some": 1.0, "memory_some": 0.0, "io_some": 0.5},
    }
    base.update(fields)
    return base


class TelemetryPushes:
    """One simulated agent's telemetry pushes as an agent sends them (binary protobuf, one sample
    each): the message is built once, and each push only restamps it and serialises it again."""

    def __init__(self, host: str, **fields: Any) -> None:
        document = {"host": host, "samples": [sample(0.0, **fields)]}
        self._batch = json_format.ParseDict(document, fleet_pb2.TelemetryBatch())

    def body(self, ts: float) -> bytes:
        self._batch.samples[0].ts = ts
        return self._batch.SerializeToString()


def telemetry_body(host: str, samples: list[dict[str, Any]]) -> bytes:
    """A TelemetryBatch of `samples` (JSON, as `sample` makes them) in protobuf's binary encoding."""
    batch = json_format.ParseDict({"host": host, "samples": samples}, fleet_pb2.TelemetryBatch())
    return batch.SerializeToString()


class NoAgents:
    """The coordinator's agent client for stores whose hosts register no api_url: any call fails."""

    async def hold_reservation(self, host: Host, reservation: Reservation) -> bool:
        raise AssertionError("no agent call expected")

    async def release_reservation(self, host: Host, reservation_id: str) -> None:
        raise AssertionError("no agent call expected")

    async def start_migration(self, *args: Any) -> dict[str, Any]:
        raise AssertionError("no agent call expected")

    async def get_migration(self, *args: Any) -> dict[str, Any]:
        raise AssertionError("no agent call expected")

    async def list_migrations(self, *args: Any) -> list[dict[str, Any]]:
        raise AssertionError("no agent call expected")

    async def list_containers(self, host: Host) -> list[dict[str, Any]]:
        raise AssertionError("no agent call expected")

    async def create_container(
        self, host: Host, spec: dict[str, Any], within: float, start: bool = True
    ) -> dict[str, Any]:
        raise AssertionError("no agent call expected")

    async def start_container(self, host: Host, container_id: str, within: float) -> dict[str, Any]:
        raise AssertionError("no agent call expected")

    async def warm_layer(
        self, host: Host, digest: str, ref: str, ttl: float, model: str, within: float
    ) -> dict[str, Any]:
        raise AssertionError("no agent call expected")

    async def close(self) -> None:
        pass


DRAIN_MODEL = REPO / "models" / "drain" / "drain.onnx"


def scoring_overrides(leader_takes_pushes: str) -> dict[str, Any]:
    """Replicas for `etcd_replicas` that score with the shipped drain model twice a second, share
    what agents push to them twice a second, lose a leader in 2 s, and never find a host down."""
    return {
        "store": {"leader_ttl": 2},
        "model": {"path": str(DRAIN_MODEL), "tick_period": 0.5},
        "telemetry": {"flush_period": 0.5, "leader_takes_pushes": leader_takes_pushes},
        "heartbeat": {"suspect_after": 600.0, "down_after": 1200.0},
    }


@contextlib.asynccontextmanager
async def etcd_replicas(
    workdir: Path,
    pki: CoordinatorPki,
    *,
    members: int = 3,
    cluster: EtcdCluster | None = None,
    overrides: Mapping[str, Mapping[str, Any] | Any] | None = None,
    one_at_a_time: bool = True,
) -> AsyncIterator[list[CoordinatorProcess]]:
    """Three coordinator daemons on an etcd cluster of `members` (or on `cluster`, which the caller
    runs), under a fresh key prefix.

    `overrides` go into each replica's config beside the store (a `store` mapping extends it).
    Started one at a time by default: three imports at once are slow on a loaded 2-core host.
    On exit every replica still running must stop with code 0.
    """
    async with contextlib.AsyncExitStack() as stack:
        if cluster is None:
            cluster = await stack.enter_async_context(EtcdCluster(workdir / "etcd", size=members))
        store = {"backend": "etcd", "etcd_endpoints": cluster.endpoints, "etcd_prefix": f"/{secrets.token_hex(4)}/"}
        rest = dict(overrides or {})
        store.update(rest.pop("store", {}))
        procs = []
        for i in range(3):
            (workdir / f"c{i}").mkdir()
            procs.append(CoordinatorProcess(workdir / f"c{i}", pki, overrides={"store": store, **rest}))
        try:
            if one_at_a_time:
                for p in procs:
                    await p.start()
            else:
                await asyncio.gather(*(p.start() for p in procs))
            yield procs
        finally:
            running = [p for p in procs if p.proc is not None]
            codes = await asyncio.gather(*(p.stop() for p in running))
            assert codes == [0] * len(running), "\n".join(p.logs() for p in procs)


async def single_leader(
    procs: list[CoordinatorProcess], pki: CoordinatorPki, within: float = 15.0
) -> CoordinatorProcess:
    """The one replica whose /healthz says it acts as the leader, once exactly one does."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        acting = []
        for p in procs:
            async with p.client(pki.operator()) as ops:
                _, health = await ops.get("/healthz")
            if health.get("acting"):
                acting.append(p)
        if len(acting) == 1:
            return acting[0]
        assert loop.time() < deadline, "no single leader"
        await asyncio.sleep(0.2)
