"""A chain's usage prediction: its features (coordinator/chains/usage.py), the choices made from
them (coordinator/chains/prediction.py), the generator and the shipped model (models/chains/)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from coordinator.chains.manifest import Handover, Stage
from coordinator.chains.prediction import (
    Prediction,
    UsageModel,
    decide,
    history,
    model_rows,
    replan,
    serving_rate,
)
from coordinator.chains.states import ChainRecord, HandoverRecord, RunState, StageRun, State
from coordinator.chains.usage import (
    FACTOR_BOUNDS,
    FEATURE_NAMES,
    ChainRun,
    StageUsage,
    feature_row,
    rows_for,
    usage_from_output,
)
from coordinator.predictor import ModelLoadError
from models.chains.generate import REGIMES, chain_history
from models.chains.train import HELD_OUT_REGIME, history_rows, without_rates

MODEL = Path(__file__).resolve().parent.parent / "models" / "chains" / "usage.onnx"
MIB = 1 << 20


def run(usage: dict[str, tuple[float, float]], volumes: dict[str, float] | None = None) -> ChainRun:
    return ChainRun({k: StageUsage(c, m) for k, (c, m) in usage.items()}, volumes or {})


def test_a_row_is_relative_to_the_targets_last_run() -> None:
    row, scale = feature_row("cpu_millis", [100, 200, 400], 50, 100, 10, 30)  # type: ignore[misc]
    assert scale == 400
    kind, runs, mean3, trend, _spread, growth, s_over_t, volume, rate = row
    assert (kind, runs) == (0.0, 3.0)
    assert mean3 == pytest.approx(700 / 3 / 400)
    assert trend == pytest.approx(0.5)
    assert growth == pytest.approx(2.0)  # the serving stage uses twice what it did last run
    assert s_over_t == pytest.approx(50 / 400)
    assert volume == pytest.approx(3.0)
    assert math.isnan(rate)  # no request rate measured


def test_the_request_rate_is_the_serving_stages_now_over_its_last_run() -> None:
    past = [ChainRun({"a": StageUsage(100, 10), "b": StageUsage(300, 30)}, {}, {"a": 50.0})]
    rows = rows_for(past, "a", "b", StageUsage(100, 10), None, 125.0)
    assert rows["cpu_millis"][0][FEATURE_NAMES.index("rate_growth")] == pytest.approx(2.5)
    unmeasured = rows_for(past, "a", "b", StageUsage(100, 10), None, None)
    assert math.isnan(unmeasured["memory_bytes"][0][FEATURE_NAMES.index("rate_growth")])


def test_no_row_without_a_past_run_of_the_target() -> None:
    assert feature_row("memory_bytes", [], 1, 1, None, None) is None
    assert rows_for([run({"a": (10, 10)})], "a", "b", StageUsage(10, 10), None) == {}


def test_rows_for_both_resources_and_neutral_ratios_without_a_serving_measurement() -> None:
    past = [run({"a": (100, 10 * MIB), "b": (300, 30 * MIB)}, {"a": 1000.0})]
    rows = rows_for(past, "a", "b", None, None)
    assert set(rows) == {"cpu_millis", "memory_bytes"}
    assert rows["memory_bytes"][1] == 30 * MIB
    assert rows["cpu_millis"][0][5] == 1.0 and rows["cpu_millis"][0][7] == 1.0  # growth, volume: unknown


def test_the_models_factor_is_bounded() -> None:
    low, high = FACTOR_BOUNDS
    assert usage_from_output(100.0, 10) == high * 10
    assert usage_from_output(0.0, 10) == low * 10
    assert usage_from_output(float("nan"), 10) == 10


def stage(**kw: object) -> Stage:
    return Stage(name="t", handover=Handover(protocol="http_state", port=8080), image="img", **kw)  # type: ignore[arg-type]


def test_decide_prefers_the_model_then_the_manifest_then_the_resources() -> None:
    rows = {"cpu_millis": ([0.0] * (len(FEATURE_NAMES) - 1) + [math.nan], 200.0)}
    p = decide(stage(predicted_memory_bytes=64 * MIB), rows, {"cpu_millis": 1.5}, (100, 32 * MIB))
    assert p == Prediction("t", 300, 64 * MIB, "model")
    p = decide(stage(predicted_cpu_millis=250, cpu_millis=500), {}, {}, (100, 32 * MIB))
    assert p == Prediction("t", 250, 32 * MIB, "manifest")
    p = decide(stage(cpu_millis=500), {}, {}, (100, 32 * MIB))
    assert p == Prediction("t", 500, 32 * MIB, "resources")


def test_replan_when_the_prediction_moves_past_the_tolerance() -> None:
    p = Prediction("t", 1000, 100 * MIB, "model")
    held = {"stage": "t", "cpu_millis": 1050, "memory_bytes": 95 * MIB}
    assert not replan(held, p)
    assert replan({**held, "cpu_millis": 800}, p)
    assert replan({**held, "stage": "u"}, p)
    assert replan({}, p)


def test_history_reads_each_earlier_chains_peaks_and_volumes() -> None:
    def record(cid: str, created: float, peaks: dict[str, tuple[float, int]]) -> ChainRecord:
        runs = tuple(
            StageRun(stage=s, container=f"{cid}-{s}", state=RunState.REMOVED, peak_cpu_millis=c, peak_memory_bytes=m)
            for s, (c, m) in peaks.items()
        )
        handovers = (HandoverRecord("a", "b", outcome="done", state_bytes=4096),)
        return ChainRecord(
            cid, "n", {}, State.COMPLETED, "10.0.0.1", runs=runs, handovers=handovers, created_at=created
        )

    earlier = [record("n-2", 2.0, {"a": (20, 2), "b": (40, 4)}), record("n-1", 1.0, {"a": (10, 1)})]
    runs = history([*earlier, record("n-3", 3.0, {})])
    assert [r.usage["a"].cpu_millis for r in runs] == [10, 20]  # oldest first; one that measured nothing left out
    assert runs[1].usage["b"] == StageUsage(40, 4.0) and runs[1].volume_bytes == {"b": 4096.0}


def test_the_serving_stages_measured_rate_enters_the_model_and_the_prediction_records_it() -> None:
    """The rate each stage served at is kept in its run (`peak_request_rate`, from telemetry); the
    chain's next run predicts with the serving stage's rate now over its rate then."""

    def served(cid: str, created: float, rates: dict[str, float], state: State = State.COMPLETED) -> ChainRecord:
        runs = tuple(
            StageRun(
                stage=s,
                container=f"{cid}-{s}",
                state=RunState.SERVING if state is State.RUNNING and s == "a" else RunState.REMOVED,
                peak_cpu_millis=100,
                peak_memory_bytes=10 * MIB,
                peak_request_rate=rate,
            )
            for s, rate in rates.items()
        )
        return ChainRecord(cid, "n", {}, state, "10.0.0.1", runs=runs, serving="a", created_at=created)

    past = history([served("n-1", 1.0, {"a": 40.0, "b": 0.0})])
    assert past[0].request_rate == {"a": 40.0}  # b was not measured: left out, not 0
    now = served("n-2", 2.0, {"a": 100.0}, State.RUNNING)
    assert serving_rate(now) == 100.0
    rows = model_rows(now, past, "b")
    growth = FEATURE_NAMES.index("rate_growth")
    assert {k: row[growth] for k, (row, _) in rows.items()} == {"cpu_millis": 2.5, "memory_bytes": 2.5}
    p = decide(stage(), rows, {"cpu_millis": 1.0, "memory_bytes": 1.0}, (100, 32 * MIB), serving_rate(now))
    assert (p.request_rate, p.rate_growth) == (100.0, 2.5)
    assert p.to_dict(5.0)["rate_growth"] == 2.5
    assert StageRun.from_dict(now.runs[0].to_dict()).peak_request_rate == 100.0
    assert StageRun.from_dict({"stage": "a", "container": "c"}).peak_request_rate == 0.0  # a record from before
    unmeasured = served("n-3", 3.0, {"a": 0.0}, State.RUNNING)
    p = decide(stage(), model_rows(unmeasured, past, "b"), {}, (100, 32 * MIB), serving_rate(unmeasured))
    assert (p.request_rate, p.rate_growth) == (None, None)


def test_the_generator_is_seeded() -> None:
    regime = REGIMES["steady"]
    assert chain_history(regime, 7, 0) == chain_history(regime, 7, 0)
    assert chain_history(regime, 7, 0) != chain_history(regime, 8, 0)
    first = chain_history(regime, 7, 0)[0]
    assert set(first.request_rate) == set(first.usage)  # every stage's rate measured


def test_the_shipped_model_uses_the_request_rate() -> None:
    """With the rates the held-out error is lower than without them (the feature missing), and
    both beat "same as last run"."""
    model = UsageModel(MODEL)
    chains = [chain_history(REGIMES[HELD_OUT_REGIME], 99, i) for i in range(8)]
    errors = []
    for rows in (history_rows(chains, 2), history_rows(without_rates(chains), 2)):
        factors = model.predict(rows.X.tolist())
        pairs = zip(factors, rows.last, rows.actual, strict=True)
        errors.append(sum(abs(usage_from_output(f, last) - a) / a for f, last, a in pairs))
    last_err = sum(abs(last - a) / a for last, a in zip(rows.last, rows.actual, strict=True))
    with_rates, blind = errors
    assert with_rates < blind < 0.7 * last_err, (with_rates, blind, last_err)


def test_the_shipped_model_beats_same_as_last_run_on_held_out_chains() -> None:
    model = UsageModel(MODEL)
    rows = history_rows([chain_history(REGIMES[HELD_OUT_REGIME], 99, i) for i in range(8)], 2)
    factors = model.predict(rows.X.tolist())
    pairs = zip(factors, rows.last, rows.actual, strict=True)
    model_err = sum(abs(usage_from_output(f, last) - a) / a for f, last, a in pairs)
    last_err = sum(abs(last - a) / a for last, a in zip(rows.last, rows.actual, strict=True))
    assert model_err < 0.7 * last_err, (model_err, last_err)


def test_a_model_that_is_not_one_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "usage.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(ModelLoadError, match="not a loadable ONNX model"):
        UsageModel(bad)
