"""DrainPredictor and ModelRegistry against real onnxruntime: load errors keep the previous model,
rollback, candidate-vs-current gating both ways, and retraining in a child process."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from sklearn.metrics import average_precision_score

from coordinator.features import HostHistory
from coordinator.predictor import (
    DrainPredictor,
    Holdout,
    ModelLoadError,
    ModelRegistry,
    RegistryError,
    RetrainError,
    average_precision,
    retrain,
)
from models.drain.generate import FleetSpec, generate_fleet
from models.drain.train import Dataset, TrainConfig, concat, fit, metadata, to_onnx, training_rows

CFG = TrainConfig(max_iter=30, threads=1, train_stride_s=600.0, model_version="test-good")
FLEET = FleetSpec(seed=21, n_hosts=24, days=3.0, maintenance_per_month=20.0)
HOLDOUT_FLEET = replace(FLEET, seed=22, n_hosts=16)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A good model, a useless one (trained on shuffled labels) and a holdout fleet's traces."""
    out = tmp_path_factory.mktemp("models")
    data = concat([training_rows(h.trace, -np.inf, np.inf, CFG) for h in generate_fleet(FLEET)])
    good = fit(data, CFG)
    shuffled = Dataset(data.X, np.random.default_rng(0).permutation(data.y), data.w)
    bad_cfg = replace(CFG, max_iter=5, model_version="test-bad")
    bad = fit(shuffled, bad_cfg)
    paths = {"good": out / "good.onnx", "bad": out / "bad.onnx"}
    paths["good"].write_bytes(to_onnx(good, metadata(CFG, 0.3, "test")))
    paths["bad"].write_bytes(to_onnx(bad, metadata(bad_cfg, 0.3, "test")))
    return paths


@pytest.fixture(scope="module")
def holdout() -> Holdout:
    traces = [h.trace for h in generate_fleet(HOLDOUT_FLEET)]
    return Holdout.from_traces(traces, HOLDOUT_FLEET.start, HOLDOUT_FLEET.end, CFG.horizon_s, stride=300)


def _with_metadata(src: Path, dst: Path, **changes: str | None) -> Path:
    model = onnx.load(str(src))
    props = {p.key: p.value for p in model.metadata_props}
    for key, value in changes.items():
        if value is None:
            props.pop(key, None)
        else:
            props[key] = value
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(dst))
    return dst


def _bad_files(good: Path, tmp: Path) -> dict[str, Path]:
    data = good.read_bytes()
    (tmp / "truncated.onnx").write_bytes(data[: len(data) // 2])
    (tmp / "garbage.onnx").write_bytes(np.random.default_rng(1).bytes(4096))
    (tmp / "empty.onnx").write_bytes(b"")
    return {
        "truncated": tmp / "truncated.onnx",
        "garbage": tmp / "garbage.onnx",
        "empty": tmp / "empty.onnx",
        "missing": tmp / "does-not-exist.onnx",
        "directory": tmp,
        "features_version": _with_metadata(good, tmp / "v0.onnx", features_version="drain-features/0"),
        "n_features": _with_metadata(good, tmp / "nf.onnx", n_features="12"),
        "no_metadata": _with_metadata(good, tmp / "nometa.onnx", threshold=None),
        "bad_threshold": _with_metadata(good, tmp / "thr.onnx", threshold="1.5"),
        "bad_horizon": _with_metadata(good, tmp / "hz.onnx", horizon_s="soon"),
        "bad_calibration": _with_metadata(good, tmp / "cal.onnx", calibration="0:0,0.5:0.9,0.4:1"),
        "calibration_range": _with_metadata(good, tmp / "cal2.onnx", calibration="0:0,1:1.5"),
        "bad_reference": _with_metadata(good, tmp / "ref.onnx", feature_reference="1,2,3"),
    }


def test_loads_and_reports_its_metadata(models: dict[str, Path]) -> None:
    model = DrainPredictor.load(models["good"])
    assert (model.version, model.horizon, model.threshold) == ("test-good", 1800.0, pytest.approx(0.3))
    assert len(model.info.sha256) == 64


def test_every_broken_model_is_a_model_load_error_and_the_registry_keeps_its_model(
    models: dict[str, Path], tmp_path: Path
) -> None:
    registry = ModelRegistry()
    registry.activate(models["good"])
    for name, path in _bad_files(models["good"], tmp_path).items():
        with pytest.raises(ModelLoadError) as err:
            registry.activate(path)
        assert str(path) in str(err.value), name
        assert registry.active is not None and registry.active.version == "test-good", name
        assert registry.previous is None, name
    with pytest.raises(ModelLoadError, match="drain-features/0"):
        DrainPredictor(tmp_path / "v0.onnx")


def test_the_calibration_table_maps_the_raw_output(models: dict[str, Path], tmp_path: Path, holdout: Holdout) -> None:
    raw = DrainPredictor(models["good"])
    table = "0:0,0.2:0.01,0.6:0.3,1:1"
    calibrated = DrainPredictor(_with_metadata(models["good"], tmp_path / "c.onnx", calibration=table))
    X = holdout.X[:500]
    expected = np.interp(raw.predict(X), [0, 0.2, 0.6, 1], [0, 0.01, 0.3, 1])
    np.testing.assert_allclose(calibrated.predict(X), expected, rtol=1e-5, atol=1e-7)


def test_explain_names_the_features_that_raise_the_probability(models: dict[str, Path], holdout: Holdout) -> None:
    model = DrainPredictor(models["good"])
    hosts = list(generate_fleet(replace(HOLDOUT_FLEET, n_hosts=4)))
    now = float(hosts[0].trace.drains[0]) - 300 if hosts[0].trace.drains.size else float(hosts[0].trace.ts[-1])
    history = HostHistory()
    history.add_columns(hosts[0].trace.ts, hosts[0].trace.values, hosts[0].trace.events)
    (top,) = model.explain({"h": history}, now, top=3).values()
    assert len(top) <= 3 and all(c.delta > 0 for c in top)
    assert [c.delta for c in top] == sorted((c.delta for c in top), reverse=True)


def test_activate_and_rollback(models: dict[str, Path]) -> None:
    registry = ModelRegistry()
    with pytest.raises(RegistryError):
        registry.rollback()
    with pytest.raises(RegistryError):
        registry.score({}, 0.0)
    registry.activate(models["good"])
    registry.activate(models["bad"])
    assert registry.active is not None and registry.active.version == "test-bad"
    assert registry.rollback().version == "test-good"
    assert registry.previous is not None and registry.previous.version == "test-bad"
    assert registry.rollback().version == "test-bad"  # and forward again


def test_score_is_one_dict_per_host(models: dict[str, Path]) -> None:
    registry = ModelRegistry()
    registry.activate(models["good"])
    hosts = list(generate_fleet(replace(HOLDOUT_FLEET, n_hosts=3)))
    now = float(hosts[0].trace.ts[-1])
    histories = {h.trace.host: HostHistory() for h in hosts}
    for h in hosts:
        histories[h.trace.host].add_columns(h.trace.ts, h.trace.values, h.trace.events)
    scores = registry.score({**histories, "new-host": []}, now)
    assert set(scores) == {*histories, "new-host"}
    assert all(0.0 <= p <= 1.0 for p in scores.values())


def test_candidate_gating_both_ways(models: dict[str, Path], holdout: Holdout) -> None:
    assert holdout.y.sum() > 5
    registry = ModelRegistry()
    registry.activate(models["bad"])
    better = registry.consider(models["good"], holdout)
    assert better.activated, better.reason
    assert better.candidate is not None and better.current is not None
    assert better.candidate.pr_auc > better.current.pr_auc
    assert registry.active is not None and registry.active.version == "test-good"
    assert registry.previous is not None and registry.previous.version == "test-bad"

    worse = registry.consider(models["bad"], holdout)
    assert not worse.activated and "PR-AUC" in worse.reason
    assert registry.active.version == "test-good"

    same = registry.consider(models["good"], holdout)  # a tie is not a win
    assert not same.activated


def test_a_candidate_must_also_win_on_hosts_it_never_saw(models: dict[str, Path], holdout: Holdout) -> None:
    registry = ModelRegistry()
    registry.activate(models["bad"])
    # labels turned around: the good model ranks the wrong hosts first there, the useless one does not
    contrary = Holdout(holdout.X, (1 - holdout.y).astype(np.int8), holdout.horizon)
    refused = registry.consider(models["good"], holdout, contrary)
    assert not refused.activated and refused.reason.startswith("on hosts it never saw, PR-AUC")
    quiet = Holdout(holdout.X[:0], holdout.y[:0], holdout.horizon)
    taken = registry.consider(models["good"], holdout, quiet)
    assert taken.activated and taken.reason.endswith("no drains on the hosts it never saw to compare on")
    registry.rollback()
    both = registry.consider(models["good"], holdout, holdout)
    assert both.activated and "on hosts it never saw" in both.reason


def test_candidate_that_does_not_load_or_has_nothing_to_compare_on(
    models: dict[str, Path], holdout: Holdout, tmp_path: Path
) -> None:
    registry = ModelRegistry()
    registry.activate(models["bad"])
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not onnx")
    decision = registry.consider(broken, holdout)
    assert not decision.activated and "does not load" in decision.reason
    quiet = Holdout(holdout.X[holdout.y == 0], holdout.y[holdout.y == 0], holdout.horizon)
    assert not registry.consider(models["good"], quiet).activated
    assert registry.active is not None and registry.active.version == "test-bad"


def test_average_precision_matches_sklearn() -> None:
    rng = np.random.default_rng(4)
    y = (rng.random(2000) < 0.05).astype(np.int8)
    p = np.round(rng.random(2000) * 0.5 + 0.4 * y, 2)  # rounded: many ties
    assert average_precision(y, p) == pytest.approx(average_precision_score(y, p), abs=1e-12)


def test_retrain_on_recorded_traces_in_a_child_process(
    models: dict[str, Path], holdout: Holdout, tmp_path: Path
) -> None:
    traces = [h.trace for h in generate_fleet(replace(FLEET, seed=23, n_hosts=12, days=2.0))]
    out = retrain(
        traces,
        tmp_path / "candidate.onnx",
        seed=3,
        model_version="retrained-test",
        extra_args=["--max-iter", "20"],
        timeout=240,
    )
    model = DrainPredictor(out)
    assert model.version == "retrained-test" and model.info.data_version.startswith("recorded hosts=12")
    assert out.with_suffix(".card.json").is_file()
    registry = ModelRegistry()
    registry.activate(models["bad"])
    assert registry.consider(out, holdout).activated  # trained on real drains: beats shuffled labels


def test_failed_retraining_is_a_retrain_error(tmp_path: Path) -> None:
    with pytest.raises(RetrainError, match="no recorded samples"):
        retrain([], tmp_path / "candidate.onnx", timeout=120)
    assert not (tmp_path / "candidate.onnx").exists()


def test_retraining_without_the_train_extra_says_so(tmp_path: Path) -> None:
    """A Python without the training code (no `ferryman[train]`) fails the round with that reason."""
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    traces = [h.trace for h in generate_fleet(replace(FLEET, seed=23, n_hosts=2, days=1.0))]
    with pytest.raises(RetrainError, match=r"ferryman\[train\]"):
        retrain(traces, tmp_path / "candidate.onnx", python=str(bare / "bin" / "python"), timeout=60)
    assert not (tmp_path / "candidate.onnx").exists()
