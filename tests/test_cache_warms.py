"""The cache's count of warmed layers (agent/cache/stats.py): hits, waste and the model that chose them."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry

from agent.cache.stats import CacheCounters
from agent.ctl.cache import status_lines


def status_of(counters: CacheCounters) -> dict[str, Any]:
    """A `/v1/cache/status` body of an empty cache with these counters."""
    return {
        "used_bytes": 0,
        "capacity_bytes": 1,
        "low_watermark_bytes": 0,
        "entries": 0,
        "pinned_bytes": 0,
        "evictions": 0,
        "evicted_bytes": 0,
        **counters.to_json(),
    }


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
        "keeps": {"kept": 0, "kept_bytes": 0, "used": 0, "used_bytes": 0, "ended": 0, "ended_bytes": 0, "pending": 0},
    }
    sample = counters.registry.get_sample_value
    assert sample("ferryman_cache_warm_bytes_total", {"outcome": "wasted"}) == 300
    assert sample("ferryman_cache_warm_model_info", {"version": "warm-2"}) == 1
    assert sample("ferryman_cache_warm_model_info", {"version": "warm-1"}) is None
    status = status_of(counters)
    line = status_lines(status)[-1]
    assert line.startswith("prefetch: 3 layers warmed (410 B) (model warm-2), 1 hits (100 B), wasted 300 B"), line
    assert line.endswith("(75.0% of settled), 1 pending"), line


def test_a_keep_is_counted_apart_used_or_ended_and_not_in_the_waste() -> None:
    now = [1000.0]
    counters = CacheCounters(CollectorRegistry(), clock=lambda: now[0])
    counters.warmed("sha256:w", 1000, ttl=60)
    counters.kept("sha256:a", 100, ttl=60, model_version="warm-3")
    counters.kept("sha256:b", 300, ttl=30)
    counters.kept("sha256:b", 300, ttl=90)  # kept again: renewed to 1090, not counted twice
    counters.kept("sha256:c", 20, ttl=30)
    counters.blob("local", 100, "sha256:a")  # a pull found a: used
    now[0] = 1061.0  # c's lease ended unused, and the warm's: b's was renewed
    keeps = counters.to_json()["warms"]["keeps"]
    assert keeps == {
        "kept": 3,
        "kept_bytes": 420,
        "used": 1,
        "used_bytes": 100,
        "ended": 1,
        "ended_bytes": 20,
        "pending": 1,
    }
    counters.found_local("sha256:b")  # an assembly found b within its renewed lease
    warms = counters.to_json()["warms"]
    assert (warms["keeps"]["used"], warms["keeps"]["used_bytes"], warms["keeps"]["pending"]) == (2, 400, 0)
    # The waste is the warms' alone: a keep that ended unused fetched nothing.
    assert (warms["warmed"], warms["wasted_bytes"], warms["waste"], warms["model_version"]) == (1, 1000, 1.0, "warm-3")
    sample = counters.registry.get_sample_value
    assert sample("ferryman_cache_keeps_total", {"outcome": "kept"}) == 3
    assert sample("ferryman_cache_keeps_total", {"outcome": "used"}) == 2
    assert sample("ferryman_cache_keep_bytes_total", {"outcome": "used"}) == 400
    assert sample("ferryman_cache_keep_bytes_total", {"outcome": "ended"}) == 20
    assert sample("ferryman_cache_warms_total", {"outcome": "warmed"}) == 1
    status = status_of(counters)
    assert status_lines(status)[-1] == (
        "prefetch keeps: 3 layers here kept (420 B), 2 used (400 B), 1 ended unused (20 B), 0 pending"
    )


def test_keeps_alone_show_their_line_and_no_prefetch_line() -> None:
    counters = CacheCounters(CollectorRegistry())
    counters.kept("sha256:a", 100, ttl=60)
    status = status_of(counters)
    lines = status_lines(status)
    assert lines[-1].startswith("prefetch keeps: 1 layers here kept (100 B)"), lines
    assert not any(line.startswith("prefetch:") for line in lines), lines
