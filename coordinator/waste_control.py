"""How aggressively to warm: a PI controller on the wasted share of warmed bytes, pure.

The prefetch loop (coordinator/warm.py) measures, each round, what the warms and starts of the
fleet did since the round before (a `WarmOutcome`) and asks `control` for the next state. The state
keeps exponentially weighted sums of warmed and wasted bytes, so the waste it steers on is a ratio
over the last several leases rather than one noisy round, and the hit rate over a short and a long
memory, to notice a shift in the workload mix.

- The waste error `e = waste - setpoint` moves the probability threshold in velocity form:
  `threshold += ki * e + kp * (e - e_before)`, clamped to the limits. Waste over the setpoint raises
  the threshold (fewer, surer warms); waste under it lowers it, so the loop warms as much as it can
  while the waste holds the setpoint, which sits a margin under the bound `max_waste`.
- Over the bound (`max_waste`) the threshold also steps up at once (multiplicative decrease of the
  warms' reach: AIMD's safety), whatever the integral says.
- With too little evidence (fewer settled warms than `min_evidence` in memory) the threshold holds,
  except when nothing is warmed at all and starts miss: then it steps down (it may be too high ever
  to warm anything).
- A mix shift: the short-memory hit rate falls under `shift_drop` of the long one while the waste is
  within the bound: the threshold steps down by `shift_step` once (new layers are needed; the
  waste term then brings it back if the guesses are poor).
- The layer count and the bandwidth share follow the threshold: the lower it is, the more layers per
  round and the larger share of the idle link (within the limits); `warming.warm_budget` still gives
  warms nothing while running work keeps the link busy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from coordinator.warming import Aggressiveness, WarmOutcome


@dataclass(frozen=True)
class ControlLimits:
    max_waste: float = 0.25
    """The bound: wasted bytes over warmed bytes."""
    setpoint: float = 0.2
    """What the controller steers the waste to (a margin under the bound: the waste is measured late)."""
    kp: float = 0.05
    ki: float = 0.01
    """Gains per round of 5 min: small, as a wasted warm is known only a lease (an hour) after it was
    made; larger gains swing the threshold from end to end (models/prefetch/evaluate.py)."""
    memory: float = 0.95
    """Weight of the past in the byte and hit sums, per round."""
    fast_memory: float = 0.5
    """Weight of the past in the short-memory hit rate, per round."""
    min_threshold: float = 0.4
    """Below it warms displace more useful layers than they bring, whatever their waste (held out, the
    card's trace, warm-2 steered from 0.5: a floor of 0.4 gives 0.693 all local at waste 0.15, 0.3 gives
    0.689 at 0.17, 0.5 gives 0.684 at 0.12)."""
    max_threshold: float = 0.95
    step: float = 0.01
    """Threshold step without evidence, and over the bound."""
    min_layers: int = 1
    max_layers: int = 16
    min_bandwidth_share: float = 0.05
    max_bandwidth_share: float = 0.5
    min_evidence: float = 5.0
    """Settled warms (weighted) in memory before waste moves anything."""
    shift_drop: float = 0.8
    shift_step: float = 0.1
    min_starts: float = 10.0
    """Starts (weighted) in memory before a drop in the hit rate counts as a shift."""

    def __post_init__(self) -> None:
        if not 0 < self.setpoint <= self.max_waste < 1:
            raise ValueError(f"need 0 < setpoint <= max_waste < 1, got {self.setpoint}, {self.max_waste}")
        if not 0 <= self.min_threshold < self.max_threshold <= 1:
            raise ValueError(
                f"need 0 <= min_threshold < max_threshold <= 1, got {self.min_threshold}, {self.max_threshold}"
            )
        if not 1 <= self.min_layers <= self.max_layers:
            raise ValueError(f"need 1 <= min_layers <= max_layers, got {self.min_layers}, {self.max_layers}")
        if not 0 < self.min_bandwidth_share <= self.max_bandwidth_share <= 1:
            raise ValueError("need 0 < min_bandwidth_share <= max_bandwidth_share <= 1")
        if not (0 <= self.memory < 1 and 0 <= self.fast_memory < 1):
            raise ValueError("memories must be in [0, 1)")


@dataclass(frozen=True)
class ControlState:
    aggressiveness: Aggressiveness
    warmed: float = 0.0
    """Weighted bytes warmed."""
    wasted: float = 0.0
    """Weighted bytes of warms whose lease ended unused."""
    used: float = 0.0
    """Weighted bytes of warms a start used."""
    settled: float = 0.0
    """Weighted warms whose fate is known (the evidence)."""
    error: float = 0.0
    """The waste error of the round before (the proportional term's reference)."""
    starts: float = 0.0
    local: float = 0.0
    fast_starts: float = 0.0
    fast_local: float = 0.0
    shifted: bool = False
    """A shift was answered and the hit rate has not come back yet (one step per shift)."""

    @property
    def waste(self) -> float:
        """The wasted share of the settled warms' bytes over the memory (0 before any settled).

        Of settled bytes, not of warmed bytes: a wasted warm settles a lease after it was made, so
        wasted bytes over the bytes warmed meanwhile read high for a lease after the warms slow down
        (and low after they speed up); wasted and used bytes are of the same warms."""
        settled = self.wasted + self.used
        return self.wasted / settled if settled > 0 else 0.0

    @property
    def hit_rate(self) -> float:
        return self.local / self.starts if self.starts > 0 else math.nan

    @property
    def fast_hit_rate(self) -> float:
        return self.fast_local / self.fast_starts if self.fast_starts > 0 else math.nan


def initial(threshold: float, limits: ControlLimits) -> ControlState:
    """The state before any round: the model's operating threshold, the reach that goes with it."""
    return ControlState(_reach(_clamp(threshold, limits.min_threshold, limits.max_threshold), limits))


def control(state: ControlState, outcome: WarmOutcome, limits: ControlLimits) -> ControlState:
    """The state after one round whose warms and starts did `outcome` (rules: module docstring)."""
    m, f = limits.memory, limits.fast_memory
    nxt = replace(
        state,
        warmed=m * state.warmed + outcome.warmed_bytes,
        wasted=m * state.wasted + outcome.wasted_bytes,
        used=m * state.used + outcome.used_bytes,
        settled=m * state.settled + outcome.settled_warms,
        starts=m * state.starts + outcome.starts,
        local=m * state.local + outcome.local_starts,
        fast_starts=f * state.fast_starts + outcome.starts,
        fast_local=f * state.fast_local + outcome.local_starts,
    )
    threshold = state.aggressiveness.threshold
    error = 0.0
    if nxt.settled >= limits.min_evidence:
        error = nxt.waste - limits.setpoint
        threshold += limits.ki * error + limits.kp * (error - state.error)
        if nxt.waste > limits.max_waste:
            threshold += limits.step
    elif outcome.starts > outcome.local_starts and outcome.warms == 0:
        threshold -= limits.step
    shifted = state.shifted
    if nxt.starts >= limits.min_starts and nxt.fast_starts > 0:
        dropped = nxt.fast_hit_rate < limits.shift_drop * nxt.hit_rate
        if dropped and not shifted and nxt.waste <= limits.max_waste:
            threshold -= limits.shift_step
            shifted = True
        elif not dropped:
            shifted = False
    threshold = _clamp(threshold, limits.min_threshold, limits.max_threshold)
    return replace(nxt, aggressiveness=_reach(threshold, limits), error=error, shifted=shifted)


def _reach(threshold: float, limits: ControlLimits) -> Aggressiveness:
    """Layers and bandwidth share for a threshold: the whole range at the lowest, the least at the highest."""
    low = (limits.max_threshold - threshold) / (limits.max_threshold - limits.min_threshold)
    layers = limits.min_layers + round(low * (limits.max_layers - limits.min_layers))
    share = limits.min_bandwidth_share + low * (limits.max_bandwidth_share - limits.min_bandwidth_share)
    return Aggressiveness(threshold=threshold, max_layers=layers, bandwidth_share=share)


def _clamp(x: float, lo: float, hi: float) -> float:
    return min(hi, max(lo, x))
