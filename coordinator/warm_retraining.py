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
import json
import logging
import math
import os
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from coordinator.config import CoordinatorConfig
from coordinator.model import Decision, StartRecord
from coordinator.predictions import models_dir
from coordinator.predictor import ModelLoadError, RetrainError, run_training
from coordinator.retraining import FLEET, RetrainOutcome
from coordinator.store import Store
from coordinator.warm import WarmService
from coordinator.warm_predictor import LayerPredictor

log = logging.getLogger(__name__)

TRAIN_MODULE = "models.prefetch.retrain"
ACTIVE_FILE = "warm-active.json"
DECISION_KIND = "warm-retrain"


def verdict(candidate: Mapping[str, float], active: Mapping[str, float], max_waste: float) -> tuple[bool, str]:
    """Whether the candidate replaces the active model, from both models' figures on the held-out
    starts (`hit_rate`: the share with every layer local, `waste`, `pr_auc`), and why.

    It must keep its waste within `max_waste` (or at most the active model's), and have a higher hit
    rate, or the same hit rate and a higher PR-AUC (the ranking decides where the cache does not)."""
    c_hit, a_hit = candidate["hit_rate"], active["hit_rate"]
    c_waste, a_waste = candidate["waste"], active["waste"]
    c_auc, a_auc = _finite(candidate.get("pr_auc")), _finite(active.get("pr_auc"))
    figures = (
        f"hit rate {c_hit:.3f} vs {a_hit:.3f}, waste {c_waste:.3f} vs {a_waste:.3f}, PR-AUC {c_auc:.3f} vs {a_auc:.3f}"
    )
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
    try:
        path = json.loads((models_dir(config) / ACTIVE_FILE).read_text())["path"]
    except (OSError, ValueError, KeyError, TypeError):
        return config.warm.model
    return path if isinstance(path, str) and Path(path).is_file() else config.warm.model


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
        self._dir = models_dir(config)
        self._python = python
        self._lock = asyncio.Lock()

    async def run_once(self) -> RetrainOutcome:
        """One retraining round; never raises for a failed round (it is recorded instead)."""
        async with self._lock:
            outcome = await self._round()
        await self._store.record_decision(
            Decision(
                ts=self._clock(),
                host=FLEET,
                kind=DECISION_KIND,
                model_version=self._warm.model_version,
                detail=("activated: " if outcome.activated else "kept: ") + outcome.reason,
            )
        )
        log.info(
            "layer predictor retraining round",
            extra={"activated": outcome.activated, "reason": outcome.reason, "candidate": outcome.candidate or None},
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
        now = self._clock()
        self._dir.mkdir(parents=True, exist_ok=True)
        version, n = f"warm-retrained-{int(now)}", 0
        while await asyncio.to_thread((self._dir / f"{version}.onnx").exists):  # never over the served file
            n += 1
            version = f"warm-retrained-{int(now)}-{n}"
        candidate = self._dir / f"{version}.onnx"
        with tempfile.TemporaryDirectory(prefix="ferryman-warm-retrain-") as tmp:
            data, judged = Path(tmp) / "starts.json", Path(tmp) / "verdict.json"
            await asyncio.to_thread(data.write_text, json.dumps(recorded(starts)))
            args = [
                *("--recorded", str(data), "--current", active.info.path, "--out", str(candidate)),
                *("--verdict", str(judged), "--holdout", f"{cfg.retrain_holdout:g}", "--model-version", version),
                *("--seed", str(int(now) % (1 << 31))),
            ]
            try:
                await asyncio.to_thread(
                    run_training, TRAIN_MODULE, args, timeout=cfg.retrain_timeout, python=self._python
                )
                figures = json.loads(await asyncio.to_thread(judged.read_text))
            except (RetrainError, OSError, ValueError) as exc:
                candidate.unlink(missing_ok=True)
                return RetrainOutcome(False, f"retraining failed: {exc}")
        activate, reason = verdict(figures["candidate"], figures["active"], cfg.max_waste)
        if not activate:
            candidate.unlink(missing_ok=True)
            return RetrainOutcome(False, reason)
        try:
            model = await asyncio.to_thread(LayerPredictor.load, candidate)
        except ModelLoadError as exc:
            candidate.unlink(missing_ok=True)
            return RetrainOutcome(False, f"the candidate does not load: {exc}")
        await asyncio.to_thread(self._remember, candidate, model.version)
        self._warm.use_model(model)
        previous = Path(active.info.path)
        if previous.parent == self._dir and previous.name.startswith("warm-retrained-"):
            # a retrained model this one replaced: never served again
            await asyncio.to_thread(previous.unlink, missing_ok=True)
        return RetrainOutcome(True, reason, str(candidate))

    def _remember(self, path: Path, version: str) -> None:
        """Name the active model for the next start: a temporary file renamed over the last one."""
        fd, tmp = tempfile.mkstemp(dir=self._dir, prefix=".warm-active-")
        with os.fdopen(fd, "w") as f:
            json.dump({"path": str(path), "version": version}, f)
            f.flush()
            os.fsync(f.fileno())
        Path(tmp).replace(self._dir / ACTIVE_FILE)
