"""What each deployment's component does over time: bounded time series, kept in memory.

Two sources, both already flowing:

- **usage**, from agent telemetry: every sample lists the host's containers with their cgroup CPU
  rate and memory and their labels; the containers labelled `ferryman.deployment` and
  `ferryman.component` (a component and its replicas) are summed per host and sample time;
- **traffic**, from the balancer on the host that owns a replicated component's address
  (agent/network/balancer.py), read by the leader every `TRAFFIC_PERIOD` seconds: the connections
  it balanced (an nftables counter on the DNAT rules: TCP SYNs and new UDP flows) as a rate, and the
  connections each replica holds open (conntrack).

- **requests**, from the component's own metrics endpoint when its manifest declares `metrics_port`
  (coordinator/deployments/requestmetrics.py), read by the leader every `TRAFFIC_PERIOD` seconds
  through each copy's agent and summed over the copies: requests answered per second, their mean
  latency and failed requests per second between two reads. The kernel sees connections, not
  requests, so latency and errors exist only for components that serve the endpoint.

Each series keeps its last `MAX_POINTS` points per component (about an hour at a 5 s period); a
coordinator that restarts, or a new leader, starts them empty. Pure bookkeeping: no I/O.
"""

from __future__ import annotations

import collections
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from coordinator.deployments.requestmetrics import RequestCounts

LABEL_DEPLOYMENT = "ferryman.deployment"
LABEL_COMPONENT = "ferryman.component"
MAX_POINTS = 720
START_TIMES = 5
"""Cold starts kept per component: their median is its cold start."""
TRAFFIC_PERIOD = 5.0
"""Seconds between two reads of the balancers' counters by the leader."""


@dataclass(frozen=True)
class UsagePoint:
    ts: float
    host: str
    cpu_millis: float
    """CPU of the component's containers on `host`, summed (millicores)."""
    memory_bytes: int
    containers: int


@dataclass(frozen=True)
class TrafficPoint:
    ts: float
    new_connections_per_second: float
    open_connections: Mapping[str, int]
    """Backend address -> connections to the service address it holds open."""


@dataclass(frozen=True)
class RequestPoint:
    ts: float
    requests_per_second: float
    latency_ms: float
    """Mean time to answer a request between the two reads (0 with no request answered)."""
    errors_per_second: float


def request_point(ts: float, now: RequestCounts, last: tuple[float, RequestCounts] | None) -> RequestPoint | None:
    """The rates between two reads of a component's summed counters; None for the first read, or
    when a counter went down (a copy restarted or left: its counters are gone from the sum)."""
    if last is None or ts <= last[0]:
        return None
    before = last[1]
    deltas = (
        now.requests - before.requests,
        now.errors - before.errors,
        now.duration_sum_s - before.duration_sum_s,
        now.duration_count - before.duration_count,
    )
    if min(deltas) < 0:
        return None
    elapsed = ts - last[0]
    latency = 1000.0 * deltas[2] / deltas[3] if deltas[3] > 0 else 0.0
    return RequestPoint(ts, deltas[0] / elapsed, latency, deltas[1] / elapsed)


def _number(value: Any) -> float:
    """A protobuf-JSON number (uint64 comes as a string); 0 when it is not one."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def usage_points(host: str, samples: Sequence[tuple[float, Mapping[str, Any]]]) -> list[tuple[str, str, UsagePoint]]:
    """(deployment, component, point) for each component with containers in each sample."""
    out = []
    for ts, sample in samples:
        sums: dict[tuple[str, str], list[float]] = {}
        for container in sample.get("containers") or ():
            labels = container.get("labels") or {}
            key = (labels.get(LABEL_DEPLOYMENT), labels.get(LABEL_COMPONENT))
            if not key[0] or not key[1]:
                continue
            total = sums.setdefault((str(key[0]), str(key[1])), [0.0, 0.0, 0.0])
            total[0] += _number(container.get("cpu_millis"))
            total[1] += _number(container.get("memory_bytes"))
            total[2] += 1
        for (deployment, component), (cpu, memory, count) in sums.items():
            out.append((deployment, component, UsagePoint(ts, host, cpu, int(memory), int(count))))
    return out


class ComponentSeries:
    """Per (deployment, component): the last MAX_POINTS usage, traffic and request points."""

    def __init__(self, max_points: int = MAX_POINTS) -> None:
        self._max = max_points
        self._usage: dict[tuple[str, str], collections.deque[UsagePoint]] = {}
        self._traffic: dict[tuple[str, str], collections.deque[TrafficPoint]] = {}
        self._last_count: dict[tuple[str, str], tuple[float, int]] = {}
        self._requests: dict[tuple[str, str], collections.deque[RequestPoint]] = {}
        self._last_requests: dict[tuple[str, str], tuple[float, RequestCounts]] = {}

    def observe(self, host: str, samples: Sequence[tuple[float, Mapping[str, Any]]]) -> None:
        """Agent telemetry as stored (protobuf JSON samples, oldest first)."""
        for deployment, component, point in usage_points(host, samples):
            self._series(self._usage, (deployment, component)).append(point)

    def observe_traffic(
        self, deployment: str, component: str, ts: float, balanced: int, open_connections: Mapping[str, int]
    ) -> None:
        """`balanced`: the balancer's counter of connections it spread so far (it restarts from 0
        when the table is rewritten: no rate across that)."""
        key = (deployment, component)
        last = self._last_count.get(key)
        self._last_count[key] = (ts, balanced)
        if last is None or balanced < last[1] or ts <= last[0]:
            return
        rate = (balanced - last[1]) / (ts - last[0])
        self._series(self._traffic, key).append(TrafficPoint(ts, rate, dict(open_connections)))

    def observe_requests(self, deployment: str, component: str, ts: float, counts: RequestCounts) -> None:
        """`counts`: the component's copies' counters read at `ts`, summed."""
        key = (deployment, component)
        point = request_point(ts, counts, self._last_requests.get(key))
        self._last_requests[key] = (ts, counts)
        if point is not None:
            self._series(self._requests, key).append(point)

    def forget(self, deployment: str) -> None:
        stores: tuple[dict[tuple[str, str], Any], ...] = (
            self._usage,
            self._traffic,
            self._last_count,
            self._requests,
            self._last_requests,
        )
        for store in stores:
            for key in [k for k in store if k[0] == deployment]:
                del store[key]

    def of(self, deployment: str, component: str) -> dict[str, Any]:
        key = (deployment, component)
        return {
            "usage": [asdict(p) for p in self._usage.get(key, ())],
            "traffic": [
                {**asdict(p), "open_connections": dict(p.open_connections)} for p in self._traffic.get(key, ())
            ],
            "requests": [asdict(p) for p in self._requests.get(key, ())],
        }

    def _series(self, store: dict[tuple[str, str], collections.deque[Any]], key: tuple[str, str]) -> Any:
        found = store.get(key)
        if found is None:
            found = store[key] = collections.deque(maxlen=self._max)
        return found


class StartTimes:
    """Per (deployment, component): how long its last `START_TIMES` replicas took from the scale
    request to healthy (placement, image pull, create, start, first passing health check)."""

    def __init__(self, keep: int = START_TIMES) -> None:
        self._keep = keep
        self._seconds: dict[tuple[str, str], collections.deque[float]] = {}

    def observe(self, deployment: str, component: str, seconds: float) -> None:
        kept = self._seconds.get((deployment, component))
        if kept is None:
            kept = self._seconds[(deployment, component)] = collections.deque(maxlen=self._keep)
        kept.append(max(0.0, seconds))

    def cold_start(self, deployment: str, component: str) -> float | None:
        """The median of the kept starts (one slow pull does not set it); None before the first."""
        kept = self._seconds.get((deployment, component))
        return statistics.median(kept) if kept else None

    def forget(self, deployment: str) -> None:
        for key in [k for k in self._seconds if k[0] == deployment]:
            del self._seconds[key]
