"""A retraining round's candidate model: trained in a child process, judged against the active
model, swapped in, and named for the next start.

The layer predictor (coordinator/warm_retraining.py) and the scaling model
(coordinator/scaling/retraining.py) retrain the same way; what differs is the recorded data, the
training module, the judge and how a model is loaded and served (`Retraining`).

Files, in the models directory: each candidate is `<prefix><unix time>[-n].onnx` (never over a
file that exists, so never over the served one); the active one is named in `active_file`, written
to a temporary file and renamed over the last, so a restarted coordinator serves it again
(`active_path`). A retrained model that another replaces is deleted: it is never served again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.model import Decision
from coordinator.predictor import ModelLoadError, RetrainError, run_training
from coordinator.retraining import FLEET, RetrainOutcome
from coordinator.store import Store

Judge = Callable[[Mapping[str, float], Mapping[str, float]], tuple[bool, str]]
"""(candidate's figures, active model's figures) -> (activate?, why)."""


@dataclass(frozen=True)
class Retraining:
    directory: Path
    """The models directory."""
    prefix: str
    """File name prefix of retrained models ("warm-retrained-")."""
    active_file: str
    """The file naming the active model ("warm-active.json")."""
    module: str
    """The training module run as `python -m` ("models.prefetch.retrain")."""
    timeout: float
    python: str

    def active_path(self, configured: str) -> str:
        """The model to serve: the one the last round activated, if its file is still there, else
        `configured`."""
        try:
            path = json.loads((self.directory / self.active_file).read_text())["path"]
        except (OSError, ValueError, KeyError, TypeError):
            return configured
        return path if isinstance(path, str) and Path(path).is_file() else configured

    async def round(
        self,
        data: Mapping[str, Any],
        active: str,
        holdout: str,
        now: float,
        judge: Judge,
        swap: Callable[[Path], Awaitable[str]],
    ) -> RetrainOutcome:
        """Train a candidate on `data` (the training module's `--recorded` JSON) against the `active`
        model file, judge both on the held-out window, and if `judge` says so, `swap` it in (load it,
        serve it, return its version; ModelLoadError keeps the active one)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        candidate, version = await asyncio.to_thread(self._new_candidate, now)
        with tempfile.TemporaryDirectory(prefix=f"ferryman-{self.prefix}") as tmp:
            recorded, judged = Path(tmp) / "recorded.json", Path(tmp) / "verdict.json"
            await asyncio.to_thread(recorded.write_text, json.dumps(data))
            args = [
                *("--recorded", str(recorded), "--current", active, "--out", str(candidate)),
                *("--verdict", str(judged), "--holdout", holdout, "--model-version", version),
                *("--seed", str(int(now) % (1 << 31))),
            ]
            try:
                await asyncio.to_thread(run_training, self.module, args, timeout=self.timeout, python=self.python)
                figures = json.loads(await asyncio.to_thread(judged.read_text))
            except (RetrainError, OSError, ValueError) as exc:
                candidate.unlink(missing_ok=True)
                return RetrainOutcome(False, f"retraining failed: {exc}")
        activate, reason = judge(figures["candidate"], figures["active"])
        if not activate:
            candidate.unlink(missing_ok=True)
            return RetrainOutcome(False, reason)
        try:
            served = await swap(candidate)
        except ModelLoadError as exc:
            candidate.unlink(missing_ok=True)
            return RetrainOutcome(False, f"the candidate does not load: {exc}")
        await asyncio.to_thread(self._remember, candidate, served)
        previous = Path(active)
        if previous.parent == self.directory and previous.name.startswith(self.prefix):
            await asyncio.to_thread(previous.unlink, missing_ok=True)
        return RetrainOutcome(True, reason, str(candidate))

    def _new_candidate(self, now: float) -> tuple[Path, str]:
        version, n = f"{self.prefix}{int(now)}", 0
        while (self.directory / f"{version}.onnx").exists():
            n += 1
            version = f"{self.prefix}{int(now)}-{n}"
        return self.directory / f"{version}.onnx", version

    def _remember(self, path: Path, version: str) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{self.active_file}-")
        with os.fdopen(fd, "w") as f:
            json.dump({"path": str(path), "version": version}, f)
            f.flush()
            os.fsync(f.fileno())
        Path(tmp).replace(self.directory / self.active_file)


async def record_round(
    store: Store, ts: float, kind: str, model_version: str, outcome: RetrainOutcome, log: logging.Logger, what: str
) -> None:
    """A round's outcome as a fleet decision and one log line (`what`: "layer predictor retraining round")."""
    await store.record_decision(
        Decision(
            ts=ts,
            host=FLEET,
            kind=kind,
            model_version=model_version,
            detail=("activated: " if outcome.activated else "kept: ") + outcome.reason,
        )
    )
    log.info(
        what,
        extra={"activated": outcome.activated, "reason": outcome.reason, "candidate": outcome.candidate or None},
    )
