"""ferryctl's `reservations`: capacity held for work that is about to arrive.

With a coordinator (`--coordinator` or $FERRYMAN_COORDINATOR) they are the fleet's: `create`
places one on the best host (or `--host`), `list` shows all of them, `release` frees one on the
coordinator and its agent. Without, they are the one agent's (`GET/POST/DELETE /v1/reservations`):
what the coordinator holds there, and what an operator holds by hand.
"""

from __future__ import annotations

import argparse
import secrets
import time
from typing import Any, Protocol
from urllib.parse import quote

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from agent.api.reservations import parse_reservation
from agent.ctl import render
from agent.ctl.args import cpus, memory_size
from agent.reservations import MAX_TTL, check_reservation_id
from core.errors import InvalidRequest
from core.http.validate import capacity_fields

DEFAULT_TTL = 300.0
"""Seconds a reservation made by hand lives unless `--ttl` says otherwise."""


class Requester(Protocol):
    async def request(
        self, method: str, path: str, *, params: dict[str, str] | None = None, body: Any = None
    ) -> Any: ...


class ReservationUsageError(Exception):
    """A reservation request the API would refuse, caught before sending it."""


def _cpu_millis(text: str) -> int:
    return round(cpus(text) * 1000)


def _ttl(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 < value <= MAX_TTL:
        raise argparse.ArgumentTypeError(f"must be within (0, {MAX_TTL:g}] seconds, got {text!r}")
    return value


def add_parser(sub: Any) -> None:
    p = sub.add_parser("reservations", help="capacity held on hosts: list, create or release reservations")
    actions = p.add_subparsers(dest="reservations_command", metavar="SUBCOMMAND")
    actions.add_parser("list", help="the reservations held (the default)")
    create = actions.add_parser("create", help="hold capacity on a host")
    create.add_argument("--cpus", type=_cpu_millis, default=0, help="CPU in cores, e.g. 0.5 (capacity.cpu_millis)")
    create.add_argument("--memory", "-m", type=memory_size, default=0, help="memory, e.g. 256M (capacity.memory_bytes)")
    create.add_argument("--disk", type=memory_size, default=0, help="disk, e.g. 1G (capacity.disk_bytes)")
    create.add_argument(
        "--ttl", type=_ttl, default=None, help=f"seconds until it expires (agent: default {DEFAULT_TTL:g})"
    )
    create.add_argument("--purpose", default=None, help="what it is for (shown in listings)")
    create.add_argument("--host", default=None, help="coordinator: the host to reserve on (default auto: the best)")
    create.add_argument("--image", default=None, help="coordinator: prefer hosts that hold this image's layers")
    create.add_argument("--id", dest="reservation_id", default=None, help="agent: the reservation's id (generated)")
    release = actions.add_parser("release", help="free a reservation")
    release.add_argument("id")


def _capacity(args: argparse.Namespace) -> dict[str, int]:
    raw = {"cpu_millis": args.cpus, "memory_bytes": args.memory, "disk_bytes": args.disk}
    try:
        capacity = capacity_fields(raw, "capacity")
    except InvalidRequest as exc:
        raise ReservationUsageError(exc.message) from exc
    if not any(capacity.values()):
        raise ReservationUsageError("give at least one of --cpus, --memory and --disk")
    return capacity


def coordinator_body(args: argparse.Namespace) -> dict[str, Any]:
    """The body of the coordinator's POST /v1/reservations."""
    if args.reservation_id is not None:
        raise ReservationUsageError("--id: the coordinator names its reservations")
    body: dict[str, Any] = {"capacity": _capacity(args), "host": args.host or "auto"}
    for key in ("ttl", "purpose", "image"):
        if (value := getattr(args, key)) is not None:
            body[key] = value
    return body


def agent_body(args: argparse.Namespace, now: float) -> dict[str, Any]:
    """The body of an agent's POST /v1/reservations (a Reservation), checked with the agent's parser."""
    unsupported = [flag for flag, value in (("--host", args.host), ("--image", args.image)) if value is not None]
    if unsupported:
        raise ReservationUsageError(f"{', '.join(unsupported)}: only with a coordinator (--coordinator URL)")
    body: dict[str, Any] = {
        "id": args.reservation_id or f"ops-{secrets.token_hex(6)}",
        "capacity": _capacity(args),
        "expires_at": now + (args.ttl if args.ttl is not None else DEFAULT_TTL),
        "purpose": args.purpose or "ops",
    }
    try:
        check_reservation_id(body["id"])
        parse_reservation(body)
    except InvalidRequest as exc:
        raise ReservationUsageError(exc.message) from exc
    return body


async def run(client: Requester, args: argparse.Namespace, out: Console, *, coordinator: bool) -> int:
    """`reservations ...` against the coordinator or one agent (both answer the same paths)."""
    match args.reservations_command:
        case "create":
            body = coordinator_body(args) if coordinator else agent_body(args, time.time())
            held = await client.request("POST", "/v1/reservations", body=body)
            if args.json:
                render.print_json(held)
            else:
                render.say(f"{held['id']} on {held['host']} until {render.clock_time(held.get('expires_at'))}")
        case "release":
            await client.request("DELETE", f"/v1/reservations/{quote(args.id, safe='')}")
            if args.json:
                render.print_json({"id": args.id, "released": True})
            else:
                render.say(f"{args.id} released")
        case _:
            data = await client.request("GET", "/v1/reservations")
            if args.json:
                render.print_json(data)
            else:
                render.print_table(out, reservations_table(data.get("reservations", [])))
    return 0


def reservations_table(reservations: list[dict[str, Any]]) -> Table:
    table = render.new_table("ID", "HOST", "CPU", "MEMORY", "DISK", "EXPIRES", "PURPOSE")
    for r in sorted(reservations, key=lambda r: float(r.get("expires_at") or 0)):
        cap = r.get("capacity") or {}
        table.add_row(
            escape(str(r["id"])),
            escape(str(r.get("host", ""))),
            f"{float(cap.get('cpu_millis', 0)) / 1000:g}",
            render.human_size(cap.get("memory_bytes")),
            render.human_size(cap.get("disk_bytes")),
            render.clock_time(r.get("expires_at")),
            escape(str(r.get("purpose", ""))),
        )
    return table
