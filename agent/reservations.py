"""Capacity the coordinator holds on this host for placements and migrations, and admission against it.

The coordinator reserves CPU, memory and disk here for a container it is about to place (a migration
target, usually) with a TTL. Until the reservation is released or expires, nothing else may use that
capacity: a plain `ferryctl run`, or another migration, is refused (HTTP 409) when it would need it.

API for the migration code (the target side):

* PREPARE: ``await reservations.admit(need, reservation_id)`` — the need is charged to that reservation
  (only what exceeds it must be free besides); raises `CapacityReserved` (409) when it does not fit and
  `ReservationNotFound` (404) when the id is unknown or expired.
* COMMIT or ROLLBACK: ``await reservations.release(reservation_id)`` — returns False when it was already
  gone (expired, or released twice), so a rollback path can call it unconditionally.

Accounting, per dimension (cpu millicores, memory bytes, disk bytes):

    free = capacity - used by active containers - held by reservations

where a container's use is its limit, or what it uses now when it has none, and a reservation holds
the larger of its capacity and what was admitted against it. A reservation keeps holding after
admission, until it is released: between the restore and the commit the workload is counted twice,
which can only refuse more, never over-commit.

Reservations survive an agent restart: they are persisted to `<state_dir>/reservations.json`
(written atomically) and reloaded, minus those that expired meanwhile. A reservation held for one
request (`held_for`: the coordinator's create of a container it placed carries its reservation) is
not written: it ends with the request, and a restart ends the request too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from agent.telemetry.containers import ContainerReading
from core.errors import Conflict, InvalidRequest, NotFound
from core.files import atomic_write
from proto.ferryman.v1 import fleet_pb2 as pb

log = logging.getLogger(__name__)

STATE_FILE = "reservations.json"
FILE_VERSION = 1
MAX_TTL = 86400.0
"""Seconds: a reservation further in the future than this is a coordinator bug or a broken clock."""
SWEEP_PERIOD = 1.0
"""Seconds between expiry sweeps (expired reservations never count, swept or not)."""
RESERVATION_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")


class CapacityReserved(Conflict):
    """Admitting a container or migration would use capacity reserved for someone else."""

    code = "capacity_reserved"


class InsufficientCapacity(Conflict):
    """A reservation asks for more than this host has free."""

    code = "insufficient_capacity"


class ReservationNotFound(NotFound):
    code = "reservation_not_found"


@dataclass(frozen=True)
class Amount:
    """A quantity of each resource; may go negative while computing what is free."""

    cpu_millis: float = 0.0
    memory_bytes: int = 0
    disk_bytes: int = 0

    @classmethod
    def of(cls, capacity: pb.Capacity) -> Amount:
        return cls(float(capacity.cpu_millis), int(capacity.memory_bytes), int(capacity.disk_bytes))

    def to_pb(self) -> pb.Capacity:
        return pb.Capacity(
            cpu_millis=max(round(self.cpu_millis), 0),
            memory_bytes=max(self.memory_bytes, 0),
            disk_bytes=max(self.disk_bytes, 0),
        )

    def to_json(self) -> dict[str, Any]:
        return {"cpu_millis": self.cpu_millis, "memory_bytes": self.memory_bytes, "disk_bytes": self.disk_bytes}

    @classmethod
    def from_json(cls, data: Any) -> Amount:
        return cls(float(data["cpu_millis"]), int(data["memory_bytes"]), int(data["disk_bytes"]))

    def __add__(self, other: Amount) -> Amount:
        return Amount(
            self.cpu_millis + other.cpu_millis,
            self.memory_bytes + other.memory_bytes,
            self.disk_bytes + other.disk_bytes,
        )

    def __sub__(self, other: Amount) -> Amount:
        return Amount(
            self.cpu_millis - other.cpu_millis,
            self.memory_bytes - other.memory_bytes,
            self.disk_bytes - other.disk_bytes,
        )

    def max(self, other: Amount) -> Amount:
        return Amount(
            max(self.cpu_millis, other.cpu_millis),
            max(self.memory_bytes, other.memory_bytes),
            max(self.disk_bytes, other.disk_bytes),
        )

    def clamp(self) -> Amount:
        return self.max(Amount())

    def exceeds(self, limit: Amount) -> list[str]:
        """The dimensions in which self is larger than `limit`, described for an error message."""
        out = []
        if self.cpu_millis > limit.cpu_millis:
            out.append(f"cpu {self.cpu_millis:.0f}m > {max(limit.cpu_millis, 0):.0f}m free")
        if self.memory_bytes > limit.memory_bytes:
            out.append(f"memory {_mib(self.memory_bytes)} > {_mib(max(limit.memory_bytes, 0))} free")
        if self.disk_bytes > limit.disk_bytes:
            out.append(f"disk {_mib(self.disk_bytes)} > {_mib(max(limit.disk_bytes, 0))} free")
        return out


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def total(amounts: Iterable[Amount]) -> Amount:
    out = Amount()
    for amount in amounts:
        out = out + amount
    return out


def committed(containers: Iterable[ContainerReading]) -> Amount:
    """What active containers may use: limits, or current use where they have none."""
    return total(Amount(c.committed_cpu_millis, c.committed_memory, 0) for c in containers)


@dataclass(frozen=True)
class Held:
    """One reservation on this host and what has been admitted against it."""

    id: str
    host: str
    capacity: Amount
    expires_at: float
    purpose: str
    claimed: Amount = Amount()
    durable: bool = True
    """Written to the state file. A reservation held for one request only (`held_for`) is not: it
    lives no longer than the request, which an agent restart ends as well."""

    @property
    def holding(self) -> Amount:
        return self.capacity.max(self.claimed)

    def to_pb(self) -> pb.Reservation:
        return pb.Reservation(
            id=self.id,
            host=self.host,
            capacity=self.capacity.to_pb(),
            expires_at=self.expires_at,
            purpose=self.purpose,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "host": self.host,
            "capacity": self.capacity.to_json(),
            "expires_at": self.expires_at,
            "purpose": self.purpose,
            "claimed": self.claimed.to_json(),
        }

    @classmethod
    def from_json(cls, data: Any) -> Held:
        return cls(
            id=str(data["id"]),
            host=str(data["host"]),
            capacity=Amount.from_json(data["capacity"]),
            expires_at=float(data["expires_at"]),
            purpose=str(data["purpose"]),
            claimed=Amount.from_json(data["claimed"]),
        )


class Admission(Protocol):
    """What the container service needs: `Reservations.admit`."""

    async def admit(self, need: pb.Capacity | Amount, reservation_id: str | None = None) -> None: ...


class ReservationBook(Admission, Protocol):
    """What a migration target needs: admit against a reservation, then give it back."""

    async def release(self, reservation_id: str) -> bool: ...


def container_need(cpus: float | None, memory: int | None) -> Amount:
    """A container's need from its limits (cores, bytes); no limit counts as 0 (see `admit`)."""
    return Amount(cpu_millis=(cpus or 0.0) * 1000, memory_bytes=memory or 0)


CapacitySource = Callable[[], Awaitable[Amount]]
"""What the host offers now (async: detected disk capacity is measured)."""
UsageSource = Callable[[], Awaitable[list[ContainerReading]]]
"""The active containers and their limits / use."""


def check_reservation_id(reservation_id: str) -> None:
    if not RESERVATION_ID_RE.fullmatch(reservation_id):
        raise InvalidRequest(f"reservation id {reservation_id!r} must match {RESERVATION_ID_RE.pattern}")


class Reservations:
    """The reservations on this host: reserve, release, admit, expire, persist."""

    def __init__(
        self,
        host: str,
        state_dir: str | os.PathLike[str],
        capacity: CapacitySource,
        usage: UsageSource,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.host = host
        self.path = Path(state_dir) / STATE_FILE
        self._capacity = capacity
        self._usage = usage
        self._clock = clock
        self._items: dict[str, Held] = {}
        # One placement decision at a time: the check and the booking must not interleave.
        self._lock = asyncio.Lock()
        self._sweeper: asyncio.Task[None] | None = None

    # ---- lifecycle

    async def open(self) -> None:
        """Load persisted reservations (dropping expired ones) and start the expiry sweep."""
        self._items = await asyncio.to_thread(self._load)
        self._drop_expired()
        if self._items:
            log.info("reservations restored", extra={"count": len(self._items), "ids": sorted(self._items)})
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="reservations-expiry")

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    # ---- the coordinator's side

    async def reserve(self, reservation: pb.Reservation, *, durable: bool = True) -> Held:
        """Hold `reservation.capacity` here until `expires_at`; InsufficientCapacity (409) when it does not fit.

        Reserving an id that exists replaces it (a renewal, or a changed size): the old one does
        not count against the new one, and what was admitted against it stays admitted.
        `durable=False`: kept in memory only (see `held_for`).
        """
        self._validate(reservation)
        wanted = Amount.of(reservation.capacity)
        async with self._lock:
            self._drop_expired()
            existing = self._items.get(reservation.id)
            others = [h for h in self._items.values() if h.id != reservation.id]
            free = await self._free(others)
            already = existing.claimed if existing is not None else Amount()
            # What was already admitted under this id is in use, not newly asked for.
            short = (wanted - already).clamp().exceeds(free)
            if short:
                raise InsufficientCapacity(
                    f"host {self.host} cannot reserve {reservation.id}: {', '.join(short)}"
                    f" ({len(others)} other reservation(s) hold {_describe(total(h.holding for h in others))})"
                )
            held = Held(
                id=reservation.id,
                host=self.host,
                capacity=wanted,
                expires_at=reservation.expires_at,
                purpose=reservation.purpose,
                claimed=already,
                durable=durable,
            )
            replaced = self._items.get(held.id)
            self._items[held.id] = held
            if durable or (replaced is not None and replaced.durable):
                await self._persist()
        log.info(
            "reserved",
            extra={"reservation": held.id, "purpose": held.purpose, "expires_at": held.expires_at, **wanted.to_json()},
        )
        return held

    async def release(self, reservation_id: str) -> bool:
        """Give the capacity back (commit, rollback, or the coordinator's DELETE); False when unknown."""
        async with self._lock:
            held = self._items.pop(reservation_id, None)
            if held is None:
                return False
            if held.durable:
                await self._persist()
        log.info("reservation released", extra={"reservation": reservation_id})
        return True

    @contextlib.asynccontextmanager
    async def held_for(self, reservation: pb.Reservation) -> AsyncIterator[Held]:
        """`reservation` held while the block runs, released when it ends however it ends: the
        coordinator's create of a container it placed, one request instead of a hold, the create
        and a release. Not written to the state file (no disk sync on the start's path): an agent
        restart ends the request, and the coordinator drops its side when the call fails."""
        held = await self.reserve(reservation, durable=False)
        try:
            yield held
        finally:
            await self.release(held.id)

    # ---- the agent's side

    async def admit(self, need: pb.Capacity | Amount, reservation_id: str | None = None) -> None:
        """Allow a container or migration needing `need`, or raise CapacityReserved (409).

        Without `reservation_id`: `need` must fit in what is free after every reservation, and there
        must be some CPU and memory left at all (a container without limits still uses some). With
        it: `need` is charged to that reservation; only the part beyond it must be free besides.
        Only reserved capacity is protected: in a dimension no (other) reservation holds, admission
        refuses nothing, so a host without reservations behaves as if there were no admission.
        """
        amount = need if isinstance(need, Amount) else Amount.of(need)
        async with self._lock:
            self._drop_expired()
            own: Held | None = None
            if reservation_id is not None:
                own = self._items.get(reservation_id)
                if own is None:
                    raise ReservationNotFound(f"no reservation {reservation_id} on host {self.host} (expired?)")
            others = [h for h in self._items.values() if own is None or h.id != own.id]
            free = await self._free(others)
            if own is not None:
                # Unused part of the own reservation first; the free pool must cover the rest.
                available = (own.capacity - own.claimed).clamp()
                free = free - own.holding + available
            held = total(h.holding for h in others)
            # Only what others hold is protected: a dimension nobody reserved may be overcommitted as
            # before (CPU, typically), that is the placement's business, not admission's.
            short = amount.exceeds(_protected(free, held))
            if own is None and not short:
                short = [
                    f"no {what} left"
                    for what, left, reserved in (
                        ("cpu", free.cpu_millis, held.cpu_millis),
                        ("memory", free.memory_bytes, held.memory_bytes),
                    )
                    if reserved > 0 and left <= 0
                ]
            if short:
                raise CapacityReserved(
                    f"host {self.host} cannot admit {_describe(amount)}: {', '.join(short)}"
                    f" ({len(others)} reservation(s) hold {_describe(held)})"
                )
            if own is not None:
                self._items[own.id] = replace(own, claimed=own.claimed + amount)
                if own.durable:
                    await self._persist()

    # ---- reading

    def reserved(self) -> Amount:
        """Capacity held by unexpired reservations now (telemetry's `reserved`)."""
        now = self._clock()
        return total(h.holding for h in self._items.values() if h.expires_at > now)

    def held(self) -> list[Held]:
        """Unexpired reservations, soonest expiry first."""
        now = self._clock()
        return sorted((h for h in self._items.values() if h.expires_at > now), key=lambda h: (h.expires_at, h.id))

    async def free(self) -> Amount:
        """Capacity neither used by containers nor held by reservations (may be negative)."""
        async with self._lock:
            self._drop_expired()
            return await self._free(list(self._items.values()))

    # ---- internals

    def _validate(self, reservation: pb.Reservation) -> None:
        check_reservation_id(reservation.id)
        if reservation.host and reservation.host != self.host:
            raise InvalidRequest(
                f"reservation {reservation.id} is for host {reservation.host!r}, this is {self.host!r}"
            )
        if not reservation.HasField("capacity"):
            raise InvalidRequest(f"reservation {reservation.id} has no capacity")
        now = self._clock()
        if not math.isfinite(reservation.expires_at):
            # NaN passes both range checks below (every comparison is false): such a reservation
            # would never expire, be hidden from listings, and hold its capacity for good.
            raise InvalidRequest(f"reservation {reservation.id} expires_at must be a finite unix time")
        if reservation.expires_at <= now:
            raise InvalidRequest(
                f"reservation {reservation.id} expires in the past ({reservation.expires_at:.3f} <= now {now:.3f})"
            )
        if reservation.expires_at > now + MAX_TTL:
            raise InvalidRequest(f"reservation {reservation.id} expires more than {MAX_TTL:.0f} s from now")

    async def _free(self, holders: Iterable[Held]) -> Amount:
        capacity = await self._capacity()
        used = committed(await self._usage())
        return capacity - used - total(h.holding for h in holders)

    def _drop_expired(self) -> list[str]:
        now = self._clock()
        gone = [rid for rid, h in self._items.items() if h.expires_at <= now]
        for rid in gone:
            del self._items[rid]
            log.info("reservation expired", extra={"reservation": rid})
        return gone

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_PERIOD)
            async with self._lock:
                if self._drop_expired():
                    await self._persist()

    async def _persist(self) -> None:
        kept = [h.to_json() for h in self._items.values() if h.durable]
        data = {"version": FILE_VERSION, "reservations": kept}
        await asyncio.to_thread(_write_json, self.path, data)

    def _load(self) -> dict[str, Held]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            data = json.loads(raw)
            if data.get("version") != FILE_VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {FILE_VERSION}")
            items = [Held.from_json(item) for item in data["reservations"]]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # Keep the file for a person to look at; start empty rather than refuse to start the agent.
            aside = self.path.with_name(f"{STATE_FILE}.corrupt-{int(time.time())}")
            self.path.rename(aside)
            log.error("reservations file unreadable, moved aside", extra={"path": str(aside), "error": str(exc)})
            return {}
        return {h.id: h for h in items}


_UNBOUNDED = 1 << 62


def _protected(free: Amount, held: Amount) -> Amount:
    """`free` where reservations hold something; unbounded in dimensions nobody reserved."""
    return Amount(
        free.cpu_millis if held.cpu_millis > 0 else float(_UNBOUNDED),
        free.memory_bytes if held.memory_bytes > 0 else _UNBOUNDED,
        free.disk_bytes if held.disk_bytes > 0 else _UNBOUNDED,
    )


def _describe(amount: Amount) -> str:
    return f"cpu {amount.cpu_millis:.0f}m, memory {_mib(amount.memory_bytes)}, disk {_mib(amount.disk_bytes)}"


def _write_json(path: Path, data: Any) -> None:
    atomic_write(path, json.dumps(data, indent=1, sort_keys=True), mode=0o600)
