"""The layer predictor in the coordinator: the start history kept as features, scored on demand.

`seed()` replays the stored start history at start-up (as `predictions.rebuild` does for telemetry);
`started(record)` adds each new start (ContainerStarts calls it after recording it); `predict(host)`
scores the host's candidate layers with the loaded model in a worker thread (onnxruntime through
`LayerPredictor`). Without a model (`[warm] model` empty) the history is still kept and `predict`
answers nothing; a configured model that cannot be served stops the start (ConfigError), as the
drain model does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from coordinator.metrics import CoordinatorMetrics
from coordinator.model import StartRecord
from coordinator.predictor import ModelLoadError
from coordinator.store import Store
from coordinator.warm_features import FleetStarts, HostStarts, Start
from coordinator.warm_predictor import LayerPredictor, ScoredLayer
from core.errors import ConfigError


class WarmService:
    def __init__(
        self,
        store: Store,
        predictor: LayerPredictor | None,
        clock: Callable[[], float],
        metrics: CoordinatorMetrics | None = None,
    ) -> None:
        self._store = store
        self.predictor = predictor
        self._clock = clock
        self._metrics = metrics
        if metrics is not None and predictor is not None:
            metrics.warm_model.labels(version=predictor.version).set(1)
        self.fleet = FleetStarts()
        self.hosts: dict[str, HostStarts] = {}

    @classmethod
    def load_model(cls, path: str) -> LayerPredictor | None:
        """The model at `path` (None for no path); ConfigError with the loader's reason otherwise."""
        if not path:
            return None
        try:
            return LayerPredictor.load(path)
        except ModelLoadError as exc:
            raise ConfigError(f"cannot load the layer predictor {exc}") from exc

    @property
    def model_version(self) -> str:
        return self.predictor.version if self.predictor is not None else ""

    async def seed(self) -> int:
        """The history from the store, oldest first; returns the starts replayed."""
        records = await self._store.starts()
        for record in records:
            self._add(record)
        return len(records)

    def started(self, record: StartRecord) -> None:
        """A new start: into the history, and counted (hits, warm hits, misses)."""
        self._add(record)
        if self._metrics is None:
            return
        misses = len(record.misses)
        result = "local" if not misses else ("cold" if not record.hits else "partial")
        self._metrics.starts.labels(result=result).inc()
        self._metrics.start_layers.labels(kind="hit").inc(len(record.hits) - len(record.warm_hits))
        self._metrics.start_layers.labels(kind="warm_hit").inc(len(record.warm_hits))
        self._metrics.start_layers.labels(kind="miss").inc(misses)

    def _add(self, record: StartRecord) -> None:
        history = self.hosts.setdefault(record.host, HostStarts())
        start = Start(record.ts, record.signature, record.layers)
        if history.recent and start.ts < history.recent[-1][0].ts:
            # a start recorded late (clocks of replicas differ): counted as happening now
            start = Start(history.recent[-1][0].ts, start.signature, start.layers)
        history.add(start, self.fleet)

    async def predict(self, host: str, now: float | None = None) -> list[ScoredLayer]:
        """The host's candidate layers with P(needed within the model's horizon), highest first."""
        history = self.hosts.get(host)
        if self.predictor is None or history is None:
            return []
        return await asyncio.to_thread(
            self.predictor.host_layers, history, self.fleet, self._clock() if now is None else now
        )
