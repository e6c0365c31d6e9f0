"""Scoring every host's drain risk once per tick, with the active model of a `ModelRegistry`.

Each host has one `coordinator.features.HostHistory` (its binned last two hours): rebuilt from the
store at start, appended on each accepted telemetry push. A tick scores all hosts in one batch off
the event loop and stores the results with the model version. Model files are loaded, swapped and
rolled back by `coordinator.predictor.ModelRegistry` (a file that fails to load changes nothing).
Without a model nothing is predicted and only ops drain hosts.

A model activated at run time (activate, rollback, a retrained candidate that won) is written to the
store, bytes and all (`ModelStore`); a replica that becomes the leader loads what the store names
(`sync`), so it scores with the same model its predecessor had activated.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from coordinator.config import CoordinatorConfig
from coordinator.features import HostHistory, TelemetryPoint
from coordinator.history_share import SHARED_BINS, HostShare, notices_from_json
from coordinator.metrics import CoordinatorMetrics
from coordinator.model import Host, Prediction
from coordinator.notices import NOTICE_PROBABILITY, Notice, active_notice, notices_in_sample, prune
from coordinator.predictor import Contribution, DrainPredictor, ModelLoadError, ModelRegistry, RegistryError
from coordinator.store import HistoryExchange, ModelSlots, Store, StoredModel
from core.errors import ConfigError, Conflict, FerrymanError
from core.files import atomic_write

log = logging.getLogger(__name__)

NO_MODEL_THRESHOLD = 1.01
"""Above any probability: without a model no host is excluded or drained for risk."""
YIELD_EVERY = 1000
"""Hosts a tick turns into predictions before the event loop gets a turn (some 10 ms of work)."""
SHARES_BETWEEN_YIELDS = 500
"""Hosts whose new shares the leader decodes between two turns of its loop (`take_shares`)."""


def predictions_to_write(
    stored: Mapping[str, Prediction],
    scored: Sequence[Prediction],
    threshold: float,
    deadband: float,
    refresh: float,
) -> tuple[list[Prediction], list[Prediction]]:
    """Which of a tick's predictions to store: (before the tick's decisions, after them).

    Before: a host whose P(drain) crossed the threshold since the stored value (a host never stored
    counts as below it): placement excludes hosts at or above the threshold by what is stored, so
    that must not lag the decisions. After: a host never stored, scored by another model version, its
    P moved more than `deadband` from the stored value, or the stored value is `refresh` seconds old.
    Every other host's stored value stays: it is within `deadband` of the latest score."""
    now: list[Prediction] = []
    later: list[Prediction] = []
    for p in scored:
        old = stored.get(p.host)
        was_above = old is not None and old.probability >= threshold
        if was_above != (p.probability >= threshold):
            now.append(p)
        elif (
            old is None
            or old.model_version != p.model_version
            or abs(p.probability - old.probability) > deadband
            or p.ts - old.ts >= refresh
        ):
            later.append(p)
    return now, later


class ModelLoadFailed(FerrymanError):
    code = "model_load_failed"
    http_status = 422


class NoPreviousModel(Conflict):
    code = "no_previous_model"


class RiskModel(Protocol):
    """What the coordinator needs of a drain model (`DrainPredictor`; tests may pin a fixed one)."""

    @property
    def version(self) -> str: ...
    @property
    def threshold(self) -> float: ...
    def score(self, histories: Mapping[str, HostHistory], now: float) -> dict[str, float]: ...


@dataclass(frozen=True)
class Explanation:
    """Why a host has the probability it has: the notice that makes it a fact, or the features that
    pushed the model's output most (see `DrainPredictor.explain`)."""

    host: str
    ts: float
    probability: float
    model_probability: float
    model_version: str
    notice: Notice | None = None
    contributions: tuple[Contribution, ...] = ()
    notices: tuple[Notice, ...] = field(default=())
    """Every notice with a stated time the host reported that has not expired."""

    def describe(self) -> str:
        if self.notice is not None:
            return self.notice.describe()
        if not self.contributions:
            return f"model {self.model_version}: P={self.model_probability:.3f}"
        top = ", ".join(f"{c.feature}={c.value:.3g} ({c.delta:+.3f})" for c in self.contributions)
        return f"model {self.model_version}: P={self.model_probability:.3f}; top features {top}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "ts": self.ts,
            "probability": self.probability,
            "model_probability": self.model_probability,
            "model_version": self.model_version,
            "source": "notice" if self.notice is not None else "model",
            "notice": self.notice.to_dict() if self.notice is not None else None,
            "contributions": [c.to_dict() for c in self.contributions],
            "notices": [n.to_dict() for n in self.notices],
            "explanation": self.describe(),
        }


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


def sample_to_point(ts: float, sample: Mapping[str, Any]) -> TelemetryPoint:
    """A stored sample as the model's `TelemetryPoint` (missing readings stay None)."""
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


def models_dir(config: CoordinatorConfig) -> Path:
    """Where this replica writes model files: retrained candidates, and models loaded from the store."""
    return Path(config.model.retrain_dir or Path(config.database).parent / "models")


def _stored(model: DrainPredictor) -> StoredModel:
    data = Path(model.info.path).read_bytes()
    return StoredModel(hashlib.sha256(data).hexdigest(), data)


def activate_at_start(registry: ModelRegistry, path: str) -> DrainPredictor:
    """The configured model, activated; ConfigError (with the loader's reason) when it cannot be used."""
    try:
        return registry.activate(path)
    except ModelLoadError as exc:
        raise ConfigError(f"cannot load the drain model {exc}") from exc


class PredictionService:
    def __init__(
        self,
        store: Store,
        config: CoordinatorConfig,
        clock: Callable[[], float],
        metrics: CoordinatorMetrics,
        registry: ModelRegistry,
        pinned: RiskModel | None = None,
    ) -> None:
        self._store = store
        self._config = config
        self._clock = clock
        self._metrics = metrics
        self.registry = registry
        self._pinned = pinned
        """A model fixed from outside (tests); it is never swapped."""
        self._histories: dict[str, HostHistory] = {}
        self._notices: dict[str, list[Notice]] = {}
        """Notices with a stated time, per host (facts: see coordinator/notices.py)."""
        self.explanations: dict[str, Explanation] = {}
        """The latest tick's explanation per host (`ferryctl predictions --explain HOST`)."""
        self._exchange: HistoryExchange | None = None
        self._remote: dict[str, dict[str, HostHistory]] = {}
        """Other replicas' parts of each host's history (host -> replica -> bins they shared)."""
        self._shares_applied: dict[str, int] = {}
        """The version of each host's shares last set into `_remote`."""
        self._scoring = False
        self._pending: list[tuple[str, list[TelemetryPoint]]] = []
        """Points that arrived while a scoring thread reads the histories; applied after it."""
        self._stored: dict[str, Prediction] | None = None
        """Each host's prediction as this replica last stored it (read from the store when it starts
        leading): the base of `predictions_to_write`."""
        self._writing: asyncio.Task[None] | None = None
        """The previous tick's writes that follow its decisions (at most one batch in flight)."""
        metrics.drain_threshold.set(self.threshold())  # and at every tick: the model or its config may change

    @property
    def model(self) -> RiskModel | None:
        return self._pinned if self._pinned is not None else self.registry.active

    @property
    def previous(self) -> RiskModel | None:
        return None if self._pinned is not None else self.registry.previous

    # ----- histories

    async def rebuild(self) -> int:
        """One history per host from the stored telemetry (at start); returns the samples replayed."""
        since = self._clock() - self._config.telemetry.max_age
        stored = await self._store.telemetry_all(since=since)
        self._histories = {
            host: HostHistory.from_points([sample_to_point(ts, s) for ts, s in samples])
            for host, samples in stored.items()
        }
        self._notices = {}
        for host, samples in stored.items():
            self._note(host, samples)
        return sum(len(s) for s in stored.values())

    async def _catch_up(self, host: str, now: float) -> None:
        """A host whose samples reached the store by another way (another coordinator on a shared store)."""
        samples = await self._store.telemetry(host, since=now - self._config.telemetry.max_age)
        if samples and host not in self._histories:
            self._note(host, samples)
            self._extend(host, [sample_to_point(ts, s) for ts, s in samples])

    def observe(self, host: str, samples: Sequence[tuple[float, Mapping[str, Any]]]) -> None:
        """Append an accepted push to the host's history (called on the event loop)."""
        if not samples:
            return
        points = [sample_to_point(ts, s) for ts, s in samples]
        self._note(host, samples)
        if self._scoring:
            self._pending.append((host, points))
        else:
            self._extend(host, points)

    def _note(self, host: str, samples: Sequence[tuple[float, Mapping[str, Any]]]) -> None:
        found = [n for ts, s in samples for n in notices_in_sample(ts, s)]
        if found:
            known = self._notices.setdefault(host, [])
            known.extend(n for n in found if n not in known)

    # ----- several replicas: each shares its part of the histories, the leader merges them

    def read_shares_from(self, exchange: HistoryExchange) -> None:
        """Score with the other replicas' shares too (read at every tick)."""
        self._exchange = exchange

    def share(self, host: str) -> dict[str, Any] | None:
        """This replica's share of `host`'s recent pushes (its newest bins and notices), JSON."""
        history = self._histories.get(host)
        if history is None:
            return None
        bins = history.recent_bins(SHARED_BINS)
        if not bins:
            return None
        return HostShare(bins, tuple(self._notices.get(host, ()))).to_json()

    async def take_shares(self) -> None:
        """Set the other replicas' new shares into their parts of the histories, between ticks (the
        leader's `shares` loop): a tick then decodes only what arrived since, not the whole fleet's.
        Never while a scoring thread reads the histories (the tick takes what is left)."""
        if self._exchange is None:
            return
        for n, (host, (version, shares)) in enumerate(self._exchange.peer_shares().items()):
            if n and n % SHARES_BETWEEN_YIELDS == 0:
                await asyncio.sleep(0)  # the loop's other work (pushes, lease renewals) gets a turn
            if self._scoring:
                return
            self._take_share(host, version, shares)

    def _take_shares(self, hosts: set[str]) -> None:
        if self._exchange is None:
            return
        for host, (version, shares) in self._exchange.peer_shares().items():
            if host in hosts:
                self._take_share(host, version, shares)
        for gone in self._remote.keys() - hosts:
            del self._remote[gone]
            self._shares_applied.pop(gone, None)

    def _take_share(self, host: str, version: int, shares: Mapping[str, Mapping[str, Any]]) -> None:
        if self._shares_applied.get(host) == version:
            return
        self._shares_applied[host] = version
        parts = self._remote.setdefault(host, {})
        for replica, raw in shares.items():
            try:
                ids, rows = HostShare.rows_from_json(raw)
                notices = notices_from_json(raw)
            except (KeyError, TypeError, ValueError) as exc:
                extra = {"host": host, "replica": replica, "error": str(exc)}
                log.warning("a history share does not decode", extra=extra)
                continue
            part = parts.get(replica)
            if part is None:
                part = parts[replica] = HostHistory()
            part.set_bins(ids, rows)
            if notices:
                known = self._notices.setdefault(host, [])
                known.extend(n for n in notices if n not in known)

    def _scored_histories(self, hosts: set[str]) -> dict[str, HostHistory]:
        """Each host's history as this replica holds it merged with the other replicas' parts."""
        out: dict[str, HostHistory] = {}
        for name in sorted(hosts & (self._histories.keys() | self._remote.keys())):
            parts = [*self._remote.get(name, {}).values()]
            own = self._histories.get(name)
            if own is not None:
                parts.insert(0, own)
            out[name] = parts[0] if len(parts) == 1 else HostHistory.merged(parts)
        return out

    def notices(self, host: str) -> list[Notice]:
        return list(self._notices.get(host, ()))

    def _extend(self, host: str, points: list[TelemetryPoint]) -> None:
        history = self._histories.get(host)
        if history is None:
            history = self._histories[host] = HostHistory()
        history.extend(points)

    # ----- models

    async def activate(self, path: str) -> RiskModel:
        """Load `path` and make it the active model, in the store first; on any load error (or a
        store that refuses it) the current model stays."""
        if self._pinned is not None:
            raise Conflict("the drain model is pinned by the process that started the coordinator")
        try:
            model = await asyncio.to_thread(DrainPredictor, path, intra_op_threads=1)
        except ModelLoadError as exc:
            log.error("drain model not activated", extra={"model_path": path, "error": str(exc)})
            raise ModelLoadFailed(str(exc)) from exc
        previous = self.registry.active
        await self._persist(model, previous)
        self.registry.install(model, previous)
        return model

    async def rollback(self) -> RiskModel:
        if self._pinned is not None:
            raise NoPreviousModel("the drain model is pinned: nothing to roll back to")
        active, previous = self.registry.active, self.registry.previous
        if previous is None:
            raise NoPreviousModel("no previous drain model to roll back to")
        await self._persist(previous, active)
        try:
            return self.registry.rollback()
        except RegistryError as exc:
            raise NoPreviousModel(str(exc)) from exc

    async def persist(self) -> None:
        """Write the registry's active and previous models to the store (after a retraining won)."""
        if self._pinned is None and self.registry.active is not None:
            await self._persist(self.registry.active, self.registry.previous)

    async def _persist(self, active: DrainPredictor, previous: DrainPredictor | None) -> None:
        def read() -> ModelSlots:
            before = None
            if previous is not None:
                try:
                    before = _stored(previous)
                except OSError:  # its file is gone: there is nothing to roll back to elsewhere
                    before = None
            try:
                return ModelSlots(_stored(active), before)
            except OSError as exc:
                raise ModelLoadFailed(f"{active.info.path}: cannot read: {exc}") from exc

        await self._store.set_model_slots(await asyncio.to_thread(read))

    async def sync(self) -> bool:
        """Load the models the store names if they are not the ones loaded here; whether it changed
        anything. A model that does not load here leaves the current one (and is logged)."""
        if self._pinned is not None:
            return False
        slots = await self._store.model_slots()
        if slots is None:
            return False
        active, previous = self.registry.active, self.registry.previous

        def same(loaded: DrainPredictor | None, stored: StoredModel | None) -> bool:
            return (loaded.info.sha256 if loaded else None) == (stored.sha256 if stored else None)

        if same(active, slots.active) and same(previous, slots.previous):
            return False
        directory = models_dir(self._config) / "stored"

        def load(stored: StoredModel) -> DrainPredictor:
            directory.mkdir(parents=True, exist_ok=True)
            path = directory / f"{stored.sha256}.onnx"
            atomic_write(path, stored.data, mode=0o600)
            return DrainPredictor(path, intra_op_threads=1)

        try:
            new_active = await asyncio.to_thread(load, slots.active)
            new_previous = await asyncio.to_thread(load, slots.previous) if slots.previous else None
        except (ModelLoadError, OSError) as exc:
            log.error("the stored drain model does not load here; keeping the current one", extra={"error": str(exc)})
            return False
        self.registry.install(new_active, new_previous)
        return True

    def threshold(self) -> float:
        model = self.model
        if model is None:
            return NO_MODEL_THRESHOLD
        return self._config.model.threshold or model.threshold

    async def tick(self, listed: Sequence[Host] | None = None) -> list[Prediction]:
        """Score every host with history in one batch; the predictions carry the model's version.
        `listed`: the hosts as the caller has just listed them (the store is listed otherwise)."""
        model = self.model
        self._metrics.drain_threshold.set(self.threshold())
        if model is None:
            return []
        now = self._clock()
        phase = self._metrics.tick_phase_seconds
        hosts = {h.name for h in (listed if listed is not None else await self._store.list_hosts())}
        with phase.labels(phase="prepare").time():
            for name in sorted(hosts - self._histories.keys()):
                await self._catch_up(name, now)
            self._take_shares(hosts)
            histories = self._scored_histories(hosts)
        if not histories:
            return []
        with phase.labels(phase="score").time():
            predictions, explanations = await self._score(model, histories, now)
        self.explanations = explanations
        with phase.labels(phase="store").time():
            await self.flush()
            if self._stored is None:
                self._stored = await self._store.latest_predictions()
            cfg = self._config.model
            before, after = predictions_to_write(
                self._stored, predictions, self.threshold(), cfg.prediction_deadband, cfg.prediction_refresh
            )
            await self._write(before)
            if after:
                self._writing = asyncio.get_running_loop().create_task(self._write(after), name="prediction-writes")
            self._metrics.set_drain_probabilities({p.host: p.probability for p in predictions})
        return predictions

    async def _score(
        self, model: RiskModel, histories: dict[str, HostHistory], now: float
    ) -> tuple[list[Prediction], dict[str, Explanation]]:
        """The fleet's predictions (a notice with a stated time raises its host's) and explanations."""
        self._scoring = True
        try:
            scores = await asyncio.to_thread(model.score, histories, now)
        finally:
            self._scoring = False
            pending, self._pending = self._pending, []
            for host, points in pending:
                self._extend(host, points)
        predictions: list[Prediction] = []
        explanations: dict[str, Explanation] = {}
        horizon = float(getattr(model, "horizon", 1800.0))
        for n, (host, raw) in enumerate(sorted(scores.items())):
            if n and n % YIELD_EVERY == 0:
                await asyncio.sleep(0)  # the pushes and lease renewals on this loop get a turn
            kept: list[Notice] = []
            if host in self._notices:  # most hosts never reported a notice
                kept = self._notices[host] = prune(self._notices[host], now)
            notice = active_notice(kept, now, horizon)
            p = float(raw)
            final = max(p, NOTICE_PROBABILITY) if notice is not None else p
            predictions.append(Prediction(host, now, final, model.version))
            explanations[host] = Explanation(host, now, final, p, model.version, notice, (), tuple(kept))
        threshold = self.threshold()
        alarming = {h: histories[h] for h, e in explanations.items() if e.notice is None and e.probability >= threshold}
        explain = getattr(model, "explain", None)
        if alarming and explain is not None:
            for host, top in (await asyncio.to_thread(explain, alarming, now)).items():
                e = explanations[host]
                explanations[host] = Explanation(
                    host, now, e.probability, e.model_probability, e.model_version, None, tuple(top), e.notices
                )
        return predictions, explanations

    async def _write(self, predictions: Sequence[Prediction]) -> None:
        """Store `predictions` (fenced by the leader's term, as every leader write); a write that fails
        is tried again at the next tick (the stored base is only moved once it landed)."""
        if not predictions:
            return
        try:
            await self._store.record_predictions(predictions)
        except FerrymanError as exc:
            log.warning("predictions not stored", extra={"count": len(predictions), "error": exc.message})
            return
        stored = self._stored if self._stored is not None else {}
        for p in predictions:
            stored[p.host] = p
        self._stored = stored

    async def flush(self) -> None:
        """Wait for the previous tick's writes that follow its decisions."""
        writing, self._writing = self._writing, None
        if writing is not None:
            await writing

    async def lead(self) -> None:
        """This replica starts leading: what is stored is read again at the next tick (another leader
        may have written since)."""
        await self.stop_writing()
        self._stored = None

    async def stop_writing(self) -> None:
        """This replica stops leading: writes still in flight end (its term's fence refuses them anyway)."""
        writing, self._writing = self._writing, None
        if writing is not None:
            writing.cancel()
            await asyncio.gather(writing, return_exceptions=True)
