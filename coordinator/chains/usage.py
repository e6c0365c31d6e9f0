"""The features of a chain's usage prediction: a stage's CPU and memory in this run of the chain,
from the chain's own history (version `chain-usage-features/2`). Pure: training
(models/chains/train.py) and the chain manager (coordinator/chains/prediction.py) compute the same
rows with this module.

A chain runs again and again (one run: the chain's stages, one after another); each run of a stage
has a measured peak CPU (millicores) and memory (bytes), the state handed into it has a size (the
data volume), and the stage served requests at a rate (requests/s, where it was measured). While
stage S serves, the usage of the next stage T in this run is predicted from:

- T's own past runs (the "same as last run" baseline is T's last one alone);
- how S compares now with S in the last run (`s_growth`): the request rate and the data volume of
  this run show in S first, before T exists;
- how the data volume handed into S compares with the last run's (`volume_growth`);
- how the request rate S serves at compares with its rate in the last run (`rate_growth`): the
  rate drives the next stage's usage directly, where S's usage mixes it with S's idle share and
  its data. Missing (NaN) when either rate was not measured; the model was trained with rows
  missing it, and predicts from the rest then.

Every feature is a ratio to T's last run (`scale`), so one model serves stages of any size; the
model's output is T's usage in this run over its last run: usage = output x scale
(`usage_from_output`). One row per resource (`kind`: 0 CPU, 1 memory).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

FEATURES_VERSION = "chain-usage-features/2"
FEATURE_NAMES = (
    "kind",
    "runs",
    "t_mean3",
    "t_trend",
    "t_spread",
    "s_growth",
    "s_over_t",
    "volume_growth",
    "rate_growth",
)
N_FEATURES = len(FEATURE_NAMES)
KINDS = ("cpu_millis", "memory_bytes")
MAX_RUNS = 10
"""Runs of history a row counts (and the most the chain manager reads)."""
FACTOR_BOUNDS = (0.25, 4.0)
"""The model's output is clipped to this: no run of a stage is predicted at under a quarter, or over
four times, of its last."""
EPS = 1e-9


@dataclass(frozen=True)
class StageUsage:
    """A stage's measured peak in one run of the chain."""

    cpu_millis: float
    memory_bytes: float

    def of(self, kind: str) -> float:
        return self.cpu_millis if kind == "cpu_millis" else self.memory_bytes


@dataclass(frozen=True)
class ChainRun:
    """One run of the chain: each stage's measured peak, the state bytes handed into it, and the
    request rate it served at (requests/s; a stage not measured is not in it)."""

    usage: Mapping[str, StageUsage]
    volume_bytes: Mapping[str, float] = field(default_factory=dict)
    request_rate: Mapping[str, float] = field(default_factory=dict)


def _ratio(a: float, b: float) -> float:
    return a / b if b > EPS else 1.0


def feature_row(
    kind: str,
    target_past: Sequence[float],
    source_past: float | None,
    source_now: float | None,
    volume_past: float | None,
    volume_now: float | None,
    rate_past: float | None = None,
    rate_now: float | None = None,
) -> tuple[list[float], float] | None:
    """One row and its scale (T's last run), or None without a past run of T to scale by.

    `target_past`: T's usage of this kind in earlier runs, oldest first; `source_past`, `source_now`:
    S's in the last run and in this one; `volume_*`: the state bytes handed into S then and now;
    `rate_*`: the request rate S served at then and now (None: not measured)."""
    past = [v for v in target_past if v > 0][-MAX_RUNS:]
    if not past:
        return None
    scale = past[-1]
    last3 = past[-3:]
    mean = sum(last3) / len(last3)
    last5 = past[-5:]
    mean5 = sum(last5) / len(last5)
    spread = math.sqrt(sum((v - mean5) ** 2 for v in last5) / len(last5))
    growth = _ratio(source_now, source_past) if source_now and source_past else 1.0
    s_over_t = _ratio(source_past, scale) if source_past else 1.0
    volume = _ratio(volume_now, volume_past) if volume_now and volume_past else 1.0
    rate = _ratio(rate_now, rate_past) if rate_now and rate_past else math.nan
    row = [
        float(KINDS.index(kind)),
        float(len(past)),
        mean / scale,
        (past[-1] - past[-2]) / scale if len(past) >= 2 else 0.0,
        spread / scale,
        growth,
        s_over_t,
        volume,
        rate,
    ]
    return row, scale


def rows_for(
    history: Sequence[ChainRun],
    source: str,
    target: str,
    source_now: StageUsage | None,
    volume_now: float | None,
    rate_now: float | None = None,
) -> dict[str, tuple[list[float], float]]:
    """The rows (by kind) for predicting `target` in the run going on, `source` serving now with
    `source_now` measured so far, `volume_now` state bytes handed into it and `rate_now` requests/s
    (None: not measured); kinds without a past run of `target` are left out."""
    runs = list(history)[-MAX_RUNS:]
    last_with_source = next((r for r in reversed(runs) if source in r.usage), None)
    out: dict[str, tuple[list[float], float]] = {}
    for kind in KINDS:
        made = feature_row(
            kind,
            [r.usage[target].of(kind) for r in runs if target in r.usage],
            last_with_source.usage[source].of(kind) if last_with_source else None,
            source_now.of(kind) if source_now else None,
            last_with_source.volume_bytes.get(source) if last_with_source else None,
            volume_now,
            last_with_source.request_rate.get(source) if last_with_source else None,
            rate_now,
        )
        if made is not None:
            out[kind] = made
    return out


def usage_from_output(output: float, scale: float) -> float:
    """The predicted usage: the model's factor (clipped to FACTOR_BOUNDS) times T's last run."""
    low, high = FACTOR_BOUNDS
    factor = output if math.isfinite(output) else 1.0
    return min(max(factor, low), high) * scale
