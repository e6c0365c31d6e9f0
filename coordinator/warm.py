"""The layer predictor in the coordinator: the start history kept as features, scored on demand.

`seed()` replays the stored start history at start-up (as `predictions.rebuild` does for telemetry);
`started(record)` adds each new start (ContainerStarts calls it after recording it); `predict(host)`
scores the host's candidate layers with the loaded model in a worker thread (onnxruntime through
`LayerPredictor`). `round()` (every `[warm] period` seconds on the leader) warms them: first the
waste controller (`waste_control.control`) moves the fleet's `Aggressiveness` by what every host's
warms and starts did since the round before (wasted and used warm bytes, local starts); then per
ready host `warming.plan` under it, the expected waste of each host's warms at most the bound
(`max_waste`), a layer no other ready host holds (their registered layers) at a lower bar, as a start
that misses it would fetch it from the registry; each chosen layer is fetched by the host's agent (peers first)
under a lease as long as the model's (`AgentClientLike.warm_layer`). Before them, with `[warm]
keep_bytes`, `warming.keep` picks the predicted layers the host holds (its registration) and the same
request keeps each under the lease, nothing fetched, so the host's cache bound leaves them (a layer
evicted since the registration is fetched: a warm). A host migrating anything
gets no warms and no keeps that round (`warm_budget`: the link is busy). Only layers of images started before,
or pushed as a release of one (`pushed`, from the registry's notifications), are warmed (the
coordinator knows their image reference and size from the start history or the push).

Without a model (`[warm] model` empty) the history is still kept and `predict` answers nothing; a
configured model that cannot be served stops the start (ConfigError), as the drain model does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields

from coordinator.agents import AgentClientLike
from coordinator.config import WarmConfig
from coordinator.metrics import CoordinatorMetrics
from coordinator.model import HostHealth, StartRecord
from coordinator.predictor import ModelLoadError
from coordinator.registry_events import PushedImage, check_envelope, pushed_images
from coordinator.store import Store
from coordinator.warm_features import FleetStarts, HostStarts, Start
from coordinator.warm_predictor import LayerPredictor, ScoredLayer
from coordinator.warming import Candidate, WarmOutcome, keep, plan, warm_budget
from coordinator.waste_control import ControlLimits, ControlState, control, initial
from core.errors import ConfigError, FerrymanError

log = logging.getLogger(__name__)


@dataclass
class _HostWarms:
    """One host's warms in flight and what its warms and starts did since the last round."""

    pending: dict[str, tuple[int, float]] = field(default_factory=dict)
    """digest -> (size, lease end) of warms no start used yet."""
    landed: dict[str, float] = field(default_factory=dict)
    """digest -> lease end of the pending warms the agent answered (the layer is there)."""
    kept: dict[str, tuple[int, float]] = field(default_factory=dict)
    """digest -> (size, lease end) of keeps no start used yet."""
    window: list[int] = field(default_factory=lambda: [0] * len(fields(WarmOutcome)))
    """WarmOutcome's fields: warmed bytes, wasted bytes, settled, starts, local starts, warms, used bytes."""

    def expire(self, now: float) -> None:
        for digest in [d for d, (_, until) in self.pending.items() if until <= now]:
            size, _ = self.pending.pop(digest)
            self.landed.pop(digest, None)
            self.window[1] += size
            self.window[2] += 1
        for digest in [d for d, (_, until) in self.kept.items() if until <= now]:
            del self.kept[digest]


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
        self.layer_refs: dict[str, tuple[str, int]] = {}
        """digest -> (an image reference holding it, its size), from started images."""
        self.warms: dict[str, _HostWarms] = {}
        self.control: ControlState | None = None
        """The fleet's aggressiveness and the controller's memory (None before the first round)."""
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

    def use_model(self, predictor: LayerPredictor) -> None:
        """Serve `predictor` from now on (a retrained model the retraining round chose). One assignment:
        a prediction in progress finishes with the model it began with, the next one takes this; the
        controller's state stays, as its memory is of warms and starts, not of the model."""
        old, self.predictor = self.predictor, predictor
        if self._metrics is not None:
            if old is not None:
                self._metrics.warm_model.labels(version=old.version).set(0)
            self._metrics.warm_model.labels(version=predictor.version).set(1)

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

    def registry_events(self, document: object) -> dict[str, object]:
        """A registry's notification envelope: checked whole first (InvalidRequest, nothing taken),
        then its image pushes (`pushed`). What it held, and the sources taken as releases."""
        envelope = check_envelope(document)
        pushes = pushed_images(envelope)
        return {"events": len(envelope["events"]), "pushes": len(pushes), "releases": self.pushed(pushes)}

    def pushed(self, images: Sequence[PushedImage]) -> list[str]:
        """A registry's pushes (coordinator/registry_events.py): a new image of a repository the
        fleet runs is a release before its first start, so the next rounds warm its new layers on
        the hosts that ran the old image, fetched by the pushed reference. The sources taken as
        releases; the others (a repository the fleet never ran, an image it has seen) change nothing."""
        out = []
        for image in images:
            release = self.fleet.pushed(image.source, image.layers)
            if self._metrics is not None:
                self._metrics.registry_pushes.labels(outcome="release" if release else "ignored").inc()
            if not release:
                continue
            ref = image.source.removeprefix("image:")
            for digest, size in zip(image.layers, image.sizes, strict=True):
                self.layer_refs.setdefault(digest, (ref, size))
            out.append(image.source)
        return out

    def warmed_on(self, digest: str, now: float) -> list[str]:
        """Hosts where a warm of `digest` landed, unused so far and under its lease: placement counts
        them as holding it before their next registration says so (a start then goes where the
        layer was warmed rather than fetching it again elsewhere)."""
        return sorted(h for h, w in self.warms.items() if w.landed.get(digest, 0.0) > now)

    def warming(self, host: str, now: float) -> set[str]:
        """Layers warmed on `host` for a start that have not been used and whose lease holds."""
        warms = self.warms.get(host)
        return {d for d, (_, until) in warms.pending.items() if until > now} if warms else set()

    def _add(self, record: StartRecord) -> None:
        if record.source.startswith("image:") and len(record.sizes) == len(record.layers):
            ref = record.source.removeprefix("image:")
            for digest, size in zip(record.layers, record.sizes, strict=True):
                self.layer_refs[digest] = (ref, size)
        warms = self.warms.get(record.host)
        if warms is not None:
            warms.expire(record.ts)
            for digest in record.layers:
                if digest in warms.pending and digest in record.hits:
                    size, _ = warms.pending.pop(digest)
                    warms.landed.pop(digest, None)
                    warms.window[2] += 1
                    warms.window[6] += size
                kept = warms.kept.pop(digest, None)
                if kept is not None and digest in record.hits and self._metrics is not None:
                    self._metrics.warm_bytes.labels(outcome="kept_used").inc(kept[0])
            warms.window[3] += 1
            warms.window[4] += not record.misses
        history = self.hosts.setdefault(record.host, HostStarts())
        start = Start(record.ts, record.signature, record.layers, record.source)
        if history.recent and start.ts < history.recent[-1][0].ts:
            # a start recorded late (clocks of replicas differ): counted as happening now
            start = Start(history.recent[-1][0].ts, start.signature, start.layers, start.source)
        history.add(start, self.fleet)

    async def predict(self, host: str, now: float | None = None) -> list[ScoredLayer]:
        """The host's candidate layers with P(needed within the model's horizon), highest first."""
        history = self.hosts.get(host)
        if self.predictor is None or history is None:
            return []
        return await asyncio.to_thread(
            self.predictor.host_layers, history, self.fleet, self._clock() if now is None else now
        )

    async def round(
        self, agents: AgentClientLike, config: WarmConfig, limits: ControlLimits, busy_hosts: set[str]
    ) -> dict[str, list[str]]:
        """One warming round over the ready hosts; the layers asked of each. A failed warm is logged
        and counted as wasted (its bytes may have moved): nothing else depends on it."""
        if self.predictor is None:
            return {}
        now = self._clock()
        lease = self.predictor.info.lease
        state = self._steer(now, limits)
        out: dict[str, list[str]] = {}
        hosts = await self._store.list_hosts()
        # what each host holds, as it last registered: a layer another host holds comes from a peer
        holding = {h.name: set(h.layer_digests) for h in hosts if h.health is HostHealth.READY}
        for host in hosts:
            if host.health is not HostHealth.READY or not host.api_url or host.name not in self.hosts:
                continue
            warms = self.warms.setdefault(host.name, _HostWarms())
            busy = config.link_bytes_per_second if host.name in busy_hosts else 0.0
            budget = warm_budget(
                config.link_bytes_per_second, busy, config.period, state.aggressiveness.bandwidth_share
            )
            room = config.keep_bytes - sum(size for size, _ in warms.kept.values())
            if budget <= 0:
                # Nor keeps: one of a layer evicted since the registration would fetch it.
                continue
            scored = await self.predict(host.name, now)
            candidates = [
                Candidate(s.digest, s.probability, self.layer_refs[s.digest][1], s.lease_probability)
                for s in scored
                if s.digest in self.layer_refs
            ]
            on_peers = set().union(*(held for name, held in holding.items() if name != host.name))
            kept = keep(
                candidates, set(host.layer_digests), set(warms.kept) | set(warms.pending), state.aggressiveness,
                room, on_peers=on_peers,
            )  # fmt: skip
            for c in kept:
                ref = self.layer_refs[c.digest][0]
                try:
                    answer = await agents.warm_layer(
                        host, c.digest, ref, lease, self.model_version, config.request_timeout
                    )
                except (FerrymanError, OSError) as exc:
                    log.warning("keep failed", extra={"host": host.name, "digest": c.digest, "error": str(exc)})
                    continue
                if answer.get("kept", True):
                    warms.kept[c.digest] = (c.size, now + lease)
                    if self._metrics is not None:
                        self._metrics.warm_bytes.labels(outcome="kept").inc(c.size)
                else:  # evicted since the host registered: the agent fetched it, a warm
                    warms.pending[c.digest] = (c.size, now + lease)
                    warms.landed[c.digest] = now + lease
                    warms.window[0] += c.size
                    warms.window[5] += 1
            chosen = plan(
                candidates,
                set(host.layer_digests),
                set(warms.pending),
                state.aggressiveness,
                budget,
                max_expected_waste=limits.max_waste,
                on_peers=on_peers,
            )
            for c in chosen:
                ref = self.layer_refs[c.digest][0]
                warms.pending[c.digest] = (c.size, now + lease)
                warms.window[0] += c.size
                warms.window[5] += 1
                try:
                    await agents.warm_layer(host, c.digest, ref, lease, self.model_version, config.request_timeout)
                    warms.landed[c.digest] = now + lease
                except (FerrymanError, OSError) as exc:
                    log.warning("warm failed", extra={"host": host.name, "digest": c.digest, "error": str(exc)})
            out[host.name] = [c.digest for c in kept + chosen]
        return out

    def _steer(self, now: float, limits: ControlLimits) -> ControlState:
        """The fleet's outcome since the last round (every host's window, then emptied) through the
        controller; the new state, also in the metrics."""
        window = [0] * len(fields(WarmOutcome))
        for warms in self.warms.values():
            warms.expire(now)
            window = [a + b for a, b in zip(window, warms.window, strict=True)]
            warms.window = [0] * len(window)
        outcome = WarmOutcome(*window)
        if self.control is None:
            threshold = self.predictor.info.threshold if self.predictor is not None else limits.max_threshold
            self.control = initial(threshold, limits)
        self.control = control(self.control, outcome, limits)
        if self._metrics is not None:
            m = self._metrics
            m.warm_bytes.labels(outcome="warmed").inc(outcome.warmed_bytes)
            m.warm_bytes.labels(outcome="used").inc(outcome.used_bytes)
            m.warm_bytes.labels(outcome="wasted").inc(outcome.wasted_bytes)
            agg = self.control.aggressiveness
            m.warm_control.labels(value="threshold").set(agg.threshold)
            m.warm_control.labels(value="max_layers").set(agg.max_layers)
            m.warm_control.labels(value="bandwidth_share").set(agg.bandwidth_share)
            m.warm_control.labels(value="waste").set(self.control.waste)
        return self.control
