"""New containers started through the coordinator: placed by predicted time to running, then created
on the chosen host's agent, charged to the reservation made for them.

The reservation is released once the container runs, whether or not the create worked: from then
on the container's own limits hold its room on the agent (its admission counts them), and the agent,
not the coordinator's last sample, refuses a later placement that no longer fits (409: the placer
moves on to the next host). Keeping reservations until their TTL would fill a host that runs many
short tasks with rooms nobody uses.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

from coordinator.agents import AgentClientLike, reservation_json
from coordinator.costs import CostBook
from coordinator.model import Host, InsufficientCapacity, Reservation, StartRecord
from coordinator.placement import Need, Placer
from coordinator.reservations import ReservationService
from coordinator.store import Store
from core.errors import InvalidRequest
from core.workloads import of_container_spec

log = logging.getLogger(__name__)

OLD_AGENT_REFUSAL = "body.reservation: expected a non-empty string"
"""How an agent that takes a create's reservation by id only refuses one given whole (a 400)."""


class ContainerStarts:
    def __init__(
        self,
        store: Store,
        placer: Placer,
        reservations: ReservationService,
        agents: AgentClientLike,
        create_timeout: float,
        costs: CostBook | None = None,
        on_started: Callable[[str, list[str]], None] = lambda host, digests: None,
        history: tuple[int, float] = (2000, 14 * 86400.0),
        clock: Callable[[], float] = time.time,
        on_recorded: Callable[[StartRecord], None] = lambda record: None,
        warming: Callable[[str, float], Collection[str]] = lambda host, now: (),
    ) -> None:
        """`on_started(host, digests)`: a container runs on `host` with these layers (the tracker
        learns it before the host's next registration says so). `history`: the starts kept per
        host and their maximum age in seconds (the layer predictor's history)."""
        self._store = store
        self._placer = placer
        self._reservations = reservations
        self._agents = agents
        self._create_timeout = create_timeout
        self._costs = costs
        self._on_started = on_started
        self._history = history
        self._clock = clock
        self._on_recorded = on_recorded
        self._warming = warming

    async def start(self, spec: Mapping[str, Any], need: Need, ttl: float | None = None) -> dict[str, Any]:
        """Place, reserve, create and start; the placement (with its prediction) and the container.
        A failed create releases the reservation: nothing is left behind.

        The reservation is in the store only until the create: the create carries it, and the agent
        holds it for that request (refusing it, 409, before anything is fetched or made, when the
        host cannot hold it: the next host is tried) and lets it go once the container runs. One
        round trip to the agent, not a hold, the create and a release."""
        started = time.monotonic()
        refused: dict[str, str] = {}
        while True:
            placement = await self._placer.place_start(
                need, f"container {spec.get('id', '')}", exclude=refused.keys(), ttl=ttl, on_agent=False
            )
            placed = time.monotonic()
            reservation = placement.reservation
            held = set(placement.target.layer_digests)
            try:
                warmed = set(self._warming(reservation.host, self._clock()))
                container = await self._create(placement.target, reservation, spec)
                created = time.monotonic()
            except InsufficientCapacity as exc:  # the agent could not hold it: nothing was made there
                await self._reservations.release(reservation.id)
                refused[reservation.host] = exc.message
                log.info("agent refused a placed start", extra={"host": reservation.host, "error": exc.message})
                continue
            except BaseException:
                await self._reservations.release(reservation.id)
                raise
            break
        signature = of_container_spec(spec)
        record = StartRecord(
            host=reservation.host,
            ts=self._clock(),
            signature=signature.id,
            layers=tuple(need.layers),
            hits=tuple(d for d in need.layers if d in held),
            warm_hits=tuple(d for d in need.layers if d in held and d in warmed),
            workload_class=signature.workload_class,
            source=signature.source,
            sizes=tuple(need.layers.values()),
        )
        # The container runs: its limits hold its room on the agent now. The release and the start's
        # record are independent, so they go at once (every start waits for both).
        await asyncio.gather(
            self._reservations.release(reservation.id), self._store.record_start(record, *self._history)
        )
        seconds = time.monotonic() - started
        if self._costs is not None:  # the next prediction for this host learns from this one
            assembly = container.get("assembly")
            if isinstance(assembly, Mapping):
                costs, at = assembly.get("layer_costs"), assembly.get("costs_at")
                if isinstance(costs, Mapping) and isinstance(at, int | float):
                    self._costs.reported(reservation.host, costs, float(at))
            self._costs.started(reservation.host, seconds, placement.chosen)
        self._on_started(reservation.host, list(need.layers))
        self._on_recorded(record)  # the layer predictor's state learns it at once
        log.info(
            "container started",
            extra={
                "container": container.get("id"),
                "host": reservation.host,
                "seconds": round(seconds, 3),
                "predicted_s": round(placement.chosen.seconds, 3),
            },
        )
        timings = {  # where the time to running went, as the coordinator saw it
            "place_seconds": round(placed - started, 4),
            "create_seconds": round(created - placed, 4),
            "release_seconds": round(started + seconds - created, 4),
        }
        return {"placement": placement.to_dict(), "container": container, "seconds": round(seconds, 3), **timings}

    async def _create(self, host: Host, reservation: Reservation, spec: Mapping[str, Any]) -> dict[str, Any]:
        """The create on `host`'s agent, carrying `reservation` for the agent to hold for the request.
        An agent from before creates carried their reservation (a rolling upgrade updates the
        coordinator first) refuses it whole: it holds it first then, and the create names it by id."""
        try:
            return await self._agents.create_container(
                host, {**spec, "reservation": reservation_json(reservation)}, self._create_timeout
            )
        except InvalidRequest as exc:
            if OLD_AGENT_REFUSAL not in exc.message:
                raise
        held = await self._reservations.hold_on_agent(host, reservation)
        return await self._agents.create_container(host, {**spec, "reservation": held.id}, self._create_timeout)
