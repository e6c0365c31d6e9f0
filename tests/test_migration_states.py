"""The migration's decision tables, driven without I/O: transitions, recovery and the source's answers."""

from __future__ import annotations

import dataclasses
import json
from itertools import product

import pytest

from agent.migration.record import MigrationId, MigrationOptions, MigrationRecord
from agent.migration.states import (
    TERMINAL,
    Decision,
    Event,
    IllegalTransition,
    RecoveryAction,
    Role,
    State,
    answer_for,
    can_roll_back,
    decision_for,
    next_state,
    recovery_action,
)

# The whole table, written out again: a change to states.py must change this too.
EXPECTED: dict[tuple[State, Event], State] = {
    (State.PREPARE, Event.PREPARED): State.PRECOPY,
    (State.PRECOPY, Event.ROUND_DONE): State.PRECOPY,
    (State.PRECOPY, Event.CONVERGED): State.STOPCOPY,
    (State.STOPCOPY, Event.IMAGES_SENT): State.RESTORE,
    (State.RESTORE, Event.RESTORED): State.SWITCH,
    (State.RESTORE, Event.LAZY_RESTORED): State.POSTCOPY,
    (State.POSTCOPY, Event.PAGES_COMPLETE): State.SWITCH,
    (State.SWITCH, Event.SWITCHED): State.COMMIT,
    (State.PREPARE, Event.FAILED): State.ROLLBACK,
    (State.PRECOPY, Event.FAILED): State.ROLLBACK,
    (State.STOPCOPY, Event.FAILED): State.ROLLBACK,
    (State.RESTORE, Event.FAILED): State.ROLLBACK,
    (State.POSTCOPY, Event.POSTCOPY_ABORTED): State.ROLLBACK,
    (State.POSTCOPY, Event.LOST): State.NEEDS_OPERATOR,
    (State.SWITCH, Event.LOST): State.NEEDS_OPERATOR,
}
LIVE = [s for s in State if s not in TERMINAL]


def _record(state: State, role: str = "source", peer: str = "h2", mode: str = "precopy") -> MigrationRecord:
    record = MigrationRecord(
        id=MigrationId("mig-1"), role=role, container="web", peer=peer, options=MigrationOptions(mode=mode)
    )
    return dataclasses.replace(record, state=state)


@pytest.mark.parametrize(("state", "event"), list(product(State, Event)))
def test_every_state_and_event(state: State, event: Event) -> None:
    record = _record(state)
    before = dataclasses.replace(record)
    if (state, event) in EXPECTED:
        after = record.advance(event, error="why")
        assert after.state == EXPECTED[(state, event)] == next_state(state, event)
        assert after.history[-1][0] == after.state.value
    else:
        with pytest.raises(IllegalTransition, match=event.value):
            record.advance(event)
        with pytest.raises(IllegalTransition):
            next_state(state, event)
        assert record == before and record.state == state  # the refused event changed nothing


def test_can_roll_back_agrees_with_the_table() -> None:
    for state in State:
        assert can_roll_back(state) == (EXPECTED.get((state, Event.FAILED)) == State.ROLLBACK), state
    assert {s for s in State if can_roll_back(s)} == {State.PREPARE, State.PRECOPY, State.STOPCOPY, State.RESTORE}
    # From the decision on, plain failure is illegal: only the post-copy events end those states early.
    for state in (State.POSTCOPY, State.SWITCH):
        with pytest.raises(IllegalTransition):
            next_state(state, Event.FAILED)


def test_terminal_states_accept_nothing() -> None:
    assert {State.COMMIT, State.ROLLBACK, State.NEEDS_OPERATOR} == TERMINAL
    for state, event in product(TERMINAL, Event):
        with pytest.raises(IllegalTransition):
            next_state(state, event)


def test_needs_operator_is_terminal_and_done() -> None:
    record = _record(State.POSTCOPY).advance(Event.LOST, error="post-copy lost")
    assert record.state == State.NEEDS_OPERATOR and record.done
    stored = record.for_storage()
    assert stored["state"] == "NEEDS_OPERATOR" and stored["done"] is True
    assert MigrationRecord.from_storage(json.loads(json.dumps(stored))) == record


def _reachable(start: State) -> set[State]:
    seen, frontier = {start}, [start]
    while frontier:
        state = frontier.pop()
        for (src, _), dst in EXPECTED.items():
            if src == state and dst not in seen:
                seen.add(dst)
                frontier.append(dst)
    return seen


def test_every_state_is_reachable_and_every_live_one_can_end() -> None:
    assert _reachable(State.PREPARE) == set(State)
    for state in LIVE:
        assert _reachable(state) & TERMINAL, state


# ----- recovery ------------------------------------------------------------------------------------

RECOVERY = {
    (Role.SOURCE, State.PREPARE): RecoveryAction.RESUME_SOURCE_AND_FAIL,
    (Role.SOURCE, State.PRECOPY): RecoveryAction.RESUME_SOURCE_AND_FAIL,
    (Role.SOURCE, State.STOPCOPY): RecoveryAction.RESUME_SOURCE_AND_FAIL,
    (Role.SOURCE, State.RESTORE): RecoveryAction.RESUME_SOURCE_AND_FAIL,
    (Role.SOURCE, State.POSTCOPY): RecoveryAction.NEEDS_OPERATOR,
    (Role.SOURCE, State.SWITCH): RecoveryAction.FINISH_SWITCH,
    (Role.TARGET, State.PREPARE): RecoveryAction.REMOVE_TARGET_COPY_AND_FAIL,
    (Role.TARGET, State.PRECOPY): RecoveryAction.REMOVE_TARGET_COPY_AND_FAIL,
    (Role.TARGET, State.STOPCOPY): RecoveryAction.REMOVE_TARGET_COPY_AND_FAIL,
    (Role.TARGET, State.RESTORE): RecoveryAction.ASK_SOURCE,
    (Role.TARGET, State.POSTCOPY): RecoveryAction.FINISH_POSTCOPY,
    (Role.TARGET, State.SWITCH): RecoveryAction.FINISH_COMMIT,
}


@pytest.mark.parametrize(("role", "state"), list(product(Role, LIVE)))
def test_recovery_covers_every_role_and_live_state(role: Role, state: State) -> None:
    assert recovery_action(role.value, state) == RECOVERY[(role, state)]


def test_recovery_of_terminal_states_or_unknown_roles_is_refused() -> None:
    for role, state in product(Role, TERMINAL):
        with pytest.raises(IllegalTransition):
            recovery_action(role, state)
    with pytest.raises(IllegalTransition):
        recovery_action("bystander", State.PREPARE)


def test_every_recovery_action_is_used() -> None:
    assert {recovery_action(role, state) for role, state in product(Role, LIVE)} == set(RecoveryAction)


@pytest.mark.parametrize(
    ("role", "state", "event", "outcome"),
    [
        (Role.SOURCE, State.STOPCOPY, Event.FAILED, State.ROLLBACK),  # RESUME_SOURCE_AND_FAIL
        (Role.SOURCE, State.POSTCOPY, Event.LOST, State.NEEDS_OPERATOR),  # NEEDS_OPERATOR
        (Role.TARGET, State.PRECOPY, Event.FAILED, State.ROLLBACK),  # REMOVE_TARGET_COPY_AND_FAIL
        (Role.TARGET, State.SWITCH, Event.SWITCHED, State.COMMIT),  # FINISH_COMMIT
    ],
)
def test_recovery_actions_use_legal_events(role: Role, state: State, event: Event, outcome: State) -> None:
    """The event each ending recovery action advances with is legal in the state it handles."""
    assert next_state(state, event) == outcome


# ----- the source's answers --------------------------------------------------------------------------

ANSWERS = {
    State.PREPARE: Decision.PENDING,
    State.PRECOPY: Decision.PENDING,
    State.STOPCOPY: Decision.PENDING,
    State.RESTORE: Decision.PENDING,
    State.POSTCOPY: Decision.COMMIT,
    State.SWITCH: Decision.COMMIT,
    State.COMMIT: Decision.COMMIT,
    State.ROLLBACK: Decision.ROLLBACK,
    State.NEEDS_OPERATOR: Decision.ROLLBACK,
}


@pytest.mark.parametrize("state", list(State))
def test_decision_for_each_source_state(state: State) -> None:
    assert decision_for(_record(state), "h2") == ANSWERS[state]


@pytest.mark.parametrize(
    "record",
    [None, _record(State.SWITCH, role="target"), _record(State.SWITCH, peer="h3")],
    ids=["unknown", "we-are-its-target", "asked-by-another-host"],
)
def test_unknown_or_foreign_migrations_roll_back(record: MigrationRecord | None) -> None:
    """We never made that migration with the asker: our copy, if any, is the workload."""
    answer = answer_for(record, "h2")
    assert answer.decision == Decision.ROLLBACK and not answer.await_committed


@pytest.mark.parametrize(("state", "mode"), list(product(State, ["precopy", "lazy", "hybrid"])))
def test_only_a_precopy_source_in_switch_waits_for_committed(state: State, mode: str) -> None:
    answer = answer_for(_record(state, mode=mode), "h2")
    assert answer.await_committed == (state == State.SWITCH and mode == "precopy")
    assert not answer.await_committed or answer.decision == Decision.COMMIT


def test_decisions_keep_their_wire_values() -> None:
    assert [d.value for d in Decision] == ["commit", "rollback", "pending"]
    assert json.dumps({"decision": Decision.COMMIT}) == '{"decision": "commit"}'
    assert Decision.parse("rollback") is Decision.ROLLBACK
    assert Decision.parse("maybe") is None and Decision.parse(None) is None
    assert [d.final for d in Decision] == [True, True, False]
