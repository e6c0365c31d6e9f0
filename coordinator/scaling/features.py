"""The scaling model's features: a downstream component's CPU need `horizon` seconds ahead, from its
upstream's lagged metrics and its own (version `scaling-features/1`).

Training (models/scaling/train.py) and serving compute the same rows with this module. Every value
is scaled by the component's own recent level (`scale`: its mean CPU over the last minute), so one
model serves components of any size and load. The upstream enters through the lag the correlation
engine found: what the upstream received at t - lag + horizon reaches the component at t + horizon,
and that is already measured when horizon <= lag. The model's output is a correction factor on that
upstream-implied need: need at the horizon = output x implied_horizon x scale (`need_from_output`),
which carries over to loads the training traces never had (trees cannot extrapolate a level; a
factor carries over).

For second t (every series known up to and including t), with U the upstream and D the component.
Transfer: D's CPU over the last minute per U request a lag earlier (cores per request/s). Features,
all over the scale (no absolute level, so nothing ties the model to one component's size):

- `implied_horizon`: transfer x U's rate around t - lag + horizon (or its latest, when horizon > lag);
- `implied_latest`: transfer x U's latest rate (what arrives at t + lag);
- `upstream_trend`: transfer x (U's rate now - 10 s ago);
- `upstream_latency`, `upstream_errors`: U's last 5 s over its last minute;
- `gap_s`: horizon - lag (seconds the upstream information falls short; <= 0: fully known);
- `cpu_now`, `cpu_5s`, `cpu_trend`, `cpu_max_60s`: D's own CPU;
- `latency`, `errors`: D's last 5 s over its last minute.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from coordinator.scaling.series import Array, ComponentSeries

FEATURES_VERSION = "scaling-features/1"
FEATURE_NAMES = (
    "implied_horizon",
    "implied_latest",
    "upstream_trend",
    "upstream_latency",
    "upstream_errors",
    "gap_s",
    "cpu_now",
    "cpu_5s",
    "cpu_trend",
    "cpu_max_60s",
    "latency",
    "errors",
)
N_FEATURES = len(FEATURE_NAMES)
HISTORY_S = 60
"""Seconds of the component's own past the features look at (the scale and the references)."""
EPS = 1e-6
IMPLIED_FLOOR = 0.05
"""The implied need (over the scale) the correction factor applies to at least: an upstream gone
quiet still leaves the component some work."""


class _Windows:
    """Means over inclusive windows [a, b] of one series, by cumulative sums."""

    def __init__(self, x: Array) -> None:
        self.cs = np.concatenate([[0.0], np.cumsum(np.asarray(x, np.float64))])

    def mean(self, a: npt.NDArray[np.int64], b: npt.NDArray[np.int64]) -> Array:
        a = np.maximum(a, 0)
        return np.asarray((self.cs[b + 1] - self.cs[a]) / (b - a + 1), np.float64)


def first_second(lag_s: int) -> int:
    """The first second with a full history for a model over an upstream `lag_s` ahead."""
    return lag_s + HISTORY_S + 10


def feature_matrix(
    up: ComponentSeries, down: ComponentSeries, lag_s: int, horizon_s: int, times: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.float32], Array]:
    """Rows (float32 [len(times), N_FEATURES]) at the given seconds, and each row's scale (cores)."""
    if lag_s < 1 or horizon_s < 1:
        raise ValueError(f"lag {lag_s} s and horizon {horizon_s} s must be >= 1")
    t = np.asarray(times, np.int64)
    if len(t) and (t.min() < first_second(lag_s) or t.max() >= len(down) or len(up) != len(down)):
        raise ValueError(f"seconds outside [{first_second(lag_s)}, {len(down)}) or series of different lengths")
    u_rate, u_lat, u_err = _Windows(up.rate), _Windows(up.latency), _Windows(up.errors)
    d_cpu, d_lat, d_err = _Windows(down.cpu), _Windows(down.latency), _Windows(down.errors)
    h = HISTORY_S - 1
    scale = np.maximum(d_cpu.mean(t - h, t), EPS)
    transfer = d_cpu.mean(t - h, t) / np.maximum(u_rate.mean(t - lag_s - h, t - lag_s), EPS)
    at = np.minimum(t, t - lag_s + horizon_s)
    implied_h = transfer * u_rate.mean(at - 2, at) / scale
    implied_now = transfer * u_rate.mean(t - 2, t) / scale
    up_trend = transfer * (u_rate.mean(t - 4, t) - u_rate.mean(t - 14, t - 10)) / scale
    up_lat = u_lat.mean(t - 4, t) / np.maximum(u_lat.mean(t - h, t), EPS)
    up_err = (u_err.mean(t - 4, t) + 0.1) / (u_err.mean(t - h, t) + 0.1)
    cpu = np.asarray(down.cpu, np.float64)
    cpu_now = cpu[t] / scale
    cpu_5 = d_cpu.mean(t - 4, t) / scale
    cpu_trend = (d_cpu.mean(t - 4, t) - d_cpu.mean(t - 14, t - 10)) / scale
    cpu_max = np.array([cpu[max(0, i - h) : i + 1].max() for i in t], np.float64) / scale
    lat = d_lat.mean(t - 4, t) / np.maximum(d_lat.mean(t - h, t), EPS)
    err = (d_err.mean(t - 4, t) + 0.1) / (d_err.mean(t - h, t) + 0.1)
    gap = np.full(len(t), float(horizon_s - lag_s))
    cols = (implied_h, implied_now, up_trend, up_lat, up_err, gap, cpu_now, cpu_5, cpu_trend, cpu_max, lat, err)
    return np.column_stack(cols).astype(np.float32), scale


_IMPLIED = FEATURE_NAMES.index("implied_horizon")


def implied(X: npt.NDArray[np.float32]) -> Array:
    """The upstream-implied need at the horizon over the scale, floored (what the factor multiplies)."""
    return np.maximum(np.asarray(X[:, _IMPLIED], np.float64), IMPLIED_FLOOR)


def need_from_output(output: npt.NDArray[Any], X: npt.NDArray[np.float32], scale: Array) -> Array:
    """The model's correction factors as CPU needs in cores."""
    return np.asarray(output, np.float64) * implied(X) * scale


def training_target(need: Array, X: npt.NDArray[np.float32], scale: Array) -> Array:
    """What the model is fitted to: the need over the implied need (`need_from_output`'s inverse)."""
    return np.asarray(need / (implied(X) * scale), np.float64)


def target(down: ComponentSeries, horizon_s: int, times: npt.NDArray[np.int64]) -> Array:
    """The CPU need at the horizon (mean over the 5 s around t + horizon), in cores."""
    t = np.asarray(times, np.int64) + horizon_s
    if len(t) and t.max() + 2 >= len(down):
        raise ValueError("seconds too close to the end of the series for the horizon")
    return _Windows(down.cpu).mean(t - 2, t + 2)
