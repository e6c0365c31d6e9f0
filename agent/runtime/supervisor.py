"""The restart supervisor: exited containers start again as their restart policy says.

It follows containerd's task exits (agent/containerd/events.py). An event can be missed (the agent
was down, containerd restarted, the exit came while the stream was being opened again), so it also
reads every container at start, after each new subscription and every `restart.resync_interval`
seconds; the decision for what it finds is the same either way, and a run is restarted at most once
(ContainerService.restart_exited starts it only while it is still the run that ended).

What happens to each ended run is decided by agent/runtime/restarts.py; this module only reads,
waits and starts. A restart waits in its own task, cancelled when the agent closes: the next agent
reads the container again and decides afresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable
from typing import Protocol

from agent.config import RestartConfig
from agent.containerd import TaskExit
from agent.model import ContainerSummary
from agent.runtime.restarts import Backoff, Decision, ExitView, Verdict, decide
from core.errors import FerrymanError
from core.tasks import TaskSet

log = logging.getLogger(__name__)


class TaskExits(Protocol):
    """containerd's exit events for this namespace (agent.containerd.events.EventStream)."""

    def task_exits(self) -> AsyncGenerator[TaskExit, None]: ...


class SupervisedContainers(Protocol):
    """What the supervisor needs of the container service (agent.runtime.service.ContainerService)."""

    async def exit_view(self, container_id: str) -> ExitView | None: ...
    async def exit_views(self) -> dict[str, ExitView | None]: ...
    async def restart_exited(self, seen: ExitView) -> ContainerSummary | None: ...


class RestartSupervisor:
    def __init__(
        self,
        events: TaskExits,
        containers: SupervisedContainers,
        migrating: Callable[[str], bool],
        config: RestartConfig,
    ) -> None:
        self._events = events
        self._containers = containers
        self._migrating = migrating
        """Whether a migration holds a container (MigrationService.migrating)."""
        self._backoff = Backoff(config.initial_delay, config.max_delay, config.reset_after)
        self._resync_interval = config.resync_interval
        self._tasks = TaskSet()
        self._resync = asyncio.Event()
        self._pending: dict[str, asyncio.Task[None]] = {}
        """Restarts waiting out their delay, by container."""
        self._delays: dict[str, float] = {}
        """Each container's last restart delay, for the next one's backoff."""
        self._reported: dict[str, tuple[str, Verdict]] = {}
        """The last run and verdict logged per container, so a re-read does not log it again."""

    def start(self) -> None:
        self._tasks.spawn(self._follow_exits(), "restart-supervisor-events")
        self._tasks.spawn(self._resync_loop(), "restart-supervisor-resync")

    async def close(self) -> None:
        """Stop following exits and drop the restarts still waiting (a restart under way completes)."""
        await self._tasks.close()

    # ----- reading -------------------------------------------------------------------------------

    async def _follow_exits(self) -> None:
        retry = self._backoff.initial
        while True:
            try:
                async with contextlib.aclosing(self._events.task_exits()) as exits:
                    self._resync.set()  # what exited before this subscription is read there
                    async for exit_ in exits:
                        retry = self._backoff.initial
                        await self._consider_one(exit_.container_id)
            except FerrymanError as exc:
                log.warning("containerd's exit events ended; subscribing again", extra={"error": exc.message})
            except Exception:  # a bug: keep supervising; the re-reads still restart what exits
                log.exception("following containerd's exit events failed; subscribing again")
            await asyncio.sleep(retry)
            retry = min(retry * 2, self._backoff.maximum)

    async def _resync_loop(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: no new task a pass (a test's leak check saw them).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._resync_interval):
                    await self._resync.wait()
            self._resync.clear()
            try:
                views = await self._containers.exit_views()
            except FerrymanError as exc:
                log.warning("cannot read the containers to restart", extra={"error": exc.message})
                continue
            except Exception:  # a bug: the next pass may fare better
                log.exception("reading the containers to restart failed")
                continue
            for gone in (self._delays.keys() | self._reported.keys()) - views.keys():
                self._delays.pop(gone, None)
                self._reported.pop(gone, None)
            for view in views.values():
                if view is not None:
                    self._consider(view)

    async def _consider_one(self, container_id: str) -> None:
        try:
            view = await self._containers.exit_view(container_id)
        except FerrymanError as exc:
            log.warning("cannot read an exited container", extra={"container": container_id, "error": exc.message})
            return
        if view is not None:
            self._consider(view)

    # ----- deciding and acting -------------------------------------------------------------------

    def _consider(self, view: ExitView) -> None:
        cid = view.container_id
        if cid in self._pending:
            return
        decision = decide(
            view, migrating=self._migrating(cid), previous_delay=self._delays.get(cid), backoff=self._backoff
        )
        if decision.restart:
            self._pending[cid] = self._tasks.spawn(self._restart_later(view, decision), f"restart-{cid}")
        elif self._reported.get(cid) != (view.run, decision.verdict):
            self._reported[cid] = (view.run, decision.verdict)
            log.info(
                "exited container stays down",
                extra={
                    "container": cid,
                    "exit_status": view.exit_status,
                    "reason": decision.verdict.value,
                    "policy": view.policy.spelling,
                    "restart_count": view.restart_count,
                },
            )

    async def _restart_later(self, view: ExitView, decision: Decision) -> None:
        cid = view.container_id
        try:
            await asyncio.sleep(decision.delay)
            if self._migrating(cid):
                return  # the migration decides; a re-read afterwards sees what it left
            restarted = await self._containers.restart_exited(view)
            if restarted is not None:
                self._delays[cid] = decision.delay
                log.info(
                    "restarted exited container",
                    extra={
                        "container": cid,
                        "exit_status": view.exit_status,
                        "policy": view.policy.spelling,
                        "restart_count": restarted.restart_count,
                        "delay": decision.delay,
                    },
                )
        except FerrymanError as exc:
            # The start failed: a run that ended at once. The next try waits longer (backoff).
            self._delays[cid] = decision.delay
            log.warning("restart failed", extra={"container": cid, "error": exc.message})
        finally:
            self._pending.pop(cid, None)
        # Read it again: the new run's exit event may have come while this restart was pending
        # (a process that exits at once), and _consider passed it over then.
        await self._consider_one(cid)
