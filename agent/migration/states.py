"""The migration state machine: states, events and the one table of legal transitions. No I/O.

Both sides run the same machine. An illegal event raises and leaves the state unchanged, so a
driver bug cannot silently skip a step such as the target's confirmation before COMMIT.
"""

from __future__ import annotations

import enum

from core.errors import Conflict


class State(enum.StrEnum):
    PREPARE = "PREPARE"  # target checks capacity, holds a reservation, pulls the image
    PRECOPY = "PRECOPY"  # dumps while the workload runs; only changed pages travel
    STOPCOPY = "STOPCOPY"  # workload frozen on the source; last delta, other images, rw layer
    RESTORE = "RESTORE"  # target restores the task from the images (left paused)
    POSTCOPY = "POSTCOPY"  # reserved for lazy pages: running on the target, some pages remote
    SWITCH = "SWITCH"  # the source decided: the service address moves, the target resumes
    COMMIT = "COMMIT"  # done: the workload runs on the target only; the source copy is removed
    ROLLBACK = "ROLLBACK"  # abandoned: the workload runs on the source only


class Event(enum.StrEnum):
    PREPARED = "prepared"
    ROUND_DONE = "round_done"
    CONVERGED = "converged"
    IMAGES_SENT = "images_sent"
    RESTORED = "restored"
    LAZY_RESTORED = "lazy_restored"
    PAGES_COMPLETE = "pages_complete"
    SWITCHED = "switched"
    FAILED = "failed"


TERMINAL = frozenset({State.COMMIT, State.ROLLBACK})

_TABLE: dict[tuple[State, Event], State] = {
    (State.PREPARE, Event.PREPARED): State.PRECOPY,
    (State.PRECOPY, Event.ROUND_DONE): State.PRECOPY,
    (State.PRECOPY, Event.CONVERGED): State.STOPCOPY,
    (State.STOPCOPY, Event.IMAGES_SENT): State.RESTORE,
    (State.RESTORE, Event.RESTORED): State.SWITCH,
    (State.RESTORE, Event.LAZY_RESTORED): State.POSTCOPY,
    (State.POSTCOPY, Event.PAGES_COMPLETE): State.SWITCH,
    (State.SWITCH, Event.SWITCHED): State.COMMIT,
}
# Failure is legal from every non-terminal state.
for _state in State:
    if _state not in TERMINAL:
        _TABLE[(_state, Event.FAILED)] = State.ROLLBACK


class IllegalTransition(Conflict):
    code = "illegal_transition"


def next_state(state: State, event: Event) -> State:
    try:
        return _TABLE[(state, event)]
    except KeyError:
        raise IllegalTransition(f"event {event.value} is not allowed in state {state.value}") from None


def can_roll_back(state: State) -> bool:
    """Before SWITCH the source copy is authoritative; from SWITCH on the target's is."""
    return state in (State.PREPARE, State.PRECOPY, State.STOPCOPY, State.RESTORE)
