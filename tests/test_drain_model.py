"""The drain model pipeline: deterministic generator, ONNX export that matches scikit-learn, and the
shipped model telling a host with a drain precursor from a quiet one."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest

from coordinator.features import FEATURES_VERSION, N_FEATURES, TelemetryPoint, extract
from coordinator.predictor import DrainPredictor
from models.drain.generate import FAMILIES, PREEMPTION_BUCKETS, FleetSpec, generate_fleet, generate_host
from models.drain.train import (
    TrainConfig,
    alert_starts,
    check_onnx,
    concat,
    false_alert_count,
    fit,
    fit_calibration,
    metadata,
    ort_probabilities,
    to_onnx,
    training_rows,
)

SHIPPED = Path(__file__).resolve().parent.parent / "models" / "drain" / "drain.onnx"
TINY = TrainConfig(max_iter=25, threads=1, train_stride_s=600.0)
SMALL_FLEET = FleetSpec(seed=11, n_hosts=24, days=3.0, maintenance_per_month=20.0)


def test_generator_is_deterministic_and_seeded() -> None:
    a, b = generate_host(SMALL_FLEET, 3), generate_host(SMALL_FLEET, 3)
    for name in ("ts", "values", "events", "drains"):
        np.testing.assert_array_equal(getattr(a.trace, name), getattr(b.trace, name))
    other = generate_host(replace(SMALL_FLEET, seed=12), 3)
    assert not np.array_equal(a.trace.values[:100], other.trace.values[:100], equal_nan=True)
    # a host does not depend on how many hosts the fleet has
    np.testing.assert_array_equal(
        generate_host(replace(SMALL_FLEET, n_hosts=2), 1).trace.ts, generate_host(SMALL_FLEET, 1).trace.ts
    )


def test_generator_uses_the_public_preemption_buckets_and_labels_drains() -> None:
    hosts = list(generate_fleet(SMALL_FLEET))
    rates = np.array([h.preemption_rate for h in hosts])
    assert rates.min() >= 0.0 and rates.max() <= max(b[2] for b in PREEMPTION_BUCKETS)
    drains = [k for h in hosts for k in h.drain_kinds]
    assert drains.count("maintenance") > 10
    for h in hosts:
        assert len(h.drain_kinds) == h.trace.drains.size
        for d in h.trace.drains:  # a drained host stops reporting right after the drain
            after = h.trace.ts[(h.trace.ts > d) & (h.trace.ts < d + 600)]
            assert after.size == 0


def test_every_family_is_seeded_and_differs_where_it_says() -> None:
    by_family = {}
    for name in FAMILIES:
        spec = replace(SMALL_FLEET, family=name, n_hosts=6)
        a, b = generate_host(spec, 2), generate_host(spec, 2)
        np.testing.assert_array_equal(a.trace.values, b.trace.values)
        hosts = list(generate_fleet(spec))
        assert all(len(h.precursor) == h.trace.drains.size == len(h.drain_kinds) for h in hosts)
        by_family[name] = hosts
    # sampling periods differ: chatty samples every 15-30 s, subtle every 1-2 minutes
    period = {n: float(np.median(np.diff(hs[0].trace.ts))) for n, hs in by_family.items()}
    assert period["chatty"] < 31 and period["subtle"] > 59
    # only some families state the drain time (facts), and those notices precede their drains
    stated = [h.trace.notices for h in by_family["cloud"] if h.trace.notices.size]
    assert stated and all(np.all(n[:, 0] < n[:, 1]) for n in stated)
    assert all(h.trace.notices.size == 0 for h in by_family["classic"])


def test_calibration_is_monotone_and_alerts_have_hysteresis() -> None:
    rng = np.random.default_rng(2)
    raw = rng.random(5000).astype(np.float32)
    y = (rng.random(5000) < raw**3).astype(np.int8)
    cal = fit_calibration(raw, y, np.ones(5000))
    out = cal(np.sort(raw))
    assert np.all(np.diff(out) >= 0) and out.min() >= 0 and out.max() <= 1
    assert abs(float(cal(raw).mean()) - float(y.mean())) < 0.01  # calibrated on average
    assert cal.table().count(":") == cal.x.size
    p = np.array([0.1, 0.6, 0.55, 0.45, 0.2, 0.7, 0.1, 0.9], np.float32)
    first = np.zeros(8, bool)
    first[[0, 6]] = True  # two hosts
    # on at 0.6, held at 0.55 and 0.45 (>= 0.5 - 0.1), off at 0.2, on again at 0.7; a new host at 6
    assert np.flatnonzero(alert_starts(p, first, 0.5, 0.1)).tolist() == [1, 5, 7]


def test_an_alert_is_false_only_if_no_drain_follows_while_it_lasts() -> None:
    # Labels: 1 where a drain falls within the horizon. Alert 1 (rows 1-3) begins more than a horizon
    # before its drain but lasts into the labelled rows: true. Alert 2 (row 5) ends with no drain: false.
    # Alert 3 (row 7, a new host) is labelled at once: true.
    p = np.array([0.1, 0.6, 0.55, 0.9, 0.2, 0.7, 0.1, 0.9], np.float32)
    y = np.array([0, 0, 0, 1, 0, 0, 0, 1], np.int8)
    first = np.zeros(8, bool)
    first[[0, 6]] = True
    assert false_alert_count(p, first, y, 0.5, 0.1) == 1
    assert false_alert_count(p, first, np.zeros(8, np.int8), 0.5, 0.1) == 3
    assert false_alert_count(p, first, y, 0.95, 0.1) == 0


@pytest.fixture(scope="module")
def tiny_model() -> tuple[object, np.ndarray]:
    hosts = list(generate_fleet(SMALL_FLEET))
    data = concat([training_rows(h.trace, -np.inf, np.inf, TINY) for h in hosts])
    return fit(data, TINY), data.X


def test_onnxruntime_matches_sklearn(tiny_model: tuple[object, np.ndarray]) -> None:
    model, X = tiny_model
    onnx_bytes = to_onnx(model, metadata(TINY, 0.5, "test"))
    X = X[:5000].copy()
    X[::7, ::3] = np.nan  # missing readings take the learned NaN branch in both
    diff = check_onnx(model, onnx_bytes, X)
    assert diff < 1e-4
    p_ort = ort_probabilities(onnx_bytes, X)
    p_skl = model.predict_proba(X)[:, 1]  # type: ignore[attr-defined]
    assert np.abs(p_ort - p_skl).max() < 1e-4 and p_ort.std() > 0.01
    assert to_onnx(model, metadata(TINY, 0.5, "test")) == onnx_bytes  # reproducible bytes
    meta = {p.key: p.value for p in onnx.load_from_string(onnx_bytes).metadata_props}
    assert meta["features_version"] == FEATURES_VERSION and meta["n_features"] == str(N_FEATURES)


def _host(now: float, precursor: bool, repeats: int = 1, size: float = 1.0) -> list[TelemetryPoint]:
    """Two hours every 5 s of a steady host; with `precursor`, the last 25 minutes look like a
    maintenance drain on its way: notices (`repeats` times), cordon load and evacuation traffic."""
    rng = np.random.default_rng(4)
    announce = {1440 - 300 + k * (240 // max(repeats, 1)) for k in range(repeats)} if precursor else set()
    points = []
    for i in range(1440):
        ts = now - 7200 + i * 5
        ramp = max(0.0, (ts - (now - 1500)) / 1500) if precursor else 0.0
        noise = float(rng.normal(0, 0.02))
        points.append(
            TelemetryPoint(
                ts=ts,
                cpu_util=0.35 + 0.25 * ramp + noise,
                load1=0.4 + 0.3 * ramp + noise,
                mem_available_frac=0.55 + noise / 4,
                psi_cpu_some=0.5,
                psi_mem_some=0.2,
                psi_mem_full=0.05,
                psi_io_some=2.0 + 3 * ramp + noise,
                psi_io_full=0.8,
                disk_bps=size * 3e7 * (1 + 3 * ramp) * (1 + noise),
                net_bps=size * 1e7 * (1 + 3 * ramp) * (1 + noise),
                maintenance=int(i in announce),
                drain_notice=int(precursor and i == 1440 - 120),  # 10 min ago
            )
        )
    return points


def test_shipped_model_flags_a_drain_precursor_however_announced_and_whatever_the_size() -> None:
    model = DrainPredictor(SHIPPED)
    assert model.info.features_version == FEATURES_VERSION and model.horizon == 1800.0
    now = 1_760_000_000.0
    hosts = {
        "draining": _host(now, True),
        "draining-chatty": _host(now, True, repeats=12),  # the same drain announced every 20 s
        "draining-big": _host(now, True, size=300.0),
        "quiet": _host(now, False),
        "quiet-big": _host(now, False, size=300.0),
    }
    scores = model.score(hosts, now)
    for name in ("draining", "draining-chatty", "draining-big"):
        assert scores[name] > model.threshold > scores["quiet"], (name, scores)
        assert scores[name] > 10 * max(scores["quiet"], scores["quiet-big"]), (name, scores)
    explained = model.explain({"draining-chatty": hosts["draining-chatty"]}, now)["draining-chatty"]
    assert explained and all(c.delta > 0 for c in explained)


def test_shipped_card_matches_the_model() -> None:
    model = DrainPredictor(SHIPPED)
    card = json.loads(SHIPPED.with_name("card.json").read_text())
    assert card["model_version"] == model.version
    assert card["threshold"] == pytest.approx(model.threshold, abs=1e-6)
    assert card["features_version"] == FEATURES_VERSION
    assert card["onnx"]["max_abs_diff_vs_sklearn"] < 1e-4
    assert model.info.metadata["calibration"] == card["calibration"]["table"]
    assert set(card["held_out_family"]) == set(FAMILIES) == set(card["in_distribution"])
    for figures in (*card["held_out_family"].values(), *card["in_distribution"].values()):
        for key in ("pr_auc", "roc_auc", "brier", "precision", "recall", "flagged_share"):
            assert 0.0 <= figures[key] <= 1.0, key
        assert figures["false_alerts_per_100_host_days"] >= 0 and figures["reliability"]
    assert extract(_host(1e9, False), 1e9).shape == (card["n_features"],)
