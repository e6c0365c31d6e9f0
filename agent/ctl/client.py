"""A small async client for the agent's HTTP API, over a unix socket or TCP."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp

from agent.api.server import TcpAddress, UnixAddress, parse_listen
from core.errors import ConfigError

DEFAULT_AGENT = "unix:///run/ferryman/agent.sock"
ENV_AGENT = "FERRYMAN_AGENT"
CONNECT_TIMEOUT = 10.0


class ApiError(Exception):
    """An error answer from the agent (or no answer at all), with the API's code and message."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


async def _error_from(resp: aiohttp.ClientResponse) -> ApiError:
    text = await resp.text(errors="replace")
    try:
        err = json.loads(text)["error"]
        return ApiError(str(err["code"]), str(err["message"]), resp.status)
    except (ValueError, KeyError, TypeError):
        # Not our error shape (a proxy, or not an agent at all): say what came back.
        return ApiError(f"http_{resp.status}", text.strip()[:200] or resp.reason or "", resp.status)


class AgentClient:
    """`async with AgentClient("unix:///run/ferryman/agent.sock") as c: await c.list_containers()`."""

    def __init__(self, address: str) -> None:
        self.address = address
        try:
            parsed = parse_listen(address)
        except ConfigError as exc:
            raise ApiError("invalid_address", exc.message) from exc
        connector: aiohttp.BaseConnector
        if isinstance(parsed, UnixAddress):
            connector = aiohttp.UnixConnector(path=parsed.path)
            self._base = "http://localhost"  # the host is ignored on a unix socket
        else:
            assert isinstance(parsed, TcpAddress)
            connector = aiohttp.TCPConnector()
            host = f"[{parsed.host}]" if ":" in parsed.host else parsed.host
            self._base = f"http://{host}:{parsed.port}"
        # No total timeout: pulls, stops and followed logs legitimately take long.
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT),
        )

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._session.close()

    def _unreachable(self, exc: aiohttp.ClientError) -> ApiError:
        return ApiError("agent_unreachable", f"cannot talk to the agent at {self.address}: {exc}")

    async def request(self, method: str, path: str, *, params: dict[str, str] | None = None, body: Any = None) -> Any:
        """One call; the decoded JSON answer (None for 204), or ApiError."""
        try:
            async with self._session.request(method, self._base + path, params=params, json=body) as resp:
                if resp.status >= 400:
                    raise await _error_from(resp)
                if resp.status == 204:
                    return None
                return await resp.json(content_type=None)
        except aiohttp.ClientError as exc:
            raise self._unreachable(exc) from exc

    async def _ndjson(
        self, method: str, path: str, *, params: dict[str, str] | None = None, body: Any = None
    ) -> AsyncIterator[dict[str, Any]]:
        """The decoded lines of an NDJSON stream, or ApiError if the call itself fails."""
        try:
            async with self._session.request(method, self._base + path, params=params, json=body) as resp:
                if resp.status >= 400:
                    raise await _error_from(resp)
                async for raw in resp.content:
                    line = raw.strip()
                    if line:
                        yield json.loads(line)
        except aiohttp.ClientError as exc:
            raise self._unreachable(exc) from exc

    # ---- images

    async def pull(self, ref: str) -> AsyncIterator[dict[str, Any]]:
        """The NDJSON lines of a streamed pull: progress snapshots, then a done/failed line."""
        async for line in self._ndjson("POST", "/v1/images/pull", params={"stream": "1"}, body={"ref": ref}):
            yield line

    async def import_archive(self, body: AsyncIterator[bytes], name: str | None = None) -> list[dict[str, Any]]:
        """Upload an image archive (streamed from `body`); the images it became."""
        params = {"name": name} if name else None
        headers = {"Content-Type": "application/x-tar"}
        try:
            async with self._session.post(
                self._base + "/v1/images/import", params=params, data=body, headers=headers
            ) as resp:
                if resp.status >= 400:
                    raise await _error_from(resp)
                return list((await resp.json(content_type=None))["images"])
        except aiohttp.ClientError as exc:
            raise self._unreachable(exc) from exc

    async def export_image(self, name: str) -> AsyncIterator[bytes]:
        """The OCI archive of image `name`, as it arrives; ApiError("stream_ended") when it breaks off."""
        try:
            async with self._session.get(self._base + "/v1/images/export", params={"name": name}) as resp:
                if resp.status >= 400:
                    raise await _error_from(resp)
                async for chunk in resp.content.iter_chunked(1 << 20):
                    yield chunk
        except aiohttp.ClientPayloadError as exc:
            raise ApiError("stream_ended", f"the agent broke off the export of {name}: {exc}") from exc
        except aiohttp.ClientError as exc:
            raise self._unreachable(exc) from exc

    async def list_images(self) -> list[dict[str, Any]]:
        return list((await self.request("GET", "/v1/images"))["images"])

    async def remove_image(self, name: str) -> None:
        # Keep '/' and ':' literal (the route takes the rest of the path); escape everything else.
        await self.request("DELETE", "/v1/images/" + quote(name, safe="/:@"))

    # ---- containers

    async def list_containers(self) -> list[dict[str, Any]]:
        return list((await self.request("GET", "/v1/containers"))["containers"])

    async def create(self, spec: dict[str, Any], *, start: bool = False) -> dict[str, Any]:
        params = {"start": "1"} if start else None
        return dict(await self.request("POST", "/v1/containers", params=params, body=spec))

    async def start(self, container_id: str) -> dict[str, Any]:
        return dict(await self.request("POST", f"/v1/containers/{quote(container_id, safe='')}/start"))

    # `timeout` is the agent's SIGTERM-to-SIGKILL grace period, not a deadline for this call.
    async def stop(self, container_id: str, timeout: float | None = None) -> dict[str, Any]:  # noqa: ASYNC109
        params = {"timeout": str(timeout)} if timeout is not None else None
        path = f"/v1/containers/{quote(container_id, safe='')}/stop"
        return dict(await self.request("POST", path, params=params))

    async def remove(self, container_id: str, *, force: bool = False) -> None:
        params = {"force": "1"} if force else None
        await self.request("DELETE", f"/v1/containers/{quote(container_id, safe='')}", params=params)

    async def inspect(self, container_id: str) -> dict[str, Any]:
        return dict(await self.request("GET", f"/v1/containers/{quote(container_id, safe='')}"))

    async def logs(self, container_id: str, *, tail: int | None = None, follow: bool = False) -> AsyncIterator[bytes]:
        params: dict[str, str] = {}
        if tail is not None:
            params["tail"] = str(tail)
        if follow:
            params["follow"] = "1"
        path = f"/v1/containers/{quote(container_id, safe='')}/logs"
        try:
            async with self._session.get(self._base + path, params=params) as resp:
                if resp.status >= 400:
                    raise await _error_from(resp)
                async for chunk in resp.content.iter_any():
                    yield chunk
        except aiohttp.ClientError as exc:
            raise self._unreachable(exc) from exc

    # ---- migrations

    async def migrate(self, spec: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Start a migration and stream its records (one per update) until a terminal one."""
        async for line in self._ndjson("POST", "/v1/migrations", params={"stream": "1"}, body=spec):
            yield line

    async def list_migrations(self) -> list[dict[str, Any]]:
        return list((await self.request("GET", "/v1/migrations"))["migrations"])

    async def get_migration(self, migration_id: str) -> dict[str, Any]:
        return dict(await self.request("GET", f"/v1/migrations/{quote(migration_id, safe='')}"))

    async def watch_migration(self, migration_id: str) -> AsyncIterator[dict[str, Any]]:
        async for line in self._ndjson("GET", f"/v1/migrations/{quote(migration_id, safe='')}/events"):
            yield line

    async def health(self) -> dict[str, Any]:
        return dict(await self.request("GET", "/healthz"))
