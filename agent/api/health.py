"""Thin HTTP handler for containers' health (agent/health): the state, or the next change of it.

`GET /v1/containers/{id}/health?after=SEQ&wait=SECONDS` answers as soon as the container's health
has a `seq` past `after`, or after `wait` seconds with it unchanged; without `after`, at once.
"""

from __future__ import annotations

from typing import Any, Protocol

from aiohttp import web

from agent.api.handlers import _container_id
from agent.api.responses import json_answer, optional_service
from core.errors import FerrymanError
from core.http.validate import check_keys, query_number

MAX_WAIT = 300.0
"""Seconds one request may wait for a change (agent.health.monitor.MAX_WAIT)."""
INT64_MAX = 2**63 - 1


class HealthLike(Protocol):
    async def wait(self, container_id: str, after: int | None, timeout: float) -> dict[str, Any]: ...  # noqa: ASYNC109
    def release_waiters(self) -> None: ...


HEALTH = web.AppKey("health", HealthLike)


class HealthUnavailable(FerrymanError):
    code = "health_unavailable"
    http_status = 503


async def container_health(request: web.Request) -> web.Response:
    cid = _container_id(request)
    check_keys(dict(request.query), {"after", "wait"}, set(), "query")
    after = query_number(request, "after", integer=True, maximum=INT64_MAX)
    wait = query_number(request, "wait", integer=False, maximum=MAX_WAIT)
    monitor = optional_service(request, HEALTH, HealthUnavailable, "this agent runs no health checks")
    return json_answer(await monitor.wait(cid, after, wait if wait is not None else 0.0))


async def _release_waiters(app: web.Application) -> None:
    """At shutdown, long polls answer at once rather than hold the server up."""
    if HEALTH in app:
        app[HEALTH].release_waiters()


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/containers/{id}/health", container_health)
    app.on_shutdown.append(_release_waiters)
