"""Drain-model features: gaps, missing readings, irregular periods, and one definition for
training (trace_features) and serving (extract / HostHistory)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from coordinator.features import (
    FEATURE_NAMES,
    N_FEATURES,
    HostHistory,
    HostTrace,
    TelemetryPoint,
    drain_labels,
    evaluation_times,
    extract,
    extract_batch,
    trace_features,
)

NOW = 1_750_003_000.0
IDX = {name: i for i, name in enumerate(FEATURE_NAMES)}


def point(ts: float, cpu: float | None = 0.4, **kw: float | int | None) -> TelemetryPoint:
    base: dict[str, float | None] = {
        "load1": 0.5,
        "mem_available_frac": 0.6,
        "psi_cpu_some": 1.0,
        "psi_mem_some": 0.5,
        "psi_mem_full": 0.1,
        "psi_io_some": 2.0,
        "psi_io_full": 0.5,
        "disk_bps": 1e7,
        "net_bps": 5e6,
    }
    base.update(kw)  # type: ignore[arg-type]
    return TelemetryPoint(ts=ts, cpu_util=cpu, **base)  # type: ignore[arg-type]


def series(period: float, span: float = 7200.0, cpu=lambda t: 0.4, start_jitter: float = 0.0) -> list[TelemetryPoint]:
    n = int(span // period)
    return [point(NOW - span + start_jitter + i * period, cpu(NOW - span + i * period)) for i in range(n + 1)]


def f(row: np.ndarray, name: str) -> float:
    return float(row[IDX[name]])


def test_shape_names_and_dtype() -> None:
    row = extract(series(5.0), NOW)
    assert row.shape == (N_FEATURES,) and row.dtype == np.float32
    assert len(set(FEATURE_NAMES)) == N_FEATURES
    batch = extract_batch({"a": series(5.0), "b": []}, NOW)
    assert batch.shape == (2, N_FEATURES) and batch.dtype == np.float32
    assert extract_batch({}, NOW).shape == (0, N_FEATURES)
    assert extract_batch([HostHistory()], NOW).shape == (1, N_FEATURES)


def test_levels_and_trends_do_not_depend_on_the_period() -> None:
    ramp = lambda t: 0.2 + 0.5 * (t - (NOW - 7200)) / 7200  # noqa: E731 - rises 0.5 over 2 h
    every_5s = extract(series(5.0, cpu=ramp), NOW)
    every_60s = extract(series(60.0, cpu=ramp, start_jitter=1.0), NOW)
    rng = np.random.default_rng(3)
    irregular_ts = np.sort(NOW - rng.uniform(0, 7200, 900))
    irregular = extract([point(t, ramp(t)) for t in irregular_ts], NOW)
    # the baseline (30 min to 2 h ago) spans 0.375 of the ramp: sd 0.375 / sqrt(12), plus the floor
    scale = 0.375 / math.sqrt(12) + 0.02
    for row in (every_5s, every_60s, irregular):
        assert f(row, "cpu_util_mean_2h") == pytest.approx(0.45, abs=0.02)
        assert f(row, "cpu_util_trend_30m") == pytest.approx(0.5 / 7200 * 1800 / scale, rel=0.15)
        # the last 30 min average sits 0.1875 + 0.0625 above the baseline's mean
        assert f(row, "cpu_util_shift_30m") == pytest.approx(0.25 / scale, rel=0.15)
        assert f(row, "cpu_util_peak_30m") > f(row, "cpu_util_shift_30m")
        assert f(row, "gap_frac_2h") < 0.02


def test_throughputs_are_relative_to_the_host_so_size_does_not_matter() -> None:
    rng = np.random.default_rng(8)
    noise = rng.normal(0, 0.3, 1441)
    small = [point(p.ts, 0.4, disk_bps=1e6 * math.exp(noise[i])) for i, p in enumerate(series(5.0))]
    big = [point(p.ts, 0.4, disk_bps=3e8 * math.exp(noise[i])) for i, p in enumerate(series(5.0))]
    a, b = extract(small, NOW), extract(big, NOW)
    assert not any(name.startswith("log_disk_bps_mean") for name in FEATURE_NAMES)
    for name in ("log_disk_bps_shift_5m", "log_disk_bps_shift_30m", "log_disk_bps_peak_30m", "log_disk_bps_trend_30m"):
        assert f(a, name) == pytest.approx(f(b, name), abs=0.02), name


def test_gaps_show_up_as_gap_fractions_above_the_hosts_own() -> None:
    points = [p for p in series(5.0) if not NOW - 1800 <= p.ts < NOW - 600]  # 20-minute hole
    row = extract(points, NOW)
    assert f(row, "gap_rise_30m") == pytest.approx(20 / 30, abs=1.1 / 30)
    assert f(row, "gap_rise_5m") == 0.0
    assert f(row, "cpu_util_mean_30m") == pytest.approx(0.4, abs=1e-5)  # the samples that exist
    # a host sampled every 2 minutes has half its minutes empty: normal for it, no rise
    sparse = extract(series(120.0, start_jitter=1.0), NOW)
    assert f(sparse, "gap_frac_2h") == pytest.approx(0.5, abs=0.02)
    assert abs(f(sparse, "gap_rise_30m")) < 0.05
    empty = extract([], NOW)
    assert f(empty, "gap_frac_2h") == 1.0
    assert math.isnan(f(empty, "cpu_util_mean_5m")) and math.isnan(f(empty, "cpu_util_shift_5m"))


def test_missing_fields_are_nan_levels_and_missing_fractions() -> None:
    points = [
        point(
            p.ts,
            p.cpu_util,
            psi_cpu_some=None,
            psi_mem_some=None,
            psi_mem_full=None,
            psi_io_some=None,
            psi_io_full=None,
            disk_bps=None if i % 4 == 0 else 1e7,
        )
        for i, p in enumerate(series(5.0))
    ]
    row = extract(points, NOW)
    assert math.isnan(f(row, "psi_mem_some_mean_30m")) and math.isnan(f(row, "psi_io_full_trend_30m"))
    assert f(row, "psi_cpu_some_missing_frac_30m") == 1.0
    assert f(row, "log_disk_bps_missing_frac_30m") == pytest.approx(0.25, abs=0.01)
    assert f(row, "log_disk_bps_shift_30m") == pytest.approx(0.0, abs=1e-3)
    assert f(row, "cpu_util_missing_frac_30m") == 0.0
    # NaN and inf readings count as missing, not as numbers
    bad = [point(p.ts, float("nan") if i % 2 else float("inf")) for i, p in enumerate(series(60.0))]
    assert math.isnan(f(extract(bad, NOW), "cpu_util_mean_2h"))


def test_announcements_are_seen_not_counted() -> None:
    points = series(5.0)
    points[-1] = point(points[-1].ts, drain_notice=1)
    points[-300] = point(points[-300].ts, maintenance=2)  # 25 min ago
    points[-1300] = point(points[-1300].ts, hw_errors=3)  # ~108 min ago
    points[-1400] = point(points[-1400].ts, hw_errors=-5)  # nonsense counts are ignored
    row = extract(points, NOW)
    assert f(row, "drain_notice_seen_30m") == 1 and f(row, "drain_notice_seconds_since") == 0
    assert f(row, "announcement_seen_5m") == 1 and f(row, "announcement_seconds_since") == 0
    assert f(row, "maintenance_seen_30m") == 1 and 1440 <= f(row, "maintenance_seconds_since") <= 1560
    assert f(row, "preemption_signal_seen_2h") == 0 and f(row, "preemption_signal_seconds_since") == 7200
    assert f(row, "hw_errors_seen_30m") == 0 and f(row, "hw_errors_log_rate_2h") == pytest.approx(math.log1p(1.5))
    assert f(row, "oom_kills_seconds_since") == 7200.0
    # the same maintenance announced once or every minute for 25 minutes: the same features
    chatty = series(5.0)
    chatty[-1] = point(chatty[-1].ts, drain_notice=1)
    for k in range(300, 12, -12):
        chatty[-k] = point(chatty[-k].ts, maintenance=1)
    repeated = extract(chatty, NOW)
    for name in ("maintenance_seen_30m", "maintenance_seen_2h", "announcement_seen_30m", "drain_notice_seen_30m"):
        assert f(repeated, name) == f(row, name), name
    assert "maintenance_count_30m" not in FEATURE_NAMES


def test_points_after_now_and_older_than_the_window_are_ignored() -> None:
    base = series(5.0)
    noisy = [point(NOW + 30, cpu=1.0, drain_notice=5), point(NOW - 3 * 3600, cpu=1.0, maintenance=1), *base]
    np.testing.assert_array_equal(extract(noisy, NOW), extract(base, NOW))


def test_host_history_matches_the_list_path_out_of_order_and_across_wraps() -> None:
    rng = np.random.default_rng(5)
    points = [
        point(NOW - 5 * 3600 + i * 7.0, float(rng.random()), hw_errors=int(rng.random() < 0.01))
        for i in range(int(5 * 3600 / 7))
    ]  # 5 h: the ring wraps more than twice
    history = HostHistory()
    shuffled = points[:]
    # late points inside the window arrive out of order, within chunks of 50
    for i in range(0, len(shuffled), 50):
        chunk = shuffled[i : i + 50]
        rng.shuffle(chunk)  # type: ignore[arg-type]
        history.extend(chunk)
    history.append(point(NOW - 4 * 3600, cpu=1.0))  # far too old now: dropped
    for now in (NOW, NOW + 600, NOW + 9000):
        expected, got = extract(points, now), extract(history, now)
        assert np.array_equal(np.isnan(expected), np.isnan(got))
        # float32 sums in another order: a trend near 0 (log_disk_bps_trend_30m) is a difference of sums
        # of ~250 log values near 16 (1e7 B/s), so float32's rounding leaves ~1e-4 (numpy 2.4's summation: 1.2e-4)
        np.testing.assert_allclose(got, expected, rtol=2e-4, atol=5e-4)
    batch = extract_batch({"a": history, "b": points}, NOW)
    np.testing.assert_allclose(batch[0], batch[1], rtol=2e-4, atol=1e-4)


def test_training_rows_equal_serving_rows() -> None:
    rng = np.random.default_rng(9)
    ts = np.sort(NOW - 10_000 + np.cumsum(rng.uniform(3, 9, 1500)))
    points = [
        point(
            t,
            float(rng.random()),
            disk_bps=None if rng.random() < 0.1 else float(rng.random() * 1e8),
            oom_kills=int(rng.random() < 0.02),
        )
        for t in ts
    ]
    trace = HostTrace.from_points("h", points[::-1], drains=[float(ts[-1]) + 100])
    times = evaluation_times(trace, 300.0)
    assert times.size > 10
    rows = trace_features(trace, times)
    for i in (0, times.size // 2, times.size - 1):
        serving = extract([p for p in points if p.ts <= times[i]], float(times[i]))
        assert np.array_equal(np.isnan(rows[i]), np.isnan(serving))
        np.testing.assert_allclose(rows[i], serving, rtol=2e-4, atol=1e-4)


def test_drain_labels() -> None:
    times = np.array([0.0, 100.0, 1000.0, 2000.0, 5000.0])
    labels = drain_labels(times, np.array([1900.0, 2000.0]), 1800.0)
    assert labels.tolist() == [0, 1, 1, 0, 0]  # (t, t + H]: a drain at t itself is already past
    assert drain_labels(times, np.array([]), 1800.0).tolist() == [0] * 5


def test_a_fleet_is_extracted_in_slices_exactly_as_in_one_batch() -> None:
    from coordinator.features import EXTRACT_CHUNK, _stack_histories, features_from_windows

    rng = np.random.default_rng(3)
    fleet = []
    for i in range(2 * EXTRACT_CHUNK + 3):  # two whole slices and a part of one
        level, period = rng.uniform(0.1, 0.9), (5.0, 10.0, 30.0)[i % 3]
        points = series(period, span=rng.uniform(600.0, 7200.0), cpu=lambda t, lv=level: lv + 0.1 * math.sin(t / 300))
        if i % 7 == 0:
            points.append(point(NOW - 60.0, hw_errors=2))
        fleet.append(HostHistory.from_points(points))
    rings, ages = _stack_histories(fleet, NOW)
    whole = features_from_windows(rings, NOW, ages)  # every host stacked at once
    sliced = extract_batch(fleet, NOW)
    assert sliced.shape == (len(fleet), N_FEATURES)
    np.testing.assert_array_equal(sliced, whole)  # bit for bit, NaNs in the same places
