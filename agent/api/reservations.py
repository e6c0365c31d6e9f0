"""Thin HTTP handlers for the coordinator's reservations on this host (agent/reservations.py)."""

from __future__ import annotations

from typing import Any, Protocol

from aiohttp import web
from google.protobuf import json_format

from agent.api.handlers import _json, optional_service
from agent.reservations import Amount, Held, ReservationNotFound
from core.errors import FerrymanError, InvalidRequest
from core.http.validate import check_message, read_object
from proto.ferryman.v1 import fleet_pb2 as pb


class ReservationsLike(Protocol):
    async def reserve(self, reservation: pb.Reservation) -> Held: ...
    async def release(self, reservation_id: str) -> bool: ...
    def held(self) -> list[Held]: ...
    def reserved(self) -> Amount: ...
    async def free(self) -> Amount: ...


RESERVATIONS = web.AppKey("reservations", ReservationsLike)


class ReservationsUnavailable(FerrymanError):
    code = "reservations_unavailable"
    http_status = 503


def _reservations(request: web.Request) -> ReservationsLike:
    return optional_service(request, RESERVATIONS, ReservationsUnavailable, "this agent keeps no reservations")


def parse_reservation(body: dict[str, Any]) -> pb.Reservation:
    """A Reservation from its protobuf JSON; unknown fields, wrong types and unbounded numbers are InvalidRequest."""
    message = pb.Reservation()
    try:
        json_format.ParseDict(body, message)
    except json_format.ParseError as exc:
        raise InvalidRequest(f"body: not a Reservation: {exc}") from exc
    check_message(message, "body")
    return message


async def create_reservation(request: web.Request) -> web.Response:
    reservation = parse_reservation(await read_object(request))
    held = await _reservations(request).reserve(reservation)
    return _json(held.to_json(), status=201)


async def list_reservations(request: web.Request) -> web.Response:
    reservations = _reservations(request)
    free = await reservations.free()
    return _json(
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
