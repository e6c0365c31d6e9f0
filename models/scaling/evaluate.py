"""Replaying a trace through a scaling policy: a queueing model of replicas with cold starts.

Each downstream stage (B, C) is simulated on its own against the trace's arrivals, second by second:

- **Work.** The stage's CPU need (the trace's `cpu`, cores) arrives each second; the ready replicas
  serve up to `replica_cores` each; what they cannot serve waits (backlog, core-seconds).
- **Latency.** The base latency inflated by the utilisation rho of the ready replicas
  (x (1 + 0.5 rho / (1 - rho)), rho capped at 0.99, M/M/1-like), plus the backlog's wait. A second
  violates the SLO when its latency exceeds `slo_factor` x the base (4x: rho above ~0.86, or a queue).
- **Replicas.** A cold start is ready `cold_start_s` after it is asked for; a warm standby
  `warm_start_s` after (then a new standby is prepared, ready a cold start later). Stopping is
  immediate. Replica-seconds count every second of a replica ready or starting, and a standby at
  `standby_share` of a replica.
- **What the policies see.** The served CPU (capped by the capacity, as a cgroup would show it),
  the simulated latency, the trace's request rates and errors; the predictive policy also the
  upstream stage's series and the lag the correlation engine found. The reactive baseline acts on
  the served CPU's mean over 15 s (metrics-server's window); the predictive policy's need now is
  the served CPU's mean over 5 s plus the queued work.

Policies: `predictive` (coordinator/scaling/policy.py with the model's need at the horizon, every
`decide_every_s`) and `reactive` (coordinator/scaling/hpa.py: the HPA's 15 s sync, 10 % tolerance,
300 s scale-down stabilisation, cold starts only).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from coordinator.scaling.features import first_second
from coordinator.scaling.hpa import HpaConfig, HpaState, hpa_step
from coordinator.scaling.policy import ScalingConfig, ScalingInputs, ScalingState, decide
from coordinator.scaling.series import ComponentSeries

NeedPredictor = Callable[[ComponentSeries, ComponentSeries, int, int], float]
"""(upstream, downstream as measured so far, lag, second) -> CPU need at the horizon, cores."""


@dataclass(frozen=True)
class SimConfig:
    replica_cores: float = 1.0
    cold_start_s: int = 12
    warm_start_s: int = 2
    standbys: int = 1
    """Warm standbys the predictive policy keeps (the reactive baseline, like the HPA, keeps none)."""
    standby_share: float = 0.2
    """What a standby costs, as a share of a serving replica (memory held, no CPU)."""
    slo_factor: float = 4.0
    decide_every_s: int = 5
    initial_replicas: int = 2
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    hpa: HpaConfig = field(default_factory=HpaConfig)


@dataclass
class SimResult:
    policy: str
    component: str
    seconds: int
    violation_s: int
    replica_s: float
    p99_latency_ms: float
    max_replicas: int
    scale_events: int
    latency_ms: npt.NDArray[np.float64] = field(repr=False)

    def figures(self) -> dict[str, float]:
        return {
            "seconds": self.seconds,
            "violation_s": self.violation_s,
            "replica_s": round(self.replica_s, 1),
            "p99_latency_ms": round(self.p99_latency_ms, 2),
            "max_replicas": self.max_replicas,
            "scale_events": self.scale_events,
        }


class _Replicas:
    def __init__(self, initial: int, standbys: int) -> None:
        self.ready = initial
        self.starting: list[int] = []
        """Second each starting replica is ready."""
        self.standbys = standbys
        self.refilling: list[int] = []

    def tick(self, t: int) -> None:
        self.ready += sum(1 for r in self.starting if r <= t)
        self.starting = [r for r in self.starting if r > t]
        self.standbys += sum(1 for r in self.refilling if r <= t)
        self.refilling = [r for r in self.refilling if r > t]

    def start(self, t: int, cold: int, warm: int, cfg: SimConfig) -> None:
        warm = min(warm, self.standbys)
        self.standbys -= warm
        self.starting += [t + cfg.warm_start_s] * warm + [t + cfg.cold_start_s] * cold
        self.refilling += [t + cfg.cold_start_s] * warm

    def stop(self, n: int) -> None:
        while n > 0 and self.starting:
            self.starting.pop()
            n -= 1
        self.ready = max(1, self.ready - n)

    @property
    def provisioned(self) -> int:
        return self.ready + len(self.starting)


def simulate(
    policy: str,
    component: str,
    up: ComponentSeries,
    down: ComponentSeries,
    lag_s: int,
    horizon_s: int,
    cfg: SimConfig,
    predict: NeedPredictor | None = None,
    prediction_error: float = 0.0,
) -> SimResult:
    n = len(down)
    start = first_second(lag_s)
    stop = n - horizon_s - 3
    need = np.asarray(down.cpu, np.float64)
    base = float(np.median(down.latency[:start])) / (1.0 + 0.5 * 0.5)  # the trace's latency at rho 0.5
    served = np.zeros(n)
    served[:start] = need[:start]
    latency = np.asarray(down.latency, np.float64).copy()
    measured = ComponentSeries(down.rate, latency, down.errors, served, down.memory)
    standbys = cfg.standbys if policy == "predictive" else 0
    reps = _Replicas(max(cfg.initial_replicas, math.ceil(need[:start].mean() / (cfg.hpa.target_utilization))), standbys)
    backlog = 0.0
    replica_s = 0.0
    violations = 0
    events = 0
    top = reps.provisioned
    p_state, h_state = ScalingState(), HpaState()
    for t in range(start, stop):
        reps.tick(t)
        capacity = reps.ready * cfg.replica_cores
        work = need[t] + backlog
        served[t] = min(work, capacity)
        backlog = work - served[t]
        rho = min(need[t] / capacity, 0.99) if capacity > 0 else 0.99
        latency[t] = base * (1.0 + 0.5 * rho / (1.0 - rho)) + 1000.0 * backlog / max(capacity, 1e-9)
        violations += latency[t] > cfg.slo_factor * base
        replica_s += reps.provisioned + cfg.standby_share * (reps.standbys + len(reps.refilling))
        if policy == "predictive":
            if (t - start) % cfg.decide_every_s == 0:
                assert predict is not None
                inputs = ScalingInputs(
                    now=float(t),
                    component=component,
                    ready=reps.ready,
                    starting=len(reps.starting),
                    standbys=reps.standbys,
                    need_now=float(served[t - 4 : t + 1].mean()) + backlog,
                    predicted_need=max(0.0, predict(up, measured, lag_s, t)),
                    horizon_s=float(horizon_s),
                    prediction_error=prediction_error,
                    cold_start_s=float(cfg.cold_start_s),
                    warm_start_s=float(cfg.warm_start_s),
                )
                decision, p_state = decide(inputs, p_state, cfg.scaling)
                if decision.cold_starts or decision.warm_starts:
                    reps.start(t, decision.cold_starts, decision.warm_starts, cfg)
                    events += 1
                elif decision.stops:
                    reps.stop(decision.stops)
                    events += 1
        else:
            used = float(served[max(start, t - 14) : t + 1].mean())  # metrics-server's ~15 s window
            hpa, h_state = hpa_step(h_state, float(t), reps.provisioned, reps.ready, used, cfg.hpa)
            if hpa is not None and hpa.desired != reps.provisioned:
                if hpa.desired > reps.provisioned:
                    reps.start(t, hpa.desired - reps.provisioned, 0, cfg)
                else:
                    reps.stop(reps.provisioned - hpa.desired)
                events += 1
        top = max(top, reps.provisioned)
    lat = latency[start:stop]
    return SimResult(
        policy, component, stop - start, int(violations), replica_s, float(np.percentile(lat, 99)), top, events, lat
    )


def ratio(a: float, b: float) -> float:
    """a / b, with 0 / 0 = 1 (no violations either way) and x / 0 = inf."""
    if b == 0:
        return 1.0 if a == 0 else math.inf
    return a / b
