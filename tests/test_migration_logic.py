"""The pure parts of migration: the state table, the convergence rules and the journal round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.migration.convergence import Overheads, Round, Verdict, decide, predicted_downtime
from agent.migration.journal import Journal
from agent.migration.record import MigrationId, MigrationRecord
from agent.migration.states import Event, IllegalTransition, State, can_roll_back, next_state

OVERHEADS = Overheads(freeze_s=0.05, restore_s=0.05)


def test_happy_path_through_every_state() -> None:
    state = State.PREPARE
    for event, expected in [
        (Event.PREPARED, State.PRECOPY),
        (Event.ROUND_DONE, State.PRECOPY),
        (Event.CONVERGED, State.STOPCOPY),
        (Event.IMAGES_SENT, State.RESTORE),
        (Event.RESTORED, State.SWITCH),
        (Event.SWITCHED, State.COMMIT),
    ]:
        state = next_state(state, event)
        assert state == expected


@pytest.mark.parametrize("state", [State.PREPARE, State.PRECOPY, State.STOPCOPY, State.RESTORE])
def test_failure_rolls_back_from_any_live_state(state: State) -> None:
    assert next_state(state, Event.FAILED) == State.ROLLBACK


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (State.PRECOPY, Event.RESTORED),
        (State.COMMIT, Event.FAILED),
        (State.ROLLBACK, Event.PREPARED),
        (State.PREPARE, Event.SWITCHED),
        (State.STOPCOPY, Event.CONVERGED),
    ],
)
def test_illegal_events_raise(state: State, event: Event) -> None:
    with pytest.raises(IllegalTransition, match=event.value):
        next_state(state, event)


def test_rollback_is_possible_only_before_switch() -> None:
    assert can_roll_back(State.RESTORE)
    assert not can_roll_back(State.SWITCH)
    assert not can_roll_back(State.COMMIT)


def test_downtime_target_stops_precopy() -> None:
    # 1 MiB/s measured, 10 dirty pages left: about 40 ms + overheads.
    rounds = [Round(dirty_pages=256, bytes_sent=1 << 20, seconds=1.0), Round(100, 1 << 20, 1.0)]
    assert decide(rounds, OVERHEADS, downtime_target_s=0.3, max_iterations=8) == Verdict.CONTINUE
    rounds.append(Round(10, 40960, 0.04))
    assert predicted_downtime(rounds, OVERHEADS) < 0.3
    assert decide(rounds, OVERHEADS, 0.3, 8) == Verdict.DOWNTIME_REACHED


def test_dirty_set_rules() -> None:
    slow = dict(bytes_sent=1, seconds=100.0)  # a throughput so low the downtime rule never fires
    assert decide([Round(5000, **slow), Round(60, **slow)], OVERHEADS, 0.3, 8) == Verdict.DIRTY_SET_SMALL
    assert decide([Round(5000, **slow), Round(5600, **slow)], OVERHEADS, 0.3, 8) == Verdict.DIRTY_SET_GROWING
    assert decide([Round(5000, **slow), Round(5400, **slow)], OVERHEADS, 0.3, 8) == Verdict.CONTINUE
    assert decide([Round(5000, **slow)] * 3, OVERHEADS, 0.3, 3) == Verdict.MAX_ITERATIONS


async def test_journal_round_trip_and_atomic_replace(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "migrations")
    record = MigrationRecord(id=MigrationId("m1"), role="source", container="web", peer="h2")
    await journal.write(record)
    record = record.advance(Event.PREPARED).with_stats(iterations=1, dirty_pages=(10,), bytes_raw=100, bytes_wire=50)
    await journal.write(record)
    loaded = journal.load(MigrationId("m1"))
    assert loaded == record
    assert loaded is not None and loaded.state == State.PRECOPY and loaded.stats.compression_ratio == 2.0
    assert [p.name for p in (tmp_path / "migrations").iterdir()] == ["m1.json"]
    (tmp_path / "migrations" / "broken.json").write_text("{not json")
    assert [r.id for r in journal.all()] == ["m1"]
