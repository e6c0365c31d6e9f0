"""Scaling a deployment's component out and in: replicas behind its one service address.

The component's own container is replica 0: it keeps the service address, published on its host
(the *owner*), where the agent balances new connections to the address over every serving
replica's own address (agent/network/balancer.py: nftables DNAT with `numgen inc mod N`, conntrack
keeping established connections where they are).

Out: each new replica takes an address from `[deployments] address_pool`, is placed through the
placement with reserved capacity (like a component), created with the component's spec (its
wiring, its health check probing the replica's own address) and started; once healthy its
reservation is released and it joins the owner's balancer.

In: the highest-numbered replicas leave the balancer first (no new connections), then the owner's
conntrack is read until none of their connections is open, or `drain_timeout` passes; only then
are their containers deleted and their addresses given back.

Standbys: a scale asked to keep warm standbys starts the missing ones (each created, started,
healthy, then frozen, out of the balancer) after its replicas, in a task of their own: a standby
takes a cold start, and the component's next scale out does not wait for it (it plans around the
standbys being started: neither copies nor standbys yet, their indexes taken, and leaves the
standbys as they are).

`plan_scale` is the decision (pure); `ReplicaService` drives it, one scale at a time per component.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from coordinator.config import DeploymentsConfig
from coordinator.deployments.behaviour import ComponentSeries, StartTimes
from coordinator.deployments.plan import DeploymentPlan
from coordinator.deployments.requestmetrics import parse_counts
from coordinator.deployments.service import LABEL_COMPONENT, MOVING_POLL, DeploymentAgents, DeploymentService
from coordinator.deployments.states import (
    TERMINAL,
    WATCHED,
    ComponentRecord,
    DeploymentRecord,
    ReplicaRecord,
    ReplicaState,
    Whereabouts,
)
from coordinator.model import Capacity, Host, HostNotFound, NoTarget
from coordinator.placement import Need, Placer
from coordinator.reservations import ReservationService
from coordinator.store import Store
from core.errors import Conflict, FerrymanError, InvalidRequest, NotFound

log = logging.getLogger(__name__)

LABEL_REPLICA = "ferryman.replica"
MAX_DRAIN = 3600.0
DRAIN_POLL = 0.5
"""Seconds between two reads of a draining replica's open connections on the owner."""


class ScaleBusy(Conflict):
    """The deployment is not running, or another scale of it is under way."""

    code = "deployment_busy"


class ComponentNotFound(NotFound):
    code = "component_not_found"


class ScaleFailed(FerrymanError):
    code = "scale_failed"
    http_status = 500


@dataclass(frozen=True)
class ScalePlan:
    add: tuple[int, ...]
    """Indexes of the replicas to start."""
    remove: tuple[int, ...]
    """Indexes of the replicas to drain and stop, highest first."""
    thaw: tuple[int, ...] = ()
    """Indexes of the warm standbys to thaw into the balancer (before any cold start)."""
    standby_add: tuple[int, ...] = ()
    """Indexes of new standbys to start and freeze."""
    standby_remove: tuple[int, ...] = ()
    """Indexes of standbys to stop."""


def plan_scale(
    component: ComponentRecord,
    target: int,
    most: int,
    standbys: int | None = None,
    starting_standbys: Collection[int] = (),
) -> ScalePlan:
    """Which replicas to start, thaw or stop to run `target` copies of `component` (itself included),
    and with `standbys`, which standbys to start or stop to keep that many. A scale out thaws
    standbys first; the standbys left are then topped up or cut to `standbys`.
    `starting_standbys`: indexes of standbys being started (listed or not yet): neither a copy nor a
    standby to plan with, and their indexes taken."""
    if not 1 <= target <= most:
        raise InvalidRequest(f"replicas: expected 1 to {most}, got {target}")
    if standbys is not None and not 0 <= standbys <= most - target:
        raise InvalidRequest(f"standbys: expected 0 to {most - target} beside {target} replicas, got {standbys}")
    live = sorted(
        (
            r.index
            for r in component.replicas
            if r.state not in (ReplicaState.DRAINING, ReplicaState.STANDBY) and r.index not in starting_standbys
        ),
        reverse=True,
    )
    frozen = sorted(r.index for r in component.replicas if r.state is ReplicaState.STANDBY)
    have = 1 + len(live)
    used = {r.index for r in component.replicas} | set(starting_standbys)
    free = (i for i in range(1, most + len(used) + 1) if i not in used)
    add: tuple[int, ...] = ()
    thaw: tuple[int, ...] = ()
    remove: tuple[int, ...] = ()
    if target >= have:
        thaw = tuple(frozen[: target - have])
        add = tuple(next(free) for _ in range(target - have - len(thaw)))
    else:
        remove = tuple(live[: have - target])
    left = frozen[len(thaw) :]
    standby_add: tuple[int, ...] = ()
    standby_remove: tuple[int, ...] = ()
    if standbys is not None and standbys > len(left):
        standby_add = tuple(next(free) for _ in range(standbys - len(left)))
    elif standbys is not None:
        standby_remove = tuple(sorted(left, reverse=True)[: len(left) - standbys])
    return ScalePlan(add, remove, thaw, standby_add, standby_remove)


def replica_container(component: ComponentRecord, index: int) -> str:
    return f"{component.container[:58]}-r{index}"


class ReplicaService:
    def __init__(
        self,
        store: Store,
        deployments: DeploymentService,
        placer: Placer,
        reservations: ReservationService,
        agents: DeploymentAgents,
        config: DeploymentsConfig,
        create_timeout: float,
        clock: Callable[[], float],
        series: ComponentSeries | None = None,
    ) -> None:
        self._store = store
        self.series = series or ComponentSeries()
        """Per component: usage from telemetry (fed by the app) and traffic from the balancers."""
        self._deployments = deployments
        self._placer = placer
        self._reservations = reservations
        self._agents = agents
        self._config = config
        self._create_timeout = create_timeout
        self._clock = clock
        self._tasks: dict[tuple[str, str], asyncio.Task[DeploymentRecord]] = {}
        """Per (deployment, component): the scale under way. Components scale independently (a
        standby started for one never holds back another's scale out)."""
        self._standby_starts: dict[tuple[str, str], tuple[asyncio.Task[None], tuple[int, ...]]] = {}
        """Per (deployment, component): the standbys being started (a task of their own, after the
        scale that asked for them), and their indexes. They take a cold start; the component's next
        scale out does not wait for them."""
        self._followers: dict[str, asyncio.Task[None]] = {}
        """Per replica container: the task following its health while it serves."""
        self.starts = StartTimes()
        """Per component: its measured cold starts (scale requested to replica healthy)."""
        self._deploying: set[str] = set()
        """Deployments whose manifests' replicas are being started (within their deploy)."""
        deployments.on_healthy = self.as_deployed
        deployments.scaling = self.scaling

    async def as_deployed(self, record: DeploymentRecord, layout: DeploymentPlan) -> None:
        """Start the replicas the manifests ask for (`replicas` > 1), once the deployment is HEALTHY:
        each component's scale out in turn (a component with a shared volume keeps one copy)."""
        self._deploying.add(record.id)
        try:
            await self._as_deployed(record, layout)
        finally:
            self._deploying.discard(record.id)

    async def _as_deployed(self, record: DeploymentRecord, layout: DeploymentPlan) -> None:
        for component in record.components:
            wanted = min(layout.components[component.name].entry.manifest.replicas, self._config.max_replicas)
            if wanted <= 1:
                continue
            if component.volumes:
                log.warning(
                    "a component with a shared volume runs one copy",
                    extra={"deployment": record.id, "component": component.name, "replicas": wanted},
                )
                continue
            plan = plan_scale(component, wanted, self._config.max_replicas)
            await self._run(record.id, component.name, plan, self._config.drain_timeout, self._clock())

    async def scale(
        self,
        deployment_id: str,
        name: str,
        replicas: int,
        drain_timeout: float | None = None,
        standbys: int | None = None,
    ) -> DeploymentRecord:
        """Start scaling `name` to `replicas` copies in a task of its own (thawing its warm standbys
        first), and with `standbys`, keeping that many warm standbys beside them; the record as it
        is now. ScaleBusy while the deployment is not HEALTHY/DEGRADED, while its manifests' replicas
        start, or while the component is being scaled already (another component may be). Standbys
        being started do not hold back a scale: their start goes on beside it, and the standbys are
        left as they are by a scale asked for meanwhile (a later one sets them)."""
        record = await self._deployments.get(deployment_id)
        try:
            component = record.component(name)
        except KeyError:
            raise ComponentNotFound(f"deployment {deployment_id} has no component {name!r}") from None
        if record.state not in WATCHED:
            raise ScaleBusy(f"deployment {deployment_id} is {record.state.value}; scale it once it is HEALTHY")
        if (deployment_id, name) in self._tasks or deployment_id in self._deploying:
            raise ScaleBusy(f"{name} of deployment {deployment_id} is being scaled; wait for it to finish")
        if drain_timeout is not None and not 0 < drain_timeout <= MAX_DRAIN:
            raise InvalidRequest(f"drain_timeout: expected seconds within (0, {MAX_DRAIN:g}]")
        if component.volumes and (replicas > 1 or standbys):
            raise InvalidRequest(f"{name} mounts a shared volume, which lives on one host: it cannot have replicas")
        starting = self.starting_standbys(deployment_id, name)
        if starting:
            standbys = None
        plan = plan_scale(component, replicas, self._config.max_replicas, standbys, starting)
        drain = drain_timeout if drain_timeout is not None else self._config.drain_timeout
        requested = self._clock()
        if plan.standby_add and plan == ScalePlan((), (), standby_add=plan.standby_add):
            self._start_standbys(deployment_id, name, plan.standby_add, requested)  # nothing else to do
            return record
        task = asyncio.create_task(
            self._run(deployment_id, name, plan, drain, requested), name=f"scale-{deployment_id}-{name}"
        )
        self._tasks[(deployment_id, name)] = task
        task.add_done_callback(lambda _: self._tasks.pop((deployment_id, name), None))
        return record

    async def sample_traffic(self) -> None:
        """Read every balanced component's counters on its owner into the series (the leader, every
        behaviour.TRAFFIC_PERIOD seconds); an owner that does not answer is skipped this round."""
        for record in await self._deployments.all():
            if record.state not in WATCHED:
                if record.state in TERMINAL:
                    self.series.forget(record.id)
                    self.starts.forget(record.id)
                continue
            for component in record.components:
                if not component.replicas:
                    continue
                try:
                    balanced, open_now = await self._agents.balancer(
                        await self._host(component.host), component.address
                    )
                except FerrymanError:
                    continue
                self.series.observe_traffic(record.id, component.name, self._clock(), balanced, open_now)

    async def sample_requests(self) -> None:
        """Read the metrics endpoint of every copy of each component that has one (its manifest's
        `metrics_port`) and keep the copies' counters, summed, in the series (the leader, every
        behaviour.TRAFFIC_PERIOD seconds). A component one of whose copies does not answer, or
        answers something unreadable, is skipped this round: a partial sum would read as a drop."""
        for record in await self._deployments.all():
            if record.state not in WATCHED:
                continue
            for component in record.components:
                if not component.metrics_port or not component.host:
                    continue
                copies = [(component.host, component.container)] + [
                    (r.host, r.container) for r in component.replicas if r.state is ReplicaState.SERVING and r.host
                ]
                try:
                    hosts = [await self._host(h) for h, _ in copies]
                    texts = await asyncio.gather(
                        *(
                            self._agents.component_metrics(host, c, component.metrics_port)
                            for host, (_, c) in zip(hosts, copies, strict=True)
                        )
                    )
                    counts = [parse_counts(t) for t in texts]
                except FerrymanError as exc:
                    log.debug("metrics not read", extra={"deployment": record.id, "error": exc.message})
                    continue
                total = counts[0]
                for more in counts[1:]:
                    total = total + more
                self.series.observe_requests(record.id, component.name, self._clock(), total)

    def behaviour(self, record: DeploymentRecord, name: str) -> dict[str, Any]:
        """The component's series (ComponentNotFound for a name the deployment does not have)."""
        if name not in {c.name for c in record.components}:
            raise ComponentNotFound(f"deployment {record.id} has no component {name!r}")
        return {
            "deployment": record.id,
            "component": name,
            "cold_start_s": self.starts.cold_start(record.id, name),
            **self.series.of(record.id, name),
        }

    def cold_start(self, deployment_id: str, name: str) -> float | None:
        """The component's measured cold start (median of its last starts); None before one."""
        return self.starts.cold_start(deployment_id, name)

    def starting_standbys(self, deployment_id: str, name: str) -> tuple[int, ...]:
        """Indexes of the component's standbys being started (listed as STARTING until frozen)."""
        under_way = self._standby_starts.get((deployment_id, name))
        return under_way[1] if under_way is not None else ()

    def scaling(self, deployment_id: str, name: str | None = None, standbys: bool = True) -> bool:
        """Whether a scale of the deployment (with `name`, of that component) is under way; with
        `standbys` False, not counting standbys being started (they do not hold back a scale)."""
        if deployment_id in self._deploying:
            return True
        keys = set(self._tasks) | (set(self._standby_starts) if standbys else set())
        if name is not None:
            return (deployment_id, name) in keys
        return any(d == deployment_id for d, _ in keys)

    async def wait(self, deployment_id: str, seconds: float) -> DeploymentRecord:
        tasks: set[asyncio.Task[Any]] = {t for (d, _), t in self._tasks.items() if d == deployment_id}
        tasks |= {t for (d, _), (t, _) in self._standby_starts.items() if d == deployment_id}
        if tasks:
            await asyncio.wait(tasks, timeout=seconds)
        return await self._deployments.get(deployment_id)

    async def close(self) -> None:
        await self.stop_following()
        tasks: list[asyncio.Task[Any]] = [*self._tasks.values(), *(t for t, _ in self._standby_starts.values())]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ----- driving

    async def _run(
        self, deployment_id: str, name: str, plan: ScalePlan, drain: float, requested: float
    ) -> DeploymentRecord:
        try:
            if plan.thaw:
                await self._thaw(deployment_id, name, plan.thaw)
            if plan.add:
                await self._scale_out(deployment_id, name, plan.add, requested)
            if plan.remove:
                await self._scale_in(deployment_id, name, plan.remove, drain)
            if plan.standby_remove:
                await self._drop(deployment_id, name, plan.standby_remove)
            if plan.standby_add:
                self._start_standbys(deployment_id, name, plan.standby_add, requested)
        except FerrymanError as exc:
            log.error("scale failed", extra={"deployment": deployment_id, "component": name, "error": exc.message})
        except Exception:
            log.exception("scale failed unexpectedly", extra={"deployment": deployment_id, "component": name})
        return await self._deployments.get(deployment_id)

    def _start_standbys(self, deployment_id: str, name: str, indexes: tuple[int, ...], requested: float) -> None:
        """Start and freeze standbys in a task of their own: a scale of the component asked for
        meanwhile goes on beside it (plan_scale leaves their indexes alone)."""

        async def start() -> None:
            try:
                await self._scale_out(deployment_id, name, indexes, requested, standby=True)
            except FerrymanError as exc:
                log.error(
                    "standby failed", extra={"deployment": deployment_id, "component": name, "error": exc.message}
                )
            except Exception:
                log.exception("standby failed unexpectedly", extra={"deployment": deployment_id, "component": name})

        key = (deployment_id, name)
        task = asyncio.create_task(start(), name=f"standby-{deployment_id}-{name}")
        self._standby_starts[key] = (task, indexes)
        task.add_done_callback(lambda done: self._standby_started(key, done))

    def _standby_started(self, key: tuple[str, str], done: asyncio.Task[None]) -> None:
        """A standby start ended: forget it, unless a later one has taken its place already."""
        if (entry := self._standby_starts.get(key)) is not None and entry[0] is done:
            del self._standby_starts[key]

    async def _host(self, name: str) -> Host:
        host = await self._store.get_host(name)
        if host is None:
            raise HostNotFound(f"host {name} left the fleet")
        return host

    async def _scale_out(
        self, deployment_id: str, name: str, indexes: tuple[int, ...], requested: float, standby: bool = False
    ) -> None:
        """Start replicas (each measured as a cold start); with `standby`, freeze each once healthy
        and keep it out of the balancer."""

        async def keep(addresses: list[str]) -> DeploymentRecord:
            def add(record: DeploymentRecord) -> DeploymentRecord:
                component = record.component(name)
                new = tuple(
                    ReplicaRecord(index=i, address=a, host="", container=replica_container(component, i))
                    for i, a in zip(indexes, addresses, strict=True)
                )
                grown = dataclasses.replace(component, replicas=(*component.replicas, *new))
                return record.with_component(grown, self._clock())

            return await self._deployments.update(deployment_id, add)

        record = await self._deployments.take_addresses(len(indexes), keep)
        try:
            spec = await self._deployments.spec_for(record, name)
        except BaseException:
            await asyncio.shield(self._drop(deployment_id, name, indexes))
            raise
        # Placed one after the other, each away from the hosts that run a copy already when another
        # can take it: a host lost takes one replica, not all of them.
        placed: list[BaseException | None] = []
        for i in indexes:
            try:
                await self._place_replica(deployment_id, name, i)
                placed.append(None)
            except FerrymanError as exc:
                placed.append(exc)
        results = await asyncio.gather(
            *(
                self._start_replica(deployment_id, name, i, spec, requested)
                if not isinstance(p, BaseException)
                else _raise(p)
                for i, p in zip(indexes, placed, strict=True)
            ),
            return_exceptions=True,
        )
        failed = [i for i, r in zip(indexes, results, strict=True) if isinstance(r, BaseException)]
        for i, r in zip(indexes, results, strict=True):
            if isinstance(r, BaseException):
                log.error(
                    "replica did not start",
                    extra={
                        "deployment": deployment_id,
                        "component": name,
                        "replica": i,
                        "error": getattr(r, "message", str(r)),
                    },
                )
        if standby:
            await self._freeze(deployment_id, name, tuple(i for i in indexes if i not in failed), failed)
        if failed:
            await self._drop(deployment_id, name, tuple(failed))
        if standby:
            if failed:
                raise ScaleFailed(f"{len(failed)} of {len(indexes)} standbys of {name} did not start; see the log")
            return
        record = await self._set_state(deployment_id, name, set(indexes) - set(failed), ReplicaState.SERVING)
        await self._rebalance(record.component(name))
        for replica in record.component(name).replicas:
            if replica.index in indexes and replica.index not in failed:
                self._follow(deployment_id, name, replica.index, replica.container)
        if failed:
            raise ScaleFailed(f"{len(failed)} of {len(indexes)} replicas of {name} did not start; see the log")

    async def _freeze(self, deployment_id: str, name: str, indexes: tuple[int, ...], failed: list[int]) -> None:
        """Freeze started replicas into warm standbys; those that do not freeze join `failed`."""
        record = await self._deployments.get(deployment_id)
        frozen = set()
        for replica in record.component(name).replicas:
            if replica.index not in indexes:
                continue
            try:
                await self._agents.freeze_container(await self._host(replica.host), replica.container)
                frozen.add(replica.index)
            except FerrymanError as exc:
                log.error("standby not frozen", extra={"container": replica.container, "error": exc.message})
                failed.append(replica.index)
        await self._set_state(deployment_id, name, frozen, ReplicaState.STANDBY)

    async def _thaw(self, deployment_id: str, name: str, indexes: tuple[int, ...]) -> None:
        """Thaw warm standbys into the balancer: serving within a thaw, no start. One that does not
        thaw is dropped (the next scale starts a replica instead)."""
        record = await self._deployments.get(deployment_id)
        thawed, failed = set(), []
        for replica in record.component(name).replicas:
            if replica.index not in indexes:
                continue
            try:
                await self._agents.thaw_container(await self._host(replica.host), replica.container)
                thawed.add(replica.index)
            except FerrymanError as exc:
                log.error("standby not thawed", extra={"container": replica.container, "error": exc.message})
                failed.append(replica.index)
        record = await self._set_state(
            deployment_id, name, thawed, ReplicaState.SERVING, only_from=ReplicaState.STANDBY
        )
        await self._rebalance(record.component(name))
        for replica in record.component(name).replicas:
            if replica.index in thawed:
                self._follow(deployment_id, name, replica.index, replica.container)
        if failed:
            await self._drop(deployment_id, name, tuple(failed))
            raise ScaleFailed(f"{len(failed)} standbys of {name} did not thaw; see the log")

    async def _place_replica(self, deployment_id: str, name: str, index: int) -> None:
        """Reserve its capacity through the placement, on a host without a copy if one can take it."""
        record = await self._deployments.get(deployment_id)
        component = record.component(name)
        replica = next(r for r in component.replicas if r.index == index)
        need = Need(capacity=Capacity(self._config.cpu_millis, self._config.memory_bytes, 0), image=component.image)
        purpose = f"deployment {deployment_id} component {name} replica {index}"
        running = {component.host, *(r.host for r in component.replicas if r.host)}
        try:
            placement = await self._placer.place_start(need, purpose, exclude=running)
        except NoTarget:
            placement = await self._placer.place_start(need, purpose)
        reservation = placement.reservation
        await self._put_replica(
            deployment_id, name, dataclasses.replace(replica, host=reservation.host, reservation=reservation.id)
        )

    async def _start_replica(
        self, deployment_id: str, name: str, index: int, base: dict[str, Any], requested: float
    ) -> None:
        """Create, start and wait healthy; its reservation is released once it is, and the time since
        the scale was `requested` kept as one of the component's cold starts."""
        record = await self._deployments.get(deployment_id)
        component = record.component(name)
        replica = next(r for r in component.replicas if r.index == index)
        reservation_id = replica.reservation
        host = await self._host(replica.host)
        spec = dict(base)
        spec.update(
            id=replica.container,
            service_ip=replica.address,
            reservation=reservation_id,
            labels={**base.get("labels", {}), LABEL_COMPONENT: name, LABEL_REPLICA: str(index)},
        )
        health = dict(spec.get("health") or {})
        for kind in ("http", "tcp", "grpc"):
            if kind in health:
                health[kind] = {**health[kind], "host": replica.address}
        spec["health"] = health
        await self._agents.pull_image(host, component.image, self._create_timeout)
        await self._agents.create_container(host, spec, self._create_timeout, start=True)
        async with asyncio.timeout(self._config.health_timeout):
            seq = 0
            while True:
                health_now = await self._agents.container_health(host, replica.container, seq, 10.0, 15.0)
                seq = int(health_now.get("seq", seq))
                if health_now.get("status") == "healthy":
                    break
                if health_now.get("status") == "unhealthy":
                    raise ScaleFailed(f"replica {replica.container} on {replica.host} became unhealthy")
        self.starts.observe(deployment_id, name, self._clock() - requested)
        await self._reservations.release(reservation_id)
        await self._put_replica(deployment_id, name, dataclasses.replace(replica, reservation=""))

    async def _scale_in(self, deployment_id: str, name: str, indexes: tuple[int, ...], drain: float) -> None:
        record = await self._set_state(deployment_id, name, set(indexes), ReplicaState.DRAINING)
        component = record.component(name)
        await self._rebalance(component)  # no new connection reaches them from now on
        owner = await self._host(component.host)
        leaving = {r.address for r in component.replicas if r.index in indexes}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain
        open_now: dict[str, int] = {}
        while loop.time() < deadline:
            counts = await self._agents.balanced_connections(owner, component.address)
            open_now = {a: counts.get(a, 0) for a in leaving if counts.get(a, 0)}
            if not open_now:
                break
            await asyncio.sleep(DRAIN_POLL)
        if open_now:
            log.warning(
                "drain deadline passed; stopping replicas with connections open",
                extra={"deployment": deployment_id, "component": name, "open": open_now},
            )
        else:
            log.info("replicas drained", extra={"deployment": deployment_id, "component": name, "replicas": indexes})
        await self._drop(deployment_id, name, indexes)
        if len(component.replicas) == len(indexes):
            await self._agents.unbalance(owner, component.address)  # itself alone: nothing to spread

    # ----- while they run

    def follow_all(self, records: list[DeploymentRecord]) -> None:
        """Follow the health of every replica that serves or is degraded (a leader that starts)."""
        for record in records:
            if record.state not in WATCHED:
                continue
            for component in record.components:
                for r in component.replicas:
                    if r.state in (ReplicaState.SERVING, ReplicaState.DEGRADED):
                        self._follow(record.id, component.name, r.index, r.container)

    async def stop_following(self) -> None:
        tasks = list(self._followers.values())
        self._followers.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _follow(self, deployment_id: str, name: str, index: int, container: str) -> None:
        if container in self._followers:
            return
        task = asyncio.create_task(self._follow_replica(deployment_id, name, index), name=f"follow-{container}")
        self._followers[container] = task

        def forget(done: asyncio.Task[None]) -> None:
            if self._followers.get(container) is done:
                del self._followers[container]

        task.add_done_callback(forget)

    async def _follow_replica(self, deployment_id: str, name: str, index: int) -> None:
        """Long-poll the replica's health on its agent while it serves: one that stops passing its
        check (or stops, or whose host does not answer) leaves the balancer, `degraded`, and comes
        back when its check passes again (its agent restarts it by the restart policy)."""
        seq = 0
        moved = False  # followed to another host: `starting` there until its first probe is no failure
        while True:
            try:
                record = await self._deployments.get(deployment_id)
                replica = next(r for r in record.component(name).replicas if r.index == index)
            except (FerrymanError, KeyError, StopIteration):
                return
            if record.state not in WATCHED or replica.state not in (ReplicaState.SERVING, ReplicaState.DEGRADED):
                return
            try:
                host = await self._host(replica.host)
                health = await self._agents.container_health(host, replica.container, seq, 30.0, 35.0)
            except FerrymanError as exc:
                if isinstance(exc, NotFound) and await self._followed(deployment_id, name, replica):
                    seq, moved = 0, True
                    continue
                healthy, seq = False, 0
                await asyncio.sleep(1.0)
            else:
                if int(health.get("seq", seq)) == seq:
                    continue  # the wait ran out with nothing new
                seq = int(health.get("seq", seq))
                healthy = health.get("status") == "healthy"
                if not healthy and await self._deployments.moving_from(replica.container, replica.host):
                    # its source freezes and ends its copy: the target's is followed
                    if await self._followed(deployment_id, name, replica):
                        seq, moved = 0, True
                    continue
                if health.get("status") == "starting" and moved:
                    continue
                moved = False
            wanted = ReplicaState.SERVING if healthy else ReplicaState.DEGRADED
            if wanted is replica.state:
                continue
            record = await self._set_state(deployment_id, name, {index}, wanted, only_from=replica.state)
            log.warning(
                "replica back in the balancer" if healthy else "replica out of the balancer",
                extra={"deployment": deployment_id, "component": name, "replica": index},
            )
            try:
                await self._rebalance(record.component(name))
            except FerrymanError as exc:
                log.error("rebalance failed", extra={"deployment": deployment_id, "error": exc.message})

    async def _followed(self, deployment_id: str, name: str, replica: ReplicaRecord) -> bool:
        """A replica gone from its recorded host: after a pause while a migration moves it, or once
        the record names the host a migration put it on (its own address went with it, so the
        balancer's backend is unchanged), True; False when it is nowhere known."""
        where, host = await self._deployments.locate(replica.container, replica.host)
        if where is Whereabouts.MOVING:
            await asyncio.sleep(MOVING_POLL)
            return True
        if where is Whereabouts.LOST:
            return False

        def moved(record: DeploymentRecord) -> DeploymentRecord:
            component = record.component(name)
            parts = tuple(
                dataclasses.replace(r, host=host) if r.index == replica.index and r.host == replica.host else r
                for r in component.replicas
            )
            return record.with_component(dataclasses.replace(component, replicas=parts), self._clock())

        await self._deployments.update(deployment_id, moved)
        log.info(
            "replica followed to its new host",
            extra={"deployment": deployment_id, "component": name, "replica": replica.index, "host": host},
        )
        return True

    async def _drop(self, deployment_id: str, name: str, indexes: tuple[int, ...]) -> None:
        """Delete the replicas' containers and reservations, then forget them (their addresses free)."""
        record = await self._deployments.get(deployment_id)
        for replica in record.component(name).replicas:
            if replica.index not in indexes:
                continue
            if replica.host:
                try:
                    if replica.state is ReplicaState.STANDBY:  # a frozen task is thawed to be stopped
                        with contextlib.suppress(FerrymanError):
                            await self._agents.thaw_container(await self._host(replica.host), replica.container)
                    await self._agents.delete_container(await self._host(replica.host), replica.container)
                except FerrymanError as exc:
                    log.error("replica not deleted", extra={"container": replica.container, "error": exc.message})
            if replica.reservation:
                with contextlib.suppress(FerrymanError):  # the agent expires its copy at the same deadline
                    await self._reservations.release(replica.reservation)

        def forget(record: DeploymentRecord) -> DeploymentRecord:
            component = record.component(name)
            kept = tuple(r for r in component.replicas if r.index not in indexes)
            return record.with_component(dataclasses.replace(component, replicas=kept), self._clock())

        await self._deployments.update(deployment_id, forget)

    async def _rebalance(self, component: ComponentRecord) -> None:
        by_index = sorted(component.replicas, key=lambda r: r.index)
        serving = [r.address for r in by_index if r.state is ReplicaState.SERVING]
        if not component.replicas:
            return
        await self._agents.balance(await self._host(component.host), component.address, [component.address, *serving])

    async def _put_replica(self, deployment_id: str, name: str, replica: ReplicaRecord) -> None:
        def put(record: DeploymentRecord) -> DeploymentRecord:
            component = record.component(name)
            parts = tuple(replica if r.index == replica.index else r for r in component.replicas)
            return record.with_component(dataclasses.replace(component, replicas=parts), self._clock())

        await self._deployments.update(deployment_id, put)

    async def _set_state(
        self,
        deployment_id: str,
        name: str,
        indexes: set[int],
        state: ReplicaState,
        only_from: ReplicaState | None = None,
    ) -> DeploymentRecord:
        """Set the replicas' state; with `only_from`, only those still in that state (a replica
        being drained is not put back by its health follower)."""

        def put(record: DeploymentRecord) -> DeploymentRecord:
            component = record.component(name)
            parts = tuple(
                dataclasses.replace(r, state=state) if r.index in indexes and r.state is (only_from or r.state) else r
                for r in component.replicas
            )
            return record.with_component(dataclasses.replace(component, replicas=parts), self._clock())

        return await self._deployments.update(deployment_id, put)


async def _raise(exc: BaseException) -> None:
    raise exc
