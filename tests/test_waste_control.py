"""The waste controller (coordinator/waste_control.py): pure, so fed outcomes and a model of a fleet."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.warming import WarmOutcome
from coordinator.waste_control import ControlLimits, ControlState, control, initial

LIMITS = ControlLimits()
GB = 1 << 30


def _run(state: ControlState, outcome: WarmOutcome, rounds: int) -> ControlState:
    for _ in range(rounds):
        state = control(state, outcome, LIMITS)
    return state


def test_waste_over_the_setpoint_raises_the_threshold_and_under_it_lowers_it() -> None:
    start = initial(0.6, LIMITS)
    wasteful = WarmOutcome(warmed_bytes=GB, wasted_bytes=GB // 2, used_bytes=GB // 2, settled_warms=10, warms=10)
    frugal = WarmOutcome(warmed_bytes=GB, wasted_bytes=GB // 20, used_bytes=GB, settled_warms=10, warms=10)
    up, down = _run(start, wasteful, 5), _run(start, frugal, 5)
    assert up.aggressiveness.threshold > 0.6 > down.aggressiveness.threshold
    assert up.waste == pytest.approx(0.5) and down.waste == pytest.approx(1 / 21)
    # the reach follows the threshold: fewer layers and a smaller share of the link when wary
    assert up.aggressiveness.max_layers <= start.aggressiveness.max_layers <= down.aggressiveness.max_layers
    shares = [s.aggressiveness.bandwidth_share for s in (up, start, down)]
    assert shares == sorted(shares) and len(set(shares)) == 3


def test_without_evidence_it_holds_unless_nothing_is_warmed_and_starts_miss() -> None:
    start = initial(0.6, LIMITS)
    few = WarmOutcome(warmed_bytes=GB, wasted_bytes=GB, settled_warms=1, warms=1, starts=10, local_starts=5)
    assert control(start, few, LIMITS).aggressiveness == start.aggressiveness
    idle_misses = WarmOutcome(starts=10, local_starts=5)
    assert control(start, idle_misses, LIMITS).aggressiveness.threshold == pytest.approx(0.6 - LIMITS.step)
    idle_hits = WarmOutcome(starts=10, local_starts=10)
    assert control(start, idle_hits, LIMITS).aggressiveness == start.aggressiveness


def test_a_drop_in_the_hit_rate_answers_once_with_a_step_down() -> None:
    at_setpoint = {"warmed_bytes": GB, "wasted_bytes": GB // 5, "used_bytes": 4 * GB // 5, "settled_warms": 10}
    calm = WarmOutcome(starts=20, local_starts=16, warms=10, **at_setpoint)
    state = _run(initial(0.6, LIMITS), calm, 30)
    before = state.aggressiveness.threshold
    shifted = WarmOutcome(starts=20, local_starts=4, warms=10, **at_setpoint)
    after = control(state, shifted, LIMITS)
    assert after.shifted and after.aggressiveness.threshold == pytest.approx(before - LIMITS.shift_step)
    again = control(after, shifted, LIMITS)  # the same shift: no second step
    assert again.aggressiveness.threshold == pytest.approx(after.aggressiveness.threshold)
    recovered = _run(again, calm, 10)
    assert not recovered.shifted


def test_limits_refuse_nonsense() -> None:
    for bad in (
        {"setpoint": 0.3, "max_waste": 0.25},
        {"min_threshold": 0.9, "max_threshold": 0.5},
        {"min_layers": 0},
        {"memory": 1.0},
        {"min_bandwidth_share": 0.0},
    ):
        with pytest.raises(ValueError):
            dataclasses.replace(LIMITS, **bad)


outcomes = st.builds(
    WarmOutcome,
    warmed_bytes=st.integers(0, 10 * GB),
    wasted_bytes=st.integers(0, 10 * GB),
    settled_warms=st.integers(0, 100),
    starts=st.integers(0, 100),
    local_starts=st.integers(0, 100),
    warms=st.integers(0, 100),
    used_bytes=st.integers(0, 10 * GB),
)


@given(st.floats(0.0, 1.0), st.lists(outcomes, max_size=80))
def test_the_state_stays_within_its_limits(threshold: float, rounds: list[WarmOutcome]) -> None:
    state = initial(threshold, LIMITS)
    for outcome in rounds:
        state = control(state, outcome, LIMITS)
        agg = state.aggressiveness
        assert LIMITS.min_threshold <= agg.threshold <= LIMITS.max_threshold
        assert LIMITS.min_layers <= agg.max_layers <= LIMITS.max_layers
        assert LIMITS.min_bandwidth_share <= agg.bandwidth_share <= LIMITS.max_bandwidth_share
        assert 0.0 <= state.waste <= 1.0


@settings(max_examples=40, deadline=None)
@given(
    st.floats(0.3, 0.9),  # waste of the warms at the lowest threshold
    st.floats(0.3, 0.95),  # the threshold it starts at
    st.integers(0, 12),  # rounds before a wasted warm is known (the lease)
)
def test_on_a_model_fleet_waste_settles_within_the_bound(low_waste: float, start: float, lag: int) -> None:
    """A fleet whose warms waste less the higher the threshold (linearly, to 0.05 at the top), used
    warms known at once, wasted ones `lag` rounds later: after two days the waste of each
    round's warms is within the bound, and not far under the setpoint (the warms are not starved)."""

    def waste_at(threshold: float) -> float:
        span = (threshold - LIMITS.min_threshold) / (LIMITS.max_threshold - LIMITS.min_threshold)
        return low_waste + span * (0.05 - low_waste)

    state = initial(start, LIMITS)
    in_flight: list[int] = [0] * lag
    made: list[float] = []
    for _ in range(600):  # 50 h of 5-min rounds
        agg = state.aggressiveness
        warmed = int(agg.bandwidth_share * GB)
        waste = waste_at(agg.threshold)
        made.append(waste)
        in_flight.append(int(waste * warmed))
        outcome = WarmOutcome(
            warmed_bytes=warmed,
            wasted_bytes=in_flight.pop(0),
            used_bytes=int((1 - waste) * warmed),
            settled_warms=10,
            warms=10,
            starts=20,
            local_starts=14,
        )
        state = control(state, outcome, LIMITS)
    late = made[-100:]
    assert max(late) <= LIMITS.max_waste + 0.01, (min(late), max(late))
    if low_waste > LIMITS.setpoint + 0.05:  # the setpoint is reachable: warms go as far as it allows
        assert min(late) >= LIMITS.setpoint - 0.06, (min(late), max(late))
