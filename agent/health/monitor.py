"""The health monitor: runs each container's check while its task runs, and tells of every change.

One probe loop per running container with a check (the `io.ferryman.health` label). It learns of
runs from containerd's task events (`/tasks/start`, `/tasks/exit`), and, because an event can be
missed (the agent was down, the stream was being opened again), it also reads every container at
start, after each new subscription and every `resync_interval` seconds. So checks survive an agent
restart: they are re-attached from the labels; a container whose task is not running is not probed.

What a probe's result does to the state is decided by agent/health/states.py; this module only
probes, waits and publishes. Every change of status gets a new sequence number (`seq`) and wakes the
callers waiting in `wait` at once: a deployment learns of a transition when it happens, not on a
poll. `seq` starts from the clock's milliseconds when the monitor starts, so it keeps growing across
agent restarts.

A container that a migration holds is not probed (its task is frozen or its workload moving), nor
one frozen as a warm standby (`POST /v1/containers/{id}/freeze`): the probe is skipped, which
counts neither way.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import json
import logging
import shutil
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from agent.containerd import ContainerRecord, ProcessInfo, TaskExit, TaskStart, TaskStatus
from agent.errors import ContainerdNotFound
from agent.health.metrics import HealthMetrics
from agent.health.probing import ExecTasks, Prober
from agent.health.spec import HealthCheck, health_of
from agent.health.states import Event, HealthRecord, ProbeResult, Status, classify
from agent.model import LABEL_MANAGED, LABEL_STARTED_AT
from core.errors import ContainerNotFound, FerrymanError, NotFound
from core.tasks import TaskSet

log = logging.getLogger(__name__)

RESYNC_INTERVAL = 10.0
"""Seconds between re-reads of every container, for task events the monitor missed."""
MAX_WAIT = 300.0
"""Seconds a caller of `wait` may wait for a change at most."""
RETRY_MAX = 10.0


class NoHealthCheck(NotFound):
    code = "no_health_check"


class TaskLifecycle(Protocol):
    """containerd's task starts and exits (agent.containerd.events.EventStream)."""

    def task_lifecycle(self) -> AsyncGenerator[TaskStart | TaskExit, None]: ...


class ContainerRecords(Protocol):
    async def get(self, container_id: str) -> ContainerRecord: ...
    async def list(self, filters: list[str] | None = None) -> list[ContainerRecord]: ...


class Tasks(ExecTasks, Protocol):
    async def get(self, container_id: str) -> ProcessInfo: ...
    async def list(self) -> list[ProcessInfo]: ...


class ContainerdLike(Protocol):
    """The parts of agent.containerd.Containerd the monitor uses."""

    @property
    def containers(self) -> ContainerRecords: ...
    @property
    def tasks(self) -> Tasks: ...
    @property
    def events(self) -> TaskLifecycle: ...


@dataclass(frozen=True)
class Run:
    """A run of a container with a check, as its record and task tell it."""

    container_id: str
    check: HealthCheck
    key: str
    """The run's name: its start label and pid (a new run has a new one)."""
    pid: int
    running: bool
    """The task runs (or is paused): the run is probed. False: created, stopped or gone."""
    started_at: dt.datetime | None
    process: dict[str, Any]
    """The container's OCI process, the base of an exec probe's."""


def run_of(record: ContainerRecord, task: ProcessInfo | None) -> Run | None:
    """The container's run, or None when it is not ours or has no (readable) check."""
    if record.labels.get(LABEL_MANAGED) != "true":
        return None
    check = health_of(record.labels)
    if check is None:
        return None
    running = task is not None and task.status in (TaskStatus.RUNNING, TaskStatus.PAUSED, TaskStatus.PAUSING)
    label = record.labels.get(LABEL_STARTED_AT, "")
    started_at = None
    with contextlib.suppress(ValueError):
        started_at = dt.datetime.fromisoformat(label) if label else None
    try:
        process = json.loads(record.spec).get("process") or {}
    except ValueError:
        process = {}
    pid = task.pid if task is not None and running else 0
    return Run(record.id, check, f"{label}/{pid}", pid, running, started_at, process)


@dataclass
class _Watch:
    """One container's health, as the monitor keeps it."""

    check: HealthCheck
    record: HealthRecord
    seq: int
    run: Run | None = None
    """The run being probed; None while the container does not run."""
    loop: asyncio.Task[None] | None = None
    ended: str = ""
    """The key of the run last seen ending: a stale read that still shows it running starts nothing."""
    changed_by: int = -1
    """The number of the read that last started or ended a run here: a read begun before it is stale."""
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    """Set (and replaced) at each change of status: what `wait` waits on."""


class HealthMonitor:
    def __init__(
        self,
        cd: ContainerdLike,
        output_dir: Path,
        metrics: HealthMetrics,
        migrating: Callable[[str], bool] = lambda cid: False,
        resync_interval: float = RESYNC_INTERVAL,
    ) -> None:
        self._cd = cd
        self._output_dir = output_dir
        self._prober = Prober(cd.tasks, output_dir)
        self._metrics = metrics
        self._migrating = migrating
        """Whether a migration holds a container (MigrationService.migrating): it is not probed."""
        self._resync_interval = resync_interval
        self._watches: dict[str, _Watch] = {}
        self._seq = itertools.count(time.time_ns() // 1_000_000)
        self._reads = itertools.count()
        """Numbers the reads of containerd in the order they begin (see `_observe`)."""
        self._tasks = TaskSet()
        self._resync = asyncio.Event()
        self._released = False
        """Set when the API shuts down: callers of `wait` answer at once, so shutdown is not held up."""

    def start(self) -> None:
        # Exec probes' FIFOs live only while their probe runs: what is here was left by a killed agent.
        shutil.rmtree(self._output_dir, ignore_errors=True)
        self._tasks.spawn(self._follow(), "health-events")
        self._tasks.spawn(self._resync_loop(), "health-resync")

    async def close(self) -> None:
        """Stop every probe loop (a probe under way is cancelled, an exec probe's process reaped)."""
        self.release_waiters()
        await self._tasks.close()

    def release_waiters(self) -> None:
        """Answer every caller of `wait` now, with the health as it is, and later ones at once."""
        self._released = True
        for watch in self._watches.values():
            watch.changed.set()

    # ----- what callers read ---------------------------------------------------------------------

    def report(self, container_id: str, labels: dict[str, str]) -> dict[str, Any] | None:
        """The container's health for inspect; None when it has no check."""
        watch = self._watches.get(container_id)
        if watch is None:
            check = health_of(labels)
            return None if check is None else self._json(container_id, _Watch(check, _stopped(), 0))
        return self._json(container_id, watch)

    async def wait(self, container_id: str, after: int | None, timeout: float) -> dict[str, Any]:  # noqa: ASYNC109
        """The container's health as soon as its `seq` is past `after` (at once when `after` is None
        or already behind), or as it is after `timeout` seconds without a change."""
        watch = await self._watch_for(container_id)
        if after is not None and watch.seq <= after:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(timeout, MAX_WAIT)):
                    while watch.seq <= after and not self._released:
                        await watch.changed.wait()
                        watch = self._watches.get(container_id, watch)
        return self._json(container_id, watch)

    async def _watch_for(self, container_id: str) -> _Watch:
        try:
            record = await self._cd.containers.get(container_id)
        except ContainerdNotFound as exc:
            raise ContainerNotFound(f"no container {container_id}") from exc
        if record.labels.get(LABEL_MANAGED) != "true":
            raise ContainerNotFound(f"container {container_id} is not managed by ferryman")
        watch = self._watches.get(container_id)
        if watch is None:
            check = health_of(record.labels)
            if check is None:
                raise NoHealthCheck(f"container {container_id} has no health check")
            watch = self._watches[container_id] = _Watch(check, _stopped(), next(self._seq))
            # A container created since the last read: see whether it runs before answering, or a
            # caller asking right after its start (before the start event is read) hears "stopped".
            await self._read_one(container_id)
            watch = self._watches.get(container_id, watch)
        return watch

    def _json(self, container_id: str, watch: _Watch) -> dict[str, Any]:
        return {"container": container_id, "seq": watch.seq, **watch.record.to_json(), "check": watch.check.to_json()}

    # ----- following runs ------------------------------------------------------------------------

    async def _follow(self) -> None:
        retry = 0.1
        while True:
            try:
                async with contextlib.aclosing(self._cd.events.task_lifecycle()) as events:
                    self._resync.set()  # what started or ended before this subscription is read there
                    async for event in events:
                        retry = 0.1
                        await self._read_one(event.container_id)
            except FerrymanError as exc:
                log.warning("containerd's task events ended; subscribing again", extra={"error": exc.message})
            except Exception:  # a bug: keep watching; the re-reads still find the runs
                log.exception("following containerd's task events failed; subscribing again")
            await asyncio.sleep(retry)
            retry = min(retry * 2, RETRY_MAX)

    async def _resync_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._resync_interval):
                    await self._resync.wait()
            self._resync.clear()
            read = next(self._reads)
            try:
                records = await self._cd.containers.list([f'labels."{LABEL_MANAGED}"==true'])
                tasks = {t.container_id: t for t in await self._cd.tasks.list()}
            except FerrymanError as exc:
                log.warning("cannot read the containers to check", extra={"error": exc.message})
                continue
            runs = {r.id: run_of(r, tasks.get(r.id)) for r in records}
            for gone in [cid for cid in self._watches if runs.get(cid) is None]:
                self._forget(gone)
            for cid, run in runs.items():
                if run is not None:
                    self._observe(cid, run, read)
            self._count()

    async def _read_one(self, container_id: str) -> None:
        read = next(self._reads)
        try:
            record = await self._cd.containers.get(container_id)
        except ContainerdNotFound:
            self._forget(container_id)
            return
        except FerrymanError as exc:
            log.warning("cannot read a container to check", extra={"container": container_id, "error": exc.message})
            return
        try:
            task: ProcessInfo | None = await self._cd.tasks.get(container_id)
        except ContainerdNotFound:
            task = None
        except FerrymanError as exc:
            log.warning("cannot read a container's task", extra={"container": container_id, "error": exc.message})
            return
        run = run_of(record, task)
        if run is None:
            self._forget(container_id)
        else:
            self._observe(container_id, run, read)
        self._count()

    def _observe(self, cid: str, run: Run, read: int) -> None:
        """Start probing a new run, or stop when the run ended; nothing when nothing changed.

        Reads overlap (the periodic one lists every container while a task event reads one): a
        read begun before the one that last changed this container saw an older state, such as the
        task still created when the event's read already saw it running, and is ignored here."""
        watch = self._watches.get(cid)
        if watch is None:
            watch = self._watches[cid] = _Watch(run.check, _stopped(), next(self._seq))
        if read < watch.changed_by:
            return
        if run.running:
            if (watch.run is not None and watch.run.key == run.key) or watch.ended == run.key:
                return
            self._stop_loop(watch)
            watch.check, watch.run, watch.changed_by = run.check, run, read
            self._apply(cid, watch, Event.RUN_STARTED, None)
            watch.loop = self._tasks.spawn(self._probe_loop(cid, watch, run), f"health-{cid}")
            log.info("health checks started", extra={"container": cid, "check": run.check.target})
        elif watch.run is not None or watch.record.status is not Status.STOPPED:
            self._stop_loop(watch)
            if watch.run is not None:
                watch.ended = watch.run.key
            watch.run, watch.changed_by = None, read
            self._apply(cid, watch, Event.RUN_ENDED, None)
            log.info("health checks stopped", extra={"container": cid})

    def _forget(self, cid: str) -> None:
        watch = self._watches.pop(cid, None)
        if watch is not None:
            self._stop_loop(watch)
            watch.seq = next(self._seq)
            watch.changed.set()  # a waiter answers with the last state it had

    @staticmethod
    def _stop_loop(watch: _Watch) -> None:
        if watch.loop is not None:
            watch.loop.cancel()
            watch.loop = None

    # ----- probing -------------------------------------------------------------------------------

    async def _probe_loop(self, cid: str, watch: _Watch, run: Run) -> None:
        check = run.check
        while True:
            if self._migrating(cid):
                self._metrics.probes.labels(check.kind.value, "skipped").inc()
                await asyncio.sleep(check.interval)
                continue
            result = await self._prober.probe(cid, run.pid, run.process, check)
            self._metrics.probes.labels(check.kind.value, "pass" if result.passed else "fail").inc()
            self._metrics.probe_seconds.labels(check.kind.value).observe(result.duration)
            if watch.run is not run:
                return  # the run ended while the probe ran
            in_start = self._in_start_period(run, result.at)
            record = watch.record
            event = classify(result.passed, record.status, in_start, record.failing_streak, check.retries)
            self._apply(cid, watch, event, result)
            starting = watch.record.status is Status.STARTING and in_start
            await asyncio.sleep(check.start_interval if starting and check.start_interval else check.interval)

    @staticmethod
    def _in_start_period(run: Run, now: dt.datetime) -> bool:
        if run.check.start_period <= 0 or run.started_at is None:
            return False
        return (now - run.started_at).total_seconds() < run.check.start_period

    def _apply(self, cid: str, watch: _Watch, event: Event, result: ProbeResult | None) -> None:
        before = watch.record.status
        watch.record = watch.record.advance(event, dt.datetime.now(dt.UTC), result)
        after = watch.record.status
        if after is before and event is not Event.RUN_STARTED:
            return
        watch.seq = next(self._seq)
        changed, watch.changed = watch.changed, asyncio.Event()
        changed.set()
        self._metrics.transitions.labels(before.value, after.value).inc()
        self._count()
        if event not in (Event.RUN_STARTED, Event.RUN_ENDED):
            log.info(
                "health changed",
                extra={
                    "container": cid,
                    "from": before.value,
                    "to": after.value,
                    "failing_streak": watch.record.failing_streak,
                    "output": result.output[:200] if result is not None else None,
                },
            )

    def _count(self) -> None:
        counts = {status: 0 for status in Status}
        for watch in self._watches.values():
            counts[watch.record.status] += 1
        for status, n in counts.items():
            self._metrics.containers.labels(status.value).set(n)


def _stopped() -> HealthRecord:
    return HealthRecord(Status.STOPPED, dt.datetime.now(dt.UTC))
