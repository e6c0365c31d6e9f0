"""The chain manager: runs a chain's stages one after another, handing the state of each to the next.

`run` checks the manifest (coordinator/chains/manifest.py), resolves catalog entries, takes the
chain's service address from `[deployments] address_pool` (shared with deployments) and stores the
record PENDING; that much happens in the request, so bad input is refused with nothing created.
Then one task per chain drives it through the state table (coordinator/chains/states.py): each
state has one step here, which does its I/O and returns the record after the event it ended with,
stored before the next step starts. So the stored record is the journal, and a coordinator that
restarts drives every chain on from the state it finds (`recover`; the table says which states are
driven again and which roll back).

A handover from the serving stage S to the next stage T, over the HTTP state contract:
PREPARING (T placed on another host, pulled, created with the chain's address unpublished), HEALTH
(T's check passes, probed inside T's namespace), EXPORT (S's `POST /state/export`, through S's
agent: S takes no requests that change its state from then on), TRANSFER (the state checked to be
a MessagePack map holding what T consumes), IMPORT (T's `PUT /state`), SWITCH (the address
unpublished on S's host and published on T's), RETIRING (S drains for `drain` seconds, then is
removed). A failure in any phase up to SWITCH, or the handover's deadline, rolls back: T is
removed, S resumed (`POST /state/resume`) and its address published again; the state never left S
for good, so nothing is lost or applied twice. An alert goes out as for deployments.

A live handover (`handover.live`) takes a snapshot in EXPORT with the serving stage serving on,
and at SWITCH only the delta since it (one agent request when both stages share a host). A `criu`
handover moves the serving stage's process with a coordinator migration (MIGRATE): after HEALTH,
next to the next stage, which then takes the state by the contract on one host; or, with
`become`, right after PREPARING, the moved process being the next stage.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any, Protocol

from coordinator.alerts import Alert, Alerter
from coordinator.catalog.model import HealthCheck, Reference, UnknownReference
from coordinator.catalog.service import CatalogService
from coordinator.chains import prediction
from coordinator.chains.contract import StateUnfit, check_delta, check_state, snapshot_version
from coordinator.chains.manifest import ChainManifest, ChainManifestInvalid, ManifestValidator, Stage
from coordinator.chains.prediction import Prediction, UsageModel
from coordinator.chains.states import (
    HANDOVER_PHASES,
    HOLDS_ADDRESS,
    TERMINAL,
    ChainBusy,
    ChainRecord,
    Event,
    HandoverRecord,
    Recovery,
    RunState,
    StageRun,
    State,
    is_last,
    recovery,
    successor,
)
from coordinator.chains.store import ChainStore
from coordinator.config import DeploymentsConfig
from coordinator.deployments.addresses import allocate
from coordinator.deployments.service import HEALTH_POLL, agent_health, container_id
from coordinator.metrics import CoordinatorMetrics
from coordinator.model import Capacity, Host, HostNotFound, Migration, MigrationState
from coordinator.placement import Need, Placer
from coordinator.reservations import ReservationService
from coordinator.store import Store
from core.errors import Conflict, ContainerNotFound, FerrymanError, NotFound

log = logging.getLogger(__name__)

LABEL_CHAIN = "ferryman.chain"
LABEL_STAGE = "ferryman.stage"


class ChainNotFound(NotFound):
    code = "chain_not_found"


class StepFailed(Exception):
    """A step could not do its job; the message says what and where."""


class ChainAgents(Protocol):
    """What the chain manager needs from agents (coordinator/agents.py `AgentClient`)."""

    async def pull_image(self, host: Host, ref: str, within: float) -> dict[str, Any]: ...
    async def create_container(self, host: Host, spec: dict[str, Any], within: float) -> dict[str, Any]: ...
    async def delete_container(self, host: Host, container_id: str) -> None: ...
    async def container_health(
        self, host: Host, container_id: str, after: int, wait: float, within: float
    ) -> dict[str, Any]: ...
    async def publish(self, host: Host, container_id: str) -> None: ...
    async def unpublish(self, host: Host, service_ip: str) -> bool: ...
    async def delete_volume(self, host: Host, name: str) -> None: ...
    async def freeze_container(self, host: Host, container_id: str) -> None: ...
    async def thaw_container(self, host: Host, container_id: str) -> None: ...
    async def checkpoint_container(self, host: Host, container_id: str, within: float) -> None: ...
    async def restore_container(self, host: Host, container_id: str, within: float) -> None: ...
    async def stage_state(
        self,
        host: Host,
        container_id: str,
        action: str,
        port: int,
        body: bytes,
        within: float,
        since: int | None = None,
    ) -> tuple[int, bytes]: ...
    async def stage_takeover(
        self, host: Host, container_id: str, port: int, source: str, source_port: int, since: int, within: float
    ) -> dict[str, float]: ...


class ChainMigrations(Protocol):
    """What the chain manager needs of the coordinator's migrations (coordinator/orchestrator.py)
    for a `criu` handover: the serving stage's process moved as any container is."""

    async def request(
        self, container: str, to: str = ..., *, mode: str | None = ..., requested_by: str = ..., reason: str = ...
    ) -> Migration: ...
    async def get(self, migration_id: str) -> Migration: ...
    async def all(self) -> list[Migration]: ...
    async def wait(self, migration_id: str, within: float) -> Migration: ...


MIGRATION_WAIT = 3600.0
"""Seconds a rollback waits for a criu handover's migration to end (the orchestrator bounds it by
its own `[migrations] timeout`): the chain must know on which host its stage runs."""


class ChainService:
    def __init__(
        self,
        store: Store,
        chains: ChainStore,
        catalog: CatalogService,
        placer: Placer,
        reservations: ReservationService,
        agents: ChainAgents,
        alerter: Alerter,
        config: DeploymentsConfig,
        create_timeout: float,
        clock: Callable[[], float],
        metrics: CoordinatorMetrics,
        addresses_taken: Callable[[], Awaitable[Collection[str]]],
        admit: asyncio.Lock,
        usage_model: UsageModel | None = None,
        predict_period: float = 5.0,
        migrations: ChainMigrations | None = None,
    ) -> None:
        """`addresses_taken`: the service addresses deployments hold; `admit`: held (with the
        deployments) while an address is chosen and first stored, so no two take one;
        `usage_model`: predicts the next stage's usage from the chain's history (None: the
        manifest's `predicted`); `predict_period`: seconds between two predictions while a stage
        serves; `migrations`: the coordinator's, for `criu` handovers (without it they fail,
        rolling back)."""
        self._migrations = migrations
        self._store = store
        self._records = chains
        self._catalog = catalog
        self._placer = placer
        self._reservations = reservations
        self._agents = agents
        self._alerter = alerter
        self._config = config
        self._create_timeout = create_timeout
        self._clock = clock
        self._metrics = metrics
        self._addresses_taken = addresses_taken
        self._admit = admit
        self._usage_model = usage_model
        self._predict_period = predict_period
        self.validator = ManifestValidator()
        self._tasks: dict[str, asyncio.Task[ChainRecord]] = {}
        self._advance: dict[str, asyncio.Event] = {}
        self._exported: dict[str, bytes] = {}
        """The state between EXPORT and IMPORT, in memory only: a restart in between rolls back."""
        self._steps: Mapping[State, Callable[[ChainRecord], Awaitable[ChainRecord]]] = {
            State.PENDING: self._begin,
            State.STARTING: self._start_first,
            State.RUNNING: self._serve,
            State.PREPARING: self._prepare,
            State.HEALTH: self._health,
            State.EXPORT: self._export,
            State.TRANSFER: self._transfer,
            State.IMPORT: self._import,
            State.MIGRATE: self._migrate,
            State.SWITCH: self._switch,
            State.RETIRING: self._retire,
            State.ROLLING_BACK: self._roll_back,
            State.COMPLETING: self._teardown,
            State.ABORTING: self._teardown,
            State.FAILING: self._teardown,
        }

    # ----- reading

    async def get(self, chain_id: str) -> ChainRecord:
        record = await self._records.get_chain(chain_id)
        if record is None:
            raise ChainNotFound(f"no chain {chain_id!r}")
        return record

    async def all(self) -> list[ChainRecord]:
        return await self._records.list_chains()

    async def addresses(self) -> set[str]:
        """The service addresses chains hold."""
        return {r.address for r in await self._records.list_chains() if r.state in HOLDS_ADDRESS}

    async def wait(self, chain_id: str, seconds: float, states: Collection[State], past: int = 0) -> ChainRecord:
        """The record once it is in one of `states` with more than `past` states in its history (or
        once it ended), or after `seconds`, whichever first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while True:
            record = await self.get(chain_id)
            if record.state in TERMINAL or (record.state in states and len(record.history) > past):
                return record
            if loop.time() >= deadline:
                return record
            # The journal is the one source the API reads (a replica on etcd has no task to wait on).
            await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))

    # ----- commands

    async def run(self, document: Any, by: str) -> ChainRecord:
        """Check, resolve, address; store PENDING and drive the chain in a task of its own."""
        manifest = self.validator.parse(document)
        manifest = await self._resolve(manifest)
        chain_id = f"{manifest.name}-{secrets.token_hex(4)}"
        async with self._admit:
            taken = set(await self._addresses_taken()) | await self.addresses()
            [address] = allocate(self._config.address_pool, taken, 1)
            now = self._clock()
            record = ChainRecord(
                id=chain_id,
                name=manifest.name,
                manifest=manifest.to_dict(),
                state=State.PENDING,
                address=address,
                created_at=now,
                updated_at=now,
                requested_by=by,
                history=((State.PENDING.value, now),),
            )
            await self._records.put_chain(record)
        log.info("chain accepted", extra={"chain": chain_id, "address": address})
        self._drive_in_task(record)
        return record

    async def advance(self, chain_id: str) -> ChainRecord:
        """Hand over to the next stage now (past the last stage: complete the chain); ChainBusy
        unless it is RUNNING."""
        record = await self.get(chain_id)
        if record.state is not State.RUNNING or chain_id not in self._advance:
            raise ChainBusy(f"chain {chain_id} is {record.state.value}; it can advance once it is RUNNING")
        self._advance[chain_id].set()
        return record

    async def abort(self, chain_id: str) -> ChainRecord:
        """Stop whatever the chain is doing and remove every stage of it."""
        record = await self.get(chain_id)
        if record.state in TERMINAL:
            return record
        if record.state in (State.ABORTING, State.COMPLETING, State.FAILING):
            return record
        task = self._tasks.pop(chain_id, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        record = await self.get(chain_id)
        self._exported.pop(chain_id, None)
        if record.state not in TERMINAL and record.state not in (State.ABORTING, State.COMPLETING, State.FAILING):
            record = await self._put(record.advance(Event.ABORT, self._clock(), error="aborted"))
        self._drive_in_task(record)
        return record

    # ----- after a restart

    async def recover(self) -> int:
        """Drive on every chain a previous process left unfinished (states.recovery); the count."""
        taken = 0
        for record in await self._records.list_chains():
            action = recovery(record.state)
            if action is Recovery.NOTHING or record.id in self._tasks:
                continue
            if action is Recovery.ROLL_BACK:
                record = await self._fail_handover(record, "the coordinator restarted during the handover")
            log.warning("resuming a chain", extra={"chain": record.id, "state": record.state.value})
            self._drive_in_task(record)
            taken += 1
        return taken

    async def close(self) -> None:
        """Stop driving (the chains stay as they are; the next coordinator resumes them)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ----- the driver

    def _drive_in_task(self, record: ChainRecord) -> None:
        self._advance.setdefault(record.id, asyncio.Event())
        task = asyncio.create_task(self._drive(record), name=f"chain-{record.id}")
        self._tasks[record.id] = task

        def done(_: asyncio.Task[ChainRecord]) -> None:
            if self._tasks.get(record.id) is task:
                del self._tasks[record.id]

        task.add_done_callback(done)

    async def _drive(self, record: ChainRecord) -> ChainRecord:
        while record.state not in TERMINAL:
            step = self._steps[record.state]
            try:
                record = await step(record)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug or an unexpected answer in a step
                log.exception("chain step failed unexpectedly", extra={"chain": record.id})
                record = await self._unexpected(record, f"{type(exc).__name__}: {exc}")
        self._advance.pop(record.id, None)
        return record

    async def _unexpected(self, record: ChainRecord, error: str) -> ChainRecord:
        if record.state in HANDOVER_PHASES:
            return await self._fail_handover(record, error)
        if record.state in (State.PENDING, State.STARTING):
            if record.state is State.PENDING:
                record = record.advance(Event.START, self._clock(), serving=record.chain_manifest().stages[0].name)
            return await self._put(record.advance(Event.FAILED, self._clock(), error=error))
        if record.state in (State.RUNNING, State.RETIRING, State.ROLLING_BACK):
            # Nothing to undo safely from here: stop driving it, keep it as it is, say why.
            await asyncio.sleep(1.0)
            return await self._put(dataclasses.replace(record, error=error))
        raise StepFailed(error)  # a teardown that cannot even run: leave it to the next start

    async def _put(self, record: ChainRecord) -> ChainRecord:
        await self._records.put_chain(record)
        return record

    async def _host(self, name: str) -> Host:
        host = await self._store.get_host(name)
        if host is None:
            raise HostNotFound(f"host {name} left the fleet")
        return host

    # ----- steps: starting

    async def _begin(self, record: ChainRecord) -> ChainRecord:
        first = record.chain_manifest().stages[0]
        return await self._put(record.advance(Event.START, self._clock(), serving=first.name))

    async def _start_first(self, record: ChainRecord) -> ChainRecord:
        manifest = record.chain_manifest()
        stage = manifest.stage(record.serving)
        try:
            record, run = await self._place(record, stage, exclude=())
            record, run = await self._create(record, run, stage, publish=True, deadline=self._health_deadline())
            record = await self._put(record.with_run(dataclasses.replace(run, state=RunState.SERVING), self._clock()))
            now = self._clock()
            return await self._put(record.advance(Event.HEALTHY, now, serving_since=now))
        except StepFailed as exc:
            log.error("first stage failed", extra={"chain": record.id, "stage": stage.name, "error": str(exc)})
            record = await self._remove_runs(await self.get(record.id), mark_failed=str(exc))
            if stage.fallback and stage.fallback not in record.failed:
                return await self._put(
                    record.advance(
                        Event.FALL_BACK,
                        self._clock(),
                        serving=stage.fallback,
                        failed=(*record.failed, stage.name),
                        error=str(exc),
                    )
                )
            return await self._put(record.advance(Event.FAILED, self._clock(), error=str(exc)))

    def _health_deadline(self) -> float:
        return asyncio.get_running_loop().time() + self._config.health_timeout

    async def _place(self, record: ChainRecord, stage: Stage, exclude: Collection[str]) -> tuple[ChainRecord, StageRun]:
        """The stage's newest run if it holds a reservation (a step driven again), else a new one placed."""
        run = record.run_of(stage.name)
        if run is not None and run.reservation:
            return record, run
        attempt = sum(r.stage == stage.name for r in record.runs) + 1
        cid = container_id(record.id, f"{stage.name}-{attempt}")
        held = record.preallocation
        if held and held.get("stage") == stage.name and str(held.get("host")) not in exclude:
            # The capacity pre-allocated for it while the stage before it served: its reservation now.
            host, reservation = str(held["host"]), str(held["reservation"])
            run = StageRun(stage=stage.name, container=cid, host=host, reservation=reservation)
            record = dataclasses.replace(record.with_run(run, self._clock()), preallocation={})
            return await self._put(record), run
        capacity = Capacity(
            stage.cpu_millis or self._config.cpu_millis, stage.memory_bytes or self._config.memory_bytes, 0
        )
        try:
            placement = await self._placer.place_start(
                Need(capacity=capacity, image=stage.image),
                f"chain {record.id} stage {stage.name}",
                exclude=exclude,
            )
        except FerrymanError as exc:
            raise StepFailed(f"cannot place {stage.name}: {exc.message}") from exc
        run = StageRun(
            stage=stage.name, container=cid, host=placement.reservation.host, reservation=placement.reservation.id
        )
        return await self._put(record.with_run(run, self._clock())), run

    async def _create(
        self, record: ChainRecord, run: StageRun, stage: Stage, *, publish: bool, deadline: float
    ) -> tuple[ChainRecord, StageRun]:
        """Pull, create and start the run's container, then wait until its check passes."""
        host = await self._host_or_fail(run)
        spec = self._spec(record, run, stage, publish)
        loop = asyncio.get_running_loop()
        if run.state is RunState.PLACED:
            try:
                async with asyncio.timeout_at(deadline):
                    await self._agents.pull_image(host, stage.image, self._create_timeout)
                    await self._agents.create_container(host, spec, self._create_timeout)
            except TimeoutError:
                raise StepFailed(f"{stage.name} was not created on {run.host} in time") from None
            except FerrymanError as exc:
                raise StepFailed(f"{stage.name} could not start on {run.host}: {exc.message}") from exc
            run = dataclasses.replace(run, state=RunState.CREATED)
            record = await self._put(record.with_run(run, self._clock()))
        seq = 0
        last: dict[str, Any] = {}
        try:
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    raise TimeoutError
                last = await self._agents.container_health(
                    host, run.container, seq, min(HEALTH_POLL, max(left, 0.1)), left + 5.0
                )
                seq = int(last.get("seq", seq))
                status = last.get("status")
                if status == "healthy":
                    break
                if status in ("unhealthy", "stopped"):
                    raise StepFailed(f"{stage.name} on {run.host} became {status}: {_last_output(last)}")
        except TimeoutError:
            raise StepFailed(
                f"{stage.name} on {run.host} was not healthy in time (status {last.get('status', 'unknown')}: "
                f"{_last_output(last)})"
            ) from None
        except FerrymanError as exc:
            raise StepFailed(f"{stage.name} on {run.host}: {exc.message}") from exc
        run = dataclasses.replace(run, state=RunState.HEALTHY)
        return await self._put(record.with_run(run, self._clock())), run

    async def _host_or_fail(self, run: StageRun) -> Host:
        try:
            return await self._host(run.host)
        except FerrymanError as exc:
            raise StepFailed(f"{run.stage}: {exc.message}") from exc

    # ----- steps: serving

    async def _serve(self, record: ChainRecord) -> ChainRecord:
        """Wait for the stage's `run_for` to end or for `advance`; then hand over, or complete."""
        manifest = record.chain_manifest()
        stage = manifest.stage(record.serving)
        wakeup = self._advance.setdefault(record.id, asyncio.Event())
        record = await self._keep_standby(record)
        timeout: float | None = None
        if record.failed:
            # A handover failed: a fallback left to try is tried at once; with none, `advance` retries.
            timeout = 0.0 if successor(manifest, record.serving, record.failed) is not None else None
        elif stage.run_for:
            timeout = max(0.0, record.serving_since + stage.run_for - self._clock())
        asked = False
        loop = asyncio.get_running_loop()
        until = None if timeout is None else loop.time() + timeout
        record = await self._preallocate(record)
        while not wakeup.is_set():
            left = None if until is None else until - loop.time()
            if left is not None and left <= 0:
                break
            with contextlib.suppress(TimeoutError):
                tick = self._predict_period if left is None else min(left, self._predict_period)
                await asyncio.wait_for(wakeup.wait(), tick)
            if not wakeup.is_set():
                record = await self._preallocate(record)
        asked = wakeup.is_set()
        wakeup.clear()
        failed = record.failed if not asked else ()  # asked: try the stages that failed again
        target = successor(manifest, record.serving, failed)
        now = self._clock()
        if target is None:
            if is_last(manifest, record.serving):
                log.info("chain complete", extra={"chain": record.id})
                return await self._put(record.advance(Event.COMPLETE, now))
            return record  # nothing to try until `advance`
        log.info("chain handing over", extra={"chain": record.id, "from": record.serving, "to": target})
        return await self._put(
            record.advance(Event.ADVANCE, now, target=target, failed=failed, error="").with_handover(
                HandoverRecord(source=record.serving, target=target, phases_ms={}), now
            )
        )

    async def _keep_standby(self, record: ChainRecord) -> ChainRecord:
        """The next stage's warm standby, if it asks for one (`standby: frozen`) and has none yet:
        placed where its handover would place it, created unpublished, made healthy, then frozen
        (no CPU; its memory and its reservation kept), so the handover thaws it instead of
        starting it. One that cannot be made is removed and logged; the handover then starts the
        stage as it would without a standby."""
        manifest = record.chain_manifest()
        following = successor(manifest, record.serving, ()) if not record.failed else None
        if following is None or manifest.stage(following).standby == "none" or record.run_of(following):
            return record
        stage = manifest.stage(following)
        try:
            serving = _serving_run(record)
            record, run = await self._place(record, stage, exclude=await self._not_next_to(record, serving))
            record, run = await self._create(record, run, stage, publish=False, deadline=self._health_deadline())
            host = await self._host_or_fail(run)
            if stage.standby == "checkpointed":
                await self._agents.checkpoint_container(host, run.container, self._create_timeout)
            else:
                await self._agents.freeze_container(host, run.container)
        except (StepFailed, FerrymanError) as exc:
            log.warning("no standby kept", extra={"chain": record.id, "stage": stage.name, "error": str(exc)})
            current = await self.get(record.id)
            left = current.run_of(stage.name)
            if left is not None:
                current = await self._put(current.with_run(await self._remove(record.id, left), self._clock()))
            return current
        kept = RunState.CHECKPOINTED if stage.standby == "checkpointed" else RunState.FROZEN
        log.info("standby kept", extra={"chain": record.id, "stage": stage.name, "host": run.host, "as": kept.value})
        return await self._put(record.with_run(dataclasses.replace(run, state=kept), self._clock()))

    async def _measure(self, record: ChainRecord) -> ChainRecord:
        """The serving stage's peak usage and request rate so far, from its host's last telemetry
        sample (stored when one rose by more than the replan tolerance, or the first time)."""
        run = next((r for r in record.runs if r.stage == record.serving and r.state is RunState.SERVING), None)
        if run is None or not run.host:
            return record
        host = await self._store.get_host(run.host)
        usage = next((c for c in host.containers if c.id == run.container), None) if host is not None else None
        if usage is None:
            return record
        cpu, memory = max(run.peak_cpu_millis, usage.cpu_millis), max(run.peak_memory_bytes, usage.memory_bytes)
        rate = max(run.peak_request_rate, usage.packets_in_per_s or 0.0)
        measured = (
            (cpu, run.peak_cpu_millis),
            (memory, run.peak_memory_bytes),
            (rate, run.peak_request_rate),
        )
        rose = [(new, old) for new, old in measured if new > old]
        if not any(old <= 0 or (new - old) / old > prediction.REPLAN_TOLERANCE for new, old in rose):
            return record
        run = dataclasses.replace(
            run, peak_cpu_millis=round(cpu, 1), peak_memory_bytes=int(memory), peak_request_rate=round(rate, 2)
        )
        return await self._put(record.with_run(run, self._clock()))

    async def _predict(self, record: ChainRecord, stage: Stage) -> Prediction:
        """The next stage's usage in this run (coordinator/chains/prediction.py)."""
        rows: dict[str, tuple[list[float], float]] = {}
        outputs: dict[str, float] = {}
        if self._usage_model is not None:
            earlier = prediction.earlier_runs(await self._records.list_chains(), record)
            rows = prediction.model_rows(record, prediction.history(earlier), stage.name)
            kinds = list(rows)
            values = await asyncio.to_thread(self._usage_model.predict, [rows[k][0] for k in kinds])
            outputs = dict(zip(kinds, values, strict=True))
        default = (self._config.cpu_millis, self._config.memory_bytes)
        return prediction.decide(stage, rows, outputs, default, prediction.serving_rate(record))

    async def _preallocate(self, record: ChainRecord) -> ChainRecord:
        """While a stage serves: measure it, predict the next stage's usage, and hold that capacity
        on the host the next stage will run on (a reservation, `preallocation`), made again when the
        prediction moves by more than the tolerance or the reservation nears its end. The handover
        places the next stage there, on that reservation. A next stage that has a run already (its
        standby) holds its own reservation; nothing is pre-allocated for it."""
        try:
            record = await self._measure(record)
            following = successor(record.chain_manifest(), record.serving, record.failed)
            if following is None:
                return await self._drop_preallocation(record)
            stage = record.chain_manifest().stage(following)
            predicted = await self._predict(record, stage)
            now = self._clock()
            shown = predicted.to_dict(now)
            if _without_time(record.prediction) != _without_time(shown):
                record = await self._put(dataclasses.replace(record, prediction=shown, updated_at=now))
            if record.run_of(following) is not None:
                return await self._drop_preallocation(record)
            held = record.preallocation
            renew = bool(held) and now >= (float(held.get("at", 0)) + float(held.get("expires_at", 0))) / 2
            if not renew and not prediction.replan(held, predicted):
                return record
            capacity = Capacity(predicted.cpu_millis, predicted.memory_bytes, 0)
            purpose = f"chain {record.id} stage {stage.name} predicted"
            reservation = None
            if held and held.get("stage") == stage.name:  # the same host again, if it still fits
                with contextlib.suppress(FerrymanError):
                    reservation = await self._reservations.reserve(str(held["host"]), capacity, purpose)
            if reservation is None:
                placement = await self._placer.place_start(
                    Need(capacity=capacity, image=stage.image),
                    purpose,
                    exclude=await self._not_next_to(record, _serving_run(record)),
                )
                reservation = placement.reservation
            record = await self._drop_preallocation(record)
            allocation = {
                "stage": stage.name,
                "host": reservation.host,
                "reservation": reservation.id,
                "cpu_millis": predicted.cpu_millis,
                "memory_bytes": predicted.memory_bytes,
                "at": now,
                "expires_at": reservation.expires_at,
            }
            log.info("capacity pre-allocated", extra={"chain": record.id, **allocation})
            return await self._put(dataclasses.replace(record, preallocation=allocation, updated_at=self._clock()))
        except (StepFailed, FerrymanError) as exc:
            # No pre-allocation is no failure: the handover places the stage as it would without one.
            log.warning("no capacity pre-allocated", extra={"chain": record.id, "error": str(exc)})
            return await self.get(record.id)

    async def _drop_preallocation(self, record: ChainRecord) -> ChainRecord:
        """Release the pre-allocated reservation, if one is held."""
        held = record.preallocation
        if not held:
            return record
        with contextlib.suppress(FerrymanError):
            await self._reservations.release(str(held["reservation"]))
        return await self._put(dataclasses.replace(record, preallocation={}, updated_at=self._clock()))

    # ----- steps: the handover

    def _handover_deadline(self, record: ChainRecord) -> float:
        """The loop-clock time by which the handover must have switched (the serving stage's deadline)."""
        stage = record.chain_manifest().stage(record.serving)
        started = next(ts for state, ts in reversed(record.history) if state == State.PREPARING.value)
        left = started + stage.handover.deadline - self._clock()
        return asyncio.get_running_loop().time() + left

    async def _phase(
        self,
        record: ChainRecord,
        work: Callable[[ChainRecord, float], Awaitable[tuple[ChainRecord, dict[str, Any]]]],
        event: Event,
    ) -> ChainRecord:
        """Run one handover phase under the handover's deadline; its event, or the rollback."""
        began = self._clock()
        deadline = self._handover_deadline(record)
        try:
            async with asyncio.timeout_at(deadline):
                record, changes = await work(record, deadline)
        except TimeoutError:
            stage = record.chain_manifest().stage(record.serving)
            why = f"the handover passed its deadline ({stage.handover.deadline:g} s) in {record.state.value}"
            return await self._fail_handover(await self.get(record.id), why)
        except StepFailed as exc:
            # The journal, not this step's copy: it holds what the step made (a placed run, say).
            return await self._fail_handover(await self.get(record.id), str(exc))
        now = self._clock()
        handover = record.handovers[-1]
        phases = {**handover.phases_ms, record.state.value: round((now - began) * 1000, 3)}
        handover = dataclasses.replace(handover, phases_ms=phases, **changes)
        return await self._put(record.with_handover(handover, now).advance(event, now))

    async def _prepare(self, record: ChainRecord) -> ChainRecord:
        async def work(record: ChainRecord, deadline: float) -> tuple[ChainRecord, dict[str, Any]]:
            manifest = record.chain_manifest()
            serving = _serving_run(record)
            pre = record.preallocation
            held = pre.get("reservation") if pre.get("stage") == record.target else None
            record, run = await self._place(
                record, manifest.stage(record.target), exclude=await self._not_next_to(record, serving)
            )
            preallocated = {"preallocated": True} if held and run.reservation == held else {}
            if manifest.stage(record.serving).handover.become:
                return record, preallocated  # criu, `become`: the capacity is for the serving stage's process, moved
            host = await self._host_or_fail(run)
            stage = manifest.stage(record.target)
            if run.state is RunState.FROZEN:  # its warm standby: activated by a thaw, healthy already
                try:
                    await self._agents.thaw_container(host, run.container)
                except FerrymanError as exc:
                    raise StepFailed(f"thawing the standby of {stage.name} on {run.host}: {exc.message}") from exc
                run = dataclasses.replace(run, state=RunState.HEALTHY)
                return await self._put(record.with_run(run, self._clock())), {"from_standby": True, **preallocated}
            if run.state is RunState.CHECKPOINTED:  # its checkpointed standby: restored, then checked
                try:
                    await self._agents.restore_container(host, run.container, self._create_timeout)
                except FerrymanError as exc:
                    raise StepFailed(f"restoring the standby of {stage.name} on {run.host}: {exc.message}") from exc
                run = dataclasses.replace(run, state=RunState.CREATED)
                return await self._put(record.with_run(run, self._clock())), {"from_standby": True, **preallocated}
            if run.state is not RunState.PLACED:  # made already (a standby that was not frozen)
                return record, preallocated
            try:
                await self._agents.pull_image(host, stage.image, self._create_timeout)
                await self._agents.create_container(host, self._spec(record, run, stage, False), self._create_timeout)
            except FerrymanError as exc:
                raise StepFailed(f"{stage.name} could not start on {run.host}: {exc.message}") from exc
            run = dataclasses.replace(run, state=RunState.CREATED)
            return await self._put(record.with_run(run, self._clock())), preallocated

        become = record.chain_manifest().stage(record.serving).handover.become
        return await self._phase(record, work, Event.MOVE if become else Event.CREATED)

    async def _not_next_to(self, record: ChainRecord, serving: StageRun) -> tuple[str, ...]:
        """The hosts the next stage may not run on. Over a shared volume it runs on the serving
        stage's host, next to it (the volume is a directory there); otherwise on any other host, so
        the address moves by publish/unpublish and a host failure takes one stage, not both."""
        if record.chain_manifest().stage(record.serving).handover.protocol == "shared_volume":
            return tuple(h.name for h in await self._store.list_hosts() if h.name != serving.host)
        return (serving.host,)

    def _spec(self, record: ChainRecord, run: StageRun, stage: Stage, publish: bool) -> dict[str, Any]:
        """The agent's create request: the chain's address (published at start only for the first
        stage; a next stage's waits for SWITCH), the stage's check, labels and reservation."""
        assert stage.health is not None  # the manifest's, or the catalog entry's (resolved at run)
        spec: dict[str, Any] = {
            "id": run.container,
            "image": stage.image,
            "env": {
                **stage.env,
                "FERRYMAN_CHAIN": record.id,
                "FERRYMAN_STAGE": stage.name,
                "FERRYMAN_SERVICE_HOST": record.address,
            },
            "service_ip": record.address,
            "publish_service": publish,
            "health": agent_health(stage.health, record.address),
            "labels": {LABEL_CHAIN: record.id, LABEL_STAGE: stage.name},
            "reservation": run.reservation,
        }
        if stage.args:
            spec["args"] = list(stage.args)
        path = _volume_path(record.chain_manifest(), stage.name)
        if path:
            spec["volumes"] = [{"name": volume_name(record.id), "path": path}]
        return spec

    async def _health(self, record: ChainRecord) -> ChainRecord:
        async def work(record: ChainRecord, deadline: float) -> tuple[ChainRecord, dict[str, Any]]:
            run = _target_run(record)
            stage = record.chain_manifest().stage(record.target)
            record, _ = await self._create(record, run, stage, publish=False, deadline=deadline)
            return record, {}

        # criu: the next stage healthy, the serving stage's process moves next to it (MIGRATE).
        criu = record.chain_manifest().stage(record.serving).handover.protocol == "criu"
        return await self._phase(record, work, Event.MOVE if criu else Event.HEALTHY)

    async def _migrate(self, record: ChainRecord) -> ChainRecord:
        """criu: the serving stage's process moved to the next stage's host by a coordinator
        migration (its address moves with it, as a migration moves it). Then the state contract
        hands over on that host, or, with `become`, the moved process is the next stage."""
        become = record.chain_manifest().stage(record.serving).handover.become

        async def work(record: ChainRecord, deadline: float) -> tuple[ChainRecord, dict[str, Any]]:
            serving, placed = _serving_run(record), _target_run(record)
            migration = await self._migration_of(record, serving, placed.host, deadline)
            handover = record.handovers[-1]
            if handover.migration != migration.id:  # journaled before it is waited on: a restart follows it
                handover = dataclasses.replace(handover, migration=migration.id, moved_from=serving.host)
                record = await self._put(record.with_handover(handover, self._clock()))
            assert self._migrations is not None
            migration = await self._migrations.wait(
                migration.id, max(0.1, deadline - asyncio.get_running_loop().time())
            )
            if not migration.done:
                raise TimeoutError
            if migration.state is not MigrationState.COMMITTED:
                raise StepFailed(f"moving {serving.container} to {placed.host}: {migration.error or migration.state}")
            if serving.reservation:  # its old host runs it no more
                with contextlib.suppress(FerrymanError):
                    await self._reservations.release(serving.reservation)
            now = self._clock()
            if not become:
                moved = dataclasses.replace(serving, host=migration.target, reservation="")
                return await self._put(record.with_run(moved, now)), {}
            # The moved process is the next stage: its run takes the next stage's name and reservation.
            became = dataclasses.replace(
                serving, stage=record.target, host=migration.target, reservation=placed.reservation
            )
            runs = tuple(r for r in record.runs if r.container not in (serving.container, placed.container))
            self._metrics.chain_handovers.labels(outcome="done").inc()
            log.info("chain handed over by moving its process", extra={"chain": record.id, "to": record.target})
            record = dataclasses.replace(
                record, runs=(*runs, became), serving=record.target, target="", failed=(), serving_since=now
            )
            return record, {"outcome": "done"}

        return await self._phase(record, work, Event.BECAME if become else Event.MIGRATED)

    async def _migration_of(self, record: ChainRecord, serving: StageRun, to: str, deadline: float) -> Migration:
        """The migration moving the serving stage's process: the one in the journal, or a new one
        (or the one already running for its container, if a restart lost its id)."""
        if self._migrations is None:
            raise StepFailed("this coordinator has no migrations to move a stage with (criu)")
        known = record.handovers[-1].migration
        if known:
            return await self._migrations.get(known)
        loop = asyncio.get_running_loop()
        while True:
            try:
                return await self._migrations.request(
                    serving.container, to, requested_by=f"chain:{record.id}", reason="chain handover"
                )
            except ContainerNotFound:
                # Created moments ago: its host's telemetry has not reported it yet.
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.5)
            except Conflict:
                running = [m for m in await self._migrations.all() if m.container == serving.container and not m.done]
                if not running:
                    raise
                return running[-1]
            except FerrymanError as exc:
                raise StepFailed(f"moving {serving.container} to {to}: {exc.message}") from exc

    async def _export(self, record: ChainRecord) -> ChainRecord:
        async def work(record: ChainRecord, deadline: float) -> tuple[ChainRecord, dict[str, Any]]:
            serving = _serving_run(record)
            stage = record.chain_manifest().stage(record.serving)
            # Live: a snapshot, the stage serving on; the rest of the handover runs beside it.
            action = "snapshot" if stage.handover.live else "export"
            state = await self._exchange(record, serving, action, stage.handover.port, b"", deadline, (200,))
            self._exported[record.id] = state
            digest = await asyncio.to_thread(lambda: hashlib.sha256(state).hexdigest())
            return record, {"state_bytes": len(state), "state_sha256": digest}

        return await self._phase(record, work, Event.EXPORTED)

    async def _transfer(self, record: ChainRecord) -> ChainRecord:
        async def work(record: ChainRecord, deadline: float) -> tuple[ChainRecord, dict[str, Any]]:
            state = self._exported.get(record.id)
            if state is None:
                raise StepFailed("the exported state is gone (the coordinator restarted since EXPORT)")
            manifest = record.chain_manifest()
            consumes = manifest.stage(record.target).consumes_state
            try:
                decoded = await asyncio.to_thread(check_state, state, consumes)
                if manifest.stage(record.serving).handover.live:
                    return record, {"snapshot_version": snapshot_version(decoded)}
            except StateUnfit as exc:
                raise StepFailed(exc.message) from exc
            return record, {}

        return await self._phase(record, work, Event.TRANSFERRED)

    async def _import(self, record: ChainRecord) -> ChainRecord:
        async def work(record: ChainRecord, deadline: float) -> tuple[ChainRecord, dict[str, Any]]:
            state = self._exported.get(record.id)
            if state is None:
                raise StepFailed("the exported state is gone (the coordinator restarted since EXPORT)")
            target = _target_run(record)
            stage = record.chain_manifest().stage(record.target)
            await self._exchange(record, target, "import", stage.handover.port, state, deadline, (200, 204))
            self._exported.pop(record.id, None)
            return record, {}

        return await self._phase(record, work, Event.IMPORTED)

    async def _exchange(
        self,
        record: ChainRecord,
        run: StageRun,
        action: str,
        port: int,
        body: bytes,
        deadline: float,
        ok: Collection[int],
        since: int | None = None,
    ) -> bytes:
        host = await self._host_or_fail(run)
        within = max(0.1, deadline - asyncio.get_running_loop().time())
        try:
            status, answer = await self._agents.stage_state(
                host, run.container, action, port, body, within, since=since
            )
        except FerrymanError as exc:
            raise StepFailed(f"{action} {run.stage} on {run.host}: {exc.message}") from exc
        if status not in ok:
            text = answer[:200].decode(errors="replace").strip()
            raise StepFailed(f"{run.stage} on {run.host} refused the {action}: HTTP {status}: {text}")
        return answer

    async def _switch(self, record: ChainRecord) -> ChainRecord:
        async def work(record: ChainRecord, deadline: float) -> tuple[ChainRecord, dict[str, Any]]:
            serving, target = _serving_run(record), _target_run(record)
            changes: dict[str, Any] = {}
            froze = self._clock()
            live = record.chain_manifest().stage(record.serving).handover.live
            if live and serving.host == target.host:
                # One request to the host's agent: delta out, delta in, route flipped.
                changes["switch_steps_ms"] = await self._take_over(record, serving, target, deadline)
            else:
                if live:
                    await self._apply_delta(record, serving, target, deadline)
                await self._move_address(record, serving, target)
            now = self._clock()
            record = record.with_run(dataclasses.replace(target, state=RunState.SERVING), now)
            record = record.with_run(dataclasses.replace(serving, state=RunState.HEALTHY), now)
            if record.chain_manifest().stage(record.serving).handover.live:
                changes["frozen_ms"] = round((now - froze) * 1000, 3)
            # Stored with SWITCHED, in one write: the journal never has the address moved but not the roles.
            return dataclasses.replace(record, retiring=record.serving, serving=record.target, target=""), changes

        return await self._phase(record, work, Event.SWITCHED)

    async def _apply_delta(self, record: ChainRecord, serving: StageRun, target: StageRun, deadline: float) -> None:
        """A live handover's last step before the address moves: the serving stage exports what
        changed since the snapshot (and refuses changes from then on), the next stage applies it.
        Both can run twice (a SWITCH driven again after a restart): the export since the journaled
        version is the same while the stage refuses changes, and a stage ignores a delta it has."""
        since = record.handovers[-1].snapshot_version
        if since < 0:
            raise StepFailed("the snapshot's version is not in the journal (taken before a restart?)")
        manifest = record.chain_manifest()
        port = manifest.stage(record.serving).handover.port
        delta = await self._exchange(record, serving, "export", port, b"", deadline, (200,), since=since)
        try:
            check_delta(delta, since)
        except StateUnfit as exc:
            raise StepFailed(exc.message) from exc
        target_port = manifest.stage(record.target).handover.port
        await self._exchange(record, target, "delta", target_port, delta, deadline, (200, 204))

    async def _move_address(self, record: ChainRecord, serving: StageRun, target: StageRun) -> None:
        try:
            if serving.host != target.host:
                await self._agents.unpublish(await self._host_or_fail(serving), record.address)
            # On one host, publishing the target replaces the route to the serving stage's veth
            # (one `route replace`: no moment without a route, and nothing to announce).
            await self._agents.publish(await self._host_or_fail(target), target.container)
        except FerrymanError as exc:
            raise StepFailed(f"moving {record.address} to {target.host}: {exc.message}") from exc

    async def _take_over(
        self, record: ChainRecord, serving: StageRun, target: StageRun, deadline: float
    ) -> dict[str, float]:
        """`_apply_delta` and the address moved, on one host, by one request to its agent: the
        serving stage refuses changes for the least time. The next stage checks the delta itself
        (it refuses one not taken since the version it has); both steps can run twice, as there.
        What each of the agent's steps took (ms)."""
        since = record.handovers[-1].snapshot_version
        if since < 0:
            raise StepFailed("the snapshot's version is not in the journal (taken before a restart?)")
        manifest = record.chain_manifest()
        host = await self._host_or_fail(target)
        within = max(0.1, deadline - asyncio.get_running_loop().time())
        try:
            return await self._agents.stage_takeover(
                host,
                target.container,
                manifest.stage(record.target).handover.port,
                serving.container,
                manifest.stage(record.serving).handover.port,
                since,
                within,
            )
        except FerrymanError as exc:
            raise StepFailed(f"taking over from {serving.stage} on {target.host}: {exc.message}") from exc

    async def _retire(self, record: ChainRecord) -> ChainRecord:
        """Let the old stage finish in-flight requests for `drain` seconds, then remove it."""
        old = record.chain_manifest().stage(record.retiring)
        drain_end = record.updated_at + old.handover.drain
        await asyncio.sleep(max(0.0, drain_end - self._clock()))
        run = record.run_of(record.retiring)
        if run is not None and run.state is not RunState.SERVING:
            record = record.with_run(await self._remove(record.id, run), self._clock())
        serving = record.run_of(record.serving)
        if record.handovers[-1].preallocated and serving is not None and serving.reservation:
            # The pre-allocation did its job: the stage runs, and its host's telemetry counts its use.
            with contextlib.suppress(FerrymanError):
                await self._reservations.release(serving.reservation)
            record = record.with_run(dataclasses.replace(serving, reservation=""), self._clock())
        now = self._clock()
        handover = dataclasses.replace(record.handovers[-1], outcome="done")
        self._metrics.chain_handovers.labels(outcome="done").inc()
        log.info("chain handed over", extra={"chain": record.id, "to": record.serving})
        return await self._put(
            record.with_handover(handover, now).advance(Event.RETIRED, now, retiring="", failed=(), serving_since=now)
        )

    async def _fail_handover(self, record: ChainRecord, error: str) -> ChainRecord:
        phase = record.state.value
        log.error("chain handover failed; rolling back", extra={"chain": record.id, "phase": phase, "error": error})
        now = self._clock()
        handover = record.handovers[-1] if record.handovers else HandoverRecord(record.serving, record.target)
        handover = dataclasses.replace(handover, failed_phase=phase, error=error)
        return await self._put(record.with_handover(handover, now).advance(Event.FAILED, now, error=error))

    async def _roll_back(self, record: ChainRecord) -> ChainRecord:
        """The target removed, the serving stage resumed and its address published (again)."""
        self._exported.pop(record.id, None)
        record = await self._moved_anyway(record)
        target = record.run_of(record.target) if record.target else None
        if target is not None and target.state is not RunState.SERVING:
            record = await self._put(record.with_run(await self._remove(record.id, target, failed=True), self._clock()))
        serving = _serving_run(record)
        stage = record.chain_manifest().stage(record.serving)
        problems = []
        try:
            host = await self._host(serving.host)
            if stage.handover.contract:
                status, answer = await self._agents.stage_state(
                    host, serving.container, "resume", stage.handover.port, b"", self._create_timeout
                )
                if status not in (200, 204):
                    problems.append(f"resume: HTTP {status}: {answer[:200].decode(errors='replace')}")
            await self._agents.publish(host, serving.container)
        except FerrymanError as exc:
            problems.append(exc.message)
        if problems:  # the stage keeps what it has; say so, the chain stays on it
            log.error("rolled back with problems", extra={"chain": record.id, "problems": problems})
        handover = dataclasses.replace(record.handovers[-1], outcome="rolled_back")
        now = self._clock()
        self._metrics.chain_handovers.labels(outcome="rolled_back").inc()
        self._metrics.chain_handover_failures.labels(phase=handover.failed_phase or "unknown").inc()
        await self._alerter.fire(
            Alert(
                name="FerrymanChainHandoverFailed",
                labels={
                    "chain": record.id,
                    "stage": record.serving,
                    "target": record.target,
                    "phase": handover.failed_phase or "unknown",
                },
                summary=f"chain {record.id}: the handover from {record.serving} to {record.target} failed and "
                "was rolled back",
                description=handover.error + (f" (rollback: {'; '.join(problems)})" if problems else ""),
                starts_at=now,
            )
        )
        return await self._put(
            record.with_handover(handover, now).advance(
                Event.ROLLED_BACK, now, failed=(*record.failed, record.target), target=""
            )
        )

    async def _moved_anyway(self, record: ChainRecord) -> ChainRecord:
        """A criu handover rolling back: its migration ended first (it runs on in the orchestrator
        when the chain gave up on it), and if it committed the serving stage runs where it moved to."""
        handover = record.handovers[-1] if record.handovers else None
        if handover is None or not handover.migration or self._migrations is None:
            return record
        try:
            migration = await self._migrations.wait(handover.migration, MIGRATION_WAIT)
        except FerrymanError as exc:
            log.error("criu handover's migration unknown", extra={"chain": record.id, "error": exc.message})
            return record
        serving = record.run_of(record.serving)
        if migration.state is not MigrationState.COMMITTED or serving is None or serving.host == migration.target:
            return record
        if serving.reservation:
            with contextlib.suppress(FerrymanError):
                await self._reservations.release(serving.reservation)
        moved = dataclasses.replace(serving, host=migration.target, reservation="")
        return await self._put(record.with_run(moved, self._clock()))

    # ----- steps: the end

    async def _teardown(self, record: ChainRecord) -> ChainRecord:
        """COMPLETING, ABORTING, FAILING: remove every run; then the end state (and a FAILED's alert)."""
        failing = record.state is State.FAILING
        record = await self._drop_preallocation(record)
        record = await self._remove_runs(record)
        await self._remove_volume(record)
        record = await self._put(record.advance(Event.STOPPED, self._clock(), serving="", target="", retiring=""))
        log.info("chain ended", extra={"chain": record.id, "state": record.state.value})
        if failing:
            await self._alerter.fire(
                Alert(
                    name="FerrymanChainFailed",
                    labels={"chain": record.id, "stage": record.failed[-1] if record.failed else "-"},
                    summary=f"chain {record.id} could not start",
                    description=record.error,
                    starts_at=self._clock(),
                )
            )
        return record

    async def _remove_volume(self, record: ChainRecord) -> None:
        """Delete the chain's shared volume on every host a stage mounting it ran on; problems are
        logged (the agent keeps the directory until someone deletes it)."""
        manifest = record.chain_manifest()
        hosts = {r.host for r in record.runs if r.host and _volume_path(manifest, r.stage)}
        for name in sorted(hosts):
            try:
                await self._agents.delete_volume(await self._host(name), volume_name(record.id))
            except FerrymanError as exc:
                log.error("chain volume not removed", extra={"chain": record.id, "host": name, "error": exc.message})

    async def _remove_runs(self, record: ChainRecord, mark_failed: str = "") -> ChainRecord:
        for run in record.runs:
            if run.state not in (RunState.REMOVED, RunState.FAILED):
                removed = await self._remove(record.id, run, failed=bool(mark_failed), error=mark_failed)
                record = await self._put(record.with_run(removed, self._clock()))
        return record

    async def _remove(self, chain_id: str, run: StageRun, failed: bool = False, error: str = "") -> StageRun:
        """Delete the container (its address unpublished with it) and release the reservation;
        problems are logged and kept in the run, never raised."""
        problems = []
        if run.host and run.state is RunState.FROZEN:
            # A frozen task takes no SIGTERM: thawed first, it stops as any other does.
            with contextlib.suppress(FerrymanError):
                await self._agents.thaw_container(await self._host(run.host), run.container)
        if run.host and run.state is not RunState.PLACED:
            try:
                await self._agents.delete_container(await self._host(run.host), run.container)
            except FerrymanError as exc:
                problems.append(f"delete {run.container}: {exc.message}")
        if run.reservation:
            with contextlib.suppress(FerrymanError):
                await self._reservations.release(run.reservation)
        if problems:  # kept as it was: a later teardown tries again
            log.error("stage not fully removed", extra={"chain": chain_id, "problems": problems})
            return dataclasses.replace(run, error="; ".join(problems))
        return dataclasses.replace(run, state=RunState.FAILED if failed else RunState.REMOVED, error=error or run.error)

    # ----- resolving the manifest

    async def _resolve(self, manifest: ChainManifest) -> ChainManifest:
        """Stages given by catalog entry get the entry's image and, unless they have their own, its
        health check; an unknown entry is refused naming it."""
        if not any(s.entry for s in (*manifest.stages, *manifest.fallbacks)):
            return manifest
        catalog = await self._catalog.catalog()
        problems = []

        def resolved(stage: Stage, at: str) -> Stage:
            if not stage.entry:
                return stage
            name, _, version = stage.entry.partition("@")
            try:
                entry = catalog.resolve(Reference(name, version or None))
            except UnknownReference as exc:
                problems.append(f"{at}.entry: {exc.message}")
                return stage
            check: HealthCheck | None = stage.health or entry.manifest.dependency_health_check
            return dataclasses.replace(stage, image=entry.image, health=check)

        stages = tuple(resolved(s, f"stages[{i}]") for i, s in enumerate(manifest.stages))
        fallbacks = tuple(resolved(s, f"fallbacks[{i}]") for i, s in enumerate(manifest.fallbacks))
        if problems:
            raise ChainManifestInvalid(problems)
        return dataclasses.replace(manifest, stages=stages, fallbacks=fallbacks)


def volume_name(chain_id: str) -> str:
    """The agent's name for a chain's shared volume (one per chain)."""
    return chain_id


def _volume_path(manifest: ChainManifest, stage_name: str) -> str:
    """Where the stage mounts the chain's volume: its own handover's path over `shared_volume`, or the
    path of the stage it consumes from over `shared_volume`; "" when it mounts none."""
    stage = manifest.stage(stage_name)
    if stage.handover.protocol == "shared_volume":
        return stage.handover.path
    if stage.consumes_from:
        source = manifest.stage(stage.consumes_from)
        if source.handover.protocol == "shared_volume":
            return source.handover.path
    return ""


def _serving_run(record: ChainRecord) -> StageRun:
    run = record.run_of(record.serving)
    if run is None:
        raise StepFailed(f"the serving stage {record.serving} has no container")
    return run


def _target_run(record: ChainRecord) -> StageRun:
    run = record.run_of(record.target)
    if run is None:
        raise StepFailed(f"the next stage {record.target} has no container")
    return run


def _last_output(health: dict[str, Any]) -> str:
    last = health.get("last") or {}
    return str(last.get("output") or last.get("error") or "no probe result yet")


def _without_time(prediction: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in prediction.items() if k != "at"}
