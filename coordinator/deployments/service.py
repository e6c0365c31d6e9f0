"""Deployments, driven: resolve, place, start level by level health-gated, all or nothing.

`deploy` resolves the plan from the catalog (coordinator/deployments/plan.py), takes a service
address per component from `[deployments] address_pool`, reserves capacity for every component
through the placement before anything starts (components that share a volume on one host), and
stores the record PLANNED; that much happens in the request, so bad input is refused with nothing
created. Then a task of its own pulls every component's image on its host at once (so a later
level finds its image in place) and starts the levels in order: each component of a level is
created on its agent in parallel, with its wiring environment, its service address and its health
check (the catalog's, translated to the agent's), and is waited on through the agent's health long
poll (`GET /v1/containers/{id}/health?after=SEQ&wait=S`, woken by the transition itself). The
next level starts when the whole level is healthy.

Any failure (no host, an image that cannot be pulled, a create the agent refuses, a check that reports
unhealthy or does not pass within `health_timeout`) fails the deployment: every component that
holds anything is removed in the reverse start order (containers, reservations, volumes), the
addresses return to the pool, the record names the component and why, and an alert goes out
(coordinator/alerts.py). Undeploy removes a HEALTHY deployment the same way.

The state transitions are the table in coordinator/deployments/states.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Collection, Coroutine
from typing import Any, Protocol

from coordinator.agents import AgentUnreachable
from coordinator.alerts import Alert, Alerter
from coordinator.catalog.model import HealthCheck, HealthCheckKind, Reference, UnknownReference
from coordinator.catalog.service import CatalogService
from coordinator.config import DeploymentsConfig
from coordinator.deployments.addresses import allocate
from coordinator.deployments.plan import DeploymentPlan, SharedVolume, wiring
from coordinator.deployments.states import (
    HOLDS_ADDRESSES,
    WATCHED,
    ComponentRecord,
    ComponentState,
    DeploymentBusy,
    DeploymentRecord,
    Event,
    Recovery,
    ReplicaState,
    State,
    Whereabouts,
    can_undeploy,
    component_health,
    dependents,
    recovery,
    started_in_reverse,
    whereabouts,
)
from coordinator.deployments.store import DeploymentStore
from coordinator.metrics import CoordinatorMetrics
from coordinator.model import Capacity, Host, HostNotFound, MigrationState
from coordinator.placement import Need, Placer
from coordinator.reservations import ReservationService
from coordinator.store import Store
from core.errors import FerrymanError, NotFound

log = logging.getLogger(__name__)

LABEL_DEPLOYMENT = "ferryman.deployment"
LABEL_COMPONENT = "ferryman.component"
HEALTH_POLL = 30.0
"""Seconds one health long poll may wait on the agent (the deadline still applies)."""
STOPPED_POLL = 1.0
"""Seconds it may wait while a starting component is stopped: its restarts are read between polls."""
LEFTOVER_RETRY = (1.0, 30.0)
"""Seconds between attempts to remove what a teardown left on an unreachable host: first, at most."""
MOVING_POLL = 0.5
"""Seconds between looks at a component whose container is being migrated."""


class DeploymentNotFound(NotFound):
    code = "deployment_not_found"


class ComponentFailed(Exception):
    """A component could not be placed, created or made healthy; `reason` is a metric label."""

    def __init__(self, component: str, reason: str, message: str) -> None:
        super().__init__(message)
        self.component = component
        self.reason = reason
        self.message = message


class DeploymentAgents(Protocol):
    """What deployments need from agents (coordinator/agents.py `AgentClient`)."""

    async def pull_image(self, host: Host, ref: str, within: float) -> dict[str, Any]: ...
    async def list_containers(self, host: Host) -> list[dict[str, Any]]: ...
    async def create_container(
        self, host: Host, spec: dict[str, Any], within: float, start: bool = True
    ) -> dict[str, Any]: ...
    async def start_container(self, host: Host, container_id: str, within: float) -> dict[str, Any]: ...
    async def delete_container(self, host: Host, container_id: str) -> None: ...
    async def delete_volume(self, host: Host, name: str) -> None: ...
    async def release_reservation(self, host: Host, reservation_id: str) -> None: ...
    async def container_health(
        self, host: Host, container_id: str, after: int, wait: float, within: float
    ) -> dict[str, Any]: ...
    async def balance(self, host: Host, service_ip: str, backends: list[str]) -> None: ...
    async def unbalance(self, host: Host, service_ip: str) -> None: ...
    async def balanced_connections(self, host: Host, service_ip: str) -> dict[str, int]: ...
    async def balancer(self, host: Host, service_ip: str) -> tuple[int, dict[str, int]]: ...
    async def component_metrics(self, host: Host, container_id: str, port: int) -> str: ...
    async def freeze_container(self, host: Host, container_id: str) -> None: ...
    async def thaw_container(self, host: Host, container_id: str) -> None: ...


def agent_health(check: HealthCheck, address: str) -> dict[str, Any]:
    """The catalog's dependency_health_check as the agent's `health` object (docs/health.md): network
    probes go to the component's service address, from inside its network namespace."""
    probe: dict[str, Any]
    match check.kind:
        case HealthCheckKind.EXEC:
            probe = {"command": list(check.command)}
        case HealthCheckKind.HTTP:
            probe = {"port": check.port, "host": address, "path": check.path or "/"}
        case HealthCheckKind.GRPC:
            probe = {"port": check.port, "host": address, "service": check.service}
        case HealthCheckKind.TCP:
            probe = {"port": check.port, "host": address}
    return {
        check.kind.value: probe,
        "interval": check.interval,
        "timeout": check.timeout,
        "retries": check.retries,
        "start_period": check.start_period,
    }


def container_id(deployment: str, component: str) -> str:
    """`<deployment>-<component>`, shortened with a digest when longer than a container id may be."""
    cid = f"{deployment}-{component}"
    if len(cid) <= 64:
        return cid
    digest = hashlib.sha256(component.encode()).hexdigest()[:8]
    return f"{deployment}-{component[: 64 - len(deployment) - 10]}-{digest}"


class DeploymentService:
    def __init__(
        self,
        store: Store,
        deployments: DeploymentStore,
        catalog: CatalogService,
        placer: Placer,
        reservations: ReservationService,
        agents: DeploymentAgents,
        alerter: Alerter,
        config: DeploymentsConfig,
        create_timeout: float,
        clock: Callable[[], float],
        metrics: CoordinatorMetrics,
        addresses_taken: Callable[[], Awaitable[Collection[str]]] | None = None,
        admit: asyncio.Lock | None = None,
    ) -> None:
        """`addresses_taken`: service addresses held outside deployments (chains'); `admit`: the lock
        held while addresses are chosen and first stored, shared with whatever else takes them."""
        self._store = store
        self._records = deployments
        self._catalog = catalog
        self._placer = placer
        self._reservations = reservations
        self._agents = agents
        self._alerter = alerter
        self._config = config
        self._create_timeout = create_timeout
        self._clock = clock
        self._metrics = metrics
        self._admit = admit or asyncio.Lock()
        """Held while addresses are chosen and the record is first stored: two deploys never take one."""
        self._addresses_taken = addresses_taken
        self._tasks: dict[str, asyncio.Task[DeploymentRecord]] = {}
        self._sweeps: dict[str, asyncio.Task[None]] = {}
        """Per deployment: the retries removing what its teardown left on unreachable hosts."""
        self._watches: dict[str, asyncio.Task[None]] = {}
        """Per HEALTHY or DEGRADED deployment: the task following its components' health."""
        self._health_seen = asyncio.Lock()
        """Held while a component's health is written into its record (read, change, put)."""
        self.scaling: Callable[[str], bool] = lambda _: False
        """Whether a deployment is being scaled (coordinator/deployments/replicas.py): not undeployed then."""
        self.on_healthy: Callable[[DeploymentRecord, DeploymentPlan], Awaitable[None]] | None = None
        """Called once a deploy is HEALTHY, within its task (the replicas' service starts the
        replicas the manifests ask for: coordinator/deployments/replicas.py)."""

    # ----- reading

    async def get(self, deployment_id: str) -> DeploymentRecord:
        record = await self._records.get_deployment(deployment_id)
        if record is None:
            raise DeploymentNotFound(f"no deployment {deployment_id!r}")
        return record

    async def all(self) -> list[DeploymentRecord]:
        records = await self._records.list_deployments()
        for state in State:
            self._metrics.deployments.labels(state=state.value).set(sum(r.state is state for r in records))
        return records

    async def wait(self, deployment_id: str, seconds: float) -> DeploymentRecord:
        """The record once its running deploy or undeploy ends, or after `seconds`, whichever first."""
        task = self._tasks.get(deployment_id)
        if task is not None:
            await asyncio.wait({task}, timeout=seconds)
        return await self.get(deployment_id)

    # ----- deploy

    async def deploy(self, name: str, version: str | None, by: str) -> DeploymentRecord:
        """Resolve, address and place; store PLANNED and start the levels in a task of their own.

        Refused with nothing created: an unknown root (404) or dependency (400), a plan conflict (409),
        no addresses left (409); a component that cannot be placed fails the deployment (FAILED)."""
        catalog = await self._catalog.catalog()
        try:
            root = catalog.resolve(Reference(name, version))
        except UnknownReference as exc:
            raise DeploymentNotFound(exc.message) from None
        layout = await self._catalog.plan(name, root.version)
        order = [n for level in layout.levels for n in level]
        deployment_id = f"{root.name}-{secrets.token_hex(4)}"
        volume_names = {n: tuple(v.name for v in layout.volumes if n in v.members) for n in order}
        async with self._admit:
            addresses = await self._free_addresses(len(order))
            now = self._clock()
            record = DeploymentRecord(
                id=deployment_id,
                root=root.id,
                state=State.PLANNED,
                components=tuple(
                    ComponentRecord(
                        name=n,
                        entry=layout.components[n].entry.id,
                        image=layout.components[n].entry.image,
                        level=layout.components[n].level,
                        address=address,
                        container=container_id(deployment_id, n),
                        volumes=volume_names[n],
                        requires=layout.components[n].requires,
                        metrics_port=layout.components[n].entry.manifest.metrics_port,
                    )
                    for n, address in zip(order, addresses, strict=True)
                ),
                created_at=now,
                updated_at=now,
                requested_by=by,
                history=((State.PLANNED.value, now),),
            )
            await self._records.put_deployment(record)
        log.info("deployment planned", extra={"deployment": deployment_id, "root": root.id, "components": order})
        self._track(deployment_id, asyncio.create_task(self._run(record, layout), name=f"deployment-{deployment_id}"))
        return record

    async def _free_addresses(self, count: int) -> list[str]:
        """`count` addresses of the pool nobody holds (call under `_admit`)."""
        records = await self._records.list_deployments()
        taken = {a for r in records if r.state in HOLDS_ADDRESSES for a in r.addresses}
        if self._addresses_taken is not None:
            taken |= set(await self._addresses_taken())
        released: dict[str, float] = {}
        for r in records:
            if r.state not in HOLDS_ADDRESSES:
                for a in r.addresses:
                    released[a] = max(released.get(a, 0.0), r.updated_at)
        return allocate(self._config.address_pool, taken, count, released)

    # ----- for the replicas (coordinator/deployments/replicas.py)

    async def take_addresses(
        self, count: int, keep: Callable[[list[str]], Awaitable[DeploymentRecord]]
    ) -> DeploymentRecord:
        """Choose `count` free addresses and store them (`keep` puts them into a record) while no
        deploy or chain can take them meanwhile."""
        async with self._admit:
            return await keep(await self._free_addresses(count))

    async def update(
        self, deployment_id: str, change: Callable[[DeploymentRecord], DeploymentRecord]
    ) -> DeploymentRecord:
        """Read, change and store a record, serialised with the health follower's writes."""
        async with self._health_seen:
            record = await self.get(deployment_id)
            changed = change(record)
            if changed is not record:
                await self._put(changed)
            return changed

    async def spec_for(self, record: DeploymentRecord, name: str) -> dict[str, Any]:
        """The agent's create request of component `name` as deployed (its wiring from the plan of
        the deployed root entry and the addresses the record holds)."""
        root, _, version = record.root.partition("@")
        layout = await self._catalog.plan(root, version)
        env = wiring(layout, {c.name: c.address for c in record.components}, record.id)
        return self._spec(record, layout, name, env[name])

    async def _run(self, record: DeploymentRecord, layout: DeploymentPlan) -> DeploymentRecord:
        started = self._clock()
        prepared: dict[str, asyncio.Task[None]] = {}
        issued: set[str] = set()
        try:
            record = await self._place(record, layout)
            record = await self._put(record.advance(Event.START, self._clock(), level=0))
            # Every component is pulled and created at once (its wiring is known from the plan), so a
            # later level finds its containers ready to start.
            env = wiring(layout, {c.name: c.address for c in record.components}, record.id)
            prepared = {
                c.name: asyncio.create_task(
                    self._prepare(c, self._spec(record, layout, c.name, env[c.name]), issued),
                    name=f"prepare-{c.container}",
                )
                for c in record.components
            }
            for level, names in enumerate(layout.levels):
                if level:
                    record = await self._put(record.advance(Event.LEVEL_HEALTHY, self._clock(), level=level))
                results = await asyncio.gather(
                    *(self._start_component(record, n, prepared[n]) for n in names),
                    return_exceptions=True,
                )
                for result in results:
                    if isinstance(result, ComponentRecord):
                        record = record.with_component(result, self._clock())
                for result in results:
                    if isinstance(result, BaseException):
                        raise result
                await self._put(record)
            record = await self._put(record.advance(Event.ALL_HEALTHY, self._clock()))
            log.info(
                "deployment healthy",
                extra={"deployment": record.id, "seconds": round(self._clock() - started, 3)},
            )
            self._watch(record)
        except ComponentFailed as exc:
            await self._stop_preparing(prepared, issued)
            return await self._fail(record, exc)
        except asyncio.CancelledError:
            # The coordinator is stopping: leave nothing half-started behind it.
            failure = ComponentFailed("", "cancelled", "the coordinator stopped")
            await asyncio.shield(self._stop_preparing(prepared, issued))
            await asyncio.shield(self._fail(record, failure))
            raise
        except Exception as exc:  # a bug or an unexpected agent answer: still all or nothing
            log.exception("deployment failed unexpectedly", extra={"deployment": record.id})
            await self._stop_preparing(prepared, issued)
            return await self._fail(record, ComponentFailed("", "internal", f"{type(exc).__name__}: {exc}"))
        if self.on_healthy is not None:
            # More replicas, as the manifests ask: the deployment is HEALTHY already, so whatever
            # happens to them is theirs (logged), not a rollback.
            try:
                await self.on_healthy(record, layout)
            except Exception:
                log.exception("replicas after the deploy failed", extra={"deployment": record.id})
            record = await self.get(record.id)
        return record

    async def _put(self, record: DeploymentRecord) -> DeploymentRecord:
        await self._records.put_deployment(record)
        return record

    def _need(self, component: ComponentRecord) -> Need:
        capacity = Capacity(self._config.cpu_millis, self._config.memory_bytes, 0)
        return Need(capacity=capacity, image=component.image)

    async def _place(self, record: DeploymentRecord, layout: DeploymentPlan) -> DeploymentRecord:
        """Reserve every component's capacity, in start order; co-located components on the host of
        the first of their group placed. Each reservation is stored as it is made, so a rollback
        finds it; ComponentFailed when one cannot be placed."""
        group_of = {name: group for group in layout.colocated for name in group}
        host_of: dict[str, str] = {}
        for component in record.components:
            purpose = f"deployment {record.id} component {component.name}"
            group = group_of.get(component.name, ())
            pinned = next((host_of[n] for n in group if n in host_of), None)
            try:
                if pinned is None:
                    placement = await self._placer.place_start(self._need(component), purpose)
                    reservation = placement.reservation
                else:
                    reservation = await self._reservations.reserve(pinned, self._need(component).capacity, purpose)
            except FerrymanError as exc:
                raise ComponentFailed(
                    component.name, "placement", f"cannot place {component.name}: {exc.message}"
                ) from exc
            host_of[component.name] = reservation.host
            placed = _replace(component, host=reservation.host, reservation=reservation.id)
            record = await self._put(record.with_component(placed, self._clock()))
        return record

    async def _host(self, name: str) -> Host:
        host = await self._store.get_host(name)
        if host is None:
            raise HostNotFound(f"host {name} left the fleet")
        return host

    def _spec(self, record: DeploymentRecord, layout: DeploymentPlan, name: str, env: dict[str, str]) -> dict[str, Any]:
        """The agent's create request for component `name`."""
        component = record.component(name)
        check = layout.components[name].entry.manifest.dependency_health_check
        spec: dict[str, Any] = {
            "id": component.container,
            "image": component.image,
            "env": env,
            "service_ip": component.address,
            "health": agent_health(check, component.address),
            "labels": {LABEL_DEPLOYMENT: record.id, LABEL_COMPONENT: name},
            "reservation": component.reservation,
            "restart_policy": {"name": self._config.restart_policy},
            # Limits as reserved: once it runs, the container itself holds the capacity on its host.
            "resources": {"cpus": self._config.cpu_millis / 1000, "memory": self._config.memory_bytes},
        }
        volumes = [v for v in layout.volumes if name in v.members]
        if volumes:
            spec["volumes"] = [_volume_spec(record.id, v) for v in volumes]
        return spec

    async def _prepare(self, component: ComponentRecord, spec: dict[str, Any], issued: set[str]) -> None:
        """Pull the component's image on its host and create its container there, not started:
        every component is prepared at once when the deployment starts, so a level's start is only
        its containers' starts. `issued` gets the name once the create request is on its way (the
        rollback waits for those rather than cancel them, so no container appears after it)."""
        name, where = component.name, component.host
        try:
            host = await self._host(where)
        except FerrymanError as exc:
            raise ComponentFailed(name, "placement", f"{name}: {exc.message}") from exc
        try:
            async with asyncio.timeout(self._config.health_timeout):
                await self._agents.pull_image(host, component.image, self._create_timeout)
        except TimeoutError:
            raise ComponentFailed(
                name, "pull", f"{component.image} was not pulled on {where} within {self._config.health_timeout:g} s"
            ) from None
        except AgentUnreachable as exc:
            raise _host_lost(name, where, exc) from exc
        except FerrymanError as exc:
            raise ComponentFailed(
                name, "pull", f"{name}: {component.image} could not be pulled on {where}: {exc.message}"
            ) from exc
        issued.add(name)
        try:
            await self._agents.create_container(host, spec, self._create_timeout, start=False)
        except AgentUnreachable as exc:
            raise _host_lost(name, where, exc) from exc
        except FerrymanError as exc:
            raise ComponentFailed(name, "create", f"{name} could not be created on {where}: {exc.message}") from exc

    @staticmethod
    async def _stop_preparing(prepared: dict[str, asyncio.Task[None]], issued: set[str]) -> None:
        """Cancel the preparations still pulling; wait for the creates already asked for."""
        for name, task in prepared.items():
            if name not in issued:
                task.cancel()
        await asyncio.gather(*prepared.values(), return_exceptions=True)

    async def _start_component(
        self, record: DeploymentRecord, name: str, prepared: asyncio.Task[None]
    ) -> ComponentRecord:
        """Start `name` once it is prepared and wait until it is healthy: the component as it ended,
        or ComponentFailed."""
        component = record.component(name)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._config.health_timeout
        try:
            async with asyncio.timeout_at(deadline):
                await asyncio.shield(prepared)  # the task ends with the deployment, not with this wait
        except TimeoutError:
            raise ComponentFailed(
                name,
                "create",
                f"{name} was not pulled and created on {component.host} within {self._config.health_timeout:g} s",
            ) from None
        try:
            host = await self._host(component.host)
            async with asyncio.timeout_at(deadline):
                await self._agents.start_container(host, component.container, self._create_timeout)
        except TimeoutError:
            raise ComponentFailed(
                name, "create", f"{name} was not started on {component.host} within {self._config.health_timeout:g} s"
            ) from None
        except AgentUnreachable as exc:
            raise _host_lost(name, component.host, exc) from exc
        except FerrymanError as exc:
            raise ComponentFailed(name, "create", f"{name} could not start on {component.host}: {exc.message}") from exc
        seq = 0
        last: dict[str, Any] = {}
        exits = 0
        stopped = False
        runs: set[str] = set()  # the `since` of every run seen starting
        try:
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    raise TimeoutError
                # While it is stopped the restarts are read every second (see below).
                wait = min(STOPPED_POLL if stopped else HEALTH_POLL, max(left, 0.1))
                last = await self._agents.container_health(host, component.container, seq, wait, left + 5.0)
                seq = int(last.get("seq", seq))
                status = last.get("status")
                if status == "healthy":
                    return await self._settle(_replace(component, state=ComponentState.HEALTHY))
                if status == "unhealthy":
                    raise ComponentFailed(
                        name, "unhealthy", f"{name} on {component.host} became {status}: {_last_output(last)}"
                    )
                # The agent restarts an exited component by its policy; a run ending is an exit
                # whether the poll saw it `stopped` or only the next run `starting` (a new `since`).
                if status == "stopped":
                    exits += not stopped  # an unchanged answer (the poll's wait ran out) is the same exit
                    stopped = True
                    # Runs that end within milliseconds can end before the health monitor sees them
                    # start: the agent's restart count says how many ended all the same.
                    exits = max(exits, await self._restart_count(host, component.container) + 1)
                elif status == "starting":
                    since = str(last.get("since", ""))
                    if since not in runs:
                        exits += bool(runs) and not stopped
                        runs.add(since)
                    stopped = False
                if exits >= self._config.crash_loop_exits:
                    raise ComponentFailed(
                        name,
                        "crash_loop",
                        f"{name} on {component.host} exited {exits} times while it started "
                        f"(restart policy {self._config.restart_policy}): {_last_output(last)}",
                    )
        except TimeoutError:
            raise ComponentFailed(
                name,
                "health_timeout",
                f"{name} on {component.host} was not healthy within {self._config.health_timeout:g} s "
                f"(status {last.get('status', 'unknown')}: {_last_output(last)})",
            ) from None
        except AgentUnreachable as exc:
            raise _host_lost(name, component.host, exc) from exc
        except FerrymanError as exc:
            raise ComponentFailed(name, "health", f"{name} on {component.host}: {exc.message}") from exc

    async def _restart_count(self, host: Host, container: str) -> int:
        listed = await self._agents.list_containers(host)
        return next((int(c.get("restart_count") or 0) for c in listed if c.get("id") == container), 0)

    async def _settle(self, component: ComponentRecord) -> ComponentRecord:
        """The component runs within its limits, which its agent counts against the host from now
        on: its placement reservation is released rather than held until the teardown or its TTL."""
        if component.reservation:
            with contextlib.suppress(FerrymanError):  # the agent expires its copy at the same deadline
                await self._reservations.release(component.reservation)
        return _replace(component, reservation="")

    async def _fail(self, record: DeploymentRecord, failure: ComponentFailed) -> DeploymentRecord:
        stored = await self._records.get_deployment(record.id)
        record = stored if stored is not None else record
        if failure.component:
            failed = _replace(record.component(failure.component), state=ComponentState.FAILED, error=failure.message)
            record = record.with_component(failed, self._clock())
        record = await self._put(
            record.advance(Event.FAILED, self._clock(), failed_component=failure.component, error=failure.message)
        )
        log.error(
            "deployment failed; rolling back",
            extra={"deployment": record.id, "component": failure.component, "error": failure.message},
        )
        return await self._roll_back(record, failure)

    async def _roll_back(self, record: DeploymentRecord, failure: ComponentFailed) -> DeploymentRecord:
        """ROLLING_BACK -> FAILED: remove what the deployment holds, count it, fire the alert."""
        record = await self._teardown(record)
        record = await self._put(record.advance(Event.ROLLED_BACK, self._clock()))
        self._metrics.deployment_failures.labels(reason=failure.reason).inc()
        await self._alerter.fire(
            Alert(
                name="FerrymanDeploymentFailed",
                labels={
                    "deployment": record.id,
                    "image": record.root,
                    "component": failure.component or "-",
                    "reason": failure.reason,
                },
                summary=f"deployment {record.id} of {record.root} failed and was rolled back",
                description=failure.message,
                starts_at=self._clock(),
            )
        )
        return record

    async def _teardown(self, record: DeploymentRecord) -> DeploymentRecord:
        """Remove every component that holds anything, highest level first, each level in parallel;
        then the shared volumes, once no container of the deployment mounts them. What a host that
        does not answer keeps is marked `left_behind` and removed when it answers again (`_sweep`)."""
        for group in started_in_reverse(record.components):
            done = await asyncio.gather(*(self._remove(record.id, c) for c in group))
            for component in done:
                record = record.with_component(component, self._clock())
            await self._put(record)
        await self._remove_volumes(record, {c.host for c in record.components if c.host})
        if any(c.left_behind for c in record.components):
            self._schedule_sweep(record.id)
        return record

    async def _remove_volumes(self, record: DeploymentRecord, hosts: set[str]) -> bool:
        """Delete the deployment's volumes on `hosts` where none of its containers is left; True when
        every one of them is gone."""
        kept = {c.host for c in record.components if c.left_behind}
        volumes = {(c.host, v) for c in record.components if c.host in hosts - kept for v in c.volumes}
        gone = not (kept & hosts)
        for host_name, volume in sorted(volumes):
            name = volume_name(record.id, volume)
            try:
                await self._agents.delete_volume(await self._host(host_name), name)
            except FerrymanError as exc:
                gone = False
                log.error(
                    "volume not removed",
                    extra={"deployment": record.id, "host": host_name, "volume": name, "error": exc.message},
                )
        return gone

    def _schedule_sweep(self, deployment_id: str) -> None:
        if deployment_id in self._sweeps:
            return
        task = asyncio.create_task(self._sweep(deployment_id), name=f"leftovers-{deployment_id}")
        self._sweeps[deployment_id] = task
        task.add_done_callback(lambda t: _forget(self._sweeps, deployment_id, t))

    async def _sweep(self, deployment_id: str) -> None:
        """Retry, backing off, removing the containers (and then volumes) a teardown could not
        remove because their host did not answer, until none is left."""
        delay, most = LEFTOVER_RETRY
        while True:
            await asyncio.sleep(delay)
            delay = min(delay * 2, most)
            record = await self._records.get_deployment(deployment_id)
            if record is None:
                return
            left = [c for c in record.components if c.left_behind]
            if not left:
                return
            for component in await asyncio.gather(*(self._remove(record.id, c) for c in left)):
                record = record.with_component(component, self._clock())
            await self._remove_volumes(record, {c.host for c in left})
            await self._put(record)
            if not any(c.left_behind for c in record.components):
                log.info("leftovers removed", extra={"deployment": deployment_id})
                return

    async def _remove(self, deployment: str, component: ComponentRecord) -> ComponentRecord:
        """Delete the container (absent is fine) and release the reservation; errors are logged and
        kept in the component's record, never raised (the rest of the teardown goes on)."""
        problems = []
        unreachable = False
        for replica in component.replicas:
            try:
                await self._agents.delete_container(await self._host(replica.host), replica.container)
            except FerrymanError as exc:  # logged; the replica's host sweeps nothing (docs/deployments.md)
                problems.append(f"delete replica {replica.container}: {exc.message}")
            if replica.reservation:
                with contextlib.suppress(FerrymanError):
                    await self._reservations.release(replica.reservation)
        if component.replicas and component.host:
            with contextlib.suppress(FerrymanError):
                await self._agents.unbalance(await self._host(component.host), component.address)
        if component.host:
            try:
                host = await self._host(component.host)
                await self._agents.delete_container(host, component.container)
            except FerrymanError as exc:
                unreachable = isinstance(exc, AgentUnreachable)
                problems.append(f"delete {component.container}: {exc.message}")
        if component.reservation:
            # The coordinator's hold goes now; an unreachable agent expires its own at the same deadline.
            with contextlib.suppress(FerrymanError):
                await self._reservations.release(component.reservation)
        if problems:
            log.error("component not fully removed", extra={"deployment": deployment, "problems": problems})
            return _replace(component, error=component.error or "; ".join(problems), left_behind=unreachable)
        state = ComponentState.FAILED if component.state is ComponentState.FAILED else ComponentState.REMOVED
        return _replace(component, state=state, left_behind=False, replicas=())

    # ----- after a restart

    async def recover(self) -> int:
        """Take over the deployments a previous process left in flight (states.recovery): those that
        were starting are rolled back, rollbacks and undeploys finished. The count taken over."""
        taken = 0
        for record in await self._records.list_deployments():
            if any(c.left_behind for c in record.components):
                self._schedule_sweep(record.id)
            if record.state in WATCHED:
                self._watch(record)
            action = recovery(record.state)
            if action is Recovery.NOTHING or record.id in self._tasks:  # nothing in flight, or ours
                continue
            if action is Recovery.ROLL_BACK:
                reason = ComponentFailed("", "coordinator_restart", "the coordinator restarted during the deployment")
                work: Coroutine[Any, Any, DeploymentRecord] = self._fail(record, reason)
            elif action is Recovery.FINISH_ROLLBACK:
                reason = ComponentFailed(record.failed_component, "coordinator_restart", record.error)
                work = self._roll_back(record, reason)
            else:
                work = self._stop(record)
            log.warning("taking over a deployment", extra={"deployment": record.id, "state": record.state.value})
            self._track(record.id, asyncio.create_task(work, name=f"recover-{record.id}"))
            taken += 1
        return taken

    def _track(self, deployment_id: str, task: asyncio.Task[DeploymentRecord]) -> None:
        self._tasks[deployment_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(deployment_id, None))

    # ----- undeploy

    async def undeploy(self, deployment_id: str) -> DeploymentRecord:
        """STOPPING in a task of its own; DeploymentBusy while it is starting or rolling back."""
        record = await self.get(deployment_id)
        if not can_undeploy(record.state):
            raise DeploymentBusy(
                f"deployment {deployment_id} is {record.state.value}; undeploy it once it is HEALTHY or FAILED"
            )
        if self.scaling(deployment_id):
            raise DeploymentBusy(f"deployment {deployment_id} is being scaled; undeploy it once that is done")
        await self._unwatch(deployment_id)  # the teardown's exits are not a component degrading
        record = await self._put(record.advance(Event.UNDEPLOY, self._clock()))
        self._track(deployment_id, asyncio.create_task(self._stop(record), name=f"undeploy-{deployment_id}"))
        return record

    async def _stop(self, record: DeploymentRecord) -> DeploymentRecord:
        record = await asyncio.shield(self._teardown(record))
        record = await self._put(record.advance(Event.STOPPED, self._clock()))
        log.info("deployment removed", extra={"deployment": record.id})
        return record

    # ----- while it runs

    def _watch(self, record: DeploymentRecord) -> None:
        if record.id not in self._watches:
            task = asyncio.create_task(self._follow_all(record), name=f"watch-{record.id}")
            self._watches[record.id] = task
            task.add_done_callback(lambda t: _forget(self._watches, record.id, t))

    async def _unwatch(self, deployment_id: str) -> None:
        task = self._watches.pop(deployment_id, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _follow_all(self, record: DeploymentRecord) -> None:
        await asyncio.gather(*(self._follow(record.id, c.name) for c in record.components))

    async def _follow(self, deployment_id: str, name: str) -> None:
        """Long-poll one component's health on its agent for as long as the deployment is HEALTHY or
        DEGRADED, and write each change into the record (`_seen`). A host that does not answer, or
        a container that is not where the record says, degrades the component until it answers."""
        seq = 0
        delay, most = LEFTOVER_RETRY
        # Followed to another host: its copy there reads `starting` until its first probe, which is no
        # failure (a volume group's members wait restored, unprobed, for each other).
        moved = False
        while True:
            record = await self._records.get_deployment(deployment_id)
            if record is None or record.state not in WATCHED:
                return
            component = record.component(name)
            try:
                host = await self._host(component.host)
                health = await self._agents.container_health(
                    host, component.container, seq, HEALTH_POLL, HEALTH_POLL + 5.0
                )
            except FerrymanError as exc:
                if isinstance(exc, NotFound) and await self._followed(deployment_id, component):
                    seq, moved = 0, True
                    continue
                await self._seen(deployment_id, name, False, f"{name} on {component.host}: {exc.message}")
                seq = 0
                await asyncio.sleep(delay)
                delay = min(delay * 2, most)
                continue
            delay = LEFTOVER_RETRY[0]
            if int(health.get("seq", seq)) == seq:
                continue  # the wait ran out with nothing new
            seq = int(health.get("seq", seq))
            status = health.get("status")
            if status != "healthy" and await self.moving_from(component.container, component.host):
                # The source freezes and then ends its copy: not a failure, the target's copy is followed.
                if await self._followed(deployment_id, component):
                    seq, moved = 0, True
                continue
            if status == "starting" and moved:
                continue
            moved = False
            why = f"{name} on {component.host} became {status}: {_last_output(health)}"
            await self._seen(deployment_id, name, status == "healthy", why)

    async def moving_from(self, container: str, recorded: str) -> bool:
        """Whether a migration moves `container` off `recorded` now or has moved it (the record has not
        followed yet). The status its old copy reports then (frozen, stopped) is no failure: the
        source's health can arrive after the coordinator has seen the migration commit."""
        where, _ = await self.locate(container, recorded)
        return where is not Whereabouts.LOST

    async def locate(self, container: str, recorded: str) -> tuple[Whereabouts, str]:
        """Where a container its recorded host does not have is (`whereabouts`): moving, moved (to
        the host returned), or lost. Components and replicas alike."""
        migrations = [m for m in await self._store.list_migrations() if m.container == container]
        committed = [m for m in migrations if m.state is MigrationState.COMMITTED]
        # Only the last move counts: one that left `recorded` and was followed back again does not.
        last = max(committed, key=lambda m: m.updated_at) if committed else None
        return whereabouts(
            recorded,
            [h.name for h in await self._store.list_hosts() if any(c.id == container for c in h.containers)],
            any(not m.done for m in migrations),
            last.target if last is not None and last.source == recorded else None,
        )

    async def _followed(self, deployment_id: str, component: ComponentRecord) -> bool:
        """True once the component's container, gone from its recorded host, was found where a
        migration put it (the record now names that host), or after a pause while one is under way;
        False when it is nowhere known (the caller degrades the component)."""
        where, host = await self.locate(component.container, component.host)
        if where is Whereabouts.MOVING:
            await asyncio.sleep(MOVING_POLL)
            return True
        if where is Whereabouts.LOST:
            return False
        async with self._health_seen:
            record = await self._records.get_deployment(deployment_id)
            if record is None or record.state not in WATCHED:
                return True  # the loop sees it and stops
            now = record.component(component.name)
            if now.host != component.host:
                return True  # moved already, by another look
            moved = _replace(now, host=host)
            await self._put(record.with_component(moved, self._clock()))
        log.info(
            "component followed to its new host",
            extra={"deployment": deployment_id, "component": component.name, "from": component.host, "host": host},
        )
        if moved.replicas:
            await self._move_balancer(deployment_id, moved, component.host)
        return True

    async def _move_balancer(self, deployment_id: str, component: ComponentRecord, old_host: str) -> None:
        """The component's container owns its replicas' balancer, on the host that publishes the
        address: after a migration the new host balances (the same backends) and the old one stops."""
        serving = [
            r.address for r in sorted(component.replicas, key=lambda r: r.index) if r.state is ReplicaState.SERVING
        ]
        try:
            await self._agents.balance(
                await self._host(component.host), component.address, [component.address, *serving]
            )
        except FerrymanError as exc:
            log.error(
                "balancer not moved", extra={"deployment": deployment_id, "host": component.host, "error": exc.message}
            )
            return
        try:
            await self._agents.unbalance(await self._host(old_host), component.address)
        except FerrymanError as exc:  # its table balances an address routed elsewhere now: harmless, logged
            log.warning(
                "old balancer not removed", extra={"deployment": deployment_id, "host": old_host, "error": exc.message}
            )
        log.info(
            "balancer followed its owner",
            extra={"deployment": deployment_id, "component": component.name, "from": old_host, "host": component.host},
        )

    async def _seen(self, deployment_id: str, name: str, healthy: bool, why: str) -> None:
        async with self._health_seen:
            record = await self._records.get_deployment(deployment_id)
            if record is None or record.state not in WATCHED:
                return
            before = record.component(name)
            after = component_health(record, name, healthy, why, self._clock())
            if after is record:
                return
            await self._put(after)
        told = dependents(after, name)
        labels = {"deployment": record.id, "image": record.root, "component": name, "dependents": ",".join(told)}
        if healthy:
            log.info("component healthy again", extra={"deployment": record.id, "component": name})
            self._metrics.deployment_component_changes.labels(to="healthy").inc()
            alert = Alert(
                name="FerrymanDeploymentComponentDegraded",
                labels=labels,
                summary=f"{name} of deployment {record.id} is healthy again",
                description=f"{name} is healthy again; {', '.join(told) or 'no component'} no longer waits on it",
                starts_at=before.degraded_since,
                severity="warning",
                ends_at=self._clock(),
            )
        else:
            log.warning("component degraded", extra={"deployment": record.id, "component": name, "error": why})
            self._metrics.deployment_component_changes.labels(to="degraded").inc()
            alert = Alert(
                name="FerrymanDeploymentComponentDegraded",
                labels=labels,
                summary=f"{name} of deployment {record.id} is degraded",
                description=f"{why}; its dependents ({', '.join(told) or 'none'}) wait on it",
                starts_at=after.component(name).degraded_since,
                severity="warning",
            )
        await self._alerter.fire(alert)

    async def stop_following(self) -> None:
        """Stop watching running deployments and sweeping leftovers: this replica no longer leads
        (the next leader's `recover` takes both up). Deploys and undeploys under way finish."""
        tasks = [*self._sweeps.values(), *self._watches.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        tasks = [*self._tasks.values(), *self._sweeps.values(), *self._watches.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def volume_name(deployment: str, volume: str) -> str:
    """The agent's name of a deployment's shared volume: `<deployment>-<volume>`, at most 64 characters."""
    return container_id(deployment, volume)


def _volume_spec(deployment: str, volume: SharedVolume) -> dict[str, str]:
    return {"name": volume_name(deployment, volume.name), "path": volume.path}


def _forget(tasks: dict[str, asyncio.Task[None]], key: str, task: asyncio.Task[None]) -> None:
    """Drop a finished task from `tasks`, unless another one has taken its place meanwhile."""
    if tasks.get(key) is task:
        del tasks[key]


def _host_lost(name: str, host: str, exc: AgentUnreachable) -> ComponentFailed:
    return ComponentFailed(name, "host_lost", f"{name}: host {host} was lost while it started: {exc.message}")


def _last_output(health: dict[str, Any]) -> str:
    last = health.get("last") or {}
    return str(last.get("output") or last.get("error") or "no probe result yet")


def _replace(component: ComponentRecord, **changes: Any) -> ComponentRecord:
    return dataclasses.replace(component, **changes)


async def held_addresses(records: DeploymentStore) -> set[str]:
    """The service addresses deployments hold now."""
    return {a for r in await records.list_deployments() if r.state in HOLDS_ADDRESSES for a in r.addresses}
