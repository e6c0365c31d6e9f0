"""Acting on the local copy of a migrating container: resume it, or remove every trace of it."""

from __future__ import annotations

import asyncio
import contextlib
import signal

from agent.containerd import Containerd, TaskStatus
from agent.errors import ContainerdError, ContainerdNotFound
from agent.model import LABEL_MIGRATED_TO, LABEL_PREFIX
from core.errors import FerrymanError

LABEL_MIGRATION = LABEL_PREFIX + "migration"


async def resume_if_paused(cd: Containerd, container_id: str) -> None:
    """The rollback guarantee: a frozen source task runs again."""
    try:
        task = await cd.tasks.get(container_id)
    except ContainerdError:
        return
    if task.status in (TaskStatus.PAUSED, TaskStatus.PAUSING):
        await cd.tasks.resume(container_id)


async def remove_container(
    cd: Containerd, container_id: str, only_migration: str | None = None, moved_to: str | None = None
) -> bool:
    """Kill (frozen or not), delete task, container and snapshot; tolerate any of them missing.

    With `only_migration`, a container that a different migration (or a user) made is left alone.
    With `moved_to` (a committed source), the container is labelled first: if a step below fails and
    leaves it behind, the restart supervisor still knows its workload runs on that host now.
    """
    if moved_to is not None:
        with contextlib.suppress(ContainerdError):
            await cd.containers.update_labels(container_id, {LABEL_MIGRATED_TO: moved_to})
    if only_migration is not None:
        try:
            record = await cd.containers.get(container_id)
        except ContainerdNotFound:
            record = None
        if record is not None and record.labels.get(LABEL_MIGRATION) != only_migration:
            return False
    try:
        task = await cd.tasks.get(container_id)
    except ContainerdError:
        task = None
    if task is not None and task.status in (TaskStatus.RUNNING, TaskStatus.PAUSED, TaskStatus.PAUSING):
        with contextlib.suppress(ContainerdError):
            await cd.tasks.kill(container_id, signal.SIGKILL)
        with contextlib.suppress(ContainerdError):
            await cd.tasks.resume(container_id)  # a frozen task dies only once thawed
        with contextlib.suppress(ContainerdError, TimeoutError):
            async with asyncio.timeout(10):
                await cd.tasks.wait(container_id)
    if task is not None:  # also a task whose restore failed before it ever ran
        with contextlib.suppress(ContainerdError):
            await cd.tasks.delete(container_id)
    with contextlib.suppress(ContainerdError):
        await cd.containers.delete(container_id)
    with contextlib.suppress(ContainerdError):
        await cd.snapshots.remove(container_id)
    return True


def describe_failure(exc: BaseException) -> str:
    if isinstance(exc, FerrymanError):
        return exc.message
    if isinstance(exc, TimeoutError):
        return "timed out waiting for the peer (link cut or peer stalled)"
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled (agent shutting down)"
    return f"{type(exc).__name__}: {exc}"
