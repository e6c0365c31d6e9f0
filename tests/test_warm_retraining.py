"""The layer predictor's retraining round on the starts the coordinator recorded.

The recorded history is bench/prefetch.py's held-out trace (models/prefetch/generate.py, regime
`eval`, seed 20261231, 3 hosts, 2 days, its mix shift in the middle) written through the real
store as ContainerStarts would have recorded it; the coordinator's clock is at the end of it. The
round trains a candidate in a child process (`python -m models.prefetch.retrain`), judges it and the
served model on the last 6 hours, and swaps it in only if it beats the served model there. The
served model is a weak one made here (it ranks layers by their share of the host's last 100 starts
alone): the shipped model beats what this history trains (the card's), so it would always be kept.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from coordinator.agents import AgentClient
from coordinator.app import Coordinator
from coordinator.auth import TokenHashes
from coordinator.config import CoordinatorConfig, ModelConfig, WarmConfig
from coordinator.model import StartRecord
from coordinator.retraining import FLEET
from coordinator.sqlite_store import SqliteStore
from coordinator.warm import WarmService
from coordinator.warm_features import FEATURE_NAMES, N_FEATURES
from coordinator.warm_predictor import LayerPredictor
from coordinator.warm_retraining import ACTIVE_FILE, DECISION_KIND, active_model, verdict
from models.prefetch.generate import REGIMES, TraceSpec, generate
from models.prefetch.train import TrainConfig, fit, metadata, to_onnx

WEAK = "warm-weak"
SPEC = TraceSpec(REGIMES["eval"], 20261231, n_hosts=3, days=2.0)
BASE = 1_796_083_200.0
"""A midnight (UTC): recorded times keep the trace's time of day."""


def _weak_model(path: Path) -> Path:
    """A served model that knows one thing: P(needed) rises with the layer's share of the last 100 starts."""
    if not path.exists():
        rng = np.random.default_rng(5)
        X = rng.random((2000, N_FEATURES), dtype=np.float32)
        y = (X[:, FEATURE_NAMES.index("share_last_100")] > 0.5).astype(np.int8)
        cfg = replace(TrainConfig(), model_version=WEAK, max_iter=5)
        path.write_bytes(to_onnx(fit(X, y, cfg), metadata(cfg, 0.4, "test: share_last_100 > 0.5")))
    return path


def _config(workdir: Path) -> CoordinatorConfig:
    return CoordinatorConfig(
        database=str(workdir / "c.db"),
        model=ModelConfig(retrain_dir=str(workdir / "models")),
        warm=WarmConfig(
            model=str(_weak_model(workdir / "weak.onnx")), retrain_holdout=6 * 3600.0, retrain_timeout=600.0
        ),
    )


@pytest.fixture
async def coordinator(workdir: Path) -> AsyncIterator[Coordinator]:
    config = _config(workdir)
    store = await SqliteStore.open(config.database)
    c = Coordinator(
        config,
        store,
        AgentClient(ssl.create_default_context(), 5.0),
        TokenHashes(),
        None,
        lambda: BASE + SPEC.end,
        LayerPredictor.load(config.warm.model),
    )
    try:
        yield c
    finally:
        await c.close()


async def _record_trace(c: Coordinator) -> int:
    trace = generate(SPEC)
    for host, s in trace.starts:
        record = StartRecord(
            host=host,
            ts=BASE + s.ts,
            signature=s.signature,
            layers=s.layers,
            sizes=tuple(trace.sizes[d] for d in s.layers),
            source=f"image:registry.test/{s.signature}:v1",
        )
        await c.store.record_start(record, keep=10_000, max_age=SPEC.end + 3600)
    return len(trace.starts)


def test_the_verdict_needs_a_better_hit_rate_within_the_waste_bound() -> None:
    active = {"hit_rate": 0.60, "waste": 0.20, "pr_auc": 0.50}
    assert verdict({"hit_rate": 0.62, "waste": 0.22, "pr_auc": 0.40}, active, 0.25)[0]
    assert not verdict({"hit_rate": 0.60, "waste": 0.10, "pr_auc": 0.50}, active, 0.25)[0]  # a tie: kept
    assert verdict({"hit_rate": 0.60, "waste": 0.10, "pr_auc": 0.55}, active, 0.25)[0]  # ranks better
    assert not verdict({"hit_rate": 0.58, "waste": 0.05, "pr_auc": 0.70}, active, 0.25)[0]
    ok, why = verdict({"hit_rate": 0.70, "waste": 0.30, "pr_auc": 0.60}, active, 0.25)
    assert not ok and why.startswith("the candidate wastes too much")
    # over the bound, but no worse than the active model: the hit rate decides
    assert verdict({"hit_rate": 0.70, "waste": 0.30, "pr_auc": 0.60}, {**active, "waste": 0.35}, 0.25)[0]
    assert not verdict({"hit_rate": 0.6, "waste": 0.1, "pr_auc": float("nan")}, {**active, "pr_auc": 0.5}, 0.25)[0]


def test_the_verdict_needs_enough_held_out_starts_and_probabilities_as_close() -> None:
    active = {"hit_rate": 0.60, "waste": 0.20, "pr_auc": 0.50, "brier": 0.080, "starts": 80}
    better = {"hit_rate": 0.65, "waste": 0.10, "pr_auc": 0.60, "brier": 0.070, "starts": 80}
    assert verdict(better, active, 0.25)[0]
    ok, why = verdict({**better, "starts": 42}, active, 0.25)
    assert not ok and why.startswith("too few held-out starts")
    ok, why = verdict({**better, "brier": 0.09}, active, 0.25)
    assert not ok and "further from what happened" in why
    assert verdict({**better, "brier": float("nan")}, active, 0.25)[0]  # no Brier: the rest decides


async def test_too_little_history_trains_nothing(coordinator: Coordinator) -> None:
    outcome = await coordinator.warm_retrainer.run_once()
    assert not outcome.activated and outcome.candidate == ""
    assert outcome.reason == "0 recorded starts, a round needs 200"
    assert coordinator.warm.model_version == WEAK
    (decision,) = await coordinator.store.list_decisions(FLEET)
    assert decision.kind == DECISION_KIND and decision.model_version == WEAK
    assert decision.detail == "kept: 0 recorded starts, a round needs 200"


async def test_a_round_retrains_on_recorded_starts_and_swaps_only_a_better_model(
    coordinator: Coordinator, workdir: Path
) -> None:
    assert await _record_trace(coordinator) > 1000
    await coordinator.warm.seed()  # the history as a start of the coordinator would load it
    outcome = await coordinator.warm_retrainer.run_once()
    # the fleet's own history predicts its last hours better than a model that knows one feature
    assert outcome.activated, outcome.reason
    assert outcome.reason.startswith(("the candidate beats the active model", "the candidate ranks better")), (
        outcome.reason
    )
    served = coordinator.warm.predictor
    assert served is not None and served.info.path == outcome.candidate
    assert served.version.startswith("warm-retrained-") and served.info.data_version.startswith("recorded: ")
    assert served.info.threshold == 0.4 and served.info.lease == 3600.0  # the active model's, kept
    assert served.info.lease_calibration is not None  # its own P calibrated to the lease
    assert await coordinator.warm.predict(next(iter(coordinator.warm.hosts)))  # it scores
    # a restarted coordinator serves it again
    config = _config(workdir)
    assert (workdir / "models" / ACTIVE_FILE).is_file()
    assert active_model(config) == outcome.candidate
    reloaded = WarmService.load_model(active_model(config))
    assert reloaded is not None and reloaded.version == served.version

    # the same history again: the candidate is the same model, so it does not beat the one it would replace
    again = await coordinator.warm_retrainer.run_once()
    assert not again.activated and again.reason.startswith("the candidate does not beat"), again.reason
    assert coordinator.warm.predictor is served
    assert not Path(again.candidate or "/nonexistent").exists()
    decisions = [d for d in await coordinator.store.list_decisions(FLEET) if d.kind == DECISION_KIND]
    assert sorted(d.detail.split(":")[0] for d in decisions) == ["activated", "kept"]
    assert {d.model_version for d in decisions} == {served.version}  # the model served after each round


async def test_a_broken_record_of_the_active_model_falls_back_to_the_configured_one(workdir: Path) -> None:
    config = _config(workdir)
    (workdir / "models").mkdir()
    (workdir / "models" / ACTIVE_FILE).write_text('{"path": "/nonexistent/model.onnx"}')
    assert active_model(config) == config.warm.model
    (workdir / "models" / ACTIVE_FILE).write_text("not json")
    assert active_model(config) == config.warm.model
