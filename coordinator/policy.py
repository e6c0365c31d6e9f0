"""The drain policy: risk above threshold -> `draining` -> planned migrations -> `drained`.

Each tick scores the fleet (coordinator/predictions.py), drains hosts whose P(drain) reaches the
threshold and returns policy-drained hosts to service once it falls below threshold - hysteresis
(so a host hovering at the threshold does not flap). Draining hosts get a migration planned for
each container, highest `ferryman.priority` label first, then largest memory; the orchestrator
runs them under the per-host and per-fleet limits and retries failures on other targets. A host
with no containers left and no migration running is `drained`. Every decision is recorded with
the probability and model version behind it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from coordinator.config import CoordinatorConfig
from coordinator.model import ContainerUsage, Drain, Host, HostAdmin, HostHealth, MigrationState
from coordinator.orchestrator import AUTO, Orchestrator
from coordinator.predictions import PredictionService
from coordinator.registry import HostRegistry
from coordinator.store import Store
from core.errors import FerrymanError

log = logging.getLogger(__name__)

PRIORITY_LABEL = "ferryman.priority"
PREDICTED = "predicted"
WAIT_POLL = 0.5


def migration_order(containers: tuple[ContainerUsage, ...]) -> list[ContainerUsage]:
    """Highest priority label first (missing or malformed = 0), then the largest memory."""

    def priority(c: ContainerUsage) -> int:
        try:
            return int(c.labels.get(PRIORITY_LABEL, "0"))
        except ValueError:
            return 0

    return sorted(containers, key=lambda c: (-priority(c), -c.memory_bytes, c.id))


class DrainPolicy:
    def __init__(
        self,
        store: Store,
        hosts: HostRegistry,
        predictions: PredictionService,
        migrations: Orchestrator,
        config: CoordinatorConfig,
        clock: Callable[[], float],
    ) -> None:
        self._store = store
        self._hosts = hosts
        self._predictions = predictions
        self._migrations = migrations
        self._config = config
        self._clock = clock
        self._lock = asyncio.Lock()

    async def tick(self) -> None:
        async with self._lock:
            await self._apply_predictions()
            for host in await self._store.list_hosts():
                if host.admin is HostAdmin.DRAINING:
                    await self._progress(host)

    async def _apply_predictions(self) -> None:
        predictions = await self._predictions.tick()
        if not predictions:
            return
        threshold = self._predictions.threshold()
        hosts = {h.name: h for h in await self._store.list_hosts()}
        for p in predictions:
            host = hosts.get(p.host)
            if host is None:
                continue
            if host.admin is HostAdmin.ACTIVE and p.probability >= threshold:
                await self._hosts.drain(host.name, PREDICTED, probability=p.probability, model_version=p.model_version)
            elif (
                host.admin is HostAdmin.DRAINING
                and p.probability < threshold - self._config.model.hysteresis
                and (await self._running_drain(host.name)).reason == PREDICTED
            ):
                await self._hosts.uncordon(
                    host.name,
                    "risk fell below threshold - hysteresis",
                    probability=p.probability,
                    model_version=p.model_version,
                )

    async def _running_drain(self, host: str) -> Drain:
        running = [d for d in await self._store.list_drains(host) if d.state == "running"]
        return running[-1] if running else Drain(id="", host=host, reason="", started_at=0.0)

    async def plan(self, host_name: str) -> None:
        """Plan migrations for a draining host now (ops drains do not wait for the next tick)."""
        async with self._lock:
            host = await self._hosts.get(host_name)
            if host.admin is HostAdmin.DRAINING:
                await self._progress(host)

    async def _progress(self, host: Host) -> None:
        drain = await self._running_drain(host.name)
        migrations = await self._store.list_migrations()
        mine = [m for m in migrations if m.source == host.name]
        active = {m.container for m in mine if not m.done}
        this_drain = [m for m in mine if m.reason == f"drain:{drain.id}"]
        # Committed away already; telemetry may still list them until the host's next push.
        moved = {m.container for m in this_drain if m.state is MigrationState.COMMITTED}
        given_up = {m.container for m in this_drain if m.state is MigrationState.ABANDONED}
        remaining = [c for c in host.containers if c.id not in moved]
        if not remaining and not active:
            await self._hosts.finish_drain(host.name)
            return
        if host.health is not HostHealth.READY:
            return  # nothing can be started from a silent host; wait for it or for ops
        for container in migration_order(tuple(remaining)):
            if container.id in active or container.id in given_up:
                continue
            try:
                await self._migrations.request(container.id, AUTO, requested_by="policy", reason=f"drain:{drain.id}")
            except FerrymanError as exc:
                log.warning(
                    "could not plan a drain migration",
                    extra={"host": host.name, "container": container.id, "error": exc.message},
                )

    async def wait_drained(self, host_name: str, within: float) -> Host:
        """The host once drained (or as it is after `within` seconds); re-plans while waiting."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            host = await self._hosts.get(host_name)
            if host.admin is not HostAdmin.DRAINING or loop.time() >= deadline:
                return host
            await self.plan(host_name)
            await asyncio.sleep(min(WAIT_POLL, max(0.0, deadline - loop.time())))
