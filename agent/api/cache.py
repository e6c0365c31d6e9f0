"""Thin HTTP handlers for the layer cache (agent/cache): status, pin, unpin, evict, prefetch.

Image names hold '/' and ':', so the image is named in the body (`{"ref": ...}`), not the path.
"""

from __future__ import annotations

from typing import Any, Protocol

from aiohttp import web

from agent.api.responses import json_answer, optional_service
from core.errors import FerrymanError, InvalidRequest
from core.http.validate import check_keys, json_type, read_object, str_field


class CacheLike(Protocol):
    async def status(self) -> dict[str, Any]: ...
    async def pin(self, ref: str, pinned: bool = True) -> dict[str, Any]: ...
    async def evict(self, ref: str) -> dict[str, Any]: ...
    async def prefetch(self, ref: str, pin: bool = False) -> dict[str, Any]: ...


CACHE = web.AppKey("cache", CacheLike)


class CacheUnavailable(FerrymanError):
    code = "cache_unavailable"
    http_status = 503


def _cache(request: web.Request) -> CacheLike:
    return optional_service(request, CACHE, CacheUnavailable, "this agent keeps no layer cache")


def parse_ref(body: dict[str, Any], optional: frozenset[str] = frozenset()) -> str:
    check_keys(body, {"ref", *optional}, {"ref"}, "body")
    ref = str_field(body, "ref", "body")
    assert ref is not None
    return ref


async def cache_status(request: web.Request) -> web.Response:
    return json_answer(await _cache(request).status())


async def pin_image(request: web.Request) -> web.Response:
    return json_answer(await _cache(request).pin(parse_ref(await read_object(request))))


async def unpin_image(request: web.Request) -> web.Response:
    return json_answer(await _cache(request).pin(parse_ref(await read_object(request)), pinned=False))


async def evict_image(request: web.Request) -> web.Response:
    return json_answer(await _cache(request).evict(parse_ref(await read_object(request))))


async def prefetch_image(request: web.Request) -> web.Response:
    body = await read_object(request)
    ref = parse_ref(body, frozenset({"pin"}))
    pin = body.get("pin", False)
    if not isinstance(pin, bool):
        raise InvalidRequest(f"body.pin: expected a boolean, got {json_type(pin)}")
    return json_answer(await _cache(request).prefetch(ref, pin))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/cache/status", cache_status)
    app.router.add_post("/v1/cache/pin", pin_image)
    app.router.add_post("/v1/cache/unpin", unpin_image)
    app.router.add_post("/v1/cache/evict", evict_image)
    app.router.add_post("/v1/cache/prefetch", prefetch_image)
