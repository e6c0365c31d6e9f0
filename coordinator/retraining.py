"""Periodic retraining on what the coordinator recorded: stored telemetry plus the drains it saw.

Every `model.retrain_interval` seconds (0: never, the default) the recorded telemetry becomes one
`HostTrace` per host, labelled with the times its drains finished. Two things are held out, so a
candidate must hold on data it never saw, as the shipped model was judged on a generator family it
never saw: the last `retrain_holdout` seconds of every host, and one host in `retrain_unseen_every`
altogether (`unseen_hosts`: a stable choice by name). The candidate is trained on the rest
(`predictor.retrain`, a niced child process) and becomes active only if `ModelRegistry.consider`
finds it better than the active model on the held-out window and on the unseen hosts; the replaced
model stays available for rollback. Every round is a
recorded decision with the outcome and the active model's version.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from coordinator.config import CoordinatorConfig
from coordinator.features import HostTrace
from coordinator.model import Decision
from coordinator.predictions import PredictionService, models_dir, sample_to_point
from coordinator.predictor import Holdout, RetrainError, retrain
from coordinator.store import Store

log = logging.getLogger(__name__)

FLEET = "*"
"""The host column of fleet-wide decisions."""


def unseen_hosts(hosts: Sequence[str], every: int) -> set[str]:
    """One host in `every`, chosen by a hash of its name (stable across rounds); none for every < 2
    or a fleet too small to spare one."""
    if every < 2 or len(hosts) < every:
        return set()
    return {h for h in hosts if zlib.crc32(h.encode()) % every == 0}


@dataclass(frozen=True)
class RetrainOutcome:
    activated: bool
    reason: str
    candidate: str = ""
    """The candidate model file, when one was trained."""


class Retrainer:
    def __init__(
        self, store: Store, predictions: PredictionService, config: CoordinatorConfig, clock: Callable[[], float]
    ) -> None:
        self._store = store
        self._predictions = predictions
        self._config = config.model
        self._clock = clock
        self._dir = models_dir(config)
        self._lock = asyncio.Lock()

    async def traces(self, until: float = float("inf")) -> list[HostTrace]:
        """One trace per host from the stored samples before `until`, with the drains that finished."""
        drains: defaultdict[str, list[float]] = defaultdict(list)
        for drain in await self._store.list_drains():
            if drain.state == "done" and drain.finished_at:
                drains[drain.host].append(drain.finished_at)
        out = []
        for host, samples in sorted((await self._store.telemetry_all()).items()):
            points = [sample_to_point(ts, s) for ts, s in samples if ts < until]
            if points:
                out.append(HostTrace.from_points(host, points, [t for t in drains[host] if t < until]))
        return out

    async def run_once(self) -> RetrainOutcome:
        """One retraining round; never raises for a failed round (it is recorded instead)."""
        async with self._lock:
            outcome = await self._round()
        active = self._predictions.model
        await self._store.record_decision(
            Decision(
                ts=self._clock(),
                host=FLEET,
                kind="retrain",
                model_version=active.version if active is not None else "",
                detail=("activated: " if outcome.activated else "kept: ") + outcome.reason,
            )
        )
        log.info(
            "retraining round",
            extra={"activated": outcome.activated, "reason": outcome.reason, "candidate": outcome.candidate or None},
        )
        return outcome

    async def _round(self) -> RetrainOutcome:
        now = self._clock()
        cut = now - self._config.retrain_holdout
        everything = await self.traces()
        unseen = unseen_hosts([t.host for t in everything], self._config.retrain_unseen_every)
        training = [t for t in (await self.traces(until=cut)) if t.ts.size and t.host not in unseen]
        if not training:
            return RetrainOutcome(False, "no recorded telemetry before the held-out window")
        horizon = self._predictions.registry.active.horizon if self._predictions.registry.active else 1800.0
        holdout = Holdout.from_traces(everything, cut, now, horizon, stride=60.0)
        starts = [float(t.ts.min()) for t in everything if t.ts.size]
        unseen_set = Holdout.from_traces(
            [t for t in everything if t.host in unseen], min(starts, default=now), now, horizon, stride=60.0
        )
        self._dir.mkdir(parents=True, exist_ok=True)
        version = f"drain-retrained-{int(now)}"
        candidate = self._dir / f"{version}.onnx"
        try:
            await asyncio.to_thread(
                retrain,
                training,
                candidate,
                horizon=horizon,
                model_version=version,
                timeout=self._config.retrain_timeout,
            )
        except RetrainError as exc:
            return RetrainOutcome(False, f"retraining failed: {exc}")
        decision = await asyncio.to_thread(
            self._predictions.registry.consider, candidate, holdout, unseen_set if unseen else None
        )
        if decision.activated:
            await self._predictions.persist()  # every replica that leads after this one scores with it
        return RetrainOutcome(decision.activated, decision.reason, str(candidate))
