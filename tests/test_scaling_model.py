"""The scaling model pipeline (models/scaling/): a seeded generator with the documented lags, causal
features (a serving row is a training row), a reproducible training run, the shipped ONNX served
through onnxruntime and better than the naive and reactive baselines on traces it never saw, and the
simulation the card's figures come from."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from coordinator.predictor import ModelLoadError
from coordinator.scaling.features import FEATURE_NAMES, N_FEATURES, feature_matrix, first_second, target
from coordinator.scaling.model import ScalingModel
from coordinator.scaling.series import METRICS
from models.onnx_export import regressor_to_onnx
from models.scaling.evaluate import SimConfig, simulate
from models.scaling.generate import HELD_OUT_REGIME, REGIMES, TraceSpec, generate, main, with_lags
from models.scaling.train import TrainConfig, train
from models.trees import fit_boosted_regressor

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "models" / "scaling" / "scaling.onnx"
CARD = ROOT / "models" / "scaling" / "card.json"


def test_the_generator_is_seeded_and_downstream_follows_upstream_by_the_lag(tmp_path: Path) -> None:
    spec = TraceSpec(REGIMES["bursty"], 11, duration_s=1800)
    a, b = generate(spec), generate(spec)
    for name in "ABC":
        for m in METRICS:
            assert np.array_equal(a.components[name].metric(m), b.components[name].metric(m))
    assert not np.array_equal(generate(replace(spec, seed=12)).components["A"].rate, a.components["A"].rate)
    # B's mean arrivals are A's a lag earlier times the fan-out (the documented process)
    lag = REGIMES["bursty"].lags_s[0]
    fanout = REGIMES["bursty"].fanout[0]
    ratio = a.components["B"].rate[lag + 1 :].sum() / a.components["A"].rate[: -lag - 1].sum()
    assert ratio == pytest.approx(fanout, rel=0.03)
    assert [e[2] for e in a.edges] == list(REGIMES["bursty"].lags_s)
    out = tmp_path / "t.json"
    assert main(["--regime", "flash", "--seed", "3", "--duration", "600", "--lags", "9", "4", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["edges"] == [["A", "B", 9], ["B", "C", 4]] and len(data["components"]["C"]["cpu"]) == 600
    with pytest.raises(SystemExit):
        main(["--lags", "1", "4", "--out", str(out)])
    with pytest.raises(ValueError, match="quarter of the trace"):
        generate(TraceSpec(with_lags(REGIMES["diurnal"], (300, 3)), 1, duration_s=600))


def test_features_only_look_back() -> None:
    trace = generate(TraceSpec(REGIMES["diurnal"], 4, duration_s=900))
    up, down = trace.components["A"], trace.components["B"]
    times = np.array([first_second(20), 400, 700], np.int64)
    full, scale = feature_matrix(up, down, 20, 15, times)
    assert full.shape == (3, N_FEATURES) and np.all(np.isfinite(full))
    for i, t in enumerate(times):  # what serving sees at second t: the series up to t
        cut, cut_scale = feature_matrix(up.window(0, t + 1), down.window(0, t + 1), 20, 15, times[i : i + 1])
        assert np.array_equal(cut[0], full[i]) and cut_scale[0] == scale[i]
    with pytest.raises(ValueError, match="outside"):
        feature_matrix(up, down, 20, 15, np.array([10]))
    with pytest.raises(ValueError, match="end of the series"):
        target(down, 15, np.array([890]))


def test_the_shipped_model_beats_naive_and_reactive_on_unseen_traces() -> None:
    model = ScalingModel.load(SHIPPED)
    card = json.loads(CARD.read_text())
    assert model.info.horizon_s == card["horizon_s"] and model.info.prediction_error == card["prediction_error"]
    trace = generate(TraceSpec(REGIMES[HELD_OUT_REGIME], 777, duration_s=2400))
    for up, down, lag in trace.edges:
        u, d = trace.components[up], trace.components[down]
        times = np.arange(first_second(lag), len(d) - model.info.horizon_s - 3, dtype=np.int64)
        need = target(d, model.info.horizon_s, times)
        predicted = model.predict_need(u, d, lag, times)
        naive = d.cpu[times]
        reactive = np.array([d.cpu[t - 14 : t + 1].mean() for t in times])
        mae = float(np.mean(np.abs(predicted - need)))
        assert mae < 0.6 * float(np.mean(np.abs(naive - need))), down
        assert mae < 0.6 * float(np.mean(np.abs(reactive - need))), down
    sim = card["simulation"]["held_out"]
    assert sim["totals"]["predictive"]["violation_s"] < sim["totals"]["reactive"]["violation_s"]


def test_the_loader_refuses_what_is_not_a_scaling_model(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not onnx")
    with pytest.raises(ModelLoadError, match="not a loadable ONNX model"):
        ScalingModel.load(junk)
    with pytest.raises(ModelLoadError, match="metadata lacks"):
        ScalingModel.load(ROOT / "models" / "prefetch" / "prefetch.onnx")  # a classifier
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, N_FEATURES)).astype(np.float32)
    tree = fit_boosted_regressor(
        X, X[:, 0].astype(np.float64), max_iter=3, learning_rate=0.1, max_leaf_nodes=4, min_samples_leaf=5,
        l2_regularization=0.0, seed=1, threads=1,
    )  # fmt: skip
    meta = {
        "model_version": "t",
        "features_version": "scaling-features/0",
        "n_features": str(N_FEATURES),
        "feature_names": ",".join(FEATURE_NAMES),
        "horizon_s": "15",
        "prediction_error": "0.1",
    }
    old = tmp_path / "old.onnx"
    old.write_bytes(regressor_to_onnx(tree, N_FEATURES, "g", "d", meta))
    with pytest.raises(ModelLoadError, match="trained on features 'scaling-features/0'"):
        ScalingModel.load(old)
    bad = tmp_path / "bad.onnx"
    meta = {**meta, "features_version": "scaling-features/1", "horizon_s": "-5"}
    bad.write_bytes(regressor_to_onnx(tree, N_FEATURES, "g", "d", meta))
    with pytest.raises(ModelLoadError, match="out of range"):
        ScalingModel.load(bad)


def test_training_is_reproducible_and_writes_its_figures() -> None:
    tiny = replace(
        TrainConfig(seed=3),
        duration_s=1200,
        train_seeds=1,
        held_out_seeds=1,
        discovery_s=600,
        max_iter=10,
        step_s=4,
        sim=replace(SimConfig(), decide_every_s=10),
    )
    a, b = train(tiny, lambda _: None), train(tiny, lambda _: None)
    assert a.onnx == b.onnx
    assert a.card["prediction"] == b.card["prediction"] and a.card["simulation"] == b.card["simulation"]
    held = a.card["lags"]["held_out"][0]
    assert abs(held["B"]["lag_s"] - held["B"]["true_lag_s"]) <= 1
    assert set(a.card["prediction"]["held_out"]) == {"model", "naive", "reactive", "upstream"}
    assert set(a.card["simulation"]["held_out"]["totals"]) == {"predictive", "reactive"}


def test_the_simulation_rewards_knowing_the_need_ahead() -> None:
    trace = generate(TraceSpec(REGIMES["bursty"], 21, duration_s=2400))
    up, down = trace.components["A"], trace.components["B"]
    lag, horizon = trace.edges[0][2], 15
    truth = np.asarray(down.cpu)

    def oracle(_u: object, _d: object, _lag: int, t: int) -> float:
        return float(truth[t + horizon - 2 : t + horizon + 3].max())

    cfg = SimConfig()
    predictive = simulate("predictive", "B", up, down, lag, horizon, cfg, oracle, 0.05)
    reactive = simulate("reactive", "B", up, down, lag, horizon, cfg)
    assert predictive.seconds == reactive.seconds > 2000
    assert predictive.violation_s < reactive.violation_s
    assert predictive.p99_latency_ms < reactive.p99_latency_ms
