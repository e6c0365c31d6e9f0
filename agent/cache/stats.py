"""Exact hit and miss counts of the layer cache, kept as numbers and exported to Prometheus.

A blob a pull needs (an image config or a layer) is one request: a local hit when the content store
already has it (or another pull is fetching it at that moment: it is fetched once), otherwise a
fetch from where it came, "peer" or "registry" (an archive import counts as "archive"). Manifests
and indexes are resolved on every pull and are not counted.
"""

from __future__ import annotations

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
class CacheCounters:
    """Counted since the agent started (Prometheus keeps the history)."""

    registry: CollectorRegistry
    served: dict[str, Tally] = field(default_factory=lambda: {s: Tally() for s in SOURCES})
    evictions: int = 0
    evicted_bytes: int = 0

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

    def blob(self, source: str, size: int) -> None:
        """One blob a pull needed, `size` bytes, served from `source` ("local" for a hit). The one
        call every blob source reports through, whichever pipeline fetched it."""
        if source not in self.served:
            raise ValueError(f"unknown blob source {source!r} (one of {', '.join(SOURCES)})")
        tally = self.served[source]
        tally.requests += 1
        tally.bytes += size
        self._requests.labels(source=source).inc()
        self._bytes.labels(source=source).inc(size)

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
        }
