"""The event loop a daemon runs on: the standard library's, or libuv's (PyPI `uvloop`).

uvloop implements the same asyncio loop API in Cython over libuv. For the coordinator's telemetry
pushes it measured the same CPU per push as the standard loop (docs/coordinator.md, "Sizing"), so
it is an option, not the default. This module is the only one that imports it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from core.errors import ConfigError

EVENT_LOOPS = ("asyncio", "uvloop")


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """A factory for `asyncio.Runner` (None: the standard loop); ConfigError for an unknown name
    or uvloop not installed."""
    if name == "asyncio":
        return None
    if name == "uvloop":
        try:
            import uvloop
        except ImportError as exc:
            raise ConfigError('event_loop = "uvloop" needs the uvloop package (pip install uvloop)') from exc
        return uvloop.new_event_loop
    raise ConfigError(f"event_loop must be one of {list(EVENT_LOOPS)}, got {name!r}")
