"""What to warm and how aggressively (coordinator/warming.py): pure decisions, no I/O."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.warming import (
    Aggressiveness,
    Candidate,
    Move,
    WarmLimits,
    WarmOutcome,
    adapt,
    choose_move,
    outcome_of,
    plan,
    warm_budget,
)

LIMITS = WarmLimits()
MB = 1 << 20


def test_the_moves_follow_waste_and_misses() -> None:
    wasteful = WarmOutcome(warmed_bytes=100, wasted_bytes=40, settled_warms=10, starts=10, local_starts=5)
    frugal = WarmOutcome(warmed_bytes=100, wasted_bytes=5, settled_warms=10, starts=10, local_starts=5)
    perfect = WarmOutcome(warmed_bytes=100, wasted_bytes=5, settled_warms=10, starts=10, local_starts=10)
    few = WarmOutcome(warmed_bytes=100, wasted_bytes=90, settled_warms=2, starts=10, local_starts=5)
    nothing_yet = WarmOutcome(starts=10, local_starts=4)
    pending = WarmOutcome(starts=10, local_starts=4, warms=3)  # warms made, none settled: wait
    assert choose_move(wasteful, LIMITS) is Move.BACK_OFF
    assert choose_move(frugal, LIMITS) is Move.PUSH
    assert choose_move(perfect, LIMITS) is Move.KEEP  # nothing to gain
    assert choose_move(few, LIMITS) is Move.KEEP  # too little evidence either way
    assert choose_move(nothing_yet, LIMITS) is Move.PUSH
    assert choose_move(pending, LIMITS) is Move.KEEP
    start = Aggressiveness(0.7, 8, 0.25)
    backed = adapt(start, wasteful, LIMITS)
    assert backed.threshold == pytest.approx(0.75) and backed.max_layers == 7 and backed.bandwidth_share == 0.125
    pushed = adapt(start, frugal, LIMITS)
    assert pushed.threshold == pytest.approx(0.65) and pushed.max_layers == 9
    assert adapt(start, perfect, LIMITS) == start


@given(
    st.lists(
        st.tuples(st.integers(0, 10**9), st.integers(0, 10**9), st.integers(0, 50), st.integers(0, 50)), max_size=60
    )
)
def test_aggressiveness_stays_within_its_limits(windows: list[tuple[int, int, int, int]]) -> None:
    agg = Aggressiveness()
    for warmed, wasted, settled, starts in windows:
        outcome = WarmOutcome(warmed, min(wasted, warmed), settled, starts, starts // 2)
        agg = adapt(agg, outcome, LIMITS)
        assert LIMITS.min_threshold <= agg.threshold <= LIMITS.max_threshold
        assert LIMITS.min_layers <= agg.max_layers <= LIMITS.max_layers
        assert LIMITS.min_bandwidth_share <= agg.bandwidth_share <= LIMITS.max_bandwidth_share


def test_warms_get_only_idle_bandwidth() -> None:
    link = 12.5e6  # 100 Mbit/s
    assert warm_budget(link, 0.0, 10.0, 0.25) == int(link * 10 * 0.25)
    assert warm_budget(link, link / 2, 10.0, 0.25) == int(link / 2 * 10 * 0.25)
    assert warm_budget(link, 0.9 * link, 10.0, 0.5) == 0  # running pulls, migrations, workloads first
    assert warm_budget(0.0, 0.0, 10.0, 0.5) == 0


def test_the_plan_takes_the_most_probable_that_fit() -> None:
    candidates = [
        Candidate("sha256:a", 0.95, 300 * MB),
        Candidate("sha256:b", 0.9, 50 * MB),
        Candidate("sha256:c", 0.85, 10 * MB),
        Candidate("sha256:d", 0.8, 0),  # size unknown
        Candidate("sha256:e", 0.75, 20 * MB),
        Candidate("sha256:f", 0.5, 1 * MB),  # under the threshold
    ]
    agg = Aggressiveness(threshold=0.7, max_layers=8)
    got = plan(candidates, held={"sha256:b"}, in_flight=set(), aggressiveness=agg, budget_bytes=100 * MB)
    assert [c.digest for c in got] == ["sha256:c", "sha256:e"]  # a does not fit, b is held, d unknown
    got = plan(candidates, held=set(), in_flight={"sha256:c"}, aggressiveness=agg, budget_bytes=1 << 40)
    assert [c.digest for c in got] == ["sha256:a", "sha256:b", "sha256:e"]
    one = Aggressiveness(threshold=0.7, max_layers=1)
    assert [c.digest for c in plan(candidates, set(), set(), one, 1 << 40)] == ["sha256:a"]


def test_an_outcome_counts_warms_made_waste_settled_and_local_starts() -> None:
    outcome = outcome_of([(["a", "b"], ["a", "b"]), (["a", "c"], ["a"])], [10, 30, 40], [(10, True), (30, False)])
    assert outcome == WarmOutcome(
        warmed_bytes=80, wasted_bytes=30, settled_warms=2, starts=2, local_starts=1, warms=3
    )
    assert outcome.waste == 30 / 80 and outcome.hit_rate == 0.5
    # waste from warms of an earlier window, none made in this one: all of it is waste
    assert outcome_of([], [], [(10, False)]).waste == 1.0
