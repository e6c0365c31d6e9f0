"""Scaling decisions (coordinator/scaling/policy.py, coordinator/scaling/hpa.py): pure functions, no I/O."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.scaling.hpa import HpaConfig, HpaState, hpa_step
from coordinator.scaling.policy import (
    Action,
    ScalingConfig,
    ScalingInputs,
    ScalingState,
    decide,
    desired_replicas,
)

CONFIG = ScalingConfig(min_replicas=1, max_replicas=10, replica_capacity=1.0, scale_in_hold_s=60.0)


def inputs(
    now: float = 0.0,
    ready: int = 2,
    starting: int = 0,
    standbys: int = 1,
    need_now: float = 1.0,
    predicted: float = 1.0,
    error: float = 0.0,
    cold_start: float = 12.0,
    lead: float | None = None,
    data_age: float = 0.0,
    period: float = 0.0,
    standbys_starting: int = 0,
) -> ScalingInputs:
    return ScalingInputs(
        now=now,
        component="b",
        ready=ready,
        starting=starting,
        standbys=standbys,
        need_now=need_now,
        predicted_need=predicted,
        horizon_s=15.0,
        prediction_error=error,
        cold_start_s=cold_start,
        warm_start_s=2.0,
        lead_s=lead,
        data_age_s=data_age,
        period_s=period,
        standbys_starting=standbys_starting,
    )


def test_scales_out_ahead_of_the_predicted_need_with_cold_starts() -> None:
    decision, _ = decide(inputs(need_now=1.0, predicted=4.5), ScalingState(), CONFIG)
    assert decision.action is Action.SCALE_OUT
    assert (decision.target, decision.cold_starts, decision.warm_starts) == (5, 3, 0)  # in time: standby kept
    assert decision.inputs.predicted_need == 4.5 and "ready in time" in decision.reason
    record = decision.to_dict()
    assert record["action"] == "scale-out" and record["inputs"]["need_now"] == 1.0  # type: ignore[index]


def test_short_of_capacity_now_uses_the_warm_standbys_first() -> None:
    decision, _ = decide(inputs(ready=2, standbys=1, need_now=3.5, predicted=3.5), ScalingState(), CONFIG)
    assert (decision.target, decision.warm_starts, decision.cold_starts) == (4, 1, 1)
    decision, _ = decide(inputs(ready=2, standbys=0, need_now=3.5, predicted=3.5), ScalingState(), CONFIG)
    assert (decision.warm_starts, decision.cold_starts) == (0, 2)


def test_a_cold_start_longer_than_the_horizon_uses_the_warm_standbys_first() -> None:
    # capacity is enough now, but a 40 s cold start cannot be ready for the need at +15 s
    decision, _ = decide(
        inputs(ready=2, standbys=1, need_now=1.0, predicted=3.5, cold_start=40.0), ScalingState(), CONFIG
    )
    assert (decision.target, decision.warm_starts, decision.cold_starts) == (4, 1, 1)
    assert "would be late" in decision.reason and "late by 25 s" in decision.reason
    decision, _ = decide(
        inputs(ready=2, standbys=3, need_now=1.0, predicted=3.5, cold_start=40.0), ScalingState(), CONFIG
    )
    assert (decision.warm_starts, decision.cold_starts) == (2, 0) and "late by" not in decision.reason


def test_a_cold_start_late_by_the_data_age_and_the_next_round_uses_the_standby_first() -> None:
    # 9 s of cold start fits the 15 s horizon, but the data is 3 s old and a need not seen now is
    # seen only at the next round, 5 s on: 9 + 5 > 15 - 3, so the standby is thawed first.
    late = inputs(ready=1, standbys=1, need_now=0.5, predicted=1.5, cold_start=9.0, lead=16.0, data_age=3.0, period=5.0)
    decision, _ = decide(late, ScalingState(), CONFIG)
    assert (decision.target, decision.warm_starts, decision.cold_starts) == (2, 1, 0), decision
    assert decision.cold_late_s == pytest.approx(2.0) and "would be late" in decision.reason
    in_time = inputs(ready=1, standbys=1, need_now=0.5, predicted=1.5, cold_start=9.0, lead=16.0, data_age=0.5)
    decision, _ = decide(in_time, ScalingState(), CONFIG)
    assert (decision.warm_starts, decision.cold_starts, decision.cold_late_s) == (0, 1, 0.0), decision


def test_a_standby_is_kept_for_a_known_lead_when_cold_starts_would_be_late() -> None:
    cfg = ScalingConfig(max_replicas=10, replica_capacity=1.0, max_standbys=2, standby_cost=0.2)
    quiet = {"ready": 2, "standbys": 0, "need_now": 0.5, "predicted": 0.5, "cold_start": 9.0}
    # far below the next replica: no standby is worth its cost by the need alone ...
    decision, _ = decide(inputs(**quiet, lead=16.0, data_age=0.5), ScalingState(), cfg)  # type: ignore[arg-type]
    assert decision.standbys == 0, decision
    # ... but with cold starts late for what the lead shows, a burst is served in time only by a thaw
    led, state = decide(inputs(**quiet, lead=16.0, data_age=3.0, period=5.0), ScalingState(), cfg)  # type: ignore[arg-type]
    assert led.standbys == 1 and state.lead_at == 0.0, led
    # a round where the engine misses the lead keeps it (a cut and a restart would each be a scale
    # of the component, holding back its next scale out) ...
    missed, state = decide(inputs(**quiet, now=5.0, data_age=3.0, period=5.0), state, cfg)  # type: ignore[arg-type]
    assert missed.standbys == 1 and state.lead_at == 0.0, missed
    assert ScalingState.from_storage(state.for_storage()) == state
    # ... until no lead was seen for the hold: the naive forecast announces nothing ahead
    later, _ = decide(inputs(**quiet, now=61.0, data_age=3.0, period=5.0), state, cfg)  # type: ignore[arg-type]
    assert later.standbys == 0, later
    decision, _ = decide(inputs(**quiet, data_age=3.0, period=5.0), ScalingState(), cfg)  # type: ignore[arg-type]
    assert decision.standbys == 0, decision


def test_the_standby_kept_for_a_lead_holds_while_the_data_age_moves_cold_starts_across_in_time() -> None:
    # scaling bench, c: a 8.3 s cold start, a decision every 5 s, a 15 s horizon: late by 0.3 s with
    # data 2 s old, in time with data 1.5 s old; the data's age moves from round to round
    cfg = ScalingConfig(max_replicas=10, replica_capacity=1.0, max_standbys=1, standby_cost=0.2)
    quiet = {"ready": 1, "standbys": 1, "need_now": 0.02, "predicted": 0.02, "cold_start": 8.3, "period": 5.0}
    state = ScalingState()
    kept = []
    for n, age in enumerate((2.0, 1.5, 2.0, 1.0, 1.5, 1.5, 2.0, 1.0)):
        decision, state = decide(inputs(**quiet, now=5.0 * n, lead=26.0, data_age=age), state, cfg)  # type: ignore[arg-type]
        kept.append(decision.standbys)
    # each cut and restart of the standby was a scale of the component and a cold start's CPU
    assert kept == [1] * 8, kept
    assert ScalingState.from_storage(state.for_storage()) == state
    # in time for the whole hold: the standby goes
    for n in range(8, 22):
        decision, state = decide(inputs(**quiet, now=5.0 * n, lead=26.0, data_age=1.0), state, cfg)  # type: ignore[arg-type]
    assert decision.standbys == 0, decision


def test_a_lone_replica_gets_a_second_when_its_risk_costs_more_than_the_replica() -> None:
    cfg = ScalingConfig(max_replicas=10, replica_capacity=1.0, lone_replica_risk=0.1, lone_replica_share=0.5)
    # need 0.6 of one replica's capacity: one is enough by the need, but late 10 % of its seconds x
    # violation cost 20 = 2 a second against 1 for a second replica
    busy = {"ready": 1, "standbys": 0, "need_now": 0.3, "predicted": 0.6}
    decision, _ = decide(inputs(**busy, lead=15.0), ScalingState(), cfg)  # type: ignore[arg-type]
    assert (decision.action, decision.target, decision.floor) == (Action.SCALE_OUT, 2, 2), decision
    assert "floor 2" in decision.reason and "0.1" in decision.reason
    # no lead known (the naive forecast): no floor
    decision, _ = decide(inputs(**busy), ScalingState(), cfg)  # type: ignore[arg-type]
    assert (decision.target, decision.floor) == (1, 0), decision
    # the need below the share: the lone replica idles, no floor
    decision, _ = decide(inputs(ready=1, standbys=0, need_now=0.2, predicted=0.3, lead=15.0), ScalingState(), cfg)
    assert (decision.target, decision.floor) == (1, 0), decision
    # a cheaper violation (risk x 5 = 0.5 < 1): not worth a replica
    cheap = ScalingConfig(
        max_replicas=10, replica_capacity=1.0, violation_cost=5.0, lone_replica_risk=0.1, lone_replica_share=0.5
    )
    decision, _ = decide(inputs(**busy, lead=15.0), ScalingState(), cheap)  # type: ignore[arg-type]
    assert (decision.target, decision.floor) == (1, 0), decision
    # with the default config (risk 0) never
    decision, _ = decide(inputs(**busy, lead=15.0), ScalingState(), CONFIG)  # type: ignore[arg-type]
    assert decision.target == 1, decision


def test_a_held_standby_waives_the_lone_replica_floor_and_stands_in_for_it() -> None:
    cfg = ScalingConfig(
        max_replicas=10, replica_capacity=1.0, lone_replica_risk=0.1, lone_replica_share=0.5, max_standbys=1
    )
    # need 0.6 of one replica, a lead known, cold starts in time: the floor is due (2 x 0.1 > 1) ...
    busy = {"ready": 1, "need_now": 0.3, "predicted": 0.6, "lead": 15.0, "cold_start": 5.0}
    frozen, _ = decide(inputs(**busy, standbys=1), ScalingState(), cfg)  # type: ignore[arg-type]
    # ... but the standby held is the insurance already: one replica (and the standby, at 0.2 of
    # one) where the floor would cost a second replica
    assert (frozen.action, frozen.target, frozen.floor, frozen.floor_waived) == (Action.HOLD, 1, 0, 2), frozen
    assert frozen.standbys == 1 and "floor waived" in frozen.reason, frozen
    # one being started counts as held (frozen within its cold start)
    starting, _ = decide(inputs(**busy, standbys=0, standbys_starting=1), ScalingState(), cfg)  # type: ignore[arg-type]
    assert (starting.target, starting.floor_waived, starting.standbys) == (1, 2, 1), starting
    # none held: the floor applies, and a standby is asked for to stand in for it from now on (the
    # cold starts are in time, so nothing else would keep one)
    none, _ = decide(inputs(**busy, standbys=0), ScalingState(), cfg)  # type: ignore[arg-type]
    assert (none.target, none.floor, none.floor_waived, none.standbys) == (2, 2, 0, 1), none
    # two provisioned by the floor, the standby now held: in after the hold
    state, acted = ScalingState(), []
    for n in range(14):
        held, state = decide(inputs(**{**busy, "ready": 2}, standbys=1, now=5.0 * n), state, cfg)  # type: ignore[arg-type]
        acted.append((held.action, held.target))
    assert acted[12] == (Action.SCALE_IN, 1) and set(acted[:12]) == {(Action.HOLD, 2)}, acted
    # without standbys allowed the floor stays
    no_room = dataclasses.replace(cfg, max_standbys=0)
    kept, _ = decide(inputs(**busy, standbys=0), ScalingState(), no_room)  # type: ignore[arg-type]
    assert (kept.target, kept.floor, kept.standbys) == (2, 2, 0), kept


def test_a_standby_is_kept_when_the_predicted_need_is_close_to_the_next_replica() -> None:
    cfg = ScalingConfig(max_replicas=10, replica_capacity=1.0, max_standbys=2, standby_cost=0.2)
    # need ~ N(3.8, 0.38): 4 replicas (q0.95 = 4.43 -> 5), and P(need > 5) = 0.1 % < 1 %: no standby
    far, _ = decide(inputs(ready=5, standbys=0, need_now=0.0, predicted=3.8, error=0.1), ScalingState(), cfg)
    assert (far.target, far.standbys) == (5, 0)
    # need ~ N(4.2, 0.84) with a wider error: 6 replicas (q0.95 = 5.58); P(need > 6) = 1.6 % > 1 %: one
    close, _ = decide(inputs(ready=6, standbys=0, need_now=0.0, predicted=4.2, error=0.2), ScalingState(), cfg)
    assert (close.target, close.standbys) == (6, 1)
    # a low need: none; never past max_replicas with the target; none with max_standbys 0
    low, _ = decide(inputs(ready=1, standbys=1, need_now=0.1, predicted=0.1, error=0.2), ScalingState(), cfg)
    assert low.standbys == 0
    top, _ = decide(inputs(ready=10, need_now=9.9, predicted=9.9, error=0.2), ScalingState(), cfg)
    assert (top.target, top.standbys) == (10, 0)
    off, _ = decide(inputs(ready=6, need_now=0.0, predicted=4.2, error=0.2), ScalingState(), CONFIG)
    assert off.standbys == 0
    assert close.to_dict()["standbys"] == 1
    with pytest.raises(ValueError, match="standby_cost"):
        ScalingConfig(standby_cost=0.0)
    with pytest.raises(ValueError, match="max_standbys"):
        ScalingConfig(max_standbys=-1)


def test_the_replica_cost_against_the_violation_cost_sets_the_margin() -> None:
    # need ~ N(4, 0.1 x 4): cheap replicas buy a high quantile, dear ones a low one
    cheap = ScalingConfig(max_replicas=20, replica_capacity=1.0, replica_cost=1.0, violation_cost=1000.0)
    dear = ScalingConfig(max_replicas=20, replica_capacity=1.0, replica_cost=1.0, violation_cost=2.0)
    assert desired_replicas(inputs(need_now=0.0, predicted=4.0, error=0.1), cheap)[0] == 6  # q 0.999: 4 x 1.31
    assert desired_replicas(inputs(need_now=0.0, predicted=4.0, error=0.1), dear)[0] == 4  # q 0.5: the mean
    with pytest.raises(ValueError, match="ever worth"):
        ScalingConfig(replica_cost=5.0, violation_cost=5.0)
    with pytest.raises(ValueError, match="min_replicas"):
        ScalingConfig(min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError, match="warm start"):
        ScalingInputs(0.0, "b", 1, 0, 0, 1.0, 1.0, 15.0, 0.1, cold_start_s=2.0, warm_start_s=5.0)
    with pytest.raises(ValueError, match="finite"):
        inputs(predicted=math.nan)


def test_scaling_in_waits_for_the_hold_and_keeps_the_highest_recent_need() -> None:
    state = ScalingState()
    provisioned = 6
    seen = []
    for t in range(0, 200, 5):
        predicted = 3.0 if t != 30 else 4.2  # a dip with one spike inside it
        decision, state = decide(
            inputs(now=float(t), ready=provisioned, need_now=1.0, predicted=predicted), state, CONFIG
        )
        seen.append((t, decision.action, decision.target))
        provisioned = decision.target
    scale_ins = [(t, target) for t, action, target in seen if action is Action.SCALE_IN]
    assert scale_ins[0] == (60, 5)  # 60 s below 6; the spike at 30 s (5 replicas) is within the hold
    assert scale_ins[1] == (125, 3)  # a full hold after the first step in, and no spike within it
    assert len(scale_ins) == 2


def test_the_reactive_baseline_computes_like_the_hpa() -> None:
    cfg = HpaConfig(target_utilization=0.5, replica_cores=1.0, max_replicas=30)
    d, state = hpa_step(HpaState(), 0.0, 4, 4, 2.6, cfg)  # 0.65 / 0.5 = 1.3: ceil(4 x 1.3) = 6
    assert d is not None and d.desired == 6
    assert hpa_step(state, 10.0, 6, 4, 6.0, cfg)[0] is None  # between syncs nothing happens
    d, state = hpa_step(state, 15.0, 6, 6, 3.15, cfg)  # 1.05: within the 10 % tolerance
    assert d is not None and d.desired == 6 and d.reason == "within tolerance"
    d, _ = hpa_step(HpaState(), 0.0, 2, 2, 20.0, cfg)  # ratio 20: at most max(+100 %, +4) per sync
    assert d is not None and d.desired == 6
    d, _ = hpa_step(HpaState(), 0.0, 4, 2, 2.0, cfg)  # unready replicas count as idle when scaling up
    assert d is not None and d.desired == 4  # 2 / (4 x 1) = 0.5: at the target


def test_the_hpa_scales_down_only_after_the_stabilisation_window() -> None:
    cfg = HpaConfig(target_utilization=0.5, replica_cores=1.0)
    state = HpaState()
    current = 8
    d, state = hpa_step(state, 0.0, current, current, 4.0, cfg)  # at the target: recommendation 8
    for t in range(15, 300, 15):
        d, state = hpa_step(state, float(t), current, current, 1.0, cfg)  # recommendation 2
        assert d is not None and d.desired == 8, t
    d, state = hpa_step(state, 300.0, current, current, 1.0, cfg)
    assert d is not None and d.desired == 2


needs = st.floats(min_value=0.0, max_value=30.0, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(needs, needs), min_size=1, max_size=60),
    st.integers(0, 3),
    st.sampled_from([0.0, 20.0, 60.0]),
    st.floats(min_value=0.0, max_value=0.5),
)
def test_decisions_stay_in_bounds_and_never_flap(
    steps: list[tuple[float, float]], standbys: int, hold: float, error: float
) -> None:
    cfg = ScalingConfig(min_replicas=2, max_replicas=12, replica_capacity=1.0, scale_in_hold_s=hold, max_standbys=2)
    state = ScalingState()
    provisioned = 2
    history: list[tuple[float, int]] = []
    last_out = -math.inf
    for i, (now_need, predicted) in enumerate(steps):
        t = 5.0 * i
        x = inputs(now=t, ready=provisioned, standbys=standbys, need_now=now_need, predicted=predicted, error=error)
        decision, state = decide(x, state, cfg)
        history.append((t, decision.desired))
        assert cfg.min_replicas <= decision.target <= cfg.max_replicas
        assert cfg.min_replicas <= decision.desired <= cfg.max_replicas
        assert 0 <= decision.standbys <= min(cfg.max_standbys, cfg.max_replicas - decision.target)
        if decision.action is Action.SCALE_OUT:
            assert decision.target > provisioned
            assert decision.cold_starts + decision.warm_starts == decision.target - provisioned
            assert decision.warm_starts <= standbys
            last_out = t
        elif decision.action is Action.SCALE_IN:
            assert decision.target < provisioned and decision.stops == provisioned - decision.target
            # never within a hold of wanting more, never below what the hold window wanted
            assert t - last_out >= hold
            assert all(d <= decision.target for s, d in history if s > t - hold or s == t)
        else:
            assert decision.target == provisioned
        provisioned = decision.target


@given(needs, needs, st.floats(min_value=0.0, max_value=0.5))
def test_more_predicted_need_never_means_fewer_replicas(a: float, b: float, error: float) -> None:
    low, high = sorted((a, b))
    cfg = ScalingConfig(max_replicas=100)
    assert desired_replicas(inputs(predicted=low, error=error), cfg) <= desired_replicas(
        inputs(predicted=high, error=error), cfg
    )


@given(st.lists(st.tuples(st.integers(1, 15), needs), min_size=1, max_size=40))
def test_the_hpa_stays_in_bounds(steps: list[tuple[int, float]]) -> None:
    cfg = HpaConfig(min_replicas=1, max_replicas=15)
    state = HpaState()
    for i, (current, used) in enumerate(steps):
        d, state = hpa_step(state, 15.0 * i, current, current, used, cfg)
        assert d is not None and cfg.min_replicas <= d.desired <= cfg.max_replicas
