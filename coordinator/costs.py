"""Predicted time to running for a new container on a host: what cost-aware placement minimises.

The container's layers are taken in the order given, lowest first (a composition's stack):

    arrival(layer) = the host's fetch overhead
                     + the time its link needs for it while the other missing layers from the
                       same kind of source share that link (processor sharing: every layer smaller
                       than it arrives first, the larger ones have sent as many bytes as it by then):
                           sum over those layers L of min(size(L), size(layer)) / the source's rate
                     (a fleet peer when the layer tracker names one, at the host's measured peer
                      rate; else the registry, at its measured registry rate; peers and the registry
                      are different links, fetched at once)
    applied(layer) = max(arrival(layer), applied(the layer below)) + size * apply seconds per byte
                     * (1 + CPU pressure)
    seconds        = applied(the top layer) + start seconds * (1 + CPU pressure)

Layers are applied bottom up, each once it has arrived and the one below it is applied (the agent
applies the lower layers while the upper ones download, but a layer cannot be applied before its
bytes are here: a big base arriving last is applied after everything has arrived). Layers below the
lowest missing one cost nothing (their snapshots are there); a layer the host holds above a missing
one is applied again (its snapshot sits on another parent) but not fetched.
Rates and the apply cost are the host's own measurements (its telemetry's `layer_costs`, which
weigh recent fetches and applies most), or the `[placement]` defaults until it has any. The start
is learned from the containers started there through the coordinator (its warm starts, the median
of the last few), else `[placement] start_seconds`. The fetch overhead is learned from its starts
that fetched, at measured rates: what they took beyond the predicted pipeline (the registry's
manifest and config round trips of an image not held yet, the tracker's answers, the requests'
latency; from the starts whose bytes take at most LATENCY_MAX_PIPELINE); once per start, not per
layer, the median of the last few; 0 until learned; like the
start, it is scaled by (1 + CPU pressure).

The load: CPU pressure is the host's PSI cpu "some" avg10 (0..1) from its newest telemetry sample.
Applying, starting and the requests around them share the CPU with everything else on the host, so
they take longer as it rises; the links' byte rates do not. The apply cost, the start and the fetch
overhead are kept as they would be at no pressure: each measurement is divided by (1 + the
pressure when it was made: the sample that reported the apply rate, the newest sample at a start)
and each prediction multiplied by (1 + the pressure now). A figure measured under one load is then
applied under another at the ratio of the two (`CostBook`), not as measured.

Pure: the inputs are plain values, `Breakdown` is the record kept with the decision.
"""

from __future__ import annotations

import collections
import math
import statistics
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from coordinator.config import PlacementConfig


@dataclass(frozen=True)
class Rates:
    registry_bytes_per_second: float
    peer_bytes_per_second: float
    apply_seconds_per_byte: float
    start_seconds: float
    measured: bool = False
    fetch_latency_seconds: float = 0.0

    @classmethod
    def of(cls, costs: Mapping[str, float] | None, defaults: PlacementConfig) -> Rates:
        """The host's measurements (LayerCosts fields) where it has them, the defaults elsewhere."""
        costs = costs or {}
        registry = float(costs.get("registry_bytes_per_second") or 0.0)
        peer = float(costs.get("peer_bytes_per_second") or 0.0)
        return cls(
            registry or defaults.registry_bytes_per_second,
            peer or defaults.peer_bytes_per_second,
            float(costs.get("apply_seconds_per_byte") or 0.0) or defaults.apply_seconds_per_byte,
            float(costs["start_seconds"]) if "start_seconds" in costs else defaults.start_seconds,
            measured=bool(registry or peer),
            fetch_latency_seconds=float(costs.get("fetch_latency_seconds") or 0.0),
        )


@dataclass(frozen=True)
class Breakdown:
    host: str
    seconds: float
    fetch_seconds: float
    """When the last missing layer has arrived (the fetch overhead included)."""
    apply_seconds: float
    """Applying, in all: the layers from the lowest missing one up."""
    start_seconds: float
    bytes_from_peers: int
    bytes_from_registry: int
    bytes_held: int
    measured: bool
    """Whether the host's own rates were used (else the [placement] defaults)."""
    layers_fetched: int = 0
    latency_seconds: float = 0.0
    """Of fetch_seconds: the host's fetch overhead (when layers_fetched)."""
    assembled_seconds: float = 0.0
    """When the top layer is applied: fetches and applies as they overlap (seconds less the start)."""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in (
            "seconds",
            "fetch_seconds",
            "apply_seconds",
            "start_seconds",
            "latency_seconds",
            "assembled_seconds",
        ):
            out[key] = round(out[key], 3)
        return out


def time_to_running(
    host: str,
    held: Collection[str],
    layers: Mapping[str, int],
    peer_holders: Mapping[str, Collection[str]],
    rates: Rates,
    cpu_pressure: float,
) -> Breakdown:
    """`layers`: digest -> size of what the container needs, lowest first; `held`: digests the host
    holds; `peer_holders`: digest -> hosts that hold or are fetching it (the tracker's answer);
    `cpu_pressure`: 0..1 (PSI cpu "some" avg10 / 100)."""
    from_peers = from_registry = kept = 0
    sources: dict[str, str] = {}  # missing digest -> "peer" or "registry"
    for digest, size in layers.items():
        if digest in held:
            kept += size
        elif any(h != host for h in peer_holders.get(digest, ())):
            from_peers += size
            sources[digest] = "peer"
        else:
            from_registry += size
            sources[digest] = "registry"
    load = 1.0 + max(0.0, min(1.0, cpu_pressure))
    latency = rates.fetch_latency_seconds * load if sources else 0.0
    rate = {"peer": rates.peer_bytes_per_second, "registry": rates.registry_bytes_per_second}
    arrivals: dict[str, float] = {}
    for digest, source in sources.items():
        sharing = sum(min(layers[digest], layers[other]) for other, kind in sources.items() if kind == source)
        arrivals[digest] = latency + sharing / rate[source]
    per_byte = rates.apply_seconds_per_byte * load
    start = rates.start_seconds * load
    order = list(layers)
    lowest = next((i for i, digest in enumerate(order) if digest in sources), len(order))
    applied = work = 0.0
    for digest in order[lowest:]:
        work += layers[digest] * per_byte
        applied = max(applied, arrivals.get(digest, 0.0)) + layers[digest] * per_byte
    return Breakdown(
        host=host,
        seconds=applied + start,
        fetch_seconds=max(arrivals.values(), default=0.0),
        apply_seconds=work,
        start_seconds=start,
        bytes_from_peers=from_peers,
        bytes_from_registry=from_registry,
        bytes_held=kept,
        measured=rates.measured,
        layers_fetched=len(sources),
        latency_seconds=latency,
        assembled_seconds=applied,
    )


FIGURES = (
    "registry_bytes_per_second",
    "peer_bytes_per_second",
    "apply_seconds_per_byte",
    "start_seconds",
    "fetch_latency_seconds",
)
REPORTED = ("registry_bytes_per_second", "peer_bytes_per_second", "apply_seconds_per_byte")
"""The layer costs a start's answer may carry (the agent's measured rates, as in its telemetry)."""
START_WINDOW = 5
"""A host's start overhead is the median of its last this many warm starts, the fleet's newest
filling in while it has fewer (one slow start, say on a view of its layers that was out of date,
does not set it)."""
LATENCY_MAX_PIPELINE = 2.0
"""The fetch overhead is learned from starts whose layers were predicted to arrive and be applied
within this many seconds: in a longer one (a base image from the registry) the rates' error is
larger than the overhead, and a small fetch after it would be charged that error."""
LEARNED_MAX_AGE = 300.0
"""Seconds a start teaches for: an overhead learned under an earlier load (a busy machine's warm
start took 0.8 s, the same start minutes later 0.3 s) is forgotten rather than applied to now."""


def at_idle(costs: Mapping[str, float], pressure: float) -> dict[str, float]:
    """Measured layer costs as at idle CPU: the apply cost, measured under `pressure`, scaled back."""
    out = {key: float(value) for key, value in costs.items()}
    if "apply_seconds_per_byte" in out:
        out["apply_seconds_per_byte"] /= 1.0 + pressure
    return out


class CostBook:
    """The newest `layer_costs` each host reported, kept as pushes arrive (a registry observer), and
    the figures learned from the starts placed there; the apply cost, start and fetch overhead as at
    no CPU pressure (the module docstring). In memory: a restarted coordinator assumes the defaults
    for a host until its next push and starts."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._latest: dict[str, dict[str, float]] = {}
        self._pressure: dict[str, float] = {}
        """Host -> its newest CPU pressure (0..1)."""
        self._recent: dict[tuple[str, str], collections.deque[tuple[float, float]]] = {}
        """(host, start_seconds or fetch_latency_seconds) -> (when, value) of its last starts."""
        self._reported_at: dict[str, float] = {}
        """Host -> its clock when a start's answer last carried its layer costs: a telemetry sample
        taken before then (while that start's fetches ran) no longer replaces them."""

    def reported(self, host: str, costs: Mapping[str, Any], at: float) -> None:
        """The layer costs `host` measured as of `at` (its clock), sent with a start's answer: the
        rates with that start's fetches in, which the next placement should use at once."""
        latest = {
            key: value
            for key, value in costs.items()
            if key in REPORTED
            and isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and value > 0
        }
        if not latest:
            return
        self._latest[host] = at_idle(latest, self._pressure.get(host, 0.0))  # the host's current pressure
        self._reported_at[host] = at

    def started(self, host: str, measured_seconds: float, predicted: Breakdown) -> None:
        """A container placed on `host` ran after `measured_seconds`. When it needed no layer (all
        held), that is the host's start overhead (create, the image record, start, the calls): the
        median of its recent warm starts is what the next predictions for the host use. When it
        fetched layers at the host's measured rates, what it took beyond the prediction's pipeline
        and start is the host's fetch overhead (the median of its recent cold starts; never below
        0). Both are kept divided by (1 + the host's CPU pressure now). Starts older than
        LEARNED_MAX_AGE count no more."""
        load = 1.0 + self._pressure.get(host, 0.0)
        if predicted.layers_fetched:
            if not predicted.measured:
                return  # predicted at the default rates: their error would pass for latency
            if predicted.assembled_seconds - predicted.latency_seconds > LATENCY_MAX_PIPELINE:
                return  # seconds of bytes and applies: their error would pass for latency
            beyond = measured_seconds - (predicted.seconds - predicted.latency_seconds)
            self._learn(host, "fetch_latency_seconds", max(0.0, beyond) / load)
        elif not (predicted.bytes_from_peers or predicted.bytes_from_registry):
            self._learn(host, "start_seconds", measured_seconds / load)

    def _learn(self, host: str, figure: str, value: float) -> None:
        recent = self._recent.setdefault((host, figure), collections.deque(maxlen=START_WINDOW))
        recent.append((self._clock(), value))

    def _learned(self, host: str) -> dict[str, float]:
        """The median of the host's fresh starts per figure; while it has fewer than START_WINDOW,
        topped up with the fleet's newest (one start alone, say a slow one, does not set it)."""
        now = self._clock()
        fresh: dict[tuple[str, str], list[tuple[float, float]]] = {
            key: [(at, value) for at, value in recent if now - at <= LEARNED_MAX_AGE]
            for key, recent in self._recent.items()
        }
        out = {}
        for (name, figure), own in fresh.items():
            if name != host or not own:
                continue
            others = sorted(
                (entry for (other, f), entries in fresh.items() if f == figure and other != host for entry in entries),
                reverse=True,
            )
            values = [value for _, value in own] + [value for _, value in others[: START_WINDOW - len(own)]]
            out[figure] = statistics.median(values)
        return out

    def observe(self, host: str, samples: Sequence[tuple[float, Mapping[str, Any]]]) -> None:
        """Samples as stored (protobuf JSON), oldest first."""
        for _, sample in reversed(samples):
            if (pressure := cpu_pressure(sample)) is not None:
                self._pressure[host] = pressure
                break
        for ts, sample in reversed(samples):
            costs = sample.get("layer_costs")
            if isinstance(costs, Mapping) and costs:
                if ts < self._reported_at.get(host, -math.inf):
                    return  # a start's answer since then carried newer figures
                latest = at_idle(
                    {k: v for k, v in costs.items() if isinstance(v, int | float)}, cpu_pressure(sample) or 0.0
                )  # measured under this sample's pressure
                self._latest[host] = latest
                return

    def of(self, host: str) -> dict[str, float] | None:
        """The host's own figures; for a figure it has not measured (or learned lately), the median
        of the hosts that have (the fleet's hosts mostly share their registries and network)."""
        hosts = {*self._latest, *(name for name, _ in self._recent)}
        known = {name: {**self._latest.get(name, {}), **self._learned(name)} for name in hosts}
        own = known.get(host, {})
        merged: dict[str, float] = {}
        for key in FIGURES:
            values = [costs[key] for costs in known.values() if key in costs]
            if key in own:
                merged[key] = own[key]
            elif values:
                merged[key] = statistics.median(values)
        return merged or None


def cpu_pressure(sample: Mapping[str, Any]) -> float | None:
    """A telemetry sample's PSI cpu "some" avg10 as 0..1; None when it has none."""
    pressure = sample.get("pressure")
    value = pressure.get("cpu_some") if isinstance(pressure, Mapping) else None
    return max(0.0, min(1.0, float(value) / 100.0)) if isinstance(value, int | float) else None
