"""The migration state machine and every decision it implies, as data. No I/O.

Both sides run the same machine. An illegal event raises and leaves the state unchanged, so a
driver bug cannot silently skip a step such as the target's confirmation before COMMIT.

Three tables, read by the drivers (source.py, target.py, service.py):
  _TRANSITIONS  (state, event) -> state
  _RECOVERY     (role, journaled state) -> what a restarted agent does (`recovery_action`)
  _ANSWERS      source state -> what the source answers a target that asks for the decision
                (`decision_for`, `answer_for`)

Failure has three events, because what a failure means depends on who holds the workload. Before
SWITCH the source's frozen (or still running) copy is the workload: FAILED rolls back. From the
decision on the target's copy is; in POSTCOPY part of its memory is still on the source. A post-copy
that ends with the target's copy killed while the source still holds its complete frozen copy and can
resume it is POSTCOPY_ABORTED (a rollback). When the copy that should run is lost and ferryman
cannot tell which copy is the workload, or cannot make either whole, the event is LOST and the
migration ends in NEEDS_OPERATOR: the frozen source copy is kept for a human to resume or discard.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

from core.errors import Conflict

if TYPE_CHECKING:
    from agent.migration.record import MigrationRecord


class State(enum.StrEnum):
    PREPARE = "PREPARE"  # target checks capacity, holds a reservation, pulls the image
    PRECOPY = "PRECOPY"  # dumps while the workload runs; only changed pages travel
    STOPCOPY = "STOPCOPY"  # workload frozen on the source; last delta, other images, rw layer
    RESTORE = "RESTORE"  # target restores the task from the images (left paused)
    POSTCOPY = "POSTCOPY"  # the source decided (lazy pages): running on the target, some pages remote
    SWITCH = "SWITCH"  # the source decided: the service address moves, the target resumes
    COMMIT = "COMMIT"  # done: the workload runs on the target only; the source copy is removed
    ROLLBACK = "ROLLBACK"  # abandoned: the workload runs on the source only
    NEEDS_OPERATOR = "NEEDS_OPERATOR"  # ended undecidable: the source's frozen copy is kept for a human


class Event(enum.StrEnum):
    PREPARED = "prepared"
    ROUND_DONE = "round_done"
    CONVERGED = "converged"
    IMAGES_SENT = "images_sent"
    RESTORED = "restored"
    LAZY_RESTORED = "lazy_restored"
    PAGES_COMPLETE = "pages_complete"
    SWITCHED = "switched"
    FAILED = "failed"  # before the decision: the source's copy is the workload, it resumes
    POSTCOPY_ABORTED = "postcopy_aborted"  # the target's copy is killed; the source resumes its frozen one
    LOST = "lost"  # the decided copy cannot be completed and no side can safely resume the other


class Role(enum.StrEnum):
    SOURCE = "source"
    TARGET = "target"


TERMINAL = frozenset({State.COMMIT, State.ROLLBACK, State.NEEDS_OPERATOR})

_TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.PREPARE, Event.PREPARED): State.PRECOPY,
    (State.PRECOPY, Event.ROUND_DONE): State.PRECOPY,
    (State.PRECOPY, Event.CONVERGED): State.STOPCOPY,
    (State.STOPCOPY, Event.IMAGES_SENT): State.RESTORE,
    (State.RESTORE, Event.RESTORED): State.SWITCH,
    (State.RESTORE, Event.LAZY_RESTORED): State.POSTCOPY,
    (State.POSTCOPY, Event.PAGES_COMPLETE): State.SWITCH,
    (State.SWITCH, Event.SWITCHED): State.COMMIT,
    # Before the decision the source's copy is whole and authoritative: any failure rolls back.
    (State.PREPARE, Event.FAILED): State.ROLLBACK,
    (State.PRECOPY, Event.FAILED): State.ROLLBACK,
    (State.STOPCOPY, Event.FAILED): State.ROLLBACK,
    (State.RESTORE, Event.FAILED): State.ROLLBACK,
    # After it, only a post-copy whose target copy is dead and whose source copy can resume rolls back.
    (State.POSTCOPY, Event.POSTCOPY_ABORTED): State.ROLLBACK,
    (State.POSTCOPY, Event.LOST): State.NEEDS_OPERATOR,
    (State.SWITCH, Event.LOST): State.NEEDS_OPERATOR,
}


class IllegalTransition(Conflict):
    code = "illegal_transition"


def next_state(state: State, event: Event) -> State:
    try:
        return _TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(f"event {event.value} is not allowed in state {state.value}") from None


def can_roll_back(state: State) -> bool:
    """Before SWITCH the source copy is authoritative; from SWITCH on the target's is."""
    return next_state_or_none(state, Event.FAILED) == State.ROLLBACK


def next_state_or_none(state: State, event: Event) -> State | None:
    return _TRANSITIONS.get((state, event))


# ----- recovery: what a restarted agent does with each journaled, unfinished migration -------------


class RecoveryAction(enum.StrEnum):
    RESUME_SOURCE_AND_FAIL = "resume_source_and_fail"  # before the decision: thaw ours, route the address back
    FINISH_SWITCH = "finish_switch"  # the source decided commit: deliver it until the target confirms
    NEEDS_OPERATOR = "needs_operator"  # the source restarted in POSTCOPY: the target's missing pages are lost
    REMOVE_TARGET_COPY_AND_FAIL = "remove_target_copy_and_fail"  # a target before it restored: drop what it built
    ASK_SOURCE = "ask_source"  # a restored, paused copy: ask the source what it decided
    FINISH_POSTCOPY = "finish_postcopy"  # a running lazy copy: the pager survived, reconnect and finish
    FINISH_COMMIT = "finish_commit"  # a target told to commit: resume its copy, publish the address


_RECOVERY: dict[tuple[Role, State], RecoveryAction] = {
    (Role.SOURCE, State.PREPARE): RecoveryAction.RESUME_SOURCE_AND_FAIL,
    (Role.SOURCE, State.PRECOPY): RecoveryAction.RESUME_SOURCE_AND_FAIL,
    (Role.SOURCE, State.STOPCOPY): RecoveryAction.RESUME_SOURCE_AND_FAIL,
    (Role.SOURCE, State.RESTORE): RecoveryAction.RESUME_SOURCE_AND_FAIL,
    # The page server's session died with the previous process: the pages still here cannot reach the
    # target, whose pager kills its copy; ours is frozen as of the switch, and the target's may have
    # run past it. Neither copy can be resumed safely without knowing which one ran last.
    (Role.SOURCE, State.POSTCOPY): RecoveryAction.NEEDS_OPERATOR,
    (Role.SOURCE, State.SWITCH): RecoveryAction.FINISH_SWITCH,
    (Role.TARGET, State.PREPARE): RecoveryAction.REMOVE_TARGET_COPY_AND_FAIL,
    (Role.TARGET, State.PRECOPY): RecoveryAction.REMOVE_TARGET_COPY_AND_FAIL,
    (Role.TARGET, State.STOPCOPY): RecoveryAction.REMOVE_TARGET_COPY_AND_FAIL,
    (Role.TARGET, State.RESTORE): RecoveryAction.ASK_SOURCE,
    (Role.TARGET, State.POSTCOPY): RecoveryAction.FINISH_POSTCOPY,
    # The source decided commit and never rolls back from SWITCH: our copy is the workload.
    (Role.TARGET, State.SWITCH): RecoveryAction.FINISH_COMMIT,
}


def recovery_action(role: str, state: State) -> RecoveryAction:
    """What a restarted agent does with a migration journaled in `state` (not terminal)."""
    try:
        return _RECOVERY[(Role(role), state)]
    except (KeyError, ValueError):
        raise IllegalTransition(f"no recovery for a {role} in state {state.value}") from None


# ----- decisions: what the source answers a target that asks ---------------------------------------


class Decision(enum.StrEnum):
    """The source's decision as a target learns it; the values are the wire strings."""

    COMMIT = "commit"
    ROLLBACK = "rollback"
    PENDING = "pending"

    @property
    def final(self) -> bool:
        """The source decided: the target acts on it (PENDING: ask again later)."""
        return self is not Decision.PENDING

    @classmethod
    def parse(cls, value: object) -> Decision | None:
        """A decision from a peer's message; None for anything else."""
        try:
            return cls(value) if isinstance(value, str) else None
        except ValueError:
            return None


@dataclass(frozen=True)
class Answer:
    decision: Decision
    await_committed: bool = False
    """The source waits for the target's `committed`, then removes its own copy (COMMIT)."""


_ANSWERS: dict[State, Decision] = {
    State.PREPARE: Decision.PENDING,
    State.PRECOPY: Decision.PENDING,
    State.STOPCOPY: Decision.PENDING,
    State.RESTORE: Decision.PENDING,
    State.POSTCOPY: Decision.COMMIT,
    State.SWITCH: Decision.COMMIT,
    State.COMMIT: Decision.COMMIT,
    State.ROLLBACK: Decision.ROLLBACK,
    # A target that still asks holds a restored copy that never ran; its missing pages are gone with
    # the source's page server, so it can never become the workload. Removing it leaves the operator
    # one copy to resume: ours, frozen as of the switch.
    State.NEEDS_OPERATOR: Decision.ROLLBACK,
}

_AWAIT_COMMITTED: frozenset[tuple[State, str]] = frozenset({(State.SWITCH, "precopy")})
"""(source state, mode) in which the source, having answered commit, waits for `committed`. A lazy
source in SWITCH already has a target that resumed (it asks only from RESTORE)."""


def answer_for(record: MigrationRecord | None, peer_host: str) -> Answer:
    """What the source answers `peer_host` asking about `record` (None: no such migration here)."""
    if record is None or record.role != Role.SOURCE or record.peer != peer_host:
        return Answer(Decision.ROLLBACK)  # we never made it: our copy (if any) is the workload
    decision = _ANSWERS[record.state]
    return Answer(decision, (record.state, record.options.mode) in _AWAIT_COMMITTED)


def decision_for(record: MigrationRecord | None, peer_host: str) -> Decision:
    return answer_for(record, peer_host).decision
