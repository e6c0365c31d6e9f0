"""The scaling model at serving time: load its ONNX regressor, check it fits our features, predict a
downstream component's CPU need at the horizon. The sibling, for regression, of the classifiers'
loader (`coordinator.predictor.open_probability_model`); the model and its card come from
models/scaling/. Synchronous CPU work: the coordinator calls it through `asyncio.to_thread`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from coordinator.predictor import ModelLoadError, first_line, open_onnx_model
from coordinator.scaling.features import FEATURE_NAMES, FEATURES_VERSION, feature_matrix, need_from_output
from coordinator.scaling.series import ComponentSeries

REQUIRED_METADATA = (
    "model_version",
    "features_version",
    "n_features",
    "feature_names",
    "horizon_s",
    "prediction_error",
)
OUTPUT = "variable"


@dataclass(frozen=True)
class ScalingModelInfo:
    path: str
    sha256: str
    version: str
    horizon_s: int
    """The model predicts the need this many seconds ahead."""
    prediction_error: float
    """Relative spread of its error on held-out traces (its card's), for the policy's quantile."""
    data_version: str


class ScalingModel:
    def __init__(self, path: str | os.PathLike[str], *, intra_op_threads: int = 1) -> None:
        self.info, self._session, self._input = _load(Path(path), intra_op_threads)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, intra_op_threads: int = 1) -> ScalingModel:
        return cls(path, intra_op_threads=intra_op_threads)

    def output(self, X: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """The raw output (the correction factor) per feature row."""
        if X.shape[0] == 0:
            return np.empty(0, np.float32)
        out = self._session.run([OUTPUT], {self._input: np.ascontiguousarray(X, np.float32)})[0]
        return np.asarray(out[:, 0], np.float32)

    def predict_need(
        self, up: ComponentSeries, down: ComponentSeries, lag_s: int, times: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.float64]:
        """The downstream CPU need (cores) at each of `times` + horizon."""
        X, scale = feature_matrix(up, down, lag_s, self.info.horizon_s, times)
        return need_from_output(self.output(X), X, scale)


def _load(path: Path, threads: int) -> tuple[ScalingModelInfo, ort.InferenceSession, str]:
    """Refuse (ModelLoadError) a file too big or not ONNX, metadata lacking a field, features of
    another version, count or names, anything but one float input [N, features] and a `variable`
    output [N, 1], and a model that answers a probe batch with anything but finite numbers."""
    opened = open_onnx_model(
        path,
        threads=threads,
        what="scaling model",
        required=REQUIRED_METADATA,
        features_version=FEATURES_VERSION,
        feature_names=FEATURE_NAMES,
    )
    session, meta, n = opened.session, opened.metadata, len(FEATURE_NAMES)
    try:
        horizon, error = int(meta["horizon_s"]), float(meta["prediction_error"])
    except ValueError as exc:
        raise ModelLoadError(f"{path}: bad horizon_s/prediction_error metadata: {exc}") from exc
    if not (horizon > 0 and math.isfinite(error) and error >= 0):
        raise ModelLoadError(f"{path}: horizon_s {horizon} or prediction_error {error} out of range")
    outputs = {o.name: o for o in session.get_outputs()}
    if OUTPUT not in outputs or list(outputs[OUTPUT].shape[1:]) != [1]:
        raise ModelLoadError(f"{path}: no {OUTPUT!r} output of shape [N, 1]")
    probe = np.ones((2, n), np.float32)
    probe[1] = 0.0
    try:
        out = session.run([OUTPUT], {opened.input_name: probe})[0]
    except Exception as exc:
        raise ModelLoadError(f"{path}: fails on a probe batch: {first_line(exc)}") from exc
    if out.shape != (2, 1) or not np.all(np.isfinite(out)):
        raise ModelLoadError(f"{path}: probe batch gave {out!r}")
    info = ScalingModelInfo(
        path=str(path),
        sha256=opened.sha256,
        version=meta["model_version"],
        horizon_s=horizon,
        prediction_error=error,
        data_version=meta.get("data_version", ""),
    )
    return info, session, opened.input_name
