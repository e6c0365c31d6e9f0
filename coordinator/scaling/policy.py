"""Predictive scaling decisions: pure functions from inputs and the last state to a recorded decision.

`decide(inputs, state, config)` returns the decision and the next state; nothing here starts or stops
a replica (the runtime does, docs/scaling.md). The rule:

1. **How many replicas.** The model predicts the component's CPU need at now + horizon; its error is
   taken as normal with the relative spread the model card measured. Keeping one more replica for
   the horizon costs `replica_cost` per second; not having it costs `violation_cost` per second of SLO
   violation whenever the need exceeds the replicas' capacity. The cheapest count is the smallest k
   with P(need > k x capacity) <= replica_cost / violation_cost (the newsvendor quantile), so
   `desired` = ceil(the need's q-quantile / capacity) with q = 1 - replica_cost / violation_cost, or
   the need measured now if that is higher, within [min_replicas, max_replicas].
   **A lone replica's floor.** On a busy machine one replica alone has no slack for a second of CPU
   starvation: it answers late at a share of its seconds (`lone_replica_risk`) even within its
   capacity, where two share the stall. For a component whose upstream lead is known (the forecast
   is the model's, not the naive one), when the need provisioned for is above `lone_replica_share`
   of one replica's capacity and risk x violation_cost exceeds replica_cost (the second replica
   costs less than the violation seconds it saves), `desired` is at least 2 -- unless a warm
   standby of the component is held (frozen, or being started): the standby is that insurance
   already, a thaw serving within a decision period, and one replica with a standby costs 1 +
   standby_cost where two cost 2. The decision records the floor it waived (`floor_waived`).
2. **Ahead of the need, by the cold start.** The prediction reaches `horizon_s` past the series'
   last shared second, which is `data_age_s` behind now: it sees `horizon_s - data_age_s` seconds
   ahead. A need it does not see yet is seen at the next decision, `period_s` later, so a replica
   started then is ready `period_s` + the measured cold start (scale request to healthy) from now.
   When that fits in what the prediction sees, cold starts are in time: they are used and the
   standbys kept for surprises. When the capacity is short *now* (the need measured now exceeds what
   the ready replicas serve), or a cold start would be late (cold start + period beyond what the
   prediction sees), warm standbys are used first (a thaw serves at once), cold starts for the rest.
3. **Hysteresis.** Scaling in waits until `desired` has stayed below the provisioned count for
   `scale_in_hold_s` seconds, then goes to the highest `desired` of that window (a dip inside the hold does not
   remove a replica a burst a moment later needs again). Scaling out is immediate.
4. **Warm standbys kept.** A standby is a replica created, started and frozen: it costs memory, not
   CPU (`standby_cost`, a fraction of a replica's cost), and serves within `warm_start_s` of a thaw.
   The k-th standby is worth keeping while the chance that the need exceeds the target and k - 1
   more replicas is above standby_cost x replica_cost / violation_cost; so when the predicted need
   is close to the target's capacity (within the model's error), one is kept, and none when it is
   far below. For a component whose lead is known (or was within `scale_in_hold_s`: the engine may
   miss it for a round) and whose cold starts would be late (rule 2; or were, with a lead, within
   `scale_in_hold_s`: the data's age moves them across the edge from round to round), one standby
   is kept in any case: a burst the upstream announces is served in time only by a thaw.
   While rule 1's lone-replica floor is due, one standby is kept in any case too: it stands in for
   the floor's second replica at `standby_cost` of its cost.
   At most `max_standbys`, and never past `max_replicas` with the target.

Every decision carries its inputs, the quantile and the reason, for `history` and `explain`.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from statistics import NormalDist
from typing import Any


class Action(enum.StrEnum):
    HOLD = "hold"
    SCALE_OUT = "scale-out"
    SCALE_IN = "scale-in"


@dataclass(frozen=True)
class ScalingConfig:
    min_replicas: int = 1
    max_replicas: int = 20
    replica_capacity: float = 0.75
    """Cores of need one replica serves within the SLO."""
    replica_cost: float = 1.0
    """Cost of one replica for one second."""
    violation_cost: float = 20.0
    """Cost of one second of SLO violation (same unit as replica_cost)."""
    scale_in_hold_s: float = 60.0
    max_standbys: int = 0
    """Warm standbys (frozen replicas) kept at most per component (0: none)."""
    standby_cost: float = 0.2
    """Cost of a standby for one second, as a fraction of a replica's (its memory, no CPU)."""
    lone_replica_risk: float = 0.0
    """Share of its seconds one replica alone is taken to answer late under load (0: no floor)."""
    lone_replica_share: float = 0.5
    """Share of a replica's capacity above which a lone replica's risk counts."""

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 0 <= min_replicas ({self.min_replicas}) <= max_replicas ({self.max_replicas})")
        if not self.replica_capacity > 0:
            raise ValueError(f"replica_capacity must be > 0, not {self.replica_capacity}")
        if not 0 < self.replica_cost < self.violation_cost:
            raise ValueError(
                f"need 0 < replica_cost ({self.replica_cost}) < violation_cost ({self.violation_cost}): "
                "otherwise no replica is ever worth adding"
            )
        if self.max_standbys < 0:
            raise ValueError(f"max_standbys must be >= 0, not {self.max_standbys}")
        if not 0 < self.standby_cost <= 1:
            raise ValueError(f"standby_cost must be within (0, 1], not {self.standby_cost}")
        if self.scale_in_hold_s < 0:
            raise ValueError(f"scale_in_hold_s must be >= 0, not {self.scale_in_hold_s}")
        if not 0 <= self.lone_replica_risk <= 1:
            raise ValueError(f"lone_replica_risk must be within [0, 1], not {self.lone_replica_risk}")
        if not self.lone_replica_share >= 0:
            raise ValueError(f"lone_replica_share must be >= 0, not {self.lone_replica_share}")

    @property
    def quantile(self) -> float:
        """The need's quantile to provision for (step 1 of the module's rule)."""
        return 1.0 - self.replica_cost / self.violation_cost


@dataclass(frozen=True)
class ScalingInputs:
    """What a decision is made from (all recorded with it)."""

    now: float
    component: str
    ready: int
    """Replicas serving."""
    starting: int
    """Replicas started and not ready yet."""
    standbys: int
    """Warm standbys that can be brought in."""
    need_now: float
    """CPU need measured now, cores."""
    predicted_need: float
    """The model's CPU need at now + horizon, cores."""
    horizon_s: float
    prediction_error: float
    """Relative spread of the model's error (its card's)."""
    cold_start_s: float
    """Measured time from start to ready."""
    warm_start_s: float
    """Measured time for a warm standby to serve."""
    lead_s: float | None = None
    """The upstream's lead the prediction used; None: the naive forecast (no lead known)."""
    data_age_s: float = 0.0
    """How far the series' last shared second (where the prediction starts) is behind now."""
    period_s: float = 0.0
    """Seconds until the next decision."""
    standbys_starting: int = 0
    """Warm standbys being started (frozen once healthy; not copies, not thawable yet)."""

    def __post_init__(self) -> None:
        if min(self.ready, self.starting, self.standbys, self.standbys_starting) < 0:
            raise ValueError("replica counts must be >= 0")
        values = (
            self.need_now,
            self.predicted_need,
            self.horizon_s,
            self.prediction_error,
            self.data_age_s,
            self.period_s,
            0.0 if self.lead_s is None else self.lead_s,
        )
        if not all(math.isfinite(v) and v >= 0 for v in values):
            raise ValueError(f"needs, horizon, error, ages, period and lead must be finite and >= 0: {values}")
        if not (0 <= self.warm_start_s <= self.cold_start_s):
            raise ValueError(f"need 0 <= warm start ({self.warm_start_s}) <= cold start ({self.cold_start_s})")


@dataclass(frozen=True)
class ScalingState:
    recent: tuple[tuple[float, int], ...] = ()
    """(time, desired) of the decisions within the scale-in hold."""
    below_since: float | None = None
    """Since when every desired count was below the provisioned one (None: it is not)."""
    lead_at: float | None = None
    """When a decision last had an upstream lead (None: never)."""
    late_at: float | None = None
    """When a decision with a lead last found cold starts late (None: never): rule 4's standby."""

    def for_storage(self) -> dict[str, object]:
        return {
            "recent": [[t, d] for t, d in self.recent],
            "below_since": self.below_since,
            "lead_at": self.lead_at,
            "late_at": self.late_at,
        }

    @classmethod
    def from_storage(cls, kept: Mapping[str, Any]) -> ScalingState:
        below, lead_at, late_at = kept.get("below_since"), kept.get("lead_at"), kept.get("late_at")
        return cls(
            recent=tuple((float(t), int(d)) for t, d in kept.get("recent", ())),
            below_since=None if below is None else float(below),
            lead_at=None if lead_at is None else float(lead_at),
            late_at=None if late_at is None else float(late_at),
        )


@dataclass(frozen=True)
class ScalingDecision:
    action: Action
    target: int
    """Replicas provisioned after the decision (ready + starting)."""
    desired: int
    """This decision's replica count before the hysteresis."""
    cold_starts: int
    warm_starts: int
    stops: int
    standbys: int
    """Warm standbys to keep after the decision (rule 4)."""
    need_quantile: float
    """The need (cores) provisioned for: the larger of the quantile at the horizon and now."""
    floor: int
    """The lone replica's floor applied to `desired` (0: none; rule 1)."""
    floor_waived: int
    """The lone replica's floor that was due and not applied: a warm standby is held (0: none)."""
    cold_late_s: float
    """By how much a cold start decided now or at the next decision may be late for what the
    prediction sees (0: in time; rule 2)."""
    reason: str
    inputs: ScalingInputs
    config: ScalingConfig = field(repr=False)

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "action": str(self.action)}


def desired_replicas(inputs: ScalingInputs, config: ScalingConfig) -> tuple[int, float]:
    """Step 1: the replica count and the need it covers."""
    z = NormalDist().inv_cdf(config.quantile)
    at_horizon = inputs.predicted_need * max(0.0, 1.0 + z * inputs.prediction_error)
    need = max(inputs.need_now, at_horizon)
    count = max(math.ceil(need / config.replica_capacity - 1e-9), lone_replica_floor(inputs, need, config))
    return min(config.max_replicas, max(config.min_replicas, count)), need


def lone_replica_floor(inputs: ScalingInputs, need: float, config: ScalingConfig) -> int:
    """Rule 1's floor: 2 when a lone replica's expected violation seconds cost more than a second
    replica, for a component with a known lead and a need above the share, and no warm standby
    held; else 0."""
    return 0 if inputs.standbys + inputs.standbys_starting else floor_due(inputs, need, config)


def floor_due(inputs: ScalingInputs, need: float, config: ScalingConfig) -> int:
    """Rule 1's floor before a held standby waives it: 2 or 0."""
    if inputs.lead_s is None or config.lone_replica_risk * config.violation_cost <= config.replica_cost:
        return 0
    return 2 if need > config.lone_replica_share * config.replica_capacity else 0


def cold_late_s(inputs: ScalingInputs) -> float:
    """Rule 2: how late a cold start may be for a need the prediction does not see yet."""
    sees = max(0.0, inputs.horizon_s - inputs.data_age_s)
    return max(0.0, inputs.cold_start_s + inputs.period_s - sees)


def standbys_wanted(
    inputs: ScalingInputs,
    target: int,
    config: ScalingConfig,
    led: bool = False,
    late: bool = False,
    floor: bool = False,
) -> int:
    """Rule 4: the warm standbys worth keeping beside `target` replicas; `led`: a lead was known
    within the scale-in hold (the engine may miss it for a round on noisy series); `late`: a decision
    with a lead found cold starts late within the hold (the data's age moves a cold start across
    the edge of in time from one round to the next); `floor`: rule 1's lone-replica floor is due
    (a standby stands in for it)."""
    room = min(config.max_standbys, config.max_replicas - target)
    if room <= 0:
        return 0
    if floor or ((led or inputs.lead_s is not None) and (late or cold_late_s(inputs) > 0)):
        # A burst the upstream announces is served in time only by a thaw.
        return max(1, _worth_keeping(inputs, target, room, config))
    return _worth_keeping(inputs, target, room, config)


def _worth_keeping(inputs: ScalingInputs, target: int, room: int, config: ScalingConfig) -> int:
    """Standbys while P(need > target + k - 1 replicas' capacity) is above their cost's share."""
    worth = config.standby_cost * config.replica_cost / config.violation_cost
    mean = max(inputs.need_now, inputs.predicted_need)
    spread = inputs.predicted_need * inputs.prediction_error
    kept = 0
    while kept < room:
        capacity = (target + kept) * config.replica_capacity
        # P(need > capacity); without a spread, whether the need is above it
        above = 1.0 - NormalDist(mean, spread).cdf(capacity) if spread > 0 else float(mean > capacity)
        if above <= worth:
            break
        kept += 1
    return kept


def decide(inputs: ScalingInputs, state: ScalingState, config: ScalingConfig) -> tuple[ScalingDecision, ScalingState]:
    out, next_state = _decide(inputs, state, config)
    # The standby kept for a lead holds like a replica: a round where the engine misses the lead on a
    # noisy series, or where fresher data puts a cold start just in time, does not cut the standby the
    # last round started (each cut and restart is a scale of the component and a cold start's CPU).
    lead_at = inputs.now if inputs.lead_s is not None else state.lead_at
    led = lead_at is not None and inputs.now - lead_at < config.scale_in_hold_s
    late_at = inputs.now if inputs.lead_s is not None and cold_late_s(inputs) > 0 else state.late_at
    late = late_at is not None and inputs.now - late_at < config.scale_in_hold_s
    floor = floor_due(inputs, out.need_quantile, config) > 0
    standbys = standbys_wanted(inputs, out.target, config, led, late, floor)
    return replace(out, standbys=standbys), replace(next_state, lead_at=lead_at, late_at=late_at)


def _decide(inputs: ScalingInputs, state: ScalingState, config: ScalingConfig) -> tuple[ScalingDecision, ScalingState]:
    desired, need = desired_replicas(inputs, config)
    floor = lone_replica_floor(inputs, need, config)
    waived = floor_due(inputs, need, config) if not floor else 0
    now = inputs.now
    recent = (*((t, d) for t, d in state.recent if t > now - config.scale_in_hold_s), (now, desired))
    next_state = replace(state, recent=recent, below_since=None)
    provisioned = inputs.ready + inputs.starting
    late_by = cold_late_s(inputs)
    base = ScalingDecision(
        Action.HOLD, provisioned, desired, 0, 0, 0, 0, need, floor, waived, late_by, "", inputs, config
    )
    if desired > provisioned:
        add = desired - provisioned
        short_now = inputs.need_now > inputs.ready * config.replica_capacity
        late = late_by > 0
        if short_now and inputs.cold_start_s > 0:
            warm = min(add, inputs.standbys)
            why = f"short of capacity now ({inputs.need_now:.2f} cores > {inputs.ready} ready): warm standbys first"
        elif late:
            warm = min(add, inputs.standbys)
            why = (
                f"need {need:.2f} cores at +{inputs.horizon_s:g} s; a cold start ({inputs.cold_start_s:g} s, "
                f"next decision in {inputs.period_s:g} s, data {inputs.data_age_s:.1f} s old) would be late: "
                "warm standbys first"
            )
        else:
            warm = 0
            why = (
                f"need {need:.2f} cores at +{inputs.horizon_s:g} s (q{config.quantile:.3f}); a cold start "
                f"({inputs.cold_start_s:g} s) is ready in time"
            )
        if late and add > warm and not short_now:
            why += f" (the cold starts may be late by {late_by:.3g} s)"
        if floor and desired == floor and need <= (floor - 1) * config.replica_capacity:
            why += (
                f"; floor {floor}: a lone replica late {config.lone_replica_risk:g} of its seconds x violation "
                f"cost {config.violation_cost:g} > replica cost {config.replica_cost:g}"
            )
        out = replace(
            base, action=Action.SCALE_OUT, target=desired, cold_starts=add - warm, warm_starts=warm, reason=why
        )
    elif desired < provisioned:
        below_since = now if state.below_since is None else state.below_since
        next_state = replace(next_state, below_since=below_since)
        target = max(d for _, d in recent)
        if now - below_since >= config.scale_in_hold_s and target < provisioned:
            out = replace(
                base,
                action=Action.SCALE_IN,
                target=target,
                stops=provisioned - target,
                reason=f"every desired count of the last {config.scale_in_hold_s:g} s <= {target}",
            )
            next_state = replace(next_state, below_since=None)  # the next step in waits a full hold again
        else:
            out = replace(base, reason=f"below for less than {config.scale_in_hold_s:g} s (hysteresis)")
    else:
        out = replace(base, reason="provisioned as desired")
    if waived > desired:
        out = replace(out, reason=f"{out.reason}; the lone replica's floor waived: a warm standby is held")
    return out, next_state
