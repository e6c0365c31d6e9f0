"""The coordinator's retraining round on what it recorded: stored telemetry and finished drains become
traces, `predictor.retrain` trains a candidate in a child process, and `ModelRegistry.consider` gates it
on the held-out window against the shipped model, which stays available for rollback.

The recorded history is a generated fleet (models/drain/generate.py) written through the real store,
as agents' pushes would have left it; the coordinator's clock is set to the end of that history.
"""

from __future__ import annotations

import asyncio
import math
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.agents import AgentClient
from coordinator.app import Coordinator
from coordinator.auth import TokenHashes
from coordinator.config import CoordinatorConfig, ModelConfig, TelemetryConfig
from coordinator.features import EVENTS, FIELDS, HostTrace
from coordinator.model import Capacity, Drain, Host
from coordinator.predictor import DrainPredictor, ModelRegistry
from coordinator.retraining import FLEET
from coordinator.sqlite_store import SqliteStore
from coordinator.store import TelemetryUpdate
from models.drain.generate import FleetSpec, generate_fleet

MODEL = Path(__file__).resolve().parent.parent / "models" / "drain" / "drain.onnx"
SPEC = FleetSpec(seed=31, n_hosts=8, days=1.5, maintenance_per_month=40.0)
_EVENT_KINDS = {
    "hw_errors": "HW_ERROR",
    "drain_notice": "DRAIN_NOTICE",
    "maintenance": "MAINTENANCE",
    "oom_kills": "OOM_KILL",
    "preemption_signal": "PREEMPTION",
}


def _as_stored(ts: float, values: np.ndarray[Any, Any], events: np.ndarray[Any, Any]) -> dict[str, Any]:
    """One generated row as an agent's sample would be stored (protobuf JSON; missing readings absent)."""
    v = {f: float(x) for f, x in zip(FIELDS, values, strict=True) if not math.isnan(x)}
    sample: dict[str, Any] = {"ts": ts, "cpus": 1, "memory_total_bytes": "1000000000"}
    for field, key in (
        ("cpu_util", "cpu_util"),
        ("load1", "load1"),
        ("disk_bps", "disk_read_bps"),
        ("net_bps", "net_rx_bps"),
    ):
        if field in v:
            sample[key] = v[field]
    if "mem_available_frac" in v:
        sample["memory_available_bytes"] = str(int(v["mem_available_frac"] * 1e9))
    pressure = {
        key: v[field]
        for field, key in (
            ("psi_cpu_some", "cpu_some"),
            ("psi_mem_some", "memory_some"),
            ("psi_mem_full", "memory_full"),
            ("psi_io_some", "io_some"),
            ("psi_io_full", "io_full"),
        )
        if field in v
    }
    if pressure:
        sample["pressure"] = pressure
    sample["events"] = [
        {"kind": _EVENT_KINDS[name], "ts": ts} for name, n in zip(EVENTS, events, strict=True) for _ in range(int(n))
    ]
    return sample


async def _record(store: SqliteStore, trace: HostTrace) -> None:
    await store.register_host(Host(name=trace.host, capacity=Capacity(4000, 4 << 30, 0)))
    rows = [(float(t), _as_stored(float(t), trace.values[i], trace.events[i])) for i, t in enumerate(trace.ts)]
    update = TelemetryUpdate(trace.host, rows, SPEC.end, Capacity(), (), {})
    await store.record_telemetry(update, keep=len(rows) + 1, max_age=SPEC.days * 86400 + 3600)
    for i, t in enumerate(trace.drains):
        await store.put_drain(
            Drain(
                id=f"{trace.host}-{i}", host=trace.host, reason="test", started_at=t - 600, state="done", finished_at=t
            )
        )


@pytest.fixture
async def coordinator(workdir: Path) -> AsyncIterator[Coordinator]:
    config = CoordinatorConfig(
        database=str(workdir / "c.db"),
        telemetry=TelemetryConfig(max_age=SPEC.days * 86400 + 3600, max_samples_per_host=10_000),
        model=ModelConfig(retrain_holdout=8 * 3600.0, retrain_timeout=240.0, retrain_dir=str(workdir / "models")),
    )
    store = await SqliteStore.open(config.database)
    registry = ModelRegistry()
    registry.activate(MODEL)
    c = Coordinator(
        config, store, AgentClient(ssl.create_default_context(), 5.0), TokenHashes(), registry, lambda: SPEC.end
    )
    try:
        yield c
    finally:
        await c.close()


async def test_nothing_recorded_means_nothing_trained(coordinator: Coordinator) -> None:
    outcome = await coordinator.retrainer.run_once()
    assert not outcome.activated and outcome.candidate == ""
    assert outcome.reason == "no recorded telemetry before the held-out window"
    assert coordinator.predictions.model is not None and coordinator.predictions.model.version == "drain-2"
    (decision,) = await coordinator.store.list_decisions(FLEET)
    assert decision.kind == "retrain" and decision.model_version == "drain-2"
    assert decision.detail == "kept: no recorded telemetry before the held-out window"


async def test_retrain_interval_runs_rounds_by_itself(workdir: Path) -> None:
    """With model.retrain_interval set, the coordinator's own loop runs rounds (each a recorded decision)."""
    config = CoordinatorConfig(
        database=str(workdir / "c.db"), model=ModelConfig(retrain_interval=0.2, retrain_dir=str(workdir / "models"))
    )
    store = await SqliteStore.open(config.database)
    agents = AgentClient(ssl.create_default_context(), 5.0)
    c = Coordinator(config, store, agents, TokenHashes(), None, lambda: SPEC.end)
    await c.start()
    try:
        for _ in range(100):
            decisions = [d for d in await store.list_decisions(FLEET) if d.kind == "retrain"]
            if len(decisions) >= 2:
                break
            await asyncio.sleep(0.05)
        assert len(decisions) >= 2, decisions  # the first after one interval, then every interval
        assert decisions[0].detail == "kept: no recorded telemetry before the held-out window"
    finally:
        await c.close()


async def test_a_round_trains_on_recorded_drains_and_gates_the_candidate(coordinator: Coordinator) -> None:
    traces = [h.trace for h in generate_fleet(SPEC)]
    assert sum(t.drains.size for t in traces) >= 4  # enough drains on both sides of the held-out cut
    for trace in traces:
        await _record(coordinator.store, trace)  # type: ignore[arg-type]
    recorded = await coordinator.retrainer.traces()
    assert sorted(t.host for t in recorded) == sorted(t.host for t in traces)
    assert sum(t.drains.size for t in recorded) == sum(t.drains.size for t in traces)

    outcome = await coordinator.retrainer.run_once()
    candidate = DrainPredictor(outcome.candidate)  # a real model came out of the child process
    assert candidate.version.startswith("drain-retrained-") and candidate.info.data_version.startswith("recorded")
    registry = coordinator.predictions.registry
    if outcome.activated:
        assert outcome.reason.startswith("PR-AUC") and " > " in outcome.reason
        assert registry.active is not None and registry.active.version == candidate.version
        assert registry.previous is not None and registry.previous.version == "drain-2"
        assert registry.rollback().version == "drain-2"  # the shipped model is one step away
    else:
        assert "does not beat" in outcome.reason or "Brier" in outcome.reason, outcome.reason
        assert registry.active is not None and registry.active.version == "drain-2" and registry.previous is None
    (decision,) = await coordinator.store.list_decisions(FLEET)
    assert decision.kind == "retrain"
    assert decision.detail == ("activated: " if outcome.activated else "kept: ") + outcome.reason
