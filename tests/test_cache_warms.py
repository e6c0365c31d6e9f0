"""The cache's count of warmed layers (agent/cache/stats.py): hits, waste and the model that chose them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from agent.cache.stats import CacheCounters
from agent.ctl.cache import status_lines


def test_a_warm_is_a_hit_when_found_local_in_time_and_wasted_after() -> None:
    now = [1000.0]
    counters = CacheCounters(CollectorRegistry(), clock=lambda: now[0])
    counters.warmed("sha256:a", 100, ttl=60, model_version="warm-1")
    counters.warmed("sha256:b", 300, ttl=60, model_version="warm-1")
    counters.blob("local", 100, "sha256:a")  # a pull found a: a hit
    counters.blob("registry", 50, "sha256:c")  # fetched: no warm of it
    now[0] = 1061.0  # b's lease ended unused
    counters.warmed("sha256:d", 10, ttl=60, model_version="warm-2")
    counters.found_local("sha256:b")  # too late: counted as wasted already
    warms = counters.to_json()["warms"]
    assert warms == {
        "warmed": 3,
        "warmed_bytes": 410,
        "hits": 1,
        "hit_bytes": 100,
        "wasted": 1,
        "wasted_bytes": 300,
        "pending": 1,
        "waste": 0.75,
        "model_version": "warm-2",
    }
    sample = counters.registry.get_sample_value
    assert sample("ferryman_cache_warm_bytes_total", {"outcome": "wasted"}) == 300
    assert sample("ferryman_cache_warm_model_info", {"version": "warm-2"}) == 1
    assert sample("ferryman_cache_warm_model_info", {"version": "warm-1"}) is None
    status = {
        "used_bytes": 0,
        "capacity_bytes": 1,
        "low_watermark_bytes": 0,
        "entries": 0,
        "pinned_bytes": 0,
        "evictions": 0,
        "evicted_bytes": 0,
        **counters.to_json(),
    }
    line = status_lines(status)[-1]
    assert line.startswith("prefetch: 3 layers warmed (410 B) (model warm-2), 1 hits (100 B), wasted 300 B"), line
    assert line.endswith("(75.0% of settled), 1 pending"), line
