"""The coordinator's behaviour points (coordinator/deployments/behaviour.py) as per-second series.

The coordinator keeps, per component, cgroup usage points per host (every telemetry sample, a few
seconds apart, hosts not in step) and the balancer's connection rate (every 5 s, replicated
components only). The correlation engine reads one value per second on a window two components
share. So:

- each host's usage is interpolated linearly onto whole seconds within the span that host reported
  (0 outside it: the component did not run there) and the hosts are summed: `cpu` in cores,
  `memory` in MB;
- `rate` is the balancer's new connections per second, held from one read to the next (0 for a
  component that has no balancer, or before its first read);
- `latency` and `errors` are 0: the kernel sees connections, not requests, and the components'
  metrics endpoints are not read yet. The engine finds no link for a constant series.

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
        inside = (grid >= ts[0]) & (grid <= ts[-1])
        total[inside] += np.interp(grid[inside], ts, values)
    return total


def _held(traffic: Sequence[Mapping[str, Any]], grid: np.ndarray) -> np.ndarray:
    if not traffic:
        return np.zeros(len(grid), np.float64)
    points = sorted((float(p["ts"]), float(p["new_connections_per_second"])) for p in traffic)
    ts = np.array([t for t, _ in points])
    values = np.array([v for _, v in points])
    at = np.searchsorted(ts, grid, side="right") - 1  # the last read at or before each second
    return np.where(at >= 0, values[np.clip(at, 0, None)], 0.0)


def per_second(behaviour: Mapping[str, Any], window: Span) -> ComponentSeries:
    """One component's behaviour on the whole seconds of `window` (window.seconds values each)."""
    grid = window.start + np.arange(window.seconds, dtype=np.float64)
    usage = behaviour.get("usage") or ()
    zeros = np.zeros(len(grid), np.float64)
    return ComponentSeries(
        rate=_held(behaviour.get("traffic") or (), grid),
        latency=zeros,
        errors=zeros.copy(),
        cpu=_per_host(usage, grid, "cpu_millis", 1e-3),
        memory=_per_host(usage, grid, "memory_bytes", 1.0 / (1 << 20)),
    )
