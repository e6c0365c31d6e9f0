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
from models.drain.generate import PREEMPTION_BUCKETS, FleetSpec, generate_fleet, generate_host
from models.drain.train import TrainConfig, check_onnx, concat, fit, metadata, ort_probabilities, to_onnx, training_rows

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


def _host(now: float, precursor: bool) -> list[TelemetryPoint]:
    """Two hours every 5 s of a steady host; with `precursor`, the last 25 minutes look like a
    maintenance drain on its way: notice, drain notice, cordon load and evacuation traffic."""
    points = []
    for i in range(1440):
        ts = now - 7200 + i * 5
        ramp = max(0.0, (ts - (now - 1500)) / 1500) if precursor else 0.0
        points.append(
            TelemetryPoint(
                ts=ts,
                cpu_util=0.35 + 0.25 * ramp,
                load1=0.4 + 0.3 * ramp,
                mem_available_frac=0.55,
                psi_cpu_some=0.5,
                psi_mem_some=0.2,
                psi_mem_full=0.05,
                psi_io_some=2.0 + 3 * ramp,
                psi_io_full=0.8,
                disk_bps=3e7 * (1 + 3 * ramp),
                net_bps=1e7 * (1 + 3 * ramp),
                maintenance=int(precursor and i == 1440 - 300),  # 25 min ago
                drain_notice=int(precursor and i == 1440 - 120),  # 10 min ago
            )
        )
    return points


def test_shipped_model_flags_a_drain_precursor() -> None:
    model = DrainPredictor(SHIPPED)
    assert model.info.features_version == FEATURES_VERSION and model.horizon == 1800.0
    now = 1_760_000_000.0
    scores = model.score({"draining": _host(now, True), "quiet": _host(now, False)}, now)
    assert scores["draining"] > model.threshold > scores["quiet"]
    assert scores["draining"] > 10 * scores["quiet"]


def test_shipped_card_matches_the_model() -> None:
    model = DrainPredictor(SHIPPED)
    card = json.loads(SHIPPED.with_name("card.json").read_text())
    assert card["model_version"] == model.version
    assert card["threshold"] == pytest.approx(model.threshold, abs=1e-6)
    assert card["features_version"] == FEATURES_VERSION
    assert card["onnx"]["max_abs_diff_vs_sklearn"] < 1e-4
    for key in ("pr_auc", "roc_auc", "brier", "precision", "recall"):
        assert 0.0 <= card["test"][key] <= 1.0
    assert extract(_host(1e9, False), 1e9).shape == (card["n_features"],)
