"""The drain policy: risk above threshold -> `draining` -> planned migrations -> `drained`.

Each tick scores the fleet (coordinator/predictions.py). A notice with a stated time drains its host
at once (reason `notice`, the decision names it). The model alone drains a host only after
`confirm_ticks` ticks in a row at or above the threshold, and only while the host's false-alarm
budget lasts: a model drain that ended with the host back in service is a false alarm, and after
`false_alarm_budget` of them within `false_alarm_window` the model alone no longer drains that host
(recorded once as a `suppressed` decision). Policy-drained hosts return to service once the risk
falls below threshold - hysteresis (so a host hovering at the threshold does not flap). Every drain
decision carries its explanation: the notice, or the model's top contributing features.

Draining hosts get a migration planned for each container, highest `ferryman.priority` label first,
then largest memory; the orchestrator runs them under the per-host and per-fleet limits and retries
failures on other targets. A host with no containers left and no migration running is `drained`.
Every decision is recorded with the probability and model version behind it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from coordinator.config import CoordinatorConfig
from coordinator.metrics import CoordinatorMetrics
from coordinator.model import ContainerUsage, Decision, Drain, Host, HostAdmin, HostHealth, MigrationState, Prediction
from coordinator.orchestrator import AUTO, Orchestrator
from coordinator.predictions import Explanation, PredictionService
from coordinator.registry import HostRegistry
from coordinator.store import Store
from core.errors import FerrymanError

log = logging.getLogger(__name__)

PRIORITY_LABEL = "ferryman.priority"
PREDICTED = "predicted"
NOTICE = "notice"
WAIT_POLL = 0.5


def model_may_drain(streak: int, confirm_ticks: int, false_alarms: int, budget: int) -> bool:
    """Whether the model alone may drain a host: risk held for `confirm_ticks`, budget not spent."""
    return streak >= confirm_ticks and false_alarms < budget


def migration_order(containers: tuple[ContainerUsage, ...]) -> list[ContainerUsage]:
    """Highest priority label first (missing or malformed = 0), then the largest memory."""

    def priority(c: ContainerUsage) -> int:
        try:
            return int(c.labels.get(PRIORITY_LABEL, "0"))
        except ValueError:
            return 0

    return sorted(containers, key=lambda c: (-priority(c), -c.memory_bytes, c.id))


def _why(explanation: Explanation | None) -> str:
    """A decision's explanation, written only for the few hosts decided on (not every host scored)."""
    return explanation.describe() if explanation is not None else ""


class DrainPolicy:
    def __init__(
        self,
        store: Store,
        hosts: HostRegistry,
        predictions: PredictionService,
        migrations: Orchestrator,
        config: CoordinatorConfig,
        clock: Callable[[], float],
        metrics: CoordinatorMetrics,
    ) -> None:
        self._store = store
        self._hosts = hosts
        self._predictions = predictions
        self._migrations = migrations
        self._config = config
        self._clock = clock
        self._metrics = metrics
        self.list_for_tick: Callable[[], Awaitable[list[Host]]] | None = None
        """How a tick lists the hosts it scores and decides on (on etcd the leader's watched view:
        `EtcdStore.followed_hosts`; None: `list_hosts`); the drains it progresses are listed with
        `list_hosts`."""
        self._lock = asyncio.Lock()
        self._streaks: dict[str, int] = {}
        """Ticks in a row each host's P(drain) has been at or above the threshold."""
        self._suppressed: set[str] = set()
        """Hosts whose false-alarm budget is spent (recorded once per episode)."""

    async def tick(self) -> None:
        async with self._lock:
            # One listing serves the scoring and the decisions (on etcd the leader's watched view,
            # no read); the store is listed for the drains only when there are drains to progress.
            phase = self._metrics.tick_phase_seconds
            with phase.labels(phase="list").time():
                listed = await (self.list_for_tick or self._store.list_hosts)()
            predictions = await self._predictions.tick(listed)  # times its own phases
            with phase.labels(phase="decide").time():
                changed = await self._apply_predictions(listed, predictions)
                if changed or any(h.admin is HostAdmin.DRAINING for h in listed):
                    listed = await self._store.list_hosts()
                for host in listed:
                    if host.admin is HostAdmin.DRAINING:
                        await self._progress(host)

    async def _apply_predictions(self, listed: list[Host], predictions: list[Prediction]) -> bool:
        """Drain or return hosts as the fleet's scores say; whether any host's admin state changed."""
        if not predictions:
            return False
        threshold = self._predictions.threshold()
        cfg = self._config.model
        hosts = {h.name: h for h in listed}
        changed = False
        for p in predictions:
            host = hosts.get(p.host)
            if host is None:
                continue
            explanation = self._predictions.explanations.get(p.host)
            notice = explanation.notice if explanation is not None else None
            streak = self._streaks[p.host] = self._streaks.get(p.host, 0) + 1 if p.probability >= threshold else 0
            if host.admin is HostAdmin.ACTIVE and notice is not None:
                await self._hosts.drain(
                    host.name,
                    NOTICE,
                    probability=p.probability,
                    model_version=p.model_version,
                    detail=_why(explanation),
                )
                changed = True
            elif host.admin is HostAdmin.ACTIVE and p.probability >= threshold:
                false_alarms = await self._false_alarms(host.name)
                if model_may_drain(streak, cfg.confirm_ticks, false_alarms, cfg.false_alarm_budget):
                    self._suppressed.discard(host.name)
                    await self._hosts.drain(
                        host.name,
                        PREDICTED,
                        probability=p.probability,
                        model_version=p.model_version,
                        detail=_why(explanation),
                    )
                    changed = True
                elif false_alarms >= cfg.false_alarm_budget and host.name not in self._suppressed:
                    self._suppressed.add(host.name)
                    await self._store.record_decision(
                        Decision(
                            ts=self._clock(),
                            host=host.name,
                            kind="suppressed",
                            probability=p.probability,
                            model_version=p.model_version,
                            detail=f"false-alarm budget spent ({false_alarms} in {cfg.false_alarm_window:g}s): "
                            f"{_why(explanation)}",
                        )
                    )
            elif (
                host.admin is HostAdmin.DRAINING
                and notice is None
                and p.probability < threshold - cfg.hysteresis
                and (await self._running_drain(host.name)).reason == PREDICTED
            ):
                await self._hosts.uncordon(
                    host.name,
                    "risk fell below threshold - hysteresis",
                    probability=p.probability,
                    model_version=p.model_version,
                )
                changed = True
        return changed

    async def _false_alarms(self, host: str) -> int:
        """Model drains of `host` within the window that were cancelled (the host came back unharmed)."""
        since = self._clock() - self._config.model.false_alarm_window
        return sum(
            1
            for d in await self._store.list_drains(host)
            if d.reason == PREDICTED and d.state == "cancelled" and d.started_at >= since
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
