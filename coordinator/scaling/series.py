"""A component's behaviour as per-second time series: what the correlation engine and the scaling
model read. Index i is second i of the window; every metric has the same length."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

METRICS = ("rate", "latency", "errors", "cpu", "memory")
"""rate: requests/s arrived; latency: ms; errors: per second; cpu: cores used (the CPU need);
memory: MB."""

Array = npt.NDArray[np.float64]


@dataclass(frozen=True)
class ComponentSeries:
    rate: Array
    latency: Array
    errors: Array
    cpu: Array
    memory: Array

    def __post_init__(self) -> None:
        lengths = {len(getattr(self, m)) for m in METRICS}
        if len(lengths) != 1:
            raise ValueError(f"metrics of different lengths: {sorted(lengths)}")

    def __len__(self) -> int:
        return len(self.rate)

    def metric(self, name: str) -> Array:
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r} (one of {', '.join(METRICS)})")
        return np.asarray(getattr(self, name), np.float64)

    def window(self, start: int, stop: int) -> ComponentSeries:
        return ComponentSeries(*(np.asarray(getattr(self, m)[start:stop], np.float64) for m in METRICS))
