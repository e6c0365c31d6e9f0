"""Thin HTTP handlers for the coordinator's reservations on this host (agent/reservations.py)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, Protocol

from aiohttp import web
from google.protobuf import json_format

from agent.api.responses import json_answer, optional_service
from agent.reservations import Amount, Held, ReservationNotFound
from core.errors import FerrymanError, InvalidRequest
from core.http.validate import check_message, read_object
from proto.ferryman.v1 import fleet_pb2 as pb


class ReservationsLike(Protocol):
    async def reserve(self, reservation: pb.Reservation) -> Held: ...
    async def release(self, reservation_id: str) -> bool: ...
    def held_for(self, reservation: pb.Reservation) -> contextlib.AbstractAsyncContextManager[Held]: ...
    def held(self) -> list[Held]: ...
    def reserved(self) -> Amount: ...
    async def free(self) -> Amount: ...


RESERVATIONS = web.AppKey("reservations", ReservationsLike)


class ReservationsUnavailable(FerrymanError):
    code = "reservations_unavailable"
    http_status = 503


def _reservations(request: web.Request) -> ReservationsLike:
    return optional_service(request, RESERVATIONS, ReservationsUnavailable, "this agent keeps no reservations")


def parse_reservation(body: dict[str, Any], where: str = "body") -> pb.Reservation:
    """A Reservation from its protobuf JSON; unknown fields, wrong types and unbounded numbers are InvalidRequest."""
    message = pb.Reservation()
    try:
        json_format.ParseDict(body, message)
    except json_format.ParseError as exc:
        raise InvalidRequest(f"{where}: not a Reservation: {exc}") from exc
    check_message(message, where)
    return message


@contextlib.asynccontextmanager
async def held_for_create(request: web.Request, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """A `POST /v1/containers` body whose `reservation` is a Reservation object (the coordinator's
    create of a container it placed) rather than the id of one held before: the reservation is held
    for this request (refused with 409 insufficient_capacity when it does not fit, before anything
    is fetched or made), and the body, naming it by id, is what the block creates from; released
    when the block ends. Other bodies pass through unchanged."""
    given = body.get("reservation")
    if not isinstance(given, dict):
        yield body
        return
    async with _reservations(request).held_for(parse_reservation(given, "body.reservation")) as held:
        yield {**body, "reservation": held.id}


async def create_reservation(request: web.Request) -> web.Response:
    reservation = parse_reservation(await read_object(request))
    held = await _reservations(request).reserve(reservation)
    return json_answer(held.to_json(), status=201)


async def list_reservations(request: web.Request) -> web.Response:
    reservations = _reservations(request)
    free = await reservations.free()
    return json_answer(
        {
            "reservations": [h.to_json() for h in reservations.held()],
            "reserved": reservations.reserved().to_json(),
            "free": free.to_json(),
        }
    )


async def delete_reservation(request: web.Request) -> web.Response:
    reservation_id = request.match_info["id"]
    if not await _reservations(request).release(reservation_id):
        raise ReservationNotFound(f"no reservation {reservation_id} on this host")
    return web.Response(status=204)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/reservations", create_reservation)
    app.router.add_get("/v1/reservations", list_reservations)
    app.router.add_delete("/v1/reservations/{id}", delete_reservation)
