"""What every handler module shares: JSON answers and services an agent may be built without.

Its own module so that modules `handlers` imports from (compositions, reservations) can use them too."""

from __future__ import annotations

from typing import Any, TypeVar

from aiohttp import web

from core.errors import FerrymanError

T = TypeVar("T")


def optional_service(request: web.Request, key: web.AppKey[T], unavailable: type[FerrymanError], message: str) -> T:
    """The service under `key`, or `unavailable(message)` (a 503) for an agent built without it."""
    service = request.app.get(key)
    if service is None:
        raise unavailable(message)
    return service


def json_answer(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status)
