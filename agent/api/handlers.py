"""Thin HTTP handlers: validate input, call one service method, serialise the result.

The services are looked up under `web.AppKey`s (see `agent.api.server.build_app`); they are typed as
protocols so the API depends on the methods it calls, not on the concrete service classes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent.api.compositions import with_composition
from agent.api.reservations import held_for_create
from agent.api.responses import json_answer
from agent.health.spec import parse_health
from agent.metrics import AgentMetrics
from agent.model import (
    ContainerState,
    ContainerSummary,
    CreateRequest,
    ImageSummary,
    PullProgress,
    Resources,
    parse_restart_policy,
)
from agent.network.addresses import parse_service_ip
from agent.reservations import check_reservation_id
from agent.runtime.volumes import parse_volumes
from core.errors import ContainerNotFound, FerrymanError, InvalidRequest
from core.http.errors import error_body
from core.http.validate import (
    CAPACITY_MAX,
    check_keys,
    json_type,
    positive_field,
    query_flag,
    query_number,
    read_object,
    str_field,
    str_map_field,
)
from core.ids import check_container_id
from core.workloads import of_container_spec

log = logging.getLogger(__name__)

NDJSON = "application/x-ndjson"
ARCHIVE_CHUNK = 1 << 20
"""Bytes of an uploaded image archive handed on at a time."""
PULL_INTERVAL = 0.2
"""Seconds between progress lines of a streamed pull."""
FOLLOW_INTERVAL = 0.25
"""Seconds between polls of a followed log file."""
STATE_INTERVAL = 1.0
"""Seconds between container-state checks while following logs."""
HEALTH_TIMEOUT = 5.0
LOG_CHUNK = 64 * 1024
MAX_CPUS = CAPACITY_MAX["cpu_millis"] / 1000
"""A container's CPU limit in cores, at most what any host may offer (a quota past int64 was a 500)."""
MAX_STOP_TIMEOUT = 3600.0
"""Seconds of grace a stop may ask for: longer is a typo, and past ~1e9 the event loop's timer overflows."""
MAX_TAIL = 100_000_000
"""Lines of a log tail; more than any log holds is as good as all of it."""

# The container service's id rule (agent/runtime/service.py), checked here too because ids from the
# URL become file names (log paths): with a leading alphanumeric, "." and ".." cannot get through.


class ImageServiceLike(Protocol):
    async def pull(self, ref: str, progress: PullProgress | None = None) -> ImageSummary: ...
    async def import_archive(self, body: AsyncIterator[bytes], name: str | None = None) -> list[ImageSummary]: ...
    async def export(self, name: str) -> tuple[int, AsyncIterator[bytes]]: ...
    async def list(self) -> list[ImageSummary]: ...
    async def remove(self, name: str) -> None: ...


class ContainerServiceLike(Protocol):
    async def create(self, req: CreateRequest) -> ContainerSummary: ...
    async def start(self, container_id: str) -> ContainerSummary: ...
    # The `timeout` parameter mirrors ContainerService.stop (the grace period, not a call deadline).
    async def stop(self, container_id: str, timeout: float | None = None) -> ContainerSummary: ...  # noqa: ASYNC109
    async def delete(self, container_id: str, force: bool = False) -> None: ...
    async def freeze(self, container_id: str) -> ContainerSummary: ...
    async def thaw(self, container_id: str) -> ContainerSummary: ...
    async def checkpoint(self, container_id: str) -> ContainerSummary: ...
    async def restore(self, container_id: str) -> ContainerSummary: ...
    async def remove_volume(self, name: str) -> None: ...
    async def list(self) -> list[ContainerSummary]: ...
    async def inspect(self, container_id: str) -> dict[str, Any]: ...
    def log_path(self, container_id: str) -> Path: ...


IMAGES = web.AppKey("images", ImageServiceLike)
CONTAINERS = web.AppKey("containers", ContainerServiceLike)
METRICS = web.AppKey("metrics", AgentMetrics)
OPENAPI = web.AppKey("openapi", bytes)
SHUTDOWN = web.AppKey("shutdown", asyncio.Event)
"""Set when the server shuts down, so long-lived streams end instead of holding shutdown up."""


def parse_pull(body: dict[str, Any]) -> str:
    check_keys(body, {"ref"}, {"ref"}, "body")
    ref = str_field(body, "ref", "body")
    assert ref is not None
    return ref


def parse_create(body: dict[str, Any]) -> CreateRequest:
    """A CreateRequest from a request body; types and unknown fields are checked strictly."""
    fields = {
        "id",
        "image",
        "args",
        "env",
        "workdir",
        "user",
        "labels",
        "resources",
        "service_ip",
        "publish_service",
        "restart_policy",
        "reservation",
        "health",
        "volumes",
    }
    check_keys(body, fields, {"id", "image"}, "body")
    cid = str_field(body, "id", "body")
    image = str_field(body, "image", "body")
    assert cid is not None and image is not None
    check_container_id(cid)

    args: tuple[str, ...] | None = None
    raw_args = body.get("args")
    if raw_args is not None:
        if not isinstance(raw_args, list) or not all(isinstance(a, str) for a in raw_args):
            raise InvalidRequest("body.args: expected an array of strings")
        if not raw_args:
            raise InvalidRequest("body.args: must not be empty (omit it to use the image's command)")
        args = tuple(raw_args)

    env = str_map_field(body, "env", "body")
    bad_env = [k for k in env if "=" in k]
    if bad_env:
        raise InvalidRequest(f"body.env: variable names must not contain '=': {sorted(bad_env)}")

    resources = Resources()
    raw_res = body.get("resources")
    if raw_res is not None:
        if not isinstance(raw_res, dict):
            raise InvalidRequest(f"body.resources: expected an object, got {json_type(raw_res)}")
        check_keys(raw_res, {"cpus", "memory"}, set(), "body.resources")
        cpus = positive_field(raw_res, "cpus", "body.resources", integer=False, maximum=MAX_CPUS)
        memory = positive_field(raw_res, "memory", "body.resources", integer=True, maximum=CAPACITY_MAX["memory_bytes"])
        resources = Resources(cpus=float(cpus) if cpus is not None else None, memory=memory)

    service_ip = str_field(body, "service_ip", "body", optional=True)
    if service_ip is not None:
        service_ip = parse_service_ip(service_ip)
    publish_service = body.get("publish_service", True)
    if not isinstance(publish_service, bool):
        raise InvalidRequest(f"body.publish_service: expected a boolean, got {json_type(publish_service)}")
    if not publish_service and service_ip is None:
        raise InvalidRequest("body.publish_service: only meaningful with service_ip")

    return CreateRequest(
        id=cid,
        image=image,
        args=args,
        env=env,
        workdir=str_field(body, "workdir", "body", optional=True),
        user=str_field(body, "user", "body", optional=True),
        labels=str_map_field(body, "labels", "body"),
        resources=resources,
        service_ip=service_ip,
        publish_service=publish_service,
        restart_policy=parse_restart_policy(body.get("restart_policy"), "body.restart_policy"),
        reservation=_reservation_field(body),
        health=parse_health(body.get("health"), "body.health"),
        volumes=parse_volumes(body.get("volumes"), "body.volumes"),
    )


def _reservation_field(body: dict[str, Any]) -> str | None:
    reservation = str_field(body, "reservation", "body", optional=True)
    if reservation is not None:
        check_reservation_id(reservation)
    return reservation


def _container_id(request: web.Request) -> str:
    return check_container_id(request.match_info["id"])


# ---------------------------------------------------------------- images


def wants_stream(request: web.Request) -> bool:
    if "stream" in request.query:
        return query_flag(request, "stream")
    return NDJSON in request.headers.get("Accept", "")


async def pull_image(request: web.Request) -> web.StreamResponse:
    ref = parse_pull(await read_object(request))
    images = request.app[IMAGES]
    if not wants_stream(request):
        summary = await images.pull(ref)
        return json_answer(summary.to_json())
    return await _stream_pull(request, images, ref)


async def import_image(request: web.Request) -> web.Response:
    """The body is the archive itself (a tar), streamed to the image service, never read whole."""
    check_keys(dict(request.query), {"name"}, set(), "query")
    name = request.query.get("name") or None
    images = await request.app[IMAGES].import_archive(request.content.iter_chunked(ARCHIVE_CHUNK), name)
    return json_answer({"images": [image.to_json() for image in images]}, status=201)


async def export_image(request: web.Request) -> web.StreamResponse:
    check_keys(dict(request.query), {"name"}, {"name"}, "query")
    name = request.query["name"]
    size, body = await request.app[IMAGES].export(name)
    filename = re.sub(r"[^A-Za-z0-9_.-]", "_", name.rsplit("/", 1)[-1]) + ".tar"
    resp = web.StreamResponse(
        headers={
            "Content-Type": "application/x-tar",
            "Content-Length": str(size),
            "Content-Disposition": f'attachment; filename="{filename}"',
        }
    )
    await resp.prepare(request)
    try:
        async for chunk in body:
            await resp.write(chunk)
    except (FerrymanError, OSError) as exc:  # the headers are gone: the short body tells the client
        log.error("image export broke off", extra={"image": name, "error": str(exc)})
        raise ConnectionResetError(str(exc)) from exc
    await resp.write_eof()
    return resp


def _failure(exc: BaseException, ref: str) -> dict[str, str]:
    if isinstance(exc, FerrymanError):
        return {"code": exc.code, "message": exc.message}
    log.error("pull failed unexpectedly", exc_info=exc, extra={"ref": ref})
    return {"code": "internal", "message": "internal server error"}


def _line(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode() + b"\n"


async def _stream_pull(request: web.Request, images: ImageServiceLike, ref: str) -> web.StreamResponse:
    progress = PullProgress(ref=ref)
    task = asyncio.create_task(images.pull(ref, progress), name=f"pull {ref}")
    resp = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-store"})
    try:
        await resp.prepare(request)
        while not task.done():
            await resp.write(_line(progress.snapshot()))
            await asyncio.wait({task}, timeout=PULL_INTERVAL)
        # One last snapshot so the client sees the finished counters before the verdict.
        await resp.write(_line(progress.snapshot()))
        final: dict[str, Any]
        if task.cancelled():
            final = {"status": "failed", "error": {"code": "cancelled", "message": "the pull was cancelled"}}
        elif (exc := task.exception()) is not None:
            final = {"status": "failed", "error": _failure(exc, ref)}
        else:
            final = {"status": "done", "image": task.result().to_json()}
        await resp.write(_line(final))
        await resp.write_eof()
    except ConnectionError:
        # The caller went away: a pull nobody waits for is abandoned (its lease expires the leftovers).
        await _abandon(task, ref)
    except asyncio.CancelledError:
        await _abandon(task, ref)
        raise
    return resp


async def _abandon(task: asyncio.Task[ImageSummary], ref: str) -> None:
    if task.done():
        return
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    log.info("pull abandoned: client disconnected", extra={"ref": ref})


async def list_images(request: web.Request) -> web.Response:
    images = await request.app[IMAGES].list()
    return json_answer({"images": [img.to_json() for img in images]})


async def remove_image(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if not name:
        raise InvalidRequest("image name is empty")
    await request.app[IMAGES].remove(name)
    return web.Response(status=204)


# ---------------------------------------------------------------- containers


async def create_container(request: web.Request) -> web.Response:
    start = query_flag(request, "start")
    async with held_for_create(request, await read_object(request)) as body:
        return await _create_container(request, body, start)


async def _create_container(request: web.Request, body: dict[str, Any], start: bool) -> web.Response:
    # the signature of what was asked for: a composition's name and class, not the image made of it
    signature = of_container_spec(body).id
    plain, assembly = await with_composition(request, body)
    req = dataclasses.replace(parse_create(plain), signature=signature)
    containers = request.app[CONTAINERS]
    created = time.monotonic()
    summary = await containers.create(req)
    started = time.monotonic()
    if start:
        # A failed start leaves the container created (like `docker run`), so it can be inspected.
        summary = await containers.start(req.id)
    out = summary.to_json()
    if assembly is not None:  # where a composition's time to running went
        out["assembly"] = {
            **assembly,
            "create_seconds": round(started - created, 6),
            "start_seconds": round(time.monotonic() - started, 6),
        }
    return json_answer(out, status=201)


async def start_container(request: web.Request) -> web.Response:
    summary = await request.app[CONTAINERS].start(_container_id(request))
    return json_answer(summary.to_json())


async def stop_container(request: web.Request) -> web.Response:
    cid = _container_id(request)
    timeout = query_number(request, "timeout", integer=False, maximum=MAX_STOP_TIMEOUT)
    summary = await request.app[CONTAINERS].stop(cid, timeout)
    return json_answer(summary.to_json())


async def freeze_container(request: web.Request) -> web.Response:
    return json_answer((await request.app[CONTAINERS].freeze(_container_id(request))).to_json())


async def thaw_container(request: web.Request) -> web.Response:
    return json_answer((await request.app[CONTAINERS].thaw(_container_id(request))).to_json())


async def checkpoint_container(request: web.Request) -> web.Response:
    return json_answer((await request.app[CONTAINERS].checkpoint(_container_id(request))).to_json())


async def restore_container(request: web.Request) -> web.Response:
    return json_answer((await request.app[CONTAINERS].restore(_container_id(request))).to_json())


async def delete_container(request: web.Request) -> web.Response:
    cid = _container_id(request)
    await request.app[CONTAINERS].delete(cid, force=query_flag(request, "force"))
    return web.Response(status=204)


async def delete_volume(request: web.Request) -> web.Response:
    await request.app[CONTAINERS].remove_volume(check_container_id(request.match_info["name"]))
    return web.Response(status=204)


async def list_containers(request: web.Request) -> web.Response:
    found = await request.app[CONTAINERS].list()
    return json_answer({"containers": [c.to_json() for c in found]})


async def inspect_container(request: web.Request) -> web.Response:
    return json_answer(await request.app[CONTAINERS].inspect(_container_id(request)))


async def _find(containers: ContainerServiceLike, cid: str) -> ContainerSummary | None:
    for summary in await containers.list():
        if summary.id == cid:
            return summary
    return None


def _tail_offset(path: Path, lines: int | None) -> tuple[int, int]:
    """Where the last `lines` lines of a file start (0 for all) and the file's current size."""
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, 2)
            if lines is None:
                return 0, size
            if lines == 0:
                return size, size
            end = size
            if size:
                fh.seek(size - 1)
                if fh.read(1) == b"\n":
                    end = size - 1  # a final newline ends the last line, it does not start another
            # Scan backwards in chunks: logs can be far larger than what we want to hold in memory.
            pos, found = end, 0
            while pos > 0:
                step = min(LOG_CHUNK, pos)
                pos -= step
                fh.seek(pos)
                chunk = fh.read(step)
                idx = len(chunk)
                while (idx := chunk.rfind(b"\n", 0, idx)) >= 0:
                    found += 1
                    if found == lines:
                        return pos + idx + 1, size
            return 0, size
    except FileNotFoundError:
        return 0, 0  # never started: no output yet


def _read_from(path: Path, offset: int, limit: int | None) -> tuple[bytes, int]:
    """Up to LOG_CHUNK bytes from `offset` (not past `limit`), restarting at 0 if the file was truncated."""
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, 2)
            if size < offset:
                offset = 0
            fh.seek(offset)
            want = LOG_CHUNK if limit is None else max(0, min(LOG_CHUNK, limit - offset))
            data = fh.read(want)
            return data, offset + len(data)
    except FileNotFoundError:
        return b"", 0


def _is_live(summary: ContainerSummary | None) -> bool:
    return summary is not None and summary.state in (ContainerState.RUNNING, ContainerState.PAUSED)


async def container_logs(request: web.Request) -> web.StreamResponse:
    cid = _container_id(request)
    tail = query_number(request, "tail", integer=True, maximum=MAX_TAIL)
    follow = query_flag(request, "follow")
    containers = request.app[CONTAINERS]
    summary = await _find(containers, cid)
    if summary is None:
        raise ContainerNotFound(f"no container {cid!r}")
    path = containers.log_path(cid)

    offset, size = await asyncio.to_thread(_tail_offset, path, tail)
    resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-store"})
    await resp.prepare(request)
    with contextlib.suppress(ConnectionError):  # the client left: nothing to tell it
        if follow:
            await _follow(request, resp, containers, cid, path, offset, _is_live(summary))
        else:
            # Stop at the size seen at the start, or a chatty container would keep us reading forever.
            while True:
                data, offset = await asyncio.to_thread(_read_from, path, offset, size)
                if not data:
                    break
                await resp.write(data)
        await resp.write_eof()
    return resp


async def _follow(
    request: web.Request,
    resp: web.StreamResponse,
    containers: ContainerServiceLike,
    cid: str,
    path: Path,
    offset: int,
    live: bool,
) -> None:
    """Stream appended bytes until the container stops, the client leaves or the server shuts down."""
    shutdown = request.app[SHUTDOWN]
    loop = asyncio.get_running_loop()
    next_check = loop.time() + STATE_INTERVAL
    while True:
        data, offset = await asyncio.to_thread(_read_from, path, offset, None)
        if data:
            await resp.write(data)
            continue  # drain before sleeping
        if not live:
            return  # everything written after the task exited has been sent
        if request.transport is None or request.transport.is_closing() or shutdown.is_set():
            return
        if loop.time() >= next_check:
            # A stop is acted on only after one more drain: output written just before exit must not be lost.
            live = _is_live(await _find(containers, cid))
            next_check = loop.time() + STATE_INTERVAL
            continue
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(shutdown.wait(), FOLLOW_INTERVAL)


# ---------------------------------------------------------------- health, metrics, docs


async def healthz(request: web.Request) -> web.Response:
    try:
        async with asyncio.timeout(HEALTH_TIMEOUT):
            await request.app[CONTAINERS].list()
    except FerrymanError as exc:
        return json_answer({"status": "unavailable", **error_body(exc.code, exc.message)}, status=503)
    except TimeoutError:
        return json_answer({"status": "unavailable", **error_body("timeout", "containerd did not answer")}, 503)
    return json_answer({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    registry = request.app[METRICS]
    gauge = registry.containers
    try:
        found = await request.app[CONTAINERS].list()
    except FerrymanError as exc:
        # No counts beat stale counts: drop the series until containerd answers again.
        gauge.clear()
        log.warning("metrics: cannot list containers", extra={"code": exc.code, "error": exc.message})
    else:
        counts = Counter(c.state for c in found)
        for state in ContainerState:  # every state, so a state that emptied reads 0
            gauge.labels(state=state.value).set(counts.get(state, 0))
    body = generate_latest(registry.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI], headers={"Content-Type": "application/yaml"})
