"""New containers started through the coordinator: placed by predicted time to running, then created
on the chosen host's agent, charged to the reservation made for them.

The reservation is not released when the container runs: it lapses after its TTL. Until then the
host's room is counted twice (the reservation and the container's use in telemetry), which errs on
the side of never double-booking while the first samples of the new container arrive.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from coordinator.agents import AgentClientLike
from coordinator.costs import CostBook
from coordinator.model import HostNotFound
from coordinator.placement import Need, Placer
from coordinator.reservations import ReservationService
from coordinator.store import Store

log = logging.getLogger(__name__)


class ContainerStarts:
    def __init__(
        self,
        store: Store,
        placer: Placer,
        reservations: ReservationService,
        agents: AgentClientLike,
        create_timeout: float,
        costs: CostBook | None = None,
    ) -> None:
        self._store = store
        self._placer = placer
        self._reservations = reservations
        self._agents = agents
        self._create_timeout = create_timeout
        self._costs = costs

    async def start(self, spec: Mapping[str, Any], need: Need, ttl: float | None = None) -> dict[str, Any]:
        """Place, reserve, create and start; the placement (with its prediction) and the container.
        A failed create releases the reservation: nothing is left behind."""
        started = time.monotonic()
        placement = await self._placer.place_start(need, f"container {spec.get('id', '')}", ttl=ttl)
        reservation = placement.reservation
        try:
            host = await self._store.get_host(reservation.host)
            if host is None:
                raise HostNotFound(f"host {reservation.host} left the fleet")
            container = await self._agents.create_container(
                host, {**spec, "reservation": reservation.id}, self._create_timeout
            )
        except BaseException:
            await self._reservations.release(reservation.id)
            raise
        seconds = time.monotonic() - started
        if self._costs is not None:  # the next prediction for this host learns from this one
            self._costs.started(reservation.host, seconds, placement.chosen)
        log.info(
            "container started",
            extra={
                "container": container.get("id"),
                "host": reservation.host,
                "seconds": round(seconds, 3),
                "predicted_s": round(placement.chosen.seconds, 3),
            },
        )
        return {"placement": placement.to_dict(), "container": container, "seconds": round(seconds, 3)}
