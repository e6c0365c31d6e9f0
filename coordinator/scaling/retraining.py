"""Periodic retraining of the scaling model on the behaviour the coordinator keeps.

Every `[scaling] retrain_interval` seconds (0: never, the default) the leader takes, for every
downstream component its autoscaler last decided on with a lead (`upstream` and `lag_s` in the
decision), both components' per-second series over the seconds they share
(coordinator/scaling/resample.py), and hands them to `python -m models.scaling.retrain` in a niced
child process, so scikit-learn never loads here. The child trains a candidate on each pair's
seconds before the last `retrain_holdout` and predicts the need at the horizon of the seconds after
with both the candidate and the active model. `verdict` then decides: the candidate replaces the
active model only if it predicts that held-out window better. The swap is one assignment
(`Autoscaler.use_model`), after the candidate loaded and passed the loader's checks; the file is
kept under the models directory and named in `scaling-active.json` (written to a temporary file,
then renamed), so a restarted coordinator serves it again (`active_model`). Every round is a
recorded decision (kind `scaling-retrain`).

Why retrain at all: the shipped model learnt from generated traces; a deployment's own stages have
their own CPU per request, batching and noise, which only their recorded behaviour shows.

The round itself (child process, judge, swap, the active file) is coordinator/candidate_models.py,
shared with the layer predictor's retraining (coordinator/warm_retraining.py).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from coordinator.candidate_models import Retraining, record_round
from coordinator.config import CoordinatorConfig
from coordinator.deployments.states import WATCHED
from coordinator.predictions import models_dir
from coordinator.retraining import RetrainOutcome
from coordinator.scaling.autoscaler import Autoscaler, DeploymentList
from coordinator.scaling.model import ScalingModel
from coordinator.scaling.resample import per_second, shared_span
from coordinator.scaling.series import METRICS
from coordinator.scaling.service import Behaviour
from coordinator.store import Store

log = logging.getLogger(__name__)

TRAIN_MODULE = "models.scaling.retrain"
ACTIVE_FILE = "scaling-active.json"
DECISION_KIND = "scaling-retrain"
RETRAINED_PREFIX = "scaling-retrained-"


def verdict(candidate: Mapping[str, float], active: Mapping[str, float]) -> tuple[bool, str]:
    """Whether the candidate replaces the active model, from both models' errors on the held-out
    seconds (`mae_cores`, `under_by_20pct_share`), and why.

    It must have a lower mean absolute error and under-predict by more than 20 % no more often than
    the active model does (an under-prediction is a replica missing when the load arrives)."""
    figures = (
        f"MAE {candidate['mae_cores']:.4f} vs {active['mae_cores']:.4f} cores, under by 20 % "
        f"{candidate['under_by_20pct_share']:.3f} vs {active['under_by_20pct_share']:.3f}"
    )
    if candidate["under_by_20pct_share"] > active["under_by_20pct_share"]:
        return False, f"the candidate under-predicts more often: {figures}"
    if candidate["mae_cores"] < active["mae_cores"]:
        return True, f"the candidate predicts the held-out seconds better: {figures}"
    return False, f"the candidate does not beat the active model: {figures}"


def active_model(config: CoordinatorConfig) -> str:
    """The scaling model to serve: the one the last retraining round activated, if its file is still
    there, else the configured one."""
    return _retraining(config, sys.executable).active_path(config.scaling.model)


def _retraining(config: CoordinatorConfig, python: str) -> Retraining:
    return Retraining(
        models_dir(config), RETRAINED_PREFIX, ACTIVE_FILE, TRAIN_MODULE, config.scaling.retrain_timeout, python
    )


async def recorded(deployments: DeploymentList, behaviour: Behaviour, autoscaler: Autoscaler) -> dict[str, Any]:
    """The pairs models/scaling/retrain.py reads: per downstream component last decided with a lead,
    both series over their shared seconds and that lag."""
    pairs = []
    for record in await deployments.all():
        if record.state not in WATCHED:
            continue
        for name, last in (await autoscaler.status(record.id)).items():
            upstream, lag = last.get("upstream"), last.get("lag_s")
            if upstream is None or lag is None:
                continue
            up, down = behaviour.of(record.id, upstream), behaviour.of(record.id, name)
            window = shared_span(up, down)
            if window is None:
                continue
            up_s, down_s = per_second(up, window), per_second(down, window)
            pairs.append(
                {
                    "deployment": record.id,
                    "upstream": upstream,
                    "downstream": name,
                    "lag_s": int(lag),
                    "up": {m: up_s.metric(m).tolist() for m in METRICS},
                    "down": {m: down_s.metric(m).tolist() for m in METRICS},
                }
            )
    return {"pairs": pairs}


class ScalingRetrainer:
    def __init__(
        self,
        store: Store,
        deployments: DeploymentList,
        behaviour: Behaviour,
        autoscaler: Autoscaler,
        config: CoordinatorConfig,
        clock: Callable[[], float],
        python: str = sys.executable,
    ) -> None:
        self._store = store
        self._deployments = deployments
        self._behaviour = behaviour
        self._autoscaler = autoscaler
        self._config = config
        self._clock = clock
        self._retraining = _retraining(config, python)
        self._lock = asyncio.Lock()

    async def run_once(self) -> RetrainOutcome:
        """One retraining round; never raises for a failed round (it is recorded instead)."""
        async with self._lock:
            outcome = await self._round()
        await record_round(
            self._store,
            self._clock(),
            DECISION_KIND,
            self._autoscaler.model.info.version,
            outcome,
            log,
            "scaling model retraining round",
        )
        return outcome

    async def _round(self) -> RetrainOutcome:
        data = await recorded(self._deployments, self._behaviour, self._autoscaler)
        if not data["pairs"]:
            return RetrainOutcome(False, "no component was decided on with a leading upstream yet")

        async def swap(candidate: Path) -> str:
            model = await asyncio.to_thread(ScalingModel.load, candidate)
            self._autoscaler.use_model(model)
            return model.info.version

        return await self._retraining.round(
            data,
            self._autoscaler.model.info.path,
            f"{int(self._config.scaling.retrain_holdout)}",
            self._clock(),
            verdict,
            swap,
        )
