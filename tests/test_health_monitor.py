"""The health monitor's bookkeeping against a scripted containerd: overlapping reads.

The periodic re-read lists every container while a task event reads one; the two overlap, and the
older of them must not undo what the newer saw (real containerd and probes: tests/test_health.py).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from pathlib import Path

from prometheus_client import CollectorRegistry

from agent.containerd import ContainerRecord, ProcessInfo, TaskExit, TaskStart, TaskStatus
from agent.errors import ContainerdNotFound
from agent.health.metrics import HealthMetrics
from agent.health.monitor import HealthMonitor
from agent.health.spec import LABEL_HEALTH
from agent.model import LABEL_MANAGED

CHECK = {"tcp": {"port": 9}, "interval": 30, "start_period": 60}
"""A TCP check the monitor only starts (its first probe waits out the interval's first tick)."""


class FakeContainerd:
    """One container whose task the test moves from created to running; `list` of the tasks can be
    held (it answers with the state it saw when called, as a slow read does)."""

    def __init__(self) -> None:
        self.record = ContainerRecord(
            id="web",
            image="r/web:1",
            labels={LABEL_MANAGED: "true", LABEL_HEALTH: json.dumps(CHECK)},
            runtime="io.containerd.runc.v2",
            spec=b"{}",
            snapshotter="overlayfs",
            snapshot_key="web",
        )
        self.task = ProcessInfo("web", 0, TaskStatus.CREATED, 0)
        self.hold_list = asyncio.Event()
        self.hold_list.set()
        self.listing = asyncio.Event()
        self.events: asyncio.Queue[TaskStart | TaskExit] = asyncio.Queue()

    async def get(self, container_id: str) -> ContainerRecord:
        if container_id != "web":
            raise ContainerdNotFound(container_id)
        return self.record

    async def list(self, filters: list[str] | None = None) -> list[ContainerRecord]:
        return [self.record]

    async def task_lifecycle(self) -> AsyncGenerator[TaskStart | TaskExit, None]:
        while True:
            yield await self.events.get()


class FakeTasks:
    def __init__(self, cd: FakeContainerd) -> None:
        self._cd = cd

    async def get(self, container_id: str) -> ProcessInfo:
        return self._cd.task

    async def list(self) -> list[ProcessInfo]:
        seen = self._cd.task
        self._cd.listing.set()
        await self._cd.hold_list.wait()
        return [seen]


class Events:
    def __init__(self, cd: FakeContainerd) -> None:
        self.task_lifecycle = cd.task_lifecycle


class Scripted:
    def __init__(self, cd: FakeContainerd) -> None:
        self.containers = cd
        self.events = Events(cd)
        self._cd = cd

    @property
    def tasks(self) -> FakeTasks:
        return FakeTasks(self._cd)


async def test_a_read_begun_before_the_task_started_does_not_end_its_run(tmp_path: Path) -> None:
    cd = FakeContainerd()
    monitor = HealthMonitor(Scripted(cd), tmp_path / "out", HealthMetrics(CollectorRegistry()))  # type: ignore[arg-type]
    cd.hold_list.clear()
    monitor.start()
    try:
        # The periodic read lists the tasks while the container's task is only created...
        await asyncio.wait_for(cd.listing.wait(), 5)
        first = await monitor.wait("web", None, 0)
        assert first["status"] == "stopped", first
        # ...the task starts, and its event's read sees it running: checks start.
        cd.task = ProcessInfo("web", 4242, TaskStatus.RUNNING, 0)
        await cd.events.put(TaskStart("web", 4242))
        started = await monitor.wait("web", first["seq"], 5)
        assert started["status"] == "starting", started
        # The older read answers now, with the task as it was: it changes nothing.
        cd.hold_list.set()
        after = await monitor.wait("web", started["seq"], 1.0)
        assert (after["status"], after["seq"]) == ("starting", started["seq"]), after
        # A read begun after the run ended still ends it.
        cd.task = ProcessInfo("web", 4242, TaskStatus.STOPPED, 0)
        await cd.events.put(TaskExit("web", 0, None))
        ended = await monitor.wait("web", started["seq"], 5)
        assert ended["status"] == "stopped", ended
    finally:
        await monitor.close()


async def test_a_caller_asking_before_the_start_event_is_read_hears_the_run(tmp_path: Path) -> None:
    # The task already runs, but its start event has not been read (nothing is sent on the stream):
    # the first question is answered from a read of its own, not with "stopped".
    cd = FakeContainerd()
    cd.task = ProcessInfo("web", 4242, TaskStatus.RUNNING, 0)
    cd.hold_list.clear()  # the periodic read does not answer either
    monitor = HealthMonitor(Scripted(cd), tmp_path / "out", HealthMetrics(CollectorRegistry()))  # type: ignore[arg-type]
    monitor.start()
    await asyncio.sleep(0.05)  # its loops under way (the periodic read held)
    try:
        first = await monitor.wait("web", 0, 1.0)
        assert first["status"] == "starting", first
        await asyncio.sleep(0.05)  # the probe loop it started gets going before the close
    finally:
        await monitor.close()
