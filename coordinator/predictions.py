"""Scoring every host's drain risk once per tick, with the active model (coordinator/predictor.py).

This module only adapts: stored samples (protobuf JSON) become `coordinator.features.TelemetryPoint`s,
the model scores all hosts in one batch off the event loop, and the results are stored with the
model version. Without a model nothing is predicted and only ops drain hosts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from agent.errors import ConfigError, Conflict, FerrymanError
from coordinator.config import CoordinatorConfig
from coordinator.metrics import CoordinatorMetrics
from coordinator.model import Prediction
from coordinator.store import Store

log = logging.getLogger(__name__)

NO_MODEL_THRESHOLD = 1.01
"""Above any probability: without a model no host is excluded or drained for risk."""


class ModelLoadFailed(FerrymanError):
    code = "model_load_failed"
    http_status = 422


class NoPreviousModel(Conflict):
    code = "no_previous_model"


class RiskModel(Protocol):
    """The part of `coordinator.predictor.DrainPredictor` the coordinator relies on."""

    @property
    def version(self) -> str: ...
    @property
    def threshold(self) -> float: ...
    def score(self, histories: Mapping[str, Sequence[Any]], now: float) -> dict[str, float]: ...


def _num(value: Any) -> float | None:
    # MessageToDict writes 64-bit integers as strings.
    return float(value) if value is not None else None


def _sum(*values: float | None) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) if present else None


_EVENT_FIELDS = {
    "HW_ERROR": "hw_errors",
    "DRAIN_NOTICE": "drain_notice",
    "MAINTENANCE": "maintenance",
    "OOM_KILL": "oom_kills",
    "PREEMPTION": "preemption_signal",
}


def sample_to_point(ts: float, sample: Mapping[str, Any]) -> Any:
    """A stored sample as the model's `TelemetryPoint` (missing readings stay None)."""
    from coordinator.features import TelemetryPoint  # the predictor's module; one feature definition

    cpus = sample.get("cpus") or 0
    load1 = _num(sample.get("load1"))
    total, available = _num(sample.get("memory_total_bytes")), _num(sample.get("memory_available_bytes"))
    pressure = sample.get("pressure") or {}
    counts = dict.fromkeys(_EVENT_FIELDS.values(), 0)
    for event in sample.get("events") or ():
        name = _EVENT_FIELDS.get(str(event.get("kind", "")))
        if name is not None:
            counts[name] += 1
    return TelemetryPoint(
        ts=ts,
        cpu_util=_num(sample.get("cpu_util")),
        load1=load1 / cpus if load1 is not None and cpus else None,
        mem_available_frac=available / total if available is not None and total else None,
        psi_cpu_some=_num(pressure.get("cpu_some")),
        psi_mem_some=_num(pressure.get("memory_some")),
        psi_mem_full=_num(pressure.get("memory_full")),
        psi_io_some=_num(pressure.get("io_some")),
        psi_io_full=_num(pressure.get("io_full")),
        disk_bps=_sum(_num(sample.get("disk_read_bps")), _num(sample.get("disk_write_bps"))),
        net_bps=_sum(_num(sample.get("net_rx_bps")), _num(sample.get("net_tx_bps"))),
        **counts,
    )


def load_model(path: str) -> RiskModel:
    """The drain model at `path`; ConfigError (with the loader's reason) when it cannot be used."""
    try:
        from coordinator.predictor import DrainPredictor
    except ImportError as exc:
        raise ConfigError(f"model.path is set but the predictor is unavailable: {exc}") from exc
    loader = getattr(DrainPredictor, "load", DrainPredictor)
    try:
        model: RiskModel = loader(path)
    except Exception as exc:
        raise ConfigError(f"cannot load the drain model {path}: {exc}") from exc
    return model


class PredictionService:
    def __init__(
        self,
        store: Store,
        config: CoordinatorConfig,
        clock: Callable[[], float],
        metrics: CoordinatorMetrics,
        model: RiskModel | None = None,
    ) -> None:
        self._store = store
        self._config = config
        self._clock = clock
        self._metrics = metrics
        self.model = model
        self.previous: RiskModel | None = None

    async def activate(self, path: str) -> RiskModel:
        """Load `path` and make it the active model; on any load error the current model stays."""
        try:
            model = await asyncio.to_thread(load_model, path)
        except ConfigError as exc:
            raise ModelLoadFailed(exc.message) from exc
        self.previous, self.model = self.model, model
        log.info("drain model activated", extra={"model_version": model.version, "model_path": path})
        return model

    def rollback(self) -> RiskModel:
        if self.previous is None:
            raise NoPreviousModel("no previous drain model to roll back to")
        self.model, self.previous = self.previous, self.model
        log.warning("drain model rolled back", extra={"model_version": self.model.version})
        return self.model

    def threshold(self) -> float:
        if self.model is None:
            return NO_MODEL_THRESHOLD
        return self._config.model.threshold or self.model.threshold

    async def tick(self) -> list[Prediction]:
        model = self.model
        if model is None:
            return []
        now = self._clock()
        stored = await self._store.telemetry_all(since=now - self._config.telemetry.max_age)
        histories = {host: [sample_to_point(ts, s) for ts, s in samples] for host, samples in stored.items()}
        if not histories:
            return []
        scores = await asyncio.to_thread(model.score, histories, now)
        predictions = [Prediction(host, now, float(p), model.version) for host, p in sorted(scores.items())]
        await self._store.record_predictions(predictions)
        for p in predictions:
            self._metrics.drain_probability.labels(host=p.host).set(p.probability)
        return predictions
