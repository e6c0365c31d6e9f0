"""Replicas' parts of a host's drain-risk history add up to the whole (coordinator/history_share.py)."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.features import BIN_S, HostHistory, TelemetryPoint, extract_batch, points_to_columns
from coordinator.history_share import SHARED_BINS, HostShare, current_shares
from coordinator.notices import Notice

NOW = 1_700_000_000.0


def _points(n: int, seed: int = 1, start: float = NOW - 3600) -> list[TelemetryPoint]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        readings = [float(x) if rng.random() > 0.1 else None for x in rng.random(8)]
        throughputs = [float(rng.random() * 1e9), float(rng.random() * 1e7)]
        events = [int(rng.integers(0, 2)) for _ in range(5)]
        out.append(TelemetryPoint(start + 5 * i + rng.random(), *readings, *throughputs, *events))
    return out


def test_one_point_at_a_time_is_the_array_path_bit_for_bit() -> None:
    points = _points(1500)
    points += [_points(1, seed=9, start=NOW - 7000)[0], TelemetryPoint(float("nan"), *[None] * 10)]
    one, arrays = HostHistory(), HostHistory()
    for p in points:
        one.extend([p])
        arrays.add_columns(*points_to_columns([p]))
    assert np.array_equal(one.window(NOW), arrays.window(NOW))


def test_shared_recent_bins_merge_to_the_history_of_every_sample() -> None:
    points = _points(720)  # an hour at 5 s
    whole = HostHistory.from_points(points)
    # The leader took every other push; a follower the rest, sharing its newest bins after each one.
    own = HostHistory.from_points(points[::2])
    follower, leaders_copy = HostHistory(), HostHistory()
    for p in points[1::2]:
        follower.extend([p])
        ids, rows = HostShare.rows_from_json(HostShare(follower.recent_bins(SHARED_BINS)).to_json())
        assert len(ids) <= SHARED_BINS
        leaders_copy.set_bins(ids, rows)
    merged = HostHistory.merged([own, leaders_copy])
    expected, got = extract_batch({"whole": whole, "merged": merged}, NOW)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert not np.array_equal(extract_batch({"own": own}, NOW)[0], expected)  # the follower's part counts


def test_a_share_round_trips_and_stale_shares_drop_out() -> None:
    notice = Notice(NOW - 1, NOW + 300, "DRAIN_NOTICE", "spot", "reclaim")
    history = HostHistory.from_points(_points(40, start=NOW - 200))
    share = HostShare(history.recent_bins(SHARED_BINS), (notice,))
    back = HostShare.from_json(share.to_json())
    assert back.notices == (notice,) and back.bins.keys() == share.bins.keys()
    for b, row in share.bins.items():
        assert np.array_equal(back.bins[b], row)
    fresh = share.to_json()
    old = HostShare({int(NOW // BIN_S) - SHARED_BINS: share.bins[max(share.bins)]}).to_json()
    assert current_shares({"a": fresh, "b": old, "c": {"junk": 1}}, NOW) == {"a": fresh}
    with pytest.raises(ValueError):
        HostShare.from_json({"ids": [1], "rows": "AAAA"})
