"""Thin HTTP handlers for live migrations: validate input, call the migration service, serialise records.

A migration runs in the agent's background once started; the HTTP streams here only watch it, so a
client that disconnects (or a server that shuts down) ends its stream and never the migration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, Protocol

from aiohttp import web

from agent.api.handlers import METRICS, NDJSON, SHUTDOWN, _line, wants_stream
from agent.api.handlers import metrics as _base_metrics
from agent.api.responses import json_answer, optional_service
from agent.migration.record import MigrationOptions, MigrationRecord
from core.errors import FerrymanError, InvalidRequest
from core.http.validate import check_keys, positive_field, read_object, str_field
from core.ids import MIGRATION_ID_RE, check_container_id

log = logging.getLogger(__name__)

_REQUEST_FIELDS = {"container", "target", "downtime_target_ms", "max_iterations", "mode", "reservation"}


class MigrationServiceLike(Protocol):
    async def migrate(self, container_id: str, target: str, options: MigrationOptions) -> MigrationRecord: ...
    def get(self, migration_id: str) -> MigrationRecord: ...
    def list(self) -> list[MigrationRecord]: ...
    def watch(self, migration_id: str) -> AsyncIterator[MigrationRecord]: ...


MIGRATIONS = web.AppKey("migrations", MigrationServiceLike)


class MigrationsUnavailable(FerrymanError):
    """The agent runs without a migration service (e.g. no peers configured)."""

    code = "migrations_unavailable"
    http_status = 503


def _service(request: web.Request) -> MigrationServiceLike:
    return optional_service(request, MIGRATIONS, MigrationsUnavailable, "this agent has no migration service")


def _migration_id(request: web.Request) -> str:
    migration_id = request.match_info["id"]
    if not MIGRATION_ID_RE.fullmatch(migration_id):  # fullmatch: `$` alone would let a trailing "\n" through
        raise InvalidRequest(f"invalid migration id {migration_id!r}")
    return migration_id


def parse_migrate(body: dict[str, Any]) -> tuple[str, str, MigrationOptions]:
    """(container, target, options) from a request body; types and unknown fields are checked strictly."""
    check_keys(body, _REQUEST_FIELDS, {"container", "target"}, "body")
    container = str_field(body, "container", "body")
    target = str_field(body, "target", "body")
    assert container is not None and target is not None
    check_container_id(container)
    given: dict[str, Any] = {}
    for key in ("downtime_target_ms", "max_iterations"):
        value = positive_field(body, key, "body", integer=True)
        if value is not None:  # null means "the default", as for the container routes' optional fields
            given[key] = value
    mode = str_field(body, "mode", "body", optional=True)
    if mode is not None:
        given["mode"] = mode
    reservation = str_field(body, "reservation", "body", optional=True)
    if reservation is not None:  # held on the target by the coordinator; the target charges it
        given["reservation"] = reservation
    return container, target, MigrationOptions(**given).validated()


def _location(record: MigrationRecord) -> str:
    return f"/v1/migrations/{record.id}"


async def start_migration(request: web.Request) -> web.StreamResponse:
    container, target, options = parse_migrate(await read_object(request))
    service = _service(request)
    # Shielded: once asked for, the migration starts even if the client hangs up during the checks; it
    # must not depend on the ops client's connection (the client can find it in GET /v1/migrations).
    record = await asyncio.shield(service.migrate(container, target, options))
    if not wants_stream(request):
        resp = json_answer(record.for_storage(), status=202)
        resp.headers["Location"] = _location(record)
        return resp
    return await _stream(request, service.watch(record.id), status=202, location=_location(record))


async def list_migrations(request: web.Request) -> web.Response:
    return json_answer({"migrations": [r.for_storage() for r in _service(request).list()]})


async def get_migration(request: web.Request) -> web.Response:
    return json_answer(_service(request).get(_migration_id(request)).for_storage())


async def migration_events(request: web.Request) -> web.StreamResponse:
    migration_id = _migration_id(request)
    return await _stream(request, _service(request).watch(migration_id))


async def _stream(
    request: web.Request, records: AsyncIterator[MigrationRecord], *, status: int = 200, location: str | None = None
) -> web.StreamResponse:
    """One NDJSON line per record until a terminal one, the client leaves, or the server shuts down."""
    try:
        # The first record before the headers: an unknown id must still be a plain 404 JSON error.
        first = await anext(records)
        headers = {"Content-Type": NDJSON, "Cache-Control": "no-store"}
        if location is not None:
            headers["Location"] = location
        resp = web.StreamResponse(status=status, headers=headers)
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):  # the client left: the migration goes on regardless
            await resp.write(_line(first.for_storage()))
            if not first.done:
                await _follow(request, resp, records)
            await resp.write_eof()
        return resp
    finally:
        await _close(records)


async def _follow(request: web.Request, resp: web.StreamResponse, records: AsyncIterator[MigrationRecord]) -> None:
    shutdown = asyncio.ensure_future(request.app[SHUTDOWN].wait())
    step: asyncio.Future[MigrationRecord] | None = None
    try:
        while True:
            step = asyncio.ensure_future(anext(records))
            await asyncio.wait({step, shutdown}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                return  # shutting down: end the stream; the client can re-attach to /events later
            try:
                record = step.result()
            except StopAsyncIteration:
                return
            except Exception as exc:
                # Headers are gone: say it in-band, in the error shape the API uses everywhere else.
                await resp.write(_line(_error_line(exc)))
                return
            await resp.write(_line(record.for_storage()))
            if record.done:
                return
    finally:
        shutdown.cancel()
        if step is not None and not step.done():
            # Stop the pending read before the watch is closed (a running generator cannot be closed).
            step.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await step


def _error_line(exc: Exception) -> dict[str, Any]:
    if isinstance(exc, FerrymanError):
        return {"error": {"code": exc.code, "message": exc.message}}
    log.error("migration watch failed unexpectedly", exc_info=exc)
    return {"error": {"code": "internal", "message": "internal server error"}}


async def _close(records: AsyncIterator[MigrationRecord]) -> None:
    """Close the watch so the service drops its subscriber queue now, not at garbage collection."""
    aclose = getattr(records, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


async def metrics(request: web.Request) -> web.Response:
    """/metrics: refresh the active-migrations gauge, then the agent's usual scrape."""
    service = request.app.get(MIGRATIONS)
    if service is not None:
        request.app[METRICS].set_active_migrations(service.list())
    return await _base_metrics(request)
