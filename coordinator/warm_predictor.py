"""The layer predictor at serving time: load its ONNX model, check it fits our features, score layers.

A thin adapter like the drain predictor's (coordinator/predictor.py), and synchronous CPU work the
coordinator calls through `asyncio.to_thread`. The model and its card come from models/prefetch/.

- `LayerPredictor.load(path)`: refuses (ModelLoadError) a file that is not a loadable ONNX model,
  whose metadata lacks a field, whose features version, count or names differ from
  coordinator/warm_features.py, or that does not give probabilities on a probe batch.
- `predict(X)`: P(needed within the horizon) per feature row.
- `host_layers(history, fleet, now)`: the candidate layers of one host with their P, highest first,
  after the releases the fleet has seen (`released`: the layers only a newer image of a repository
  the host ran has take the P of the layers only the old image had), each with its P calibrated
  to the lease (`in_lease`) when the model carries that calibration.
- `in_lease(p)`: P(a start on the host uses the layer before a warm's lease ends) from the model's
  P(needed within the horizon): the isotonic map the training pipeline fitted on its validation
  traces (models/prefetch/train.py, scikit-learn's `IsotonicRegression`), kept in the metadata
  (`lease_calibration`: its knots) and evaluated as that model predicts, linear between knots and
  clipped outside them. A model without it gives no P_lease: the bound then reads the horizon's P,
  which is no higher.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from coordinator.predictor import PROB_OUTPUT, ModelLoadError, open_probability_model
from coordinator.warm_features import FEATURE_NAMES, FEATURES_VERSION, FleetStarts, HostStarts

REQUIRED_METADATA = ("model_version", "features_version", "n_features", "feature_names", "horizon_s", "threshold")


@dataclass(frozen=True)
class LayerPredictorInfo:
    path: str
    sha256: str
    version: str
    horizon: float
    """Seconds: the model gives P(needed within this long)."""
    threshold: float
    """The operating threshold its card chose (the prefetcher adapts its own around it)."""
    lease: float
    data_version: str
    metadata: Mapping[str, str]
    lease_calibration: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    """The isotonic map P(within the horizon) -> P(within the lease): its knots (x, y)."""


@dataclass(frozen=True)
class ScoredLayer:
    digest: str
    probability: float
    lease_probability: float | None = None
    """P(used before a warm's lease ends); None without the model's calibration."""


class LayerPredictor:
    def __init__(self, path: str | os.PathLike[str], *, intra_op_threads: int = 1) -> None:
        self.info, self._session, self._input = _load(Path(path), intra_op_threads)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, intra_op_threads: int = 1) -> LayerPredictor:
        return cls(path, intra_op_threads=intra_op_threads)

    @property
    def version(self) -> str:
        return self.info.version

    def predict(self, X: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        if X.shape[0] == 0:
            return np.empty(0, np.float32)
        out = self._session.run([PROB_OUTPUT], {self._input: np.ascontiguousarray(X, np.float32)})[0]
        return np.asarray(out[:, 1], np.float32)

    def host_layers(self, history: HostStarts, fleet: FleetStarts | None, now: float) -> list[ScoredLayer]:
        """The host's candidate layers and P(needed within the horizon), highest first (ties by digest)."""
        candidates = history.candidates(now, fleet)
        if not candidates:
            return []
        p = self.predict(history.features(now, candidates, fleet))
        scored = {d: float(v) for d, v in zip(candidates, p, strict=True)}
        if fleet is not None:
            scored = released(scored, history, fleet)
        digests = list(scored)
        lease = self.in_lease(np.array([scored[d] for d in digests], np.float64))
        out = [ScoredLayer(d, scored[d], None if lease is None else float(lease[i])) for i, d in enumerate(digests)]
        return sorted(out, key=lambda s: (-s.probability, s.digest))

    def in_lease(self, p: npt.NDArray[np.float64]) -> npt.NDArray[np.float64] | None:
        """P(used within the lease) for each P(needed within the horizon); None without the calibration."""
        if self.info.lease_calibration is None:
            return None
        x, y = self.info.lease_calibration
        return np.interp(p, x, y)


def released(scored: Mapping[str, float], history: HostStarts, fleet: FleetStarts) -> dict[str, float]:
    """The scores after the releases the fleet has seen: a host that ran a signature whose image was
    released since (a newer image of its repository started somewhere) will start the new image
    where it would have started the old. So the layers only the new image has take the score of the
    layers only the old one had (the model knows the host's use of those), and these old layers,
    when no other signature the host ran needs them, are dropped: nothing starts the old image again.
    The new layers come from the peer that ran it first (warms fetch from peers first)."""
    out = dict(scored)
    keep: set[str] = set()
    drop: set[str] = set()
    for signature, layers in history.signature_layers.items():
        newer = fleet.releases.get(signature)
        if newer is None:
            keep.update(layers)
            continue
        new_layers = fleet.signature_layers.get(newer, ())
        old_only = set(layers) - set(new_layers)
        p = max((scored.get(d, 0.0) for d in old_only), default=0.0)
        for d in new_layers:
            if d not in layers and p > out.get(d, 0.0):
                out[d] = p
        drop |= old_only
    for d in drop - keep:
        out.pop(d, None)
    return out


def _load(path: Path, threads: int) -> tuple[LayerPredictorInfo, ort.InferenceSession, str]:
    opened = open_probability_model(
        path,
        threads=threads,
        what="layer predictor",
        required=REQUIRED_METADATA,
        features_version=FEATURES_VERSION,
        feature_names=FEATURE_NAMES,
    )
    meta = opened.metadata
    try:
        horizon, threshold = float(meta["horizon_s"]), float(meta["threshold"])
        lease = float(meta.get("lease_s") or meta["horizon_s"])
    except ValueError as exc:
        raise ModelLoadError(f"{path}: bad horizon_s/threshold/lease_s metadata: {exc}") from exc
    if not (math.isfinite(horizon) and horizon > 0 and 0.0 <= threshold <= 1.0 and math.isfinite(lease) and lease > 0):
        raise ModelLoadError(f"{path}: horizon_s {horizon}, threshold {threshold} or lease_s {lease} out of range")
    info = LayerPredictorInfo(
        path=str(path),
        sha256=opened.sha256,
        version=meta["model_version"],
        horizon=horizon,
        threshold=threshold,
        lease=lease,
        data_version=meta.get("data_version", ""),
        metadata=meta,
        lease_calibration=_lease_calibration(path, meta.get("lease_calibration", "")),
    )
    return info, opened.session, opened.input_name


def _lease_calibration(path: Path, text: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The `lease_calibration` metadata, `{"x": [...], "y": [...]}`: at least 2 knots, x increasing
    in [0, 1], y non-decreasing in [0, 1]; "" for none. ModelLoadError otherwise."""
    if not text:
        return None
    try:
        knots = json.loads(text)
        x = tuple(float(v) for v in knots["x"])
        y = tuple(float(v) for v in knots["y"])
    except (ValueError, TypeError, KeyError) as exc:
        raise ModelLoadError(f"{path}: bad lease_calibration metadata: {exc}") from exc
    ok = len(x) == len(y) >= 2 and all(0.0 <= v <= 1.0 for v in (*x, *y))
    if not ok or np.any(np.diff(x) <= 0) or np.any(np.diff(y) < 0):
        raise ModelLoadError(f"{path}: lease_calibration needs >= 2 knots, x increasing, y non-decreasing, in [0, 1]")
    return x, y
