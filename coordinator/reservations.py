"""Reservations: capacity held on a target host for a placement, with a TTL.

The store's atomic check-and-insert is what prevents double-booking; this service adds the agent's
side (the target agent holds the same reservation and refuses work that would eat it) and expiry.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
from collections.abc import Callable

from coordinator.agents import AgentClientLike
from coordinator.config import CoordinatorConfig
from coordinator.metrics import CoordinatorMetrics
from coordinator.model import Capacity, Host, HostNotFound, InsufficientCapacity, Reservation
from coordinator.store import Store
from core.errors import FerrymanError, InvalidRequest

log = logging.getLogger(__name__)


class ReservationService:
    def __init__(
        self,
        store: Store,
        agents: AgentClientLike,
        config: CoordinatorConfig,
        clock: Callable[[], float],
        metrics: CoordinatorMetrics,
    ) -> None:
        self._store = store
        self._agents = agents
        self._config = config
        self._clock = clock
        self._metrics = metrics

    async def reserve(
        self, host: str, capacity: Capacity, purpose: str, ttl: float | None = None, *, on_agent: bool = True
    ) -> Reservation:
        """Hold `capacity` on `host` for `ttl` seconds: InsufficientCapacity if it does not fit.

        `on_agent=False`: in the store only; the caller hands the reservation to the agent with the
        work it reserves for (a create carrying it, held there for that request), one round trip
        instead of a hold before it and a release after."""
        ttl = self._config.reservations.ttl if ttl is None else ttl
        if not 0 < ttl <= self._config.reservations.max_ttl:
            raise InvalidRequest(f"ttl must be within (0, {self._config.reservations.max_ttl}] seconds, got {ttl}")
        if min(capacity.cpu_millis, capacity.memory_bytes, capacity.disk_bytes) < 0:
            raise InvalidRequest("a reservation cannot hold negative capacity")
        now = self._clock()
        reservation = Reservation(
            id=f"rsv-{secrets.token_hex(8)}",
            host=host,
            capacity=capacity,
            expires_at=now + ttl,
            purpose=purpose,
            created_at=now,
        )
        try:
            await self._store.reserve(reservation, now)
        except InsufficientCapacity:
            self._metrics.reservations.labels(result="refused").inc()
            raise
        if not on_agent:
            self._metrics.reservations.labels(result="held").inc()
            return reservation
        target = await self._store.get_host(host)
        if target is None:  # unregistered between the insert and now: the cascade removed it
            raise HostNotFound(f"no host {host!r} is registered")
        reservation = await self.hold_on_agent(target, reservation)
        self._metrics.reservations.labels(result="held").inc()
        log.info(
            "reserved",
            extra={"reservation": reservation.id, "host": host, "capacity": capacity.to_dict(), "purpose": purpose},
        )
        return reservation

    async def hold_on_agent(self, target: Host, reservation: Reservation) -> Reservation:
        """Have `target`'s agent hold a reservation made in the store; refused: it leaves the store too
        (InsufficientCapacity)."""
        if not target.api_url:
            return reservation
        try:
            await self._agents.hold_reservation(target, reservation)
        except FerrymanError as exc:
            await self._store.release(reservation.id)
            self._metrics.reservations.labels(result="agent_refused").inc()
            if isinstance(exc, InsufficientCapacity):
                raise
            raise InsufficientCapacity(f"agent {target.name} could not hold the reservation: {exc.message}") from exc
        await self._store.mark_held(reservation.id)
        return dataclasses.replace(reservation, held_by_agent=True)

    async def release(self, reservation_id: str, *, agent_too: bool = True) -> Reservation | None:
        """Forget a reservation here and (best effort) on its agent; None if it was not held."""
        reservation = await self._store.release(reservation_id)
        if reservation is not None and agent_too and reservation.held_by_agent:
            host = await self._store.get_host(reservation.host)
            if host is not None:
                await self._release_on_agent(host, reservation_id)
        return reservation

    async def _release_on_agent(self, host: Host, reservation_id: str) -> None:
        try:
            await self._agents.release_reservation(host, reservation_id)
        except FerrymanError as exc:
            # The agent expires it by itself at the same deadline; this only frees it early.
            log.warning(
                "agent did not release reservation",
                extra={"host": host.name, "reservation": reservation_id, "error": exc.message},
            )

    async def active(self) -> list[Reservation]:
        return await self._store.list_reservations(self._clock())

    async def sweep(self) -> list[Reservation]:
        expired = await self._store.expired_reservations(self._clock())
        for reservation in expired:
            await self.release(reservation.id)
            log.info("reservation expired", extra={"reservation": reservation.id, "host": reservation.host})
        return expired

    async def run_sweeper(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.sweep()
            except Exception:
                log.exception("reservation sweep failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._config.reservations.sweep_period)
