"""Periodic retraining of the layer predictor on the starts the coordinator recorded.

Every `[warm] retrain_interval` seconds (0: never, the default) the recorded start history (which
signature started where and when, with its layers and their sizes) goes to
`python -m models.prefetch.retrain` in a niced child process, so scikit-learn never loads here. The
child trains a candidate on the history before the last `retrain_holdout` seconds and judges it and
the active model on the starts after (models/prefetch/evaluate.py's cache simulation at the active
model's threshold, and PR-AUC). `verdict` then decides: the candidate replaces the active model only
if it beats it on that window. The swap is one assignment (`WarmService.use_model`), after the
candidate loaded and passed the loader's checks; the file is kept under the models directory and
named in `warm-active.json` (written to a temporary file, then renamed), so a restarted coordinator
serves it again (`active_model`). Every round is a recorded decision.

Why retrain at all: a fleet's mix drifts and shifts (new images, new versions of old ones), and the
shipped model learnt from generated traces. On the held-out trace of bench/prefetch.py (regime
`eval`, seed 20261231, 3 hosts, 2 days), a candidate trained on its first 42 hours beats the
shipped model on the last 6 (after its mix shift): all local 0.654 against 0.626, waste 0.13
against 0.33, PR-AUC 0.55 against 0.48.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from coordinator.candidate_models import Retraining, record_round
from coordinator.config import CoordinatorConfig
from coordinator.model import StartRecord
from coordinator.predictions import models_dir
from coordinator.retraining import RetrainOutcome
from coordinator.store import Store
from coordinator.warm import WarmService
from coordinator.warm_predictor import LayerPredictor

log = logging.getLogger(__name__)

TRAIN_MODULE = "models.prefetch.retrain"
ACTIVE_FILE = "warm-active.json"
DECISION_KIND = "warm-retrain"
RETRAINED_PREFIX = "warm-retrained-"


MIN_HELD_OUT_STARTS = 50
"""Held-out starts below which no verdict is drawn: on fewer, a tie in hit rate broken by PR-AUC is
noise (bench/prefetch.py: a candidate trained on 21 hours of 3 hosts won 42 held-out starts that way
and then wasted 0.44 of its warms over the next 3 hours)."""


def verdict(candidate: Mapping[str, float], active: Mapping[str, float], max_waste: float) -> tuple[bool, str]:
    """Whether the candidate replaces the active model, from both models' figures on the held-out
    starts (`hit_rate`: the share with every layer local, `waste`, `pr_auc`), and why.

    It must keep its waste within `max_waste` (or at most the active model's) and its probabilities
    as close to what happened as the active model's (Brier score, `brier`, when both have one: the
    warms judge their expected waste by P, so a model sure of more than it should be wastes live what
    one held-out window hides), and have a higher hit rate, or the same hit rate and a higher PR-AUC
    (the ranking decides where the cache does not). Nothing replaces the active model on fewer than
    `MIN_HELD_OUT_STARTS` held-out starts."""
    c_hit, a_hit = candidate["hit_rate"], active["hit_rate"]
    c_waste, a_waste = candidate["waste"], active["waste"]
    c_auc, a_auc = _finite(candidate.get("pr_auc")), _finite(active.get("pr_auc"))
    c_brier, a_brier = candidate.get("brier"), active.get("brier")
    figures = (
        f"hit rate {c_hit:.3f} vs {a_hit:.3f}, waste {c_waste:.3f} vs {a_waste:.3f}, PR-AUC {c_auc:.3f} vs {a_auc:.3f}"
    )
    held_out = candidate.get("starts")
    if held_out is not None and held_out < MIN_HELD_OUT_STARTS:
        return False, f"too few held-out starts to judge ({held_out:g} < {MIN_HELD_OUT_STARTS}): {figures}"
    if c_brier is not None and a_brier is not None and math.isfinite(c_brier) and math.isfinite(a_brier):
        figures += f", Brier {c_brier:.4f} vs {a_brier:.4f}"
        if c_brier > a_brier:
            return False, f"the candidate's probabilities are further from what happened: {figures}"
    if c_waste > max(max_waste, a_waste):
        return False, f"the candidate wastes too much: {figures}"
    if c_hit > a_hit:
        return True, f"the candidate beats the active model: {figures}"
    if c_hit == a_hit and c_auc > a_auc:
        return True, f"the candidate ranks better at the same hit rate: {figures}"
    return False, f"the candidate does not beat the active model: {figures}"


def _finite(x: float | None) -> float:
    return x if x is not None and math.isfinite(x) else 0.0


def active_model(config: CoordinatorConfig) -> str:
    """The layer predictor to serve: the one the last retraining round activated, if its file is
    still there, else the configured one ("" when none is configured: retraining needs a model)."""
    if not config.warm.model:
        return ""
    return _retraining(config, sys.executable).active_path(config.warm.model)


def _retraining(config: CoordinatorConfig, python: str) -> Retraining:
    return Retraining(
        models_dir(config), RETRAINED_PREFIX, ACTIVE_FILE, TRAIN_MODULE, config.warm.retrain_timeout, python
    )


def recorded(starts: list[StartRecord]) -> dict[str, Any]:
    """The start history as models/prefetch/retrain.py reads it."""
    return {
        "starts": [
            {"host": s.host, "ts": s.ts, "signature": s.signature, "layers": list(s.layers), "sizes": list(s.sizes)}
            for s in starts
        ]
    }


class WarmRetrainer:
    def __init__(
        self,
        store: Store,
        warm: WarmService,
        config: CoordinatorConfig,
        clock: Callable[[], float],
        python: str = sys.executable,
    ) -> None:
        self._store = store
        self._warm = warm
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
            self._warm.model_version,
            outcome,
            log,
            "layer predictor retraining round",
        )
        return outcome

    async def _round(self) -> RetrainOutcome:
        active = self._warm.predictor
        if active is None:
            return RetrainOutcome(False, "no layer predictor is served")
        cfg = self._config.warm
        starts = await self._store.starts()
        if len(starts) < cfg.retrain_min_starts:
            return RetrainOutcome(False, f"{len(starts)} recorded starts, a round needs {cfg.retrain_min_starts}")

        async def swap(candidate: Path) -> str:
            model = await asyncio.to_thread(LayerPredictor.load, candidate)
            self._warm.use_model(model)
            return model.version

        return await self._retraining.round(
            recorded(starts),
            active.info.path,
            f"{cfg.retrain_holdout:g}",
            self._clock(),
            lambda candidate, served: verdict(candidate, served, cfg.max_waste),
            swap,
        )
