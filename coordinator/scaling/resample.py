"""The coordinator's behaviour points (coordinator/deployments/behaviour.py) as per-second series.

The coordinator keeps, per component, cgroup usage points per host (every telemetry sample, a few
seconds apart, hosts not in step), the balancer's connection rate (every 5 s, replicated
components only) and, for a component with a metrics endpoint, its request rate, latency and errors
(every 5 s). The correlation engine reads one value per second on a window two components share. So:

- each host's usage is interpolated linearly onto whole seconds within the span that host reported
  and held at its last value for up to 1.5 of its sampling intervals after it (hosts are not in
  step: the last seconds of a window are past some hosts' last sample, whose next one is not in yet;
  without the hold a component's CPU "now" reads only the hosts that reported last, 0 when a new
  copy's first sample is the latest), 0 elsewhere (the component did not run there); the hosts are
  summed: `cpu` in cores, `memory` in MB;
- `rate` is the requests answered per second from the component's metrics endpoint when it has
  one, else the balancer's new connections per second; held from one read to the next (0 for a
  component with neither, or before its first read);
- `latency` (mean ms) and `errors` (per second) come from the metrics endpoint, held likewise; 0 for
  a component without one (the kernel sees connections, not requests). The engine finds no link for
  a constant series.

A component's span is from its first to its last usage point; two components share the seconds
both spans cover. Pure: numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from coordinator.scaling.series import ComponentSeries

CARRY_INTERVALS = 1.5
"""A host's last usage value holds this many of its sampling intervals past it (its next sample due)."""


@dataclass(frozen=True)
class Span:
    start: float
    stop: float

    @property
    def seconds(self) -> int:
        return max(0, math.floor(self.stop - self.start))


def span(behaviour: Mapping[str, Any]) -> Span | None:
    """First to last usage point of one component; None without any."""
    times = [float(p["ts"]) for p in behaviour.get("usage") or ()]
    if not times:
        return None
    return Span(min(times), max(times))


def shared_span(a: Mapping[str, Any], b: Mapping[str, Any]) -> Span | None:
    """The seconds two components' usage both cover; None when one has none (or they do not overlap)."""
    sa, sb = span(a), span(b)
    if sa is None or sb is None:
        return None
    start, stop = max(sa.start, sb.start), min(sa.stop, sb.stop)
    return Span(start, stop) if stop > start else None


def _per_host(usage: Sequence[Mapping[str, Any]], grid: np.ndarray, field: str, scale: float) -> np.ndarray:
    total = np.zeros(len(grid), np.float64)
    hosts: dict[str, list[tuple[float, float]]] = {}
    for p in usage:
        hosts.setdefault(str(p["host"]), []).append((float(p["ts"]), float(p[field]) * scale))
    for points in hosts.values():
        points.sort()
        ts = np.array([t for t, _ in points])
        values = np.array([v for _, v in points])
        carry = CARRY_INTERVALS * float(np.median(np.diff(ts))) if len(ts) > 1 else 0.0
        inside = (grid >= ts[0]) & (grid <= ts[-1] + carry)
        total[inside] += np.interp(grid[inside], ts, values)  # past the last point: its value
    return total


def _held(points_in: Sequence[Mapping[str, Any]], field: str, grid: np.ndarray) -> np.ndarray:
    if not points_in:
        return np.zeros(len(grid), np.float64)
    points = sorted((float(p["ts"]), float(p[field])) for p in points_in)
    ts = np.array([t for t, _ in points])
    values = np.array([v for _, v in points])
    at = np.searchsorted(ts, grid, side="right") - 1  # the last read at or before each second
    return np.where(at >= 0, values[np.clip(at, 0, None)], 0.0)


def per_second(behaviour: Mapping[str, Any], window: Span) -> ComponentSeries:
    """One component's behaviour on the whole seconds of `window` (window.seconds values each)."""
    grid = window.start + np.arange(window.seconds, dtype=np.float64)
    usage = behaviour.get("usage") or ()
    requests = behaviour.get("requests") or ()
    if requests:
        rate = _held(requests, "requests_per_second", grid)
    else:
        rate = _held(behaviour.get("traffic") or (), "new_connections_per_second", grid)
    return ComponentSeries(
        rate=rate,
        latency=_held(requests, "latency_ms", grid),
        errors=_held(requests, "errors_per_second", grid),
        cpu=_per_host(usage, grid, "cpu_millis", 1e-3),
        memory=_per_host(usage, grid, "memory_bytes", 1.0 / (1 << 20)),
    )
