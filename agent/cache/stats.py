"""Exact hit and miss counts of the layer cache, kept as numbers and exported to Prometheus.

A blob a pull needs (an image config or a layer) is one request: a local hit when the content store
already has it (or another pull is fetching it at that moment: it is fetched once), otherwise a
fetch from where it came, "peer" or "registry" (an archive import counts as "archive"). Manifests
and indexes are resolved on every pull and are not counted.

Warms (layers fetched ahead of use under a TTL lease, `POST /v1/prefetch/layers/{digest}`) are
counted apart: a warm is a *hit* when a pull then finds the layer local before its lease ends, and
*wasted* when the lease ends first (containerd collects the blob unless an image holds it by then).
The warm request may name the model version that chose it; the last one named is shown.

A warm of a layer already here is a *keep* (the lease is taken, nothing is fetched), counted apart
from the warms: *used* when a pull or an assembly finds the layer local before its lease ends, *ended*
when the lease ends first. Keeps move no bytes, so they are not in the warms' waste. A keep of a layer
still kept renews it (its end moves later) and is not counted again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

SOURCES = ("local", "peer", "registry", "archive")
"""Where a blob came from; "local" is a hit."""


@dataclass
class Tally:
    requests: int = 0
    bytes: int = 0


@dataclass
class WarmTally:
    warmed: Tally = field(default_factory=Tally)
    hits: Tally = field(default_factory=Tally)
    wasted: Tally = field(default_factory=Tally)
    pending: dict[str, tuple[int, float]] = field(default_factory=dict)
    """digest -> (size, when its lease ends): warms no pull used yet."""
    model_version: str = ""


@dataclass
class KeepTally:
    kept: Tally = field(default_factory=Tally)
    used: Tally = field(default_factory=Tally)
    ended: Tally = field(default_factory=Tally)
    pending: dict[str, tuple[int, float]] = field(default_factory=dict)
    """digest -> (size, when its lease ends): keeps no pull or assembly used yet."""


@dataclass
class CacheCounters:
    """Counted since the agent started (Prometheus keeps the history)."""

    registry: CollectorRegistry
    served: dict[str, Tally] = field(default_factory=lambda: {s: Tally() for s in SOURCES})
    evictions: int = 0
    evicted_bytes: int = 0
    warms: WarmTally = field(default_factory=WarmTally)
    keeps: KeepTally = field(default_factory=KeepTally)
    clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        r = self.registry
        self._requests = Counter(
            "ferryman_cache_requests",
            "Blobs pulls needed, by where they came from (local: a hit)",
            ["source"],
            registry=r,
        )
        self._bytes = Counter(
            "ferryman_cache_bytes", "Bytes of the blobs pulls needed, by where they came from", ["source"], registry=r
        )
        for source in SOURCES:
            self._requests.labels(source=source)
            self._bytes.labels(source=source)
        self._evictions = Counter("ferryman_cache_evictions", "Images the cache evicted", registry=r)
        self._evicted_bytes = Counter("ferryman_cache_evicted_bytes", "Bytes the cache's evictions freed", registry=r)
        self.capacity = Gauge("ferryman_cache_capacity_bytes", "The cache's bound ([cache] max_bytes)", registry=r)
        self.used = Gauge("ferryman_cache_used_bytes", "Bytes in containerd's content store", registry=r)
        self.pinned = Gauge("ferryman_cache_pinned_bytes", "Bytes of pinned images", registry=r)
        self.entries = Gauge("ferryman_cache_entries", "Images in the cache", registry=r)
        self._warms, self._warm_bytes = _by_outcome(
            "ferryman_cache_warm",
            "Layers warmed ahead of use, by outcome (warmed: fetched; hit: a pull found it before its lease "
            "ended; wasted: the lease ended first)",
            ("warmed", "hit", "wasted"),
            r,
        )
        self._keeps, self._keep_bytes = _by_outcome(
            "ferryman_cache_keep",
            "Layers already here that a warm request kept under its lease, by outcome (kept: taken; used: "
            "a pull or an assembly found it before its lease ended; ended: the lease ended first)",
            ("kept", "used", "ended"),
            r,
        )
        self._warm_model = Gauge(
            "ferryman_cache_warm_model_info", "The model version the last warm request named", ["version"], registry=r
        )

    def blob(self, source: str, size: int, digest: str = "") -> None:
        """One blob a pull needed, `size` bytes, served from `source` ("local" for a hit). The one
        call every blob source reports through, whichever pipeline fetched it."""
        if source not in self.served:
            raise ValueError(f"unknown blob source {source!r} (one of {', '.join(SOURCES)})")
        tally = self.served[source]
        tally.requests += 1
        tally.bytes += size
        self._requests.labels(source=source).inc()
        self._bytes.labels(source=source).inc(size)
        if digest and source == "local":
            self.found_local(digest)

    def found_local(self, digest: str) -> None:
        """A pull or an assembly found `digest` local: a warm of it still under its lease is a hit,
        a keep of it is used."""
        self.expire_warms()
        warm = self.warms.pending.pop(digest, None)
        if warm is not None:
            self._warm_outcome("hit", self.warms.hits, warm[0])
        keep = self.keeps.pending.pop(digest, None)
        if keep is not None:
            self._keep_outcome("used", self.keeps.used, keep[0])

    def warmed(self, digest: str, size: int, ttl: float, model_version: str = "") -> None:
        """A layer fetched ahead of use, held `ttl` seconds by its lease."""
        self.expire_warms()
        self.warms.pending[digest] = (size, self.clock() + ttl)
        self._warm_outcome("warmed", self.warms.warmed, size)
        self._named_model(model_version)

    def kept(self, digest: str, size: int, ttl: float, model_version: str = "") -> None:
        """A layer already here, held `ttl` seconds by a warm request's lease (nothing fetched)."""
        self.expire_warms()
        until = self.clock() + ttl
        held = self.keeps.pending.get(digest)
        if held is None:
            self.keeps.pending[digest] = (size, until)
            self._keep_outcome("kept", self.keeps.kept, size)
        else:  # kept already: renewed, not counted again
            self.keeps.pending[digest] = (held[0], max(held[1], until))
        self._named_model(model_version)

    def _named_model(self, model_version: str) -> None:
        if model_version and model_version != self.warms.model_version:
            if self.warms.model_version:
                self._warm_model.remove(self.warms.model_version)
            self.warms.model_version = model_version
            self._warm_model.labels(version=model_version).set(1)

    def expire_warms(self) -> None:
        now = self.clock()
        for digest in [d for d, (_, until) in self.warms.pending.items() if until <= now]:
            size, _ = self.warms.pending.pop(digest)
            self._warm_outcome("wasted", self.warms.wasted, size)
        for digest in [d for d, (_, until) in self.keeps.pending.items() if until <= now]:
            size, _ = self.keeps.pending.pop(digest)
            self._keep_outcome("ended", self.keeps.ended, size)

    def _warm_outcome(self, outcome: str, tally: Tally, size: int) -> None:
        tally.requests += 1
        tally.bytes += size
        self._warms.labels(outcome=outcome).inc()
        self._warm_bytes.labels(outcome=outcome).inc(size)

    def _keep_outcome(self, outcome: str, tally: Tally, size: int) -> None:
        tally.requests += 1
        tally.bytes += size
        self._keeps.labels(outcome=outcome).inc()
        self._keep_bytes.labels(outcome=outcome).inc(size)

    def evicted(self, freed: int) -> None:
        self.evictions += 1
        self.evicted_bytes += freed
        self._evictions.inc()
        self._evicted_bytes.inc(freed)

    def to_json(self) -> dict[str, Any]:
        requests = sum(t.requests for t in self.served.values())
        nbytes = sum(t.bytes for t in self.served.values())
        local = self.served["local"]
        return {
            "served": {s: {"requests": t.requests, "bytes": t.bytes} for s, t in self.served.items()},
            "hit_rate": {
                "requests": local.requests / requests if requests else None,
                "bytes": local.bytes / nbytes if nbytes else None,
            },
            "evictions": self.evictions,
            "evicted_bytes": self.evicted_bytes,
            "warms": self._warms_json(),
        }

    def _warms_json(self) -> dict[str, Any]:
        self.expire_warms()
        w, k = self.warms, self.keeps
        settled = w.hits.bytes + w.wasted.bytes
        return {
            "warmed": w.warmed.requests,
            "warmed_bytes": w.warmed.bytes,
            "hits": w.hits.requests,
            "hit_bytes": w.hits.bytes,
            "wasted": w.wasted.requests,
            "wasted_bytes": w.wasted.bytes,
            "pending": len(w.pending),
            "waste": w.wasted.bytes / settled if settled else None,
            "model_version": w.model_version,
            "keeps": {
                "kept": k.kept.requests,
                "kept_bytes": k.kept.bytes,
                "used": k.used.requests,
                "used_bytes": k.used.bytes,
                "ended": k.ended.requests,
                "ended_bytes": k.ended.bytes,
                "pending": len(k.pending),
            },
        }


def _by_outcome(
    prefix: str, description: str, outcomes: tuple[str, ...], registry: CollectorRegistry
) -> tuple[Counter, Counter]:
    """A count and a byte counter (`<prefix>s_total`, `<prefix>_bytes_total`) by outcome, every
    outcome exported from the start at 0."""
    count = Counter(prefix + "s", description, ["outcome"], registry=registry)
    size = Counter(prefix + "_bytes", "Bytes of those layers, by outcome", ["outcome"], registry=registry)
    for outcome in outcomes:
        count.labels(outcome=outcome)
        size.labels(outcome=outcome)
    return count, size
