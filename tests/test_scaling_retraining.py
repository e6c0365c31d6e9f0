"""Retraining of the scaling model on the behaviour the coordinator keeps (coordinator/scaling/retraining.py):
the verdict, and rounds that train a real candidate in a child process (models/scaling/retrain.py) on
generator traces fed through the behaviour series, judged against the shipped model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.config import CoordinatorConfig, ModelConfig, PredictiveScalingConfig
from coordinator.retraining import FLEET, RetrainOutcome
from coordinator.scaling.retraining import ACTIVE_FILE, DECISION_KIND, ScalingRetrainer, active_model, verdict
from coordinator.sqlite_store import SqliteStore
from tests.test_scaling_service import MODEL, T0, _All, _autoscaler, _behaviour, _record, _Replicas, _trace


def _config(workdir: Path) -> CoordinatorConfig:
    return CoordinatorConfig(
        database=str(workdir / "c.db"),
        model=ModelConfig(retrain_dir=str(workdir / "models")),
        scaling=PredictiveScalingConfig(enabled=True, model=str(MODEL), retrain_holdout=120.0),
    )


def test_the_verdict_needs_a_lower_error_without_more_under_prediction() -> None:
    active = {"mae_cores": 0.05, "under_by_20pct_share": 0.10}
    assert verdict({"mae_cores": 0.04, "under_by_20pct_share": 0.10}, active)[0]
    assert not verdict({"mae_cores": 0.05, "under_by_20pct_share": 0.05}, active)[0]  # not lower
    ok, why = verdict({"mae_cores": 0.01, "under_by_20pct_share": 0.11}, active)
    assert not ok and why.startswith("the candidate under-predicts more often"), why


async def _round(workdir: Path, overhead: float) -> tuple[RetrainOutcome, Any, Any, SqliteStore]:
    """A retraining round after one scaling round, on a generator trace whose downstream stages B
    and C use `overhead` cores more than the trace's (a background loop the generator has not)."""
    config = _config(workdir)
    store = await SqliteStore.open(config.database)
    trace = _trace(1200)
    for name in ("B", "C"):
        series = trace.components[name]
        trace.components[name] = dataclasses.replace(series, cpu=np.asarray(series.cpu) + overhead)
    kept = _behaviour("d1", trace)
    records = _All(_record("d1"))
    autoscaler = _autoscaler(kept, _Replicas(), records, T0 + 1200)
    retrainer = ScalingRetrainer(store, records, kept, autoscaler, config, lambda: T0 + 1200)
    # nothing decided on yet: no pair to learn from
    first = await retrainer.run_once()
    assert not first.activated and first.reason.startswith("no component was decided on"), first.reason
    await autoscaler.round()  # decisions with their lags (C after B, B after A)
    shipped = autoscaler.model
    outcome = await retrainer.run_once()
    return outcome, shipped, autoscaler, store


async def test_a_round_swaps_in_a_candidate_that_predicts_the_held_out_seconds_better(workdir: Path) -> None:
    # The shipped model learnt the generator's stages, whose CPU follows their requests; a stage
    # with a core of its own overhead is predicted better by a model trained on its behaviour.
    outcome, shipped, autoscaler, store = await _round(workdir, 1.0)
    try:
        assert outcome.activated, outcome.reason
        assert outcome.reason.startswith("the candidate predicts the held-out seconds better"), outcome.reason
        served = autoscaler.model
        assert served is not shipped and served.info.path == outcome.candidate
        assert served.info.version.startswith("scaling-retrained-") and served.info.horizon_s == 15
        assert served.info.data_version.startswith("recorded: 2 pair(s)")
        config = _config(workdir)
        assert active_model(config) == outcome.candidate  # a restarted coordinator serves it again
        assert json.loads((workdir / "models" / ACTIVE_FILE).read_text())["version"] == served.info.version
        assert len(await autoscaler.round()) == 2  # and it decides
        decisions = [d for d in await store.list_decisions(FLEET) if d.kind == DECISION_KIND]
        assert sorted(d.detail.split(":")[0] for d in decisions) == ["activated", "kept"]
        assert {d.model_version for d in decisions} == {shipped.info.version, served.info.version}
    finally:
        await store.close()


async def test_a_candidate_no_better_on_the_held_out_seconds_is_dropped(workdir: Path) -> None:
    # On the generator's own stages the shipped model is the better one: the candidate goes.
    outcome, shipped, autoscaler, store = await _round(workdir, 0.0)
    try:
        assert not outcome.activated and "MAE" in outcome.reason, outcome.reason  # trained and judged
        assert autoscaler.model is shipped and active_model(_config(workdir)) == str(MODEL)
        assert not Path(outcome.candidate or "/nonexistent").exists()
        assert not list((workdir / "models").glob("*.onnx"))
    finally:
        await store.close()


def test_a_broken_record_of_the_active_model_falls_back_to_the_configured_one(workdir: Path) -> None:
    config = _config(workdir)
    (workdir / "models").mkdir()
    (workdir / "models" / ACTIVE_FILE).write_text('{"path": "/nonexistent.onnx"}')
    assert active_model(config) == str(MODEL)
    (workdir / "models" / ACTIVE_FILE).write_text("not json")
    assert active_model(config) == str(MODEL)
