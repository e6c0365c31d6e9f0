"""The chain state machine, its record and its decisions, as data. No I/O.

One table holds every state and transition, as in agent/migration/states.py and h11's `_state.py`:
an event the table does not allow raises IllegalTransition and leaves the record as it was.

    PENDING --start--> STARTING --healthy--> RUNNING
    STARTING --fall_back--> STARTING (the first stage's fallback)
    STARTING --failed--> FAILING --stopped--> FAILED
    RUNNING --advance--> PREPARING --created--> HEALTH --healthy--> EXPORT --exported--> TRANSFER
        --transferred--> IMPORT --imported--> SWITCH --switched--> RETIRING --retired--> RUNNING (the next stage)
    criu: HEALTH --move--> MIGRATE --migrated--> EXPORT ... (the process moved next to the next stage)
          PREPARING --move--> MIGRATE --became--> RUNNING (`become`: the moved process is the next stage)
    PREPARING, HEALTH, MIGRATE, EXPORT, TRANSFER, IMPORT, SWITCH --failed--> ROLLING_BACK
        --rolled_back--> RUNNING (the same stage)
    RUNNING --complete--> COMPLETING --stopped--> COMPLETED
    any state but the teardowns and the ends --abort--> ABORTING --stopped--> ABORTED

A handover (PREPARING to RETIRING) never stops the serving stage before the next one is healthy,
holds the state and has the chain's address: up to SWITCH the serving stage is untouched but for
its export (it takes no requests that change its state from then on, and a rollback resumes it),
so a failure anywhere up to and including SWITCH rolls back to it with its state intact. The
record is journaled on every transition; `recovery` says what a coordinator that restarts does
with a chain it finds in each state, and `successor` which stage a chain hands over to next.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from coordinator.chains.manifest import ChainManifest
from core.errors import Conflict


class State(enum.StrEnum):
    PENDING = "PENDING"  # accepted: its address taken, nothing started
    STARTING = "STARTING"  # the first stage (or its fallback) placed, created, waited on until healthy
    RUNNING = "RUNNING"  # `serving` runs at the chain's address
    PREPARING = "PREPARING"  # handover to `target`: placed, pulled, created without the address published
    HEALTH = "HEALTH"  # waiting for `target`'s health check to pass
    EXPORT = "EXPORT"  # `serving`'s state taken out; it takes no requests that change it from now on
    TRANSFER = "TRANSFER"  # the state carried to `target`'s host, checked to be a MessagePack map
    IMPORT = "IMPORT"  # the state loaded into `target`
    MIGRATE = "MIGRATE"  # criu: `serving`'s live process moved by a migration to `target`'s host
    SWITCH = "SWITCH"  # the address moves: unpublished on `serving`'s host, published on `target`'s
    RETIRING = "RETIRING"  # the old stage drains in-flight requests (bounded), then is removed
    ROLLING_BACK = "ROLLING_BACK"  # a handover phase failed: `target` removed, `serving` resumed and republished
    COMPLETING = "COMPLETING"  # the last stage's run ended: removing it
    COMPLETED = "COMPLETED"  # the chain ran to its end; nothing of it runs
    ABORTING = "ABORTING"  # abort asked: removing every stage
    ABORTED = "ABORTED"  # aborted; nothing of it runs
    FAILING = "FAILING"  # the first stage (and its fallback) could not start: removing what there is
    FAILED = "FAILED"  # nothing of it runs; `error` says why


class Event(enum.StrEnum):
    START = "start"
    HEALTHY = "healthy"
    FALL_BACK = "fall_back"
    FAILED = "failed"
    ADVANCE = "advance"
    CREATED = "created"
    EXPORTED = "exported"
    TRANSFERRED = "transferred"
    IMPORTED = "imported"
    SWITCHED = "switched"
    MOVE = "move"  # criu: the serving stage's process is to move (to the next stage's host)
    MIGRATED = "migrated"  # criu: it moved; its state is handed over by the contract next
    BECAME = "became"  # criu, `become`: it moved, and it is the next stage
    RETIRED = "retired"
    ROLLED_BACK = "rolled_back"
    COMPLETE = "complete"
    ABORT = "abort"
    STOPPED = "stopped"


HANDOVER_PHASES = (
    State.PREPARING,
    State.HEALTH,
    State.MIGRATE,
    State.EXPORT,
    State.TRANSFER,
    State.IMPORT,
    State.SWITCH,
)
"""The phases a failure rolls back from (RETIRING is past the point of no return: the next stage serves)."""
TERMINAL = frozenset({State.COMPLETED, State.ABORTED, State.FAILED})
TEARDOWNS = frozenset({State.COMPLETING, State.ABORTING, State.FAILING})
HOLDS_ADDRESS = frozenset(State) - TERMINAL

_TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.PENDING, Event.START): State.STARTING,
    (State.STARTING, Event.HEALTHY): State.RUNNING,
    (State.STARTING, Event.FALL_BACK): State.STARTING,
    (State.STARTING, Event.FAILED): State.FAILING,
    (State.FAILING, Event.STOPPED): State.FAILED,
    (State.RUNNING, Event.ADVANCE): State.PREPARING,
    (State.PREPARING, Event.CREATED): State.HEALTH,
    (State.HEALTH, Event.HEALTHY): State.EXPORT,
    (State.EXPORT, Event.EXPORTED): State.TRANSFER,
    (State.TRANSFER, Event.TRANSFERRED): State.IMPORT,
    (State.IMPORT, Event.IMPORTED): State.SWITCH,
    (State.SWITCH, Event.SWITCHED): State.RETIRING,
    # criu: the process moves after the next stage is healthy (then the contract hands over, on one
    # host), or, when the next stage *is* the moved process (`become`), right after its placement.
    (State.HEALTH, Event.MOVE): State.MIGRATE,
    (State.PREPARING, Event.MOVE): State.MIGRATE,
    (State.MIGRATE, Event.MIGRATED): State.EXPORT,
    (State.MIGRATE, Event.BECAME): State.RUNNING,
    (State.RETIRING, Event.RETIRED): State.RUNNING,
    **{(phase, Event.FAILED): State.ROLLING_BACK for phase in HANDOVER_PHASES},
    (State.ROLLING_BACK, Event.ROLLED_BACK): State.RUNNING,
    (State.RUNNING, Event.COMPLETE): State.COMPLETING,
    (State.COMPLETING, Event.STOPPED): State.COMPLETED,
    **{(s, Event.ABORT): State.ABORTING for s in State if s not in TERMINAL | TEARDOWNS},
    (State.ABORTING, Event.STOPPED): State.ABORTED,
}


class IllegalTransition(Conflict):
    code = "illegal_transition"


class ChainBusy(Conflict):
    """The chain cannot do what was asked in its current state (e.g. advance while handing over)."""

    code = "chain_busy"


def next_state(state: State, event: Event) -> State:
    try:
        return _TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(f"event {event.value} is not allowed in state {state.value}") from None


def allowed(state: State, event: Event) -> bool:
    return (state, event) in _TRANSITIONS


def transitions() -> Mapping[tuple[State, Event], State]:
    """The whole table (read-only), for documentation and tests."""
    return dict(_TRANSITIONS)


class Recovery(enum.StrEnum):
    """What a coordinator does at start with a chain a previous process left in a state."""

    DRIVE = "drive"  # carry on where it was: every step of this state can be run again
    ROLL_BACK = "roll_back"  # a handover before its switch: nobody knows how far the phase got; roll back
    NOTHING = "nothing"  # it ended


_RECOVERY: dict[State, Recovery] = {
    **{s: Recovery.DRIVE for s in State},
    **{s: Recovery.ROLL_BACK for s in (State.PREPARING, State.HEALTH, State.EXPORT, State.TRANSFER, State.IMPORT)},
    # SWITCH is driven again, not rolled back: the state is in the next stage, and moving the address
    # (unpublish there, publish here) can be done twice; RETIRING only removes the old stage.
    # MIGRATE is driven again too: the migration is the orchestrator's, journaled and resumed by it;
    # the chain follows it by the id in its handover record (or finds it by container).
    **{s: Recovery.NOTHING for s in TERMINAL},
}


def recovery(state: State) -> Recovery:
    return _RECOVERY[state]


def successor(manifest: ChainManifest, serving: str, failed: Collection[str]) -> str | None:
    """The stage a chain serving `serving` hands over to next, None when there is none to try:
    the next stage in the manifest (after the stage a fallback stands in for), or its fallback once
    a handover to it failed; None when both failed (the chain waits for `chain advance`) or
    `serving` is the last stage."""
    names = [s.name for s in manifest.stages]
    position = serving
    if serving not in names:  # a fallback: it stands where the stage that names it stands
        position = next(s.name for s in manifest.stages if s.fallback == serving)
    i = names.index(position)
    if i + 1 == len(names):
        return None
    nxt = manifest.stages[i + 1]
    if nxt.name not in failed:
        return nxt.name
    if nxt.fallback and nxt.fallback not in failed:
        return nxt.fallback
    return None


def is_last(manifest: ChainManifest, serving: str) -> bool:
    names = [s.name for s in manifest.stages]
    if serving not in names:
        serving = next(s.name for s in manifest.stages if s.fallback == serving)
    return names.index(serving) == len(names) - 1


class RunState(enum.StrEnum):
    PLACED = "placed"  # capacity reserved on its host
    CREATED = "created"  # the agent created and started it (the address not published by it)
    HEALTHY = "healthy"  # its health check passed
    FROZEN = "frozen"  # a warm standby: healthy, then frozen until its handover thaws it
    CHECKPOINTED = "checkpointed"  # a warm standby: healthy, then checkpointed to disk until restored
    SERVING = "serving"  # it has the chain's state and address
    FAILED = "failed"  # it failed to start, to be healthy, or to take the state; removed since
    REMOVED = "removed"  # its container and reservation are gone


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


@dataclass(frozen=True)
class StageRun:
    """One container the chain made for a stage."""

    stage: str
    container: str
    host: str = ""
    reservation: str = ""
    state: RunState = RunState.PLACED
    error: str = ""
    peak_cpu_millis: float = 0.0
    peak_memory_bytes: int = 0
    """The most it was measured to use while it served (its host's telemetry): the chain's history
    that the next runs' usage is predicted from."""
    peak_request_rate: float = 0.0
    """The highest request rate it was measured to serve at (its host's telemetry: packets/s into
    its network, `packets_in_per_s`); 0: not measured. The model takes its ratio to the last run's."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "container": self.container,
            "host": self.host,
            "reservation": self.reservation,
            "state": self.state.value,
            "error": self.error,
            "peak_cpu_millis": self.peak_cpu_millis,
            "peak_memory_bytes": self.peak_memory_bytes,
            "peak_request_rate": self.peak_request_rate,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StageRun:
        return cls(
            stage=data["stage"],
            container=data["container"],
            host=data.get("host", ""),
            reservation=data.get("reservation", ""),
            state=RunState(data.get("state", RunState.PLACED.value)),
            error=data.get("error", ""),
            peak_cpu_millis=float(data.get("peak_cpu_millis", 0.0)),
            peak_memory_bytes=int(data.get("peak_memory_bytes", 0)),
            peak_request_rate=float(data.get("peak_request_rate", 0.0)),
        )


@dataclass(frozen=True)
class HandoverRecord:
    """One handover, as it ended (or as far as it got)."""

    source: str
    target: str
    outcome: str = ""
    """"done", "rolled_back", or "" while it runs."""
    failed_phase: str = ""
    error: str = ""
    state_bytes: int = 0
    state_sha256: str = ""
    phases_ms: Mapping[str, float] = field(default_factory=dict)
    """Milliseconds each phase took, by phase name."""
    from_standby: bool = False
    """The target was its frozen warm standby, thawed in PREPARING (not started)."""
    preallocated: bool = False
    """The target took the capacity pre-allocated for it (`ChainRecord.preallocation`): its
    reservation, released once the handover is done."""
    snapshot_version: int = -1
    """A live handover: the version of the snapshot EXPORT took (the delta at SWITCH is since it)."""
    frozen_ms: float = 0.0
    """A live handover: milliseconds from the final export (the source refusing changes) to the
    address moved, the part of SWITCH a client waits through."""
    switch_steps_ms: Mapping[str, float] = field(default_factory=dict)
    """A live handover on one host: what each step of the agent's takeover took (its look-up, the
    connections made ahead, the export, the patch, the route flip, the publish after it)."""
    migration: str = ""
    """criu: the coordinator migration that moves the serving stage's process."""
    moved_from: str = ""
    """criu: the host the serving stage's process ran on before its migration committed."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": self.target,
            "outcome": self.outcome,
            "failed_phase": self.failed_phase,
            "error": self.error,
            "state_bytes": self.state_bytes,
            "state_sha256": self.state_sha256,
            "phases_ms": dict(self.phases_ms),
            "from_standby": self.from_standby,
            "preallocated": self.preallocated,
            "snapshot_version": self.snapshot_version,
            "frozen_ms": self.frozen_ms,
            "switch_steps_ms": dict(self.switch_steps_ms),
            "migration": self.migration,
            "moved_from": self.moved_from,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HandoverRecord:
        return cls(
            source=data["source"],
            target=data["target"],
            outcome=data.get("outcome", ""),
            failed_phase=data.get("failed_phase", ""),
            error=data.get("error", ""),
            state_bytes=int(data.get("state_bytes", 0)),
            state_sha256=data.get("state_sha256", ""),
            phases_ms={k: float(v) for k, v in (data.get("phases_ms") or {}).items()},
            from_standby=bool(data.get("from_standby", False)),
            preallocated=bool(data.get("preallocated", False)),
            snapshot_version=int(data.get("snapshot_version", -1)),
            frozen_ms=float(data.get("frozen_ms", 0.0)),
            switch_steps_ms={k: float(v) for k, v in (data.get("switch_steps_ms") or {}).items()},
            migration=data.get("migration", ""),
            moved_from=data.get("moved_from", ""),
        )


@dataclass(frozen=True)
class ChainRecord:
    id: str
    name: str
    manifest: Mapping[str, Any]
    """The manifest as checked, defaults filled in."""
    state: State
    address: str
    serving: str = ""
    """The stage that has (or, STARTING, is to have) the chain's state and address."""
    target: str = ""
    """During a handover: the stage handed over to."""
    retiring: str = ""
    """RETIRING: the stage handed over from, draining before it is removed."""
    runs: tuple[StageRun, ...] = ()
    failed: tuple[str, ...] = ()
    """Stages a handover to failed since `serving` began to serve."""
    handovers: tuple[HandoverRecord, ...] = ()
    serving_since: float = 0.0
    created_at: float = 0.0
    updated_at: float = 0.0
    requested_by: str = ""
    error: str = ""
    history: tuple[tuple[str, float], ...] = ()
    prediction: Mapping[str, Any] = field(default_factory=dict)
    """The next stage's predicted usage while a stage serves (coordinator/chains/prediction.py):
    `stage`, `cpu_millis`, `memory_bytes`, `basis` (`model`, `manifest` or `resources`), the
    serving stage's `request_rate` and the model's `rate_growth` it was made with, `at`."""
    preallocation: Mapping[str, Any] = field(default_factory=dict)
    """The capacity reserved for the next stage ahead of its handover, from the prediction:
    `stage`, `host`, `reservation`, `cpu_millis`, `memory_bytes`, `at`; empty when none is held."""

    def chain_manifest(self) -> ChainManifest:
        return ChainManifest.from_dict(self.manifest)

    def run_of(self, stage: str) -> StageRun | None:
        """The newest run of `stage` that is not gone (removed, or failed and removed)."""
        for run in reversed(self.runs):
            if run.stage == stage and run.state not in (RunState.REMOVED, RunState.FAILED):
                return run
        return None

    def advance(self, event: Event, now: float, **changes: Any) -> ChainRecord:
        """The record after `event` at `now` (IllegalTransition, record unchanged, if not allowed)."""
        state = next_state(self.state, event)
        return dataclasses.replace(
            self, state=state, updated_at=now, history=(*self.history, (state.value, now)), **changes
        )

    def with_run(self, run: StageRun, now: float) -> ChainRecord:
        """The record with `run` replacing the run of the same container, or added."""
        if any(r.container == run.container for r in self.runs):
            runs = tuple(run if r.container == run.container else r for r in self.runs)
        else:
            runs = (*self.runs, run)
        return dataclasses.replace(self, runs=runs, updated_at=now)

    def with_handover(self, handover: HandoverRecord, now: float) -> ChainRecord:
        """The record with its last handover replaced by `handover` (one running at a time)."""
        done = self.handovers
        if done and not done[-1].outcome:
            done = done[:-1]
        return dataclasses.replace(self, handovers=(*done, handover), updated_at=now)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "state": self.state.value,
            "address": self.address,
            "serving": self.serving,
            "target": self.target,
            "retiring": self.retiring,
            "runs": [r.to_dict() for r in self.runs],
            "failed": list(self.failed),
            "handovers": [h.to_dict() for h in self.handovers],
            "serving_since": self.serving_since,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "created": iso(self.created_at),
            "requested_by": self.requested_by,
            "error": self.error,
            "history": [{"state": s, "at": iso(t), "ts": t} for s, t in self.history],
            "manifest": dict(self.manifest),
            "prediction": dict(self.prediction),
            "preallocation": dict(self.preallocation),
        }

    def for_storage(self) -> dict[str, Any]:
        return self.to_dict()

    @classmethod
    def from_storage(cls, data: Mapping[str, Any]) -> ChainRecord:
        return cls(
            id=data["id"],
            name=data["name"],
            manifest=data["manifest"],
            state=State(data["state"]),
            address=data["address"],
            serving=data.get("serving", ""),
            target=data.get("target", ""),
            retiring=data.get("retiring", ""),
            runs=tuple(StageRun.from_dict(r) for r in data.get("runs", ())),
            failed=tuple(data.get("failed", ())),
            handovers=tuple(HandoverRecord.from_dict(h) for h in data.get("handovers", ())),
            serving_since=float(data.get("serving_since", 0.0)),
            created_at=float(data.get("created_at", 0.0)),
            updated_at=float(data.get("updated_at", 0.0)),
            requested_by=data.get("requested_by", ""),
            error=data.get("error", ""),
            history=tuple((h["state"], float(h["ts"])) for h in data.get("history", ())),
            prediction=dict(data.get("prediction") or {}),
            preallocation=dict(data.get("preallocation") or {}),
        )
