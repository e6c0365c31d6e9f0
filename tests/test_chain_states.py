"""The chain state table, its record and its decisions: pure, no I/O (coordinator/chains/states.py)."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.chains.contract import StateUnfit, check_delta, check_state, snapshot_version
from coordinator.chains.manifest import ChainManifest
from coordinator.chains.states import (
    HANDOVER_PHASES,
    TEARDOWNS,
    TERMINAL,
    ChainRecord,
    Event,
    HandoverRecord,
    IllegalTransition,
    Recovery,
    RunState,
    StageRun,
    State,
    allowed,
    is_last,
    next_state,
    recovery,
    successor,
    transitions,
)


def _stage(name: str, consumes: str = "", fallback: str = "") -> dict[str, object]:
    stage: dict[str, object] = {
        "name": name,
        "image": f"registry:5000/{name}:1",
        "health": {"kind": "tcp", "port": 8080},
        "handover": {"protocol": "http_state", "port": 8080},
    }
    if consumes:
        stage["consumes"] = {"from": consumes, "state": ["counter"]}
    if fallback:
        stage["fallback"] = fallback
    return stage


MANIFEST = ChainManifest.from_dict(
    {
        "version": 1,
        "name": "counter",
        "stages": [_stage("a"), _stage("b", "a", fallback="b-safe"), _stage("c", "b")],
        "fallbacks": [_stage("b-safe", "a")],
    }
)


def _record(state: State = State.PENDING) -> ChainRecord:
    return ChainRecord("counter-1", "counter", MANIFEST.to_dict(), state, "10.0.0.200", created_at=1.0, updated_at=1.0)


def test_a_chain_hands_over_through_every_phase_to_the_next_stage() -> None:
    r = _record().advance(Event.START, 2.0, serving="a").advance(Event.HEALTHY, 3.0, serving_since=3.0)
    assert r.state is State.RUNNING
    r = r.advance(Event.ADVANCE, 4.0, target="b")
    for event in (Event.CREATED, Event.HEALTHY, Event.EXPORTED, Event.TRANSFERRED, Event.IMPORTED, Event.SWITCHED):
        r = r.advance(event, r.updated_at + 1)
    assert r.state is State.RETIRING
    r = r.advance(Event.RETIRED, 20.0, serving="b", target="")
    assert r.state is State.RUNNING and r.serving == "b"
    assert [s for s, _ in r.history] == [
        "STARTING", "RUNNING", "PREPARING", "HEALTH", "EXPORT", "TRANSFER", "IMPORT", "SWITCH", "RETIRING", "RUNNING",
    ]  # fmt: skip


@pytest.mark.parametrize("phase", HANDOVER_PHASES)
def test_a_failure_in_any_handover_phase_rolls_back_to_the_serving_stage(phase: State) -> None:
    r = _record(phase).advance(Event.FAILED, 2.0, error="boom")
    assert r.state is State.ROLLING_BACK
    assert r.advance(Event.ROLLED_BACK, 3.0).state is State.RUNNING


def test_past_the_switch_there_is_no_rollback() -> None:
    with pytest.raises(IllegalTransition):
        next_state(State.RETIRING, Event.FAILED)


def test_abort_is_allowed_wherever_something_may_run_and_ends_aborted() -> None:
    for state in State:
        if state in TERMINAL or state in TEARDOWNS:
            assert not allowed(state, Event.ABORT), state
        else:
            assert next_state(state, Event.ABORT) is State.ABORTING, state
    assert next_state(State.ABORTING, Event.STOPPED) is State.ABORTED


def test_every_state_can_end_and_the_ends_are_ends() -> None:
    table = transitions()
    for state in TERMINAL:
        assert not [k for k in table if k[0] is state]
    reach: dict[State, set[State]] = {s: {t for (f, _), t in table.items() if f is s} for s in State}
    for state in State:
        seen, todo = {state}, [state]
        while todo:
            for nxt in reach[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        assert seen & TERMINAL, state


@given(st.lists(st.sampled_from(list(Event)), max_size=40))
def test_events_move_the_record_only_as_the_table_says(events: list[Event]) -> None:
    record = _record()
    for n, event in enumerate(events):
        before = record
        if allowed(record.state, event):
            record = record.advance(event, float(n))
            assert record.state is transitions()[(before.state, event)]
            assert record.history[-1] == (record.state.value, float(n))
        else:
            with pytest.raises(IllegalTransition):
                record.advance(event, float(n))
            assert record == before  # refused: the record as it was


def test_recovery_rolls_back_before_the_switch_and_drives_everything_else() -> None:
    assert {s for s in State if recovery(s) is Recovery.ROLL_BACK} == {
        State.PREPARING, State.HEALTH, State.EXPORT, State.TRANSFER, State.IMPORT,
    }  # fmt: skip
    assert recovery(State.SWITCH) is Recovery.DRIVE  # the state is in the next stage: finish moving the address
    assert recovery(State.RUNNING) is Recovery.DRIVE and recovery(State.ROLLING_BACK) is Recovery.DRIVE
    assert {s for s in State if recovery(s) is Recovery.NOTHING} == TERMINAL


def test_successor_is_the_next_stage_then_its_fallback_then_nothing() -> None:
    assert successor(MANIFEST, "a", ()) == "b"
    assert successor(MANIFEST, "a", ("b",)) == "b-safe"
    assert successor(MANIFEST, "a", ("b", "b-safe")) is None
    assert successor(MANIFEST, "b-safe", ()) == "c"  # a fallback stands where the stage it replaces stands
    assert successor(MANIFEST, "c", ()) is None and is_last(MANIFEST, "c") and not is_last(MANIFEST, "b-safe")


def test_the_record_round_trips_through_storage() -> None:
    r = _record().advance(Event.START, 2.0, serving="a")
    r = r.with_run(StageRun("a", "counter-1-a-1", "h1", "rsv-1", RunState.SERVING), 3.0)
    r = r.with_handover(HandoverRecord("a", "b", phases_ms={"EXPORT": 1.5}), 4.0)
    r = r.with_handover(HandoverRecord("a", "b", outcome="rolled_back", failed_phase="IMPORT", error="no"), 5.0)
    assert len(r.handovers) == 1 and r.handovers[0].outcome == "rolled_back"
    assert ChainRecord.from_storage(r.for_storage()) == r
    assert r.run_of("a") is not None and r.run_of("b") is None


def test_transfer_checks_the_state_is_a_map_with_what_the_next_stage_consumes() -> None:
    state = msgpack.packb({"counter": 3, "buffer": b"\x00\x01", "trail": "a"})
    assert check_state(state, ("counter", "buffer"))["counter"] == 3
    with pytest.raises(StateUnfit, match="has no buffer"):
        check_state(msgpack.packb({"counter": 3}), ("counter", "buffer"))
    with pytest.raises(StateUnfit, match="not a map"):
        check_state(msgpack.packb([1, 2]), ())
    with pytest.raises(StateUnfit, match="not MessagePack"):
        check_state(b"\xc1", ())


def test_a_criu_handover_moves_the_process_then_hands_over_or_becomes_the_next_stage() -> None:
    running = _record().advance(Event.START, 2.0, serving="a").advance(Event.HEALTHY, 3.0)
    r = running.advance(Event.ADVANCE, 4.0, target="b")
    for event in (Event.CREATED, Event.MOVE, Event.MIGRATED, Event.EXPORTED):
        r = r.advance(event, r.updated_at + 1)
    assert [s for s, _ in r.history][-5:] == ["PREPARING", "HEALTH", "MIGRATE", "EXPORT", "TRANSFER"]
    r = running.advance(Event.ADVANCE, 4.0, target="b").advance(Event.MOVE, 5.0)
    assert r.state is State.MIGRATE and recovery(State.MIGRATE) is Recovery.DRIVE
    assert r.advance(Event.BECAME, 6.0, serving="b").state is State.RUNNING
    assert r.advance(Event.FAILED, 6.0).state is State.ROLLING_BACK


def test_a_live_handovers_snapshot_and_delta_are_checked() -> None:
    assert snapshot_version(check_state(msgpack.packb({"version": 7, "counter": 1}), ["counter"])) == 7
    with pytest.raises(StateUnfit, match="no version"):
        snapshot_version(check_state(msgpack.packb({"counter": 1}), ["counter"]))
    assert check_delta(msgpack.packb({"since": 7, "version": 9, "counter": 3}), 7) == 9
    with pytest.raises(StateUnfit, match="since version 6, not the snapshot's 7"):
        check_delta(msgpack.packb({"since": 6, "version": 9}), 7)
    with pytest.raises(StateUnfit, match="older than"):
        check_delta(msgpack.packb({"since": 7, "version": 5}), 7)
    with pytest.raises(StateUnfit, match="not a map"):
        check_delta(msgpack.packb([1]), 7)
