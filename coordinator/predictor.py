"""The drain model at serving time: load an ONNX model, check it fits our features, score hosts.

All of it is synchronous CPU work; the coordinator calls it through `asyncio.to_thread`.

- `DrainPredictor`: one loaded model; `score(histories, now)` scores every host in one batch.
- `ModelRegistry`: the active model plus the previous one (rollback), `activate(path)` that keeps
  the current model when the new one fails to load, and `consider(candidate, holdout)` that
  activates a retrained model only if it beats the current one on a held-out window.
- `retrain(...)`: runs `python -m models.drain.train` (the `train` extra) on recorded telemetry in a
  separate, niced process
  (scikit-learn is a training-only dependency and the fit must not starve the event loop).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from coordinator.features import (
    FEATURE_NAMES,
    FEATURES_VERSION,
    N_FEATURES,
    HistoryLike,
    HostTrace,
    drain_labels,
    evaluation_times,
    extract_batch,
    save_traces,
    trace_features,
)

log = logging.getLogger(__name__)

MAX_MODEL_BYTES = 64 << 20
"""A drain model is a few MB; anything far bigger is not one of ours."""
REQUIRED_METADATA = ("model_version", "features_version", "n_features", "horizon_s", "threshold")
PROB_OUTPUT = "probabilities"


@dataclass(frozen=True)
class Contribution:
    """How much one feature raised P(drain): the probability with the host's value minus with the
    training fleet's median value for that feature (occlusion), all other features as they are."""

    feature: str
    value: float
    reference: float
    delta: float

    def to_dict(self) -> dict[str, float | str]:
        return {"feature": self.feature, "value": self.value, "reference": self.reference, "delta": self.delta}


class ModelLoadError(Exception):
    """The model file cannot be used: unreadable, not ONNX, or made for other features."""


class RegistryError(Exception):
    """A registry operation that cannot be done, e.g. a rollback with no previous model."""


class RetrainError(Exception):
    """The retraining process failed or timed out."""


@dataclass(frozen=True)
class ModelInfo:
    path: str
    sha256: str
    version: str
    features_version: str
    horizon: float
    threshold: float
    data_version: str
    metadata: Mapping[str, str]


class DrainPredictor:
    """A loaded drain model. Raises ModelLoadError on anything wrong with the file."""

    def __init__(self, path: str | os.PathLike[str], *, intra_op_threads: int = 1) -> None:
        self.info, self._session, self._input = _load(Path(path), intra_op_threads)
        self._calibration = _calibration(self.info.metadata, Path(path))
        self._reference = _reference(self.info.metadata, Path(path))

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, intra_op_threads: int = 1) -> DrainPredictor:
        return cls(path, intra_op_threads=intra_op_threads)

    @property
    def version(self) -> str:
        return self.info.version

    @property
    def horizon(self) -> float:
        """Seconds: the model gives P(drained within this long)."""
        return self.info.horizon

    @property
    def threshold(self) -> float:
        return self.info.threshold

    def predict(self, X: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """P(drain) per row of a feature matrix [n, N_FEATURES]."""
        if X.shape[0] == 0:
            return np.empty(0, np.float32)
        out = self._session.run([PROB_OUTPUT], {self._input: np.ascontiguousarray(X, np.float32)})[0]
        raw = np.asarray(out[:, 1], np.float32)
        if self._calibration is None:
            return raw
        xs, ys = self._calibration
        return np.interp(raw, xs, ys).astype(np.float32)

    def explain(self, histories: Mapping[str, HistoryLike], now: float, top: int = 3) -> dict[str, list[Contribution]]:
        """The `top` features that raise each host's P(drain) most (occlusion against the reference)."""
        if not histories:
            return {}
        X = extract_batch(histories, now)
        out = {}
        for host, row in zip(histories, X, strict=True):
            trial = np.repeat(row[None, :], N_FEATURES + 1, axis=0)
            trial[np.arange(1, N_FEATURES + 1), np.arange(N_FEATURES)] = self._reference
            p = self.predict(trial)
            delta = p[0] - p[1:]
            order = np.argsort(-delta, kind="stable")[:top]
            out[host] = [
                Contribution(FEATURE_NAMES[j], float(row[j]), float(self._reference[j]), float(delta[j]))
                for j in order
                if delta[j] > 0
            ]
        return out

    def score(self, histories: Mapping[str, HistoryLike], now: float) -> dict[str, float]:
        """P(drain within horizon) per host, all hosts in one batch."""
        if not histories:
            return {}
        p = self.predict(extract_batch(histories, now))
        return {host: float(v) for host, v in zip(histories, p, strict=True)}


@dataclass(frozen=True)
class OpenedModel:
    """A binary classifier's ONNX export, read and checked (`open_probability_model`)."""

    session: ort.InferenceSession
    input_name: str
    metadata: dict[str, str]
    sha256: str


def open_onnx_model(
    path: Path,
    *,
    threads: int,
    what: str,
    required: Sequence[str],
    features_version: str,
    feature_names: Sequence[str],
    max_bytes: int = MAX_MODEL_BYTES,
) -> OpenedModel:
    """Read and open `path`, refusing (ModelLoadError) a file too big or not ONNX, metadata without a
    `required` field, features of another version, count or names, and anything but one float input
    [N, features]. Its outputs are the caller's to check."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise ModelLoadError(f"{path}: {size} bytes, more than a {what}'s {max_bytes}")
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
        raise ModelLoadError(f"{path}: not a loadable ONNX model: {first_line(exc)}") from exc
    meta = dict(session.get_modelmeta().custom_metadata_map)
    missing = [k for k in required if k not in meta]
    if missing:
        raise ModelLoadError(f"{path}: metadata lacks {', '.join(missing)}")
    if meta["features_version"] != features_version:
        raise ModelLoadError(
            f"{path}: trained on features {meta['features_version']!r}, this coordinator computes {features_version!r}"
        )
    n = len(feature_names)
    if meta["n_features"] != str(n) or meta.get("feature_names", ",".join(feature_names)) != ",".join(feature_names):
        raise ModelLoadError(f"{path}: model expects {meta['n_features']} other features than the {n} we compute")
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].type != "tensor(float)" or list(inputs[0].shape[1:]) != [n]:
        got = [(i.name, i.type, i.shape) for i in inputs]
        raise ModelLoadError(f"{path}: expected one float input [N, {n}], got {got}")
    return OpenedModel(session, inputs[0].name, meta, hashlib.sha256(data).hexdigest())


def open_probability_model(
    path: Path,
    *,
    threads: int,
    what: str,
    required: Sequence[str],
    features_version: str,
    feature_names: Sequence[str],
    max_bytes: int = MAX_MODEL_BYTES,
) -> OpenedModel:
    """`open_onnx_model`, then refusing a model without a `probabilities` output [N, 2] or that does
    not answer a probe batch (a row of zeros, a row of missing values) with probabilities. Shared by
    the drain model and the layer predictor; each checks its own metadata values after."""
    opened = open_onnx_model(
        path,
        threads=threads,
        what=what,
        required=required,
        features_version=features_version,
        feature_names=feature_names,
        max_bytes=max_bytes,
    )
    session = opened.session
    outputs = {o.name: o for o in session.get_outputs()}
    if PROB_OUTPUT not in outputs or list(outputs[PROB_OUTPUT].shape[1:]) != [2]:
        raise ModelLoadError(f"{path}: no {PROB_OUTPUT!r} output of shape [N, 2]")
    # a model that loads but cannot run (or returns nonsense) is as unusable as one that does not load
    probe = np.zeros((2, len(feature_names)), np.float32)
    probe[1] = np.nan
    try:
        p = session.run([PROB_OUTPUT], {opened.input_name: probe})[0]
    except Exception as exc:
        raise ModelLoadError(f"{path}: fails on a probe batch: {first_line(exc)}") from exc
    if p.shape != (2, 2) or not np.all(np.isfinite(p)) or p.min() < 0 or p.max() > 1:
        raise ModelLoadError(f"{path}: probe batch gave {p!r}, not probabilities")
    return opened


def _load(path: Path, threads: int) -> tuple[ModelInfo, ort.InferenceSession, str]:
    opened = open_probability_model(
        path,
        threads=threads,
        what="drain model",
        required=REQUIRED_METADATA,
        features_version=FEATURES_VERSION,
        feature_names=FEATURE_NAMES,
    )
    meta = opened.metadata
    try:
        horizon, threshold = float(meta["horizon_s"]), float(meta["threshold"])
    except ValueError as exc:
        raise ModelLoadError(f"{path}: bad horizon_s/threshold metadata: {exc}") from exc
    if not (math.isfinite(horizon) and horizon > 0 and 0.0 <= threshold <= 1.0):
        raise ModelLoadError(f"{path}: horizon_s {horizon} or threshold {threshold} out of range")
    info = ModelInfo(
        path=str(path),
        sha256=opened.sha256,
        version=meta["model_version"],
        features_version=meta["features_version"],
        horizon=horizon,
        threshold=threshold,
        data_version=meta.get("data_version", ""),
        metadata=meta,
    )
    return info, opened.session, opened.input_name


def _calibration(meta: Mapping[str, str], path: Path) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]] | None:
    """The `calibration` table (raw P -> calibrated P, "x:y,x:y,...", x increasing), or None."""
    text = meta.get("calibration", "")
    if not text:
        return None
    try:
        pairs = np.array([[float(v) for v in item.split(":")] for item in text.split(",")], np.float64)
    except ValueError as exc:
        raise ModelLoadError(f"{path}: bad calibration metadata: {exc}") from exc
    if pairs.ndim != 2 or pairs.shape[1] != 2 or np.any(np.diff(pairs[:, 0]) < 0):
        raise ModelLoadError(f"{path}: calibration must be x:y pairs with x increasing")
    if not np.all((pairs >= 0) & (pairs <= 1)):
        raise ModelLoadError(f"{path}: calibration values outside 0..1")
    return pairs[:, 0], pairs[:, 1]


def _reference(meta: Mapping[str, str], path: Path) -> npt.NDArray[np.float32]:
    """Per-feature reference values for explanations (`feature_reference`); NaN (missing) without."""
    text = meta.get("feature_reference", "")
    if not text:
        return np.full(N_FEATURES, np.nan, np.float32)
    try:
        ref = np.array([float(v) for v in text.split(",")], np.float32)
    except ValueError as exc:
        raise ModelLoadError(f"{path}: bad feature_reference metadata: {exc}") from exc
    if ref.size != N_FEATURES:
        raise ModelLoadError(f"{path}: feature_reference has {ref.size} values, not {N_FEATURES}")
    return ref


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


# --- evaluation on a held-out window ----------------------------------------------------------------


@dataclass(frozen=True)
class Holdout:
    """Feature rows and labels from recorded telemetry, for comparing models."""

    X: npt.NDArray[np.float32]
    y: npt.NDArray[np.int8]
    horizon: float

    @classmethod
    def from_traces(
        cls, traces: Sequence[HostTrace], start: float, end: float, horizon: float, stride: float = 300.0
    ) -> Holdout:
        """Rows every `stride` s in [start, end - horizon) (later rows' labels are not known yet)."""
        xs, ys = [], []
        for trace in traces:
            times = evaluation_times(trace, stride)
            times = times[(times >= start) & (times < end - horizon)]
            xs.append(trace_features(trace, times))
            ys.append(drain_labels(times, trace.drains, horizon))
        X = np.concatenate(xs) if xs else np.empty((0, N_FEATURES), np.float32)
        y = np.concatenate(ys) if ys else np.empty(0, np.int8)
        return cls(X, y, horizon)


@dataclass(frozen=True)
class Scores:
    pr_auc: float
    brier: float
    rows: int
    positives: int


def average_precision(y: npt.NDArray[np.integer[Any]], p: npt.NDArray[np.floating[Any]]) -> float:
    """Area under the precision-recall curve as a step sum (scikit-learn's average_precision_score)."""
    positives = int(np.sum(y))
    if positives == 0:
        return float("nan")
    order = np.argsort(-p, kind="mergesort")
    ps, ys = p[order], y[order]
    last = np.append(np.flatnonzero(np.diff(ps)), ps.size - 1)  # last row of each distinct score
    tp = np.cumsum(ys)[last]
    precision = tp / (last + 1)
    recall = tp / positives
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def evaluate(predictor: DrainPredictor, holdout: Holdout) -> Scores:
    p = predictor.predict(holdout.X).astype(np.float64)
    y = holdout.y.astype(np.float64)
    brier = float(np.mean((p - y) ** 2)) if y.size else float("nan")
    return Scores(average_precision(holdout.y, p), brier, int(y.size), int(y.sum()))


@dataclass(frozen=True)
class Decision:
    activated: bool
    reason: str
    candidate: Scores | None
    current: Scores | None


# --- the registry -----------------------------------------------------------------------------------


class ModelRegistry:
    """The active model and the one before it. Swaps are atomic; scoring uses one model per call.

    A candidate wins when its PR-AUC beats the current one's by more than `min_pr_auc_gain` and its
    Brier score is not worse by more than `max_brier_loss` (relative).
    """

    def __init__(
        self, *, intra_op_threads: int = 1, min_pr_auc_gain: float = 0.0, max_brier_loss: float = 0.05
    ) -> None:
        self._threads = intra_op_threads
        self._min_gain = min_pr_auc_gain
        self._max_brier_loss = max_brier_loss
        self._lock = threading.Lock()
        self._active: DrainPredictor | None = None
        self._previous: DrainPredictor | None = None

    @property
    def active(self) -> DrainPredictor | None:
        return self._active

    @property
    def previous(self) -> DrainPredictor | None:
        return self._previous

    def activate(self, path: str | os.PathLike[str]) -> DrainPredictor:
        """Load and activate `path`. On ModelLoadError nothing changes (the error propagates)."""
        model = DrainPredictor(path, intra_op_threads=self._threads)
        self._install(model)
        return model

    def _install(self, model: DrainPredictor) -> None:
        with self._lock:
            self._previous, self._active = self._active, model
        log.info(
            "drain model activated",
            extra={"model_version": model.version, "model_path": model.info.path, "sha256": model.info.sha256},
        )

    def install(self, active: DrainPredictor, previous: DrainPredictor | None) -> None:
        """Make `active` the active model and `previous` the one before it (both loaded already)."""
        with self._lock:
            self._previous, self._active = previous, active
        log.info("drain model installed", extra={"model_version": active.version, "sha256": active.info.sha256})

    def rollback(self) -> DrainPredictor:
        """Make the previous model active again (the current one becomes the previous)."""
        with self._lock:
            if self._previous is None:
                raise RegistryError("no previous drain model to roll back to")
            self._active, self._previous = self._previous, self._active
            active = self._active
        log.warning("drain model rolled back", extra={"model_version": active.version})
        return active

    def consider(
        self, candidate_path: str | os.PathLike[str], holdout: Holdout, unseen: Holdout | None = None
    ) -> Decision:
        """Activate the candidate only if it beats the active model on `holdout` (a later window) and,
        when given, on `unseen`: hosts the candidate was never trained on (a fleet it did not see).
        An `unseen` set without drains cannot be compared on and is left out of the decision."""
        try:
            candidate = DrainPredictor(candidate_path, intra_op_threads=self._threads)
        except ModelLoadError as exc:
            return Decision(False, f"candidate does not load: {exc}", None, None)
        current = self._active
        if current is not None and candidate.horizon != holdout.horizon:
            return Decision(
                False, f"candidate horizon {candidate.horizon:g}s != holdout {holdout.horizon:g}s", None, None
            )
        if holdout.y.size == 0 or holdout.y.sum() == 0:
            return Decision(False, "holdout has no drains: nothing to compare on", None, None)
        cand = evaluate(candidate, holdout)
        cur = evaluate(current, holdout) if current is not None else None
        unseen_note = ""
        if cur is not None:
            if not cand.pr_auc > cur.pr_auc + self._min_gain:
                return Decision(False, f"PR-AUC {cand.pr_auc:.4f} does not beat {cur.pr_auc:.4f}", cand, cur)
            if cand.brier > cur.brier * (1 + self._max_brier_loss):
                return Decision(False, f"Brier {cand.brier:.5f} worse than {cur.brier:.5f}", cand, cur)
            if unseen is not None and unseen.y.size and unseen.y.sum():
                cand_u, cur_u = evaluate(candidate, unseen), evaluate(current, unseen)  # type: ignore[arg-type]
                if not cand_u.pr_auc > cur_u.pr_auc + self._min_gain:
                    return Decision(
                        False,
                        f"on hosts it never saw, PR-AUC {cand_u.pr_auc:.4f} does not beat {cur_u.pr_auc:.4f}",
                        cand,
                        cur,
                    )
                unseen_note = f"; on hosts it never saw {cand_u.pr_auc:.4f} > {cur_u.pr_auc:.4f}"
            elif unseen is not None:
                unseen_note = "; no drains on the hosts it never saw to compare on"
        self._install(candidate)
        reason = "no active model" if cur is None else f"PR-AUC {cand.pr_auc:.4f} > {cur.pr_auc:.4f}{unseen_note}"
        return Decision(True, reason, cand, cur)

    def score(self, histories: Mapping[str, HistoryLike], now: float) -> dict[str, float]:
        model = self._active
        if model is None:
            raise RegistryError("no drain model is active")
        return model.score(histories, now)


# --- retraining -------------------------------------------------------------------------------------

TRAIN_MODULE = "models.drain.train"
"""Installed with the `train` extra; run as `python -m`, so scikit-learn never loads in the coordinator."""


def retrain(
    traces: Sequence[HostTrace],
    out_path: str | os.PathLike[str],
    *,
    horizon: float = 1800.0,
    seed: int = 1,
    model_version: str = "drain-retrained",
    timeout: float = 1800.0,
    nice: int = 10,
    python: str = sys.executable,
    module: str = TRAIN_MODULE,
    extra_args: Sequence[str] = (),
) -> Path:
    """Train a candidate on recorded traces in a child process (one thread, niced, bounded time).

    Blocks; call it with asyncio.to_thread. Returns `out_path`; RetrainError on any failure.
    """
    out = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="ferryman-retrain-") as tmp:
        data = Path(tmp) / "traces.npz"
        save_traces(data, traces)
        args = [
            "--recorded",
            str(data),
            "--out",
            str(out),
            "--threads",
            "1",
            "--horizon",
            f"{horizon:g}",
            "--seed",
            str(seed),
            "--model-version",
            model_version,
            *extra_args,
        ]
        run_training(module, args, timeout=timeout, nice=nice, python=python)
    if not out.is_file():
        raise RetrainError(f"retraining wrote no model at {out}")
    return out


def run_training(
    module: str, args: Sequence[str], *, timeout: float, nice: int = 10, python: str = sys.executable
) -> None:
    """Run `python -m module args` as a niced child with one BLAS thread, at most `timeout` seconds.

    Blocks; call it with asyncio.to_thread. RetrainError when the train extra is missing, the run
    takes too long or fails (with the tail of its stderr)."""
    if not _trainable(python, module):
        raise RetrainError(f"retraining needs the train extra (pip install 'ferryman[train]'): {python} lacks {module}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    try:
        proc = subprocess.run(
            [python, "-m", module, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            preexec_fn=lambda: os.nice(nice),  # only os.nice between fork and exec: no locks taken
        )
    except subprocess.TimeoutExpired as exc:
        raise RetrainError(f"retraining took longer than {timeout:g}s") from exc
    except OSError as exc:
        raise RetrainError(f"cannot start retraining: {exc}") from exc
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise RetrainError(f"retraining failed (exit {proc.returncode}): {tail}")


def _trainable(python: str, module: str) -> bool:
    """Whether `python` can import `module` and scikit-learn (looked up without importing them)."""
    probe = f"import importlib.util as u, sys; sys.exit(0 if u.find_spec({module!r}) and u.find_spec('sklearn') else 1)"
    try:
        return subprocess.run([python, "-c", probe], capture_output=True, timeout=60, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
