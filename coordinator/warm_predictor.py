"""The layer predictor at serving time: load its ONNX model, check it fits our features, score layers.

A thin adapter like the drain predictor's (coordinator/predictor.py), and synchronous CPU work the
coordinator calls through `asyncio.to_thread`. The model and its card come from models/prefetch/.

- `LayerPredictor.load(path)`: refuses (ModelLoadError) a file that is not a loadable ONNX model,
  whose metadata lacks a field, whose features version, count or names differ from
  coordinator/warm_features.py, or that does not give probabilities on a probe batch.
- `predict(X)`: P(needed within the horizon) per feature row.
- `host_layers(history, fleet, now)`: the candidate layers of one host with their P, highest first.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from coordinator.predictor import ModelLoadError
from coordinator.warm_features import FEATURE_NAMES, FEATURES_VERSION, N_FEATURES, FleetStarts, HostStarts

MAX_MODEL_BYTES = 64 << 20
REQUIRED_METADATA = ("model_version", "features_version", "n_features", "feature_names", "horizon_s", "threshold")
PROB_OUTPUT = "probabilities"


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


@dataclass(frozen=True)
class ScoredLayer:
    digest: str
    probability: float


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
        scored = [ScoredLayer(d, float(v)) for d, v in zip(candidates, p, strict=True)]
        return sorted(scored, key=lambda s: (-s.probability, s.digest))


def _load(path: Path, threads: int) -> tuple[LayerPredictorInfo, ort.InferenceSession, str]:
    try:
        size = path.stat().st_size
        if size > MAX_MODEL_BYTES:
            raise ModelLoadError(f"{path}: {size} bytes, more than a layer predictor's {MAX_MODEL_BYTES}")
        data = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read: {exc}") from exc
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only: a bad file is reported by the exception below
    try:
        session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
        raise ModelLoadError(f"{path}: not a loadable ONNX model: {str(exc).splitlines()[0][:200]}") from exc
    meta = dict(session.get_modelmeta().custom_metadata_map)
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise ModelLoadError(f"{path}: metadata lacks {', '.join(missing)}")
    if meta["features_version"] != FEATURES_VERSION:
        raise ModelLoadError(
            f"{path}: trained on features {meta['features_version']!r}, this coordinator computes {FEATURES_VERSION!r}"
        )
    if meta["n_features"] != str(N_FEATURES) or meta["feature_names"] != ",".join(FEATURE_NAMES):
        raise ModelLoadError(
            f"{path}: model expects {meta['n_features']} other features than the {N_FEATURES} we compute"
        )
    try:
        horizon, threshold = float(meta["horizon_s"]), float(meta["threshold"])
        lease = float(meta.get("lease_s") or meta["horizon_s"])
    except ValueError as exc:
        raise ModelLoadError(f"{path}: bad horizon_s/threshold/lease_s metadata: {exc}") from exc
    if not (math.isfinite(horizon) and horizon > 0 and 0.0 <= threshold <= 1.0 and math.isfinite(lease) and lease > 0):
        raise ModelLoadError(f"{path}: horizon_s {horizon}, threshold {threshold} or lease_s {lease} out of range")
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].type != "tensor(float)" or list(inputs[0].shape[1:]) != [N_FEATURES]:
        got = [(i.name, i.type, i.shape) for i in inputs]
        raise ModelLoadError(f"{path}: expected one float input [N, {N_FEATURES}], got {got}")
    outputs = {o.name: o for o in session.get_outputs()}
    if PROB_OUTPUT not in outputs or list(outputs[PROB_OUTPUT].shape[1:]) != [2]:
        raise ModelLoadError(f"{path}: no {PROB_OUTPUT!r} output of shape [N, 2]")
    probe = np.zeros((2, N_FEATURES), np.float32)
    probe[1] = np.nan  # a layer never seen: features are missing, and the model must still answer
    try:
        p = session.run([PROB_OUTPUT], {inputs[0].name: probe})[0]
    except Exception as exc:
        raise ModelLoadError(f"{path}: fails on a probe batch: {str(exc).splitlines()[0][:200]}") from exc
    if p.shape != (2, 2) or not np.all(np.isfinite(p)) or p.min() < 0 or p.max() > 1:
        raise ModelLoadError(f"{path}: probe batch gave {p!r}, not probabilities")
    info = LayerPredictorInfo(
        path=str(path),
        sha256=hashlib.sha256(data).hexdigest(),
        version=meta["model_version"],
        horizon=horizon,
        threshold=threshold,
        lease=lease,
        data_version=meta.get("data_version", ""),
        metadata=meta,
    )
    return info, session, inputs[0].name
