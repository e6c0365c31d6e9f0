"""A thin client for agents' ops APIs (https, mutual TLS with the coordinator's ops certificate).

Only the calls the coordinator makes: hold/release a reservation, start and poll a migration, list,
pull images, create and delete containers and shared volumes, wait for a container's health,
publish and unpublish a service address, and a chain stage's state contract. Each
agent's certificate must name the host we meant to reach (server_hostname is the host identity, not
the URL's address), so a re-pointed api_url cannot impersonate another host.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from typing import Any, Protocol

import aiohttp

from coordinator.config import CoordinatorConfig
from coordinator.model import Host, InsufficientCapacity, Reservation
from coordinator.wire import capacity_to, to_json
from core.errors import Conflict, FerrymanError, InvalidRequest, NotFound
from core.security.pki import HostCertPaths, Role
from core.security.reload import TlsContexts
from proto.ferryman.v1 import fleet_pb2


class AgentCallError(FerrymanError):
    """An agent could not be reached or answered with something unusable."""

    code = "agent_unavailable"
    http_status = 502


class AgentUnreachable(AgentCallError):
    """The agent did not answer at all: the connection was refused or cut, or no answer came in time."""


class AgentClientLike(Protocol):
    """What the coordinator's services need from agents (a fake implements it in unit tests)."""

    async def hold_reservation(self, host: Host, reservation: Reservation) -> bool: ...
    async def release_reservation(self, host: Host, reservation_id: str) -> None: ...
    async def start_migration(
        self, source: Host, container: str, target: str, reservation_id: str, options: dict[str, Any]
    ) -> dict[str, Any]: ...
    async def get_migration(self, source: Host, migration_id: str) -> dict[str, Any]: ...
    async def list_migrations(self, source: Host) -> list[dict[str, Any]]: ...
    async def list_containers(self, host: Host) -> list[dict[str, Any]]: ...
    async def create_container(
        self, host: Host, spec: dict[str, Any], within: float, start: bool = True
    ) -> dict[str, Any]: ...
    async def start_container(self, host: Host, container_id: str, within: float) -> dict[str, Any]: ...
    async def pull_image(self, host: Host, ref: str, within: float) -> dict[str, Any]: ...
    async def warm_layer(
        self, host: Host, digest: str, ref: str, ttl: float, model: str, within: float
    ) -> dict[str, Any]: ...
    async def delete_container(self, host: Host, container_id: str) -> None: ...
    async def delete_volume(self, host: Host, name: str) -> None: ...
    async def freeze_container(self, host: Host, container_id: str) -> None: ...
    async def thaw_container(self, host: Host, container_id: str) -> None: ...
    async def checkpoint_container(self, host: Host, container_id: str, within: float) -> None: ...
    async def restore_container(self, host: Host, container_id: str, within: float) -> None: ...
    async def container_health(
        self, host: Host, container_id: str, after: int, wait: float, within: float
    ) -> dict[str, Any]: ...
    async def publish(self, host: Host, container_id: str) -> None: ...
    async def unpublish(self, host: Host, service_ip: str) -> bool: ...
    async def balance(self, host: Host, service_ip: str, backends: list[str]) -> None: ...
    async def unbalance(self, host: Host, service_ip: str) -> None: ...
    async def balanced_connections(self, host: Host, service_ip: str) -> dict[str, int]: ...
    async def balancer(self, host: Host, service_ip: str) -> tuple[int, dict[str, int]]: ...
    async def stage_state(
        self,
        host: Host,
        container_id: str,
        action: str,
        port: int,
        body: bytes,
        within: float,
        since: int | None = None,
    ) -> tuple[int, bytes]: ...
    async def stage_takeover(
        self, host: Host, container_id: str, port: int, source: str, source_port: int, since: int, within: float
    ) -> dict[str, float]: ...
    async def component_metrics(self, host: Host, container_id: str, port: int) -> str: ...
    async def close(self) -> None: ...


def reservation_json(reservation: Reservation) -> dict[str, Any]:
    """A reservation as an agent takes it: `POST /v1/reservations`, or a create's `reservation`
    (held for that request only)."""
    return to_json(
        fleet_pb2.Reservation(
            id=reservation.id,
            host=reservation.host,
            capacity=capacity_to(reservation.capacity),
            expires_at=reservation.expires_at,
            purpose=reservation.purpose,
        )
    )


class AgentClient:
    def __init__(self, ctx: ssl.SSLContext, timeout: float) -> None:
        self._ctx = ctx
        self._timeout = timeout
        # Each call has its own deadline (_call): a container create may legitimately take minutes.
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None), connector=aiohttp.TCPConnector(limit_per_host=8)
        )

    @classmethod
    def from_config(cls, config: CoordinatorConfig, contexts: TlsContexts | None = None) -> AgentClient:
        """Calls agents with the coordinator's ops certificate; reloaded with `contexts` when given."""
        paths = HostCertPaths(
            ca_file=config.tls.ca_file,  # type: ignore[arg-type]  # str paths are fine for ssl
            cert_file=config.ops_tls.cert_file,  # type: ignore[arg-type]
            key_file=config.ops_tls.key_file,  # type: ignore[arg-type]
        )
        ctx = (contexts if contexts is not None else TlsContexts()).client(paths, Role.OPS)
        return cls(ctx, config.agents.request_timeout)

    async def close(self) -> None:
        await self._session.close()

    async def _call(
        self, host: Host, method: str, path: str, body: dict[str, Any] | None = None, within: float | None = None
    ) -> tuple[int, dict[str, Any]]:
        """One call, within `within` seconds or the client's request timeout."""
        if not host.api_url:
            raise AgentCallError(f"host {host.name!r} registered no api_url; the coordinator cannot reach it")
        url = host.api_url + path
        try:
            async with (
                asyncio.timeout(within if within is not None else self._timeout),
                self._session.request(method, url, json=body, ssl=self._ctx, server_hostname=host.name) as resp,
            ):
                data: Any = await resp.json(content_type=None) if resp.status != 204 else {}
                status = resp.status
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise AgentUnreachable(f"{method} {url} (agent {host.name}): {exc or type(exc).__name__}") from exc
        except (aiohttp.ClientError, ValueError) as exc:
            raise AgentCallError(f"{method} {url} (agent {host.name}): {exc or type(exc).__name__}") from exc
        if not isinstance(data, dict):
            raise AgentCallError(f"{method} {url}: expected a JSON object, got {type(data).__name__}")
        return status, data

    @staticmethod
    def _error(host: Host, status: int, data: dict[str, Any], what: str) -> FerrymanError:
        raw = data.get("error")
        err: dict[str, Any] = raw if isinstance(raw, dict) else {}
        message = f"agent {host.name}: {what}: {err.get('message', f'HTTP {status}')}"
        if status == 400:
            return InvalidRequest(message)
        if status == 404:
            return NotFound(message)
        if status == 409:
            if err.get("code") == InsufficientCapacity.code:  # a reservation it cannot hold
                return InsufficientCapacity(message)
            return Conflict(message)
        return AgentCallError(message)

    async def hold_reservation(self, host: Host, reservation: Reservation) -> bool:
        """Ask the target agent to hold the reservation; InsufficientCapacity on 409."""
        status, data = await self._call(host, "POST", "/v1/reservations", reservation_json(reservation))
        if status in (200, 201):
            return True
        if status == 409:
            raise InsufficientCapacity(f"agent {host.name} refused reservation {reservation.id}: {data}")
        raise self._error(host, status, data, "hold reservation")

    async def release_reservation(self, host: Host, reservation_id: str) -> None:
        status, data = await self._call(host, "DELETE", f"/v1/reservations/{reservation_id}")
        if status not in (200, 204, 404):  # 404: already released or expired there
            raise self._error(host, status, data, "release reservation")

    async def start_migration(
        self, source: Host, container: str, target: str, reservation_id: str, options: dict[str, Any]
    ) -> dict[str, Any]:
        body = {"container": container, "target": target, **options}
        if reservation_id:
            body["reservation"] = reservation_id
        status, data = await self._call(source, "POST", "/v1/migrations", body)
        if status != 202:
            raise self._error(source, status, data, f"start migration of {container}")
        return data

    async def get_migration(self, source: Host, migration_id: str) -> dict[str, Any]:
        status, data = await self._call(source, "GET", f"/v1/migrations/{migration_id}")
        if status != 200:
            raise self._error(source, status, data, f"migration {migration_id}")
        return data

    async def list_migrations(self, source: Host) -> list[dict[str, Any]]:
        """The agent's migration records (both roles), with the options each was started with."""
        status, data = await self._call(source, "GET", "/v1/migrations")
        if status != 200:
            raise self._error(source, status, data, "list migrations")
        return list(data.get("migrations", []))

    async def list_containers(self, host: Host) -> list[dict[str, Any]]:
        status, data = await self._call(host, "GET", "/v1/containers")
        if status != 200:
            raise self._error(host, status, data, "list containers")
        containers = data.get("containers", [])
        if not isinstance(containers, list):
            raise AgentCallError(f"agent {host.name}: containers is not a list")
        return containers

    async def create_container(
        self, host: Host, spec: dict[str, Any], within: float, start: bool = True
    ) -> dict[str, Any]:
        """Create a container on `host` (its image pulled or assembled there first), and start it
        unless `start` is False."""
        path = "/v1/containers?start=1" if start else "/v1/containers"
        status, data = await self._call(host, "POST", path, spec, within)
        if status != 201:
            raise self._error(host, status, data, f"create container {spec.get('id')}")
        return data

    async def start_container(self, host: Host, container_id: str, within: float) -> dict[str, Any]:
        """Start a created container on `host`."""
        status, data = await self._call(host, "POST", f"/v1/containers/{container_id}/start", None, within)
        if status != 200:
            raise self._error(host, status, data, f"start container {container_id}")
        return data

    async def warm_layer(
        self, host: Host, digest: str, ref: str, ttl: float, model: str, within: float
    ) -> dict[str, Any]:
        """Fetch one layer of `ref` on `host` ahead of use (peers first), held `ttl` seconds by a lease."""
        body = {"ref": ref, "ttl": ttl, "model": model}
        status, data = await self._call(host, "POST", f"/v1/prefetch/layers/{digest}", body, within)
        if status != 200:
            raise self._error(host, status, data, f"warm {digest}")
        return data

    async def pull_image(self, host: Host, ref: str, within: float) -> dict[str, Any]:
        """Pull `ref` into `host`'s containerd (a no-op when it holds it); the image's summary."""
        status, data = await self._call(host, "POST", "/v1/images/pull", {"ref": ref}, within)
        if status != 200:
            raise self._error(host, status, data, f"pull {ref}")
        return data

    async def delete_container(self, host: Host, container_id: str) -> None:
        """Stop and delete a container on `host`; one that is not there is fine."""
        status, data = await self._call(host, "DELETE", f"/v1/containers/{container_id}?force=1")
        if status not in (200, 204, 404):
            raise self._error(host, status, data, f"delete container {container_id}")

    async def delete_volume(self, host: Host, name: str) -> None:
        """Delete a shared volume on `host`; one that is not there is fine."""
        status, data = await self._call(host, "DELETE", f"/v1/volumes/{name}")
        if status not in (200, 204, 404):
            raise self._error(host, status, data, f"delete volume {name}")

    async def container_health(
        self, host: Host, container_id: str, after: int, wait: float, within: float
    ) -> dict[str, Any]:
        """The container's health once its `seq` is past `after`, or after `wait` seconds (long poll)."""
        path = f"/v1/containers/{container_id}/health?after={after}&wait={wait:.3f}"
        status, data = await self._call(host, "GET", path, within=within)
        if status != 200:
            raise self._error(host, status, data, f"health of {container_id}")
        return data

    async def publish(self, host: Host, container_id: str) -> None:
        """Publish the container's service address from `host` (route and gratuitous ARP)."""
        status, data = await self._call(host, "POST", "/v1/network/publish", {"container": container_id})
        if status != 200:
            raise self._error(host, status, data, f"publish the address of {container_id}")

    async def balance(self, host: Host, service_ip: str, backends: list[str]) -> None:
        """Spread new connections to `service_ip` on `host` (its owner) over `backends`."""
        path = f"/v1/network/balancers/{service_ip}"
        status, data = await self._call(host, "PUT", path, {"backends": backends})
        if status != 200:
            raise self._error(host, status, data, f"balance {service_ip}")

    async def unbalance(self, host: Host, service_ip: str) -> None:
        """Stop balancing `service_ip` on `host`; one that is not balanced there is fine."""
        status, data = await self._call(host, "DELETE", f"/v1/network/balancers/{service_ip}")
        if status != 200:
            raise self._error(host, status, data, f"unbalance {service_ip}")

    async def balanced_connections(self, host: Host, service_ip: str) -> dict[str, int]:
        """{backend: open connections} of the balancer of `service_ip` on `host` (conntrack)."""
        return (await self.balancer(host, service_ip))[1]

    async def balancer(self, host: Host, service_ip: str) -> tuple[int, dict[str, int]]:
        """(connections spread so far, {backend: open connections}) of `service_ip`'s balancer."""
        status, data = await self._call(host, "GET", f"/v1/network/balancers/{service_ip}")
        if status != 200:
            raise self._error(host, status, data, f"read the balancer of {service_ip}")
        raw = data.get("connections")
        open_now = {str(k): int(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
        return int(data.get("balanced") or 0), open_now

    async def component_metrics(self, host: Host, container_id: str, port: int) -> str:
        """A copy's metrics page (Prometheus text) through its agent (agent/api/componentmetrics.py);
        AgentCallError when the copy does not answer 200."""
        if not host.api_url:
            raise AgentCallError(f"host {host.name!r} registered no api_url; the coordinator cannot reach it")
        url = f"{host.api_url}/v1/containers/{container_id}/metrics?port={port}"
        try:
            async with (
                asyncio.timeout(self._timeout),
                self._session.get(url, ssl=self._ctx, server_hostname=host.name) as resp,
            ):
                text = await resp.text()
                status = resp.status
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise AgentUnreachable(f"GET {url} (agent {host.name}): {exc or type(exc).__name__}") from exc
        except (aiohttp.ClientError, ValueError) as exc:
            raise AgentCallError(f"GET {url} (agent {host.name}): {exc or type(exc).__name__}") from exc
        if status != 200:
            try:
                data = json.loads(text) if resp.content_type == "application/json" else {}
            except ValueError:
                data = {}
            raise self._error(host, status, data if isinstance(data, dict) else {}, f"metrics of {container_id}")
        return text

    async def freeze_container(self, host: Host, container_id: str) -> None:
        """Freeze a running container on `host` (a warm standby: no CPU, memory kept)."""
        status, data = await self._call(host, "POST", f"/v1/containers/{container_id}/freeze")
        if status != 200:
            raise self._error(host, status, data, f"freeze {container_id}")

    async def thaw_container(self, host: Host, container_id: str) -> None:
        """Thaw a frozen container on `host`: it runs on from where it was."""
        status, data = await self._call(host, "POST", f"/v1/containers/{container_id}/thaw")
        if status != 200:
            raise self._error(host, status, data, f"thaw {container_id}")

    async def checkpoint_container(self, host: Host, container_id: str, within: float) -> None:
        """Checkpoint a running container to `host`'s disk and end its task (a checkpointed standby)."""
        status, data = await self._call(host, "POST", f"/v1/containers/{container_id}/checkpoint", within=within)
        if status != 200:
            raise self._error(host, status, data, f"checkpoint {container_id}")

    async def restore_container(self, host: Host, container_id: str, within: float) -> None:
        """Run a checkpointed container on `host` again from its checkpoint."""
        status, data = await self._call(host, "POST", f"/v1/containers/{container_id}/restore", within=within)
        if status != 200:
            raise self._error(host, status, data, f"restore {container_id}")

    async def unpublish(self, host: Host, service_ip: str) -> bool:
        """Stop publishing `service_ip` from `host`; whether it was published there."""
        status, data = await self._call(host, "POST", "/v1/network/unpublish", {"service_ip": service_ip})
        if status != 200:
            raise self._error(host, status, data, f"unpublish {service_ip}")
        return bool(data.get("was_published"))

    async def stage_takeover(
        self, host: Host, container_id: str, port: int, source: str, source_port: int, since: int, within: float
    ) -> dict[str, float]:
        """A live handover's last step on one host, in one request (agent/api/stagestate.py): the
        delta since `since` from `source`, applied to `container_id`, whose address is then
        published; the milliseconds each of the agent's steps took. A stage's refusal raises
        Conflict naming it."""
        path = (
            f"/v1/containers/{container_id}/state/takeover?port={port}&from={source}"
            f"&from_port={source_port}&since={since}"
        )
        status, data = await self._call(host, "POST", path, None, within)
        if status != 200:
            raise self._error(host, status, data, f"take over from {source}")
        return {str(k): float(v) for k, v in (data.get("steps_ms") or {}).items()}

    async def stage_state(
        self,
        host: Host,
        container_id: str,
        action: str,
        port: int,
        body: bytes,
        within: float,
        since: int | None = None,
    ) -> tuple[int, bytes]:
        """A chain stage's state contract through its agent (agent/api/stagestate.py): `action` is
        export (with `since`: the delta since that snapshot), import, resume, snapshot or delta
        (a live handover's); the stage's status and body (an agent's own refusal raises)."""
        method, path = {
            "export": ("POST", "/state/export"),
            "import": ("PUT", "/state"),
            "resume": ("POST", "/state/resume"),
            "snapshot": ("POST", "/state/snapshot"),
            "delta": ("PATCH", "/state"),
        }[action]
        if not host.api_url:
            raise AgentCallError(f"host {host.name!r} registered no api_url; the coordinator cannot reach it")
        url = f"{host.api_url}/v1/containers/{container_id}{path}?port={port}"
        if since is not None:
            url += f"&since={since}"
        try:
            async with (
                asyncio.timeout(within),
                self._session.request(
                    method,
                    url,
                    data=body if action in ("import", "delta") else None,
                    headers={"Content-Type": "application/msgpack"},
                    ssl=self._ctx,
                    server_hostname=host.name,
                ) as resp,
            ):
                answer = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AgentCallError(f"{method} {url} (agent {host.name}): {exc or type(exc).__name__}") from exc
        if resp.content_type == "application/json" and status >= 400:
            # The agent's own error (no such container, the stage did not answer): not the stage's.
            try:
                data = json.loads(answer)
            except ValueError:
                data = {}
            raise self._error(host, status, data if isinstance(data, dict) else {}, f"{action} state of {container_id}")
        return status, answer
