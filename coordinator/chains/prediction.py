"""The next stage's usage, predicted while a stage serves, and what to reserve for it.

The chain's own history is its earlier runs: the chains of the same name, each stage's measured
peak (`StageRun.peak_*`) and the state bytes handed into it (`HandoverRecord.state_bytes`). From it
and what the serving stage uses now, the chain usage model (models/chains/, served here through
onnxruntime) predicts the next stage's CPU and memory in this run (coordinator/chains/usage.py says
the features). A stage's request rate is its peak packets/s in (`StageRun.peak_request_rate`, from
its host's telemetry): `rate_growth` is the serving stage's now over its last run's, missing (NaN)
when either was not measured (a stage without a service address), which the model was trained to
take. Without a model, or for a stage
no earlier run had, the manifest's `predicted` is the prediction, else its `resources` (`basis`
says which). The chain manager reserves the prediction on the host the next stage will run on and
re-reserves when it moves by more than `REPLAN_TOLERANCE`.

The model's session is synchronous CPU work: the manager calls `UsageModel.predict` through
`asyncio.to_thread`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from coordinator.chains.manifest import Stage
from coordinator.chains.states import ChainRecord, RunState, StageRun, State
from coordinator.chains.usage import (
    FEATURE_NAMES,
    FEATURES_VERSION,
    KINDS,
    MAX_RUNS,
    ChainRun,
    StageUsage,
    rows_for,
    usage_from_output,
)
from coordinator.predictor import ModelLoadError, open_onnx_model

REQUIRED_METADATA = ("model_version", "features_version", "n_features", "feature_names")
OUTPUT = "variable"
RATE_GROWTH = FEATURE_NAMES.index("rate_growth")
REPLAN_TOLERANCE = 0.1
"""A pre-allocation is made again when the prediction moves more than this (relative) from it."""


@dataclass(frozen=True)
class Prediction:
    stage: str
    cpu_millis: int
    memory_bytes: int
    basis: str
    """`model` (the chain's history), `manifest` (the stage's `predicted`) or `resources`."""
    request_rate: float | None = None
    """The serving stage's request rate the prediction was made with (peak packets/s in so far;
    None: not measured)."""
    rate_growth: float | None = None
    """The model's `rate_growth` input: that rate over the serving stage's in its last run (None:
    missing, or no model row)."""

    def to_dict(self, at: float) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "cpu_millis": self.cpu_millis,
            "memory_bytes": self.memory_bytes,
            "basis": self.basis,
            "request_rate": self.request_rate,
            "rate_growth": self.rate_growth,
            "at": at,
        }


class UsageModel:
    """The chain usage model (models/chains/usage.onnx), checked to fit our features."""

    def __init__(self, path: str | os.PathLike[str], *, intra_op_threads: int = 1) -> None:
        opened = open_onnx_model(
            Path(path),
            threads=intra_op_threads,
            what="chain usage model",
            required=REQUIRED_METADATA,
            features_version=FEATURES_VERSION,
            feature_names=FEATURE_NAMES,
        )
        self.version = opened.metadata["model_version"]
        self._session: ort.InferenceSession = opened.session
        self._input = self._session.get_inputs()[0].name
        outputs = [o.name for o in self._session.get_outputs()]
        if outputs != [OUTPUT]:
            raise ModelLoadError(f"{path}: outputs {outputs}, not [{OUTPUT!r}]")
        probe = self.predict(
            [[0.0, 3.0, 1.0, 0.0, 0.1, 1.0, 1.0, 1.0, 1.0], [0.0, 3.0, 1.0, 0.0, 0.1, 1.0, 1.0, 1.0, math.nan]]
        )
        if not np.all(np.isfinite(probe)):
            raise ModelLoadError(f"{path}: answers a probe with {probe}")

    def predict(self, rows: Sequence[Sequence[float]]) -> list[float]:
        if not rows:
            return []
        X = np.asarray(rows, np.float32).reshape(len(rows), len(FEATURE_NAMES))
        return [float(v) for v in self._session.run([OUTPUT], {self._input: X})[0][:, 0]]


def history(earlier: Sequence[ChainRecord]) -> list[ChainRun]:
    """The chain's earlier runs, oldest first (at most MAX_RUNS): each stage's peak as measured in
    its serving run, the state bytes handed into it and its peak request rate. Chains that measured
    nothing are left out."""
    out: list[ChainRun] = []
    for record in sorted(earlier, key=lambda r: r.created_at)[-MAX_RUNS:]:
        usage = {
            run.stage: StageUsage(run.peak_cpu_millis, float(run.peak_memory_bytes))
            for run in record.runs
            if run.peak_cpu_millis > 0 or run.peak_memory_bytes > 0
        }
        if usage:
            rates = {run.stage: run.peak_request_rate for run in record.runs if run.peak_request_rate > 0}
            out.append(ChainRun(usage, volumes_into(record), rates))
    return out


def volumes_into(record: ChainRecord) -> dict[str, float]:
    """The state bytes each stage took in this chain (its last done handover into it)."""
    return {h.target: float(h.state_bytes) for h in record.handovers if h.outcome == "done" and h.state_bytes}


def _serving_run(record: ChainRecord) -> StageRun | None:
    return next((r for r in record.runs if r.stage == record.serving and r.state is RunState.SERVING), None)


def serving_usage(record: ChainRecord) -> StageUsage | None:
    run = _serving_run(record)
    if run is None or (run.peak_cpu_millis <= 0 and run.peak_memory_bytes <= 0):
        return None
    return StageUsage(run.peak_cpu_millis, float(run.peak_memory_bytes))


def serving_rate(record: ChainRecord) -> float | None:
    """The serving stage's peak request rate so far (None: not measured)."""
    run = _serving_run(record)
    return run.peak_request_rate if run is not None and run.peak_request_rate > 0 else None


def model_rows(record: ChainRecord, past: Sequence[ChainRun], target: str) -> dict[str, tuple[list[float], float]]:
    """The model's rows for `target`, by resource (none without a past run of it)."""
    return rows_for(
        past,
        record.serving,
        target,
        serving_usage(record),
        volumes_into(record).get(record.serving),
        serving_rate(record),
    )


def decide(
    stage: Stage,
    rows: Mapping[str, tuple[list[float], float]],
    outputs: Mapping[str, float],
    default: tuple[int, int],
    request_rate: float | None = None,
) -> Prediction:
    """The prediction for `stage`: the model's where it had a row and an output, else the manifest's
    `predicted`, else the stage's `resources` (or the coordinator's `default` cpu, memory). It
    records the serving stage's `request_rate` and the rows' `rate_growth` it was made with."""
    fallback = {
        "cpu_millis": (stage.predicted_cpu_millis, "manifest") if stage.predicted_cpu_millis else None,
        "memory_bytes": (stage.predicted_memory_bytes, "manifest") if stage.predicted_memory_bytes else None,
    }
    resources = {"cpu_millis": stage.cpu_millis or default[0], "memory_bytes": stage.memory_bytes or default[1]}
    values: dict[str, int] = {}
    bases: set[str] = set()
    for kind in KINDS:
        if kind in rows and kind in outputs:
            values[kind], basis = round(usage_from_output(outputs[kind], rows[kind][1])), "model"
        elif fallback[kind] is not None:
            value, basis = fallback[kind]  # type: ignore[misc]
            values[kind] = int(value)
        else:
            values[kind], basis = int(resources[kind]), "resources"
        bases.add(basis)
    basis = next(b for b in ("model", "manifest", "resources") if b in bases)
    growth = next((row[RATE_GROWTH] for row, _ in rows.values() if math.isfinite(row[RATE_GROWTH])), None)
    return Prediction(
        stage.name,
        max(1, values["cpu_millis"]),
        max(1, values["memory_bytes"]),
        basis,
        request_rate,
        round(growth, 4) if growth is not None else None,
    )


def replan(preallocation: Mapping[str, Any], prediction: Prediction) -> bool:
    """Whether the pre-allocation no longer fits the prediction: none held, held for another stage,
    or off by more than REPLAN_TOLERANCE in either resource."""
    if not preallocation or preallocation.get("stage") != prediction.stage:
        return True
    for kind, want in (("cpu_millis", prediction.cpu_millis), ("memory_bytes", prediction.memory_bytes)):
        held = float(preallocation.get(kind, 0))
        if held <= 0 or abs(want - held) / held > REPLAN_TOLERANCE:
            return True
    return False


def earlier_runs(records: Sequence[ChainRecord], record: ChainRecord) -> list[ChainRecord]:
    """The chain's earlier runs: other chains of its name that ended (completed or aborted)."""
    ended = (State.COMPLETED, State.ABORTED)
    return [r for r in records if r.name == record.name and r.id != record.id and r.state in ended]
