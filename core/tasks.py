"""Guarded background tasks: named, logged when they fail or are cancelled, and stopped in order.

A bare `asyncio.create_task` whose task nobody awaits loses its exception ("Task exception was never
retrieved") and can be garbage-collected mid-flight. `TaskSet` keeps a reference to every task it
spawns, logs each failure with the task's name, and cancels and awaits them all on `close`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class TaskSet:
    """Background tasks owned by one service."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T | None]:
        """Run `coro` in the background. A failure is logged with `name` (the task's result is then
        None); cancellation is logged and propagates."""

        async def guarded() -> T | None:
            try:
                return await coro
            except asyncio.CancelledError:
                log.info("task cancelled", extra={"task": name})
                raise
            except Exception:
                log.exception("task failed", extra={"task": name})
                return None

        task = asyncio.create_task(guarded(), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        """Cancel every task and wait until all have ended."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
