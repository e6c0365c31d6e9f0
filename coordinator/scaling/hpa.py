"""The reactive baseline: a replica count computed the way the Kubernetes Horizontal Pod Autoscaler
computes it (autoscaling/v2 defaults), as a pure function, to measure predictive scaling against.

Every `sync_period_s` (15 s, the controller manager's --horizontal-pod-autoscaler-sync-period):

- `ratio` = current utilisation / target utilisation, where the utilisation is the CPU used over the
  CPU requested by the current replicas; a replica not ready yet counts as using nothing when the
  ratio says scale up (the HPA's conservative treatment of unready pods);
- within the tolerance (|ratio - 1| <= 0.1) nothing changes;
- else the recommendation is ceil(current x ratio), within [min, max];
- scale up at most by max(100 %, 4 replicas) per 15 s (the default scaleUp policies, selectPolicy Max,
  no stabilisation window);
- scale down to the highest recommendation of the last 300 s (the default scaleDown stabilisation
  window), so a dip shorter than five minutes removes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class HpaConfig:
    target_utilization: float = 0.7
    """Of the CPU requested per replica (a common HPA setting)."""
    replica_cores: float = 1.0
    """CPU request per replica."""
    min_replicas: int = 1
    max_replicas: int = 20
    sync_period_s: float = 15.0
    tolerance: float = 0.1
    scale_down_stabilization_s: float = 300.0
    scale_up_percent: float = 100.0
    scale_up_pods: int = 4

    def __post_init__(self) -> None:
        if not (self.target_utilization > 0 and self.replica_cores > 0):
            raise ValueError("target_utilization and replica_cores must be > 0")
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 1 <= min_replicas ({self.min_replicas}) <= max_replicas ({self.max_replicas})")


@dataclass(frozen=True)
class HpaState:
    last_sync: float | None = None
    recommendations: tuple[tuple[float, int], ...] = ()
    """(time, recommendation) within the scale-down stabilisation window."""

    def for_storage(self) -> dict[str, object]:
        return {"last_sync": self.last_sync, "recommendations": [[t, r] for t, r in self.recommendations]}

    @classmethod
    def from_storage(cls, kept: Mapping[str, Any]) -> HpaState:
        last = kept.get("last_sync")
        return cls(
            last_sync=None if last is None else float(last),
            recommendations=tuple((float(t), int(r)) for t, r in kept.get("recommendations", ())),
        )


@dataclass(frozen=True)
class HpaDecision:
    at: float
    current: int
    desired: int
    utilization: float
    ratio: float
    reason: str


def hpa_step(
    state: HpaState, now: float, current: int, ready: int, cpu_used: float, config: HpaConfig
) -> tuple[HpaDecision | None, HpaState]:
    """One controller pass at `now` (None between syncs): `current` replicas (ready or starting),
    `ready` of them serving, `cpu_used` cores by the ready ones."""
    if state.last_sync is not None and now - state.last_sync < config.sync_period_s:
        return None, state
    if current < 1:
        current = config.min_replicas
    request = config.replica_cores
    ready_util = cpu_used / (max(ready, 1) * request)
    ratio = ready_util / config.target_utilization
    if ratio > 1.0 and ready < current:
        # unready replicas count as using nothing when scaling up
        ratio = cpu_used / (current * request) / config.target_utilization
    if abs(ratio - 1.0) <= config.tolerance:
        recommendation, why = current, "within tolerance"
    else:
        recommendation = min(config.max_replicas, max(config.min_replicas, math.ceil(current * ratio - 1e-9)))
        why = f"ceil({current} x {ratio:.3f})"
    window = tuple((t, r) for t, r in state.recommendations if t > now - config.scale_down_stabilization_s)
    window += ((now, recommendation),)
    if recommendation > current:
        limit = max(math.ceil(current * (1 + config.scale_up_percent / 100.0)), current + config.scale_up_pods)
        desired = min(recommendation, limit)
        if desired < recommendation:
            why += f", scale-up limited to {desired}"
    else:
        desired = min(current, max(r for _, r in window))
        if desired > recommendation:
            why += f", held at {desired} by the {config.scale_down_stabilization_s:g} s stabilisation window"
    next_state = replace(state, last_sync=now, recommendations=window)
    return HpaDecision(now, current, desired, ready_util, ratio, why), next_state
