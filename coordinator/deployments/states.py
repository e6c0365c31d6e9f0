"""The deployment state machine and the deployment record, as data. No I/O.

A deployment is one object on the coordinator: its components (one per catalog entry of the plan),
where each runs, and one state. The transitions are a table, as in agent/migration/states.py and
h11's `_state.py`: an event that the table does not allow raises IllegalTransition and leaves the
record as it was, so a driver bug cannot, say, mark a deployment HEALTHY that is rolling back.

    PLANNED --start--> STARTING(level 0) --level_healthy--> STARTING(level n) --all_healthy--> HEALTHY
    PLANNED, STARTING --failed--> ROLLING_BACK --rolled_back--> FAILED
    HEALTHY --component_degraded--> DEGRADED --recovered--> HEALTHY
    HEALTHY, DEGRADED, FAILED --undeploy--> STOPPING --stopped--> REMOVED

Once HEALTHY, a component whose check fails or whose process exits is its agent's to restart (by
its restart policy); the deployment does not roll back. `component_health` records it: the
component goes `degraded`, each component that requires it lists it in `waiting_on` (its
dependents are told), and the deployment is DEGRADED until every component is healthy again.

Everything a deployment started is removed on the way to FAILED (all or nothing) and to REMOVED.
A coordinator that restarts finds deployments where the previous process left them; `recovery`
(a table too) says what it does with each: one that was starting is rolled back, since nobody
followed its levels meanwhile; a rollback or an undeploy is finished.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from core.errors import Conflict


class State(enum.StrEnum):
    PLANNED = "PLANNED"  # resolved, placed and addressed; nothing started yet
    STARTING = "STARTING"  # starting level `level`: its components created, waited on until healthy
    HEALTHY = "HEALTHY"  # every component runs and passed its health check
    ROLLING_BACK = "ROLLING_BACK"  # a component failed: removing everything already started
    FAILED = "FAILED"  # rolled back: nothing of it is left; the record names the component and why
    STOPPING = "STOPPING"  # undeploying: components removed in the reverse of the start order
    REMOVED = "REMOVED"  # undeployed: nothing of it is left
    DEGRADED = "DEGRADED"  # was HEALTHY; a component is not healthy now (its agent restarts it)


class Event(enum.StrEnum):
    START = "start"
    LEVEL_HEALTHY = "level_healthy"
    ALL_HEALTHY = "all_healthy"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    UNDEPLOY = "undeploy"
    STOPPED = "stopped"
    COMPONENT_DEGRADED = "component_degraded"
    RECOVERED = "recovered"


TERMINAL = frozenset({State.FAILED, State.REMOVED})
"""Nothing of the deployment runs; FAILED may still be undeployed to forget it (a no-op teardown)."""
HOLDS_ADDRESSES = frozenset(
    {State.PLANNED, State.STARTING, State.HEALTHY, State.DEGRADED, State.ROLLING_BACK, State.STOPPING}
)
"""States in which the deployment's service addresses are taken."""
WATCHED = frozenset({State.HEALTHY, State.DEGRADED})
"""States in which the coordinator follows every component's health."""

_TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.PLANNED, Event.START): State.STARTING,
    (State.STARTING, Event.LEVEL_HEALTHY): State.STARTING,
    (State.STARTING, Event.ALL_HEALTHY): State.HEALTHY,
    (State.PLANNED, Event.FAILED): State.ROLLING_BACK,
    (State.STARTING, Event.FAILED): State.ROLLING_BACK,
    (State.ROLLING_BACK, Event.ROLLED_BACK): State.FAILED,
    (State.HEALTHY, Event.UNDEPLOY): State.STOPPING,
    (State.HEALTHY, Event.COMPONENT_DEGRADED): State.DEGRADED,
    (State.DEGRADED, Event.RECOVERED): State.HEALTHY,
    (State.DEGRADED, Event.UNDEPLOY): State.STOPPING,
    (State.FAILED, Event.UNDEPLOY): State.STOPPING,
    (State.STOPPING, Event.STOPPED): State.REMOVED,
}


class IllegalTransition(Conflict):
    code = "illegal_transition"


class DeploymentBusy(Conflict):
    """The deployment cannot be undeployed in its current state (it is starting or rolling back)."""

    code = "deployment_busy"


def next_state(state: State, event: Event) -> State:
    try:
        return _TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(f"event {event.value} is not allowed in state {state.value}") from None


def can_undeploy(state: State) -> bool:
    return (state, Event.UNDEPLOY) in _TRANSITIONS


class Recovery(enum.StrEnum):
    """What a coordinator does at start with a deployment a previous process left in a state."""

    ROLL_BACK = "roll_back"  # it was starting: its levels cannot be followed again, so all or nothing
    FINISH_ROLLBACK = "finish_rollback"  # it was rolling back: remove what is left, then FAILED and the alert
    FINISH_STOP = "finish_stop"  # it was undeploying: remove what is left, then REMOVED
    NOTHING = "nothing"  # HEALTHY, FAILED, REMOVED: nothing was in flight


_RECOVERY: dict[State, Recovery] = {
    State.PLANNED: Recovery.ROLL_BACK,
    State.STARTING: Recovery.ROLL_BACK,
    State.ROLLING_BACK: Recovery.FINISH_ROLLBACK,
    State.STOPPING: Recovery.FINISH_STOP,
    State.HEALTHY: Recovery.NOTHING,
    State.DEGRADED: Recovery.NOTHING,
    State.FAILED: Recovery.NOTHING,
    State.REMOVED: Recovery.NOTHING,
}


def recovery(state: State) -> Recovery:
    """What a restarted coordinator does with a deployment stored in `state`."""
    return _RECOVERY[state]


class ComponentState(enum.StrEnum):
    PLACED = "placed"  # capacity reserved on its host; not created yet
    CREATING = "creating"  # the agent was asked to create and start it
    STARTING = "starting"  # running, its health check not passed yet
    HEALTHY = "healthy"
    DEGRADED = "degraded"  # was healthy; its check fails or its process exited since (restarted by policy)
    FAILED = "failed"  # the component that failed the deployment (error says why)
    REMOVED = "removed"  # its container, reservation and volumes are gone


class ReplicaState(enum.StrEnum):
    STARTING = "starting"  # placed, created and started; not in the balancer until it is healthy
    SERVING = "serving"  # in the balancer: new connections reach it
    DEGRADED = "degraded"  # was serving; its check fails or it stopped: out of the balancer until it passes
    DRAINING = "draining"  # out of the balancer: its open connections end before it is stopped
    STANDBY = "standby"  # started, healthy, then frozen (a warm standby): out of the balancer; a scale out thaws it


@dataclass(frozen=True)
class ReplicaRecord:
    """One more copy of a component, behind the component's service address (the component's own
    container is replica 0 and is not listed)."""

    index: int
    address: str
    """Its own address (from the pool): the balancer's backend, and where its health is probed."""
    host: str
    container: str
    reservation: str = ""
    state: ReplicaState = ReplicaState.STARTING

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "address": self.address,
            "host": self.host,
            "container": self.container,
            "reservation": self.reservation,
            "state": self.state.value,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReplicaRecord:
        return cls(
            index=int(data["index"]),
            address=data["address"],
            host=data["host"],
            container=data["container"],
            reservation=data.get("reservation", ""),
            state=ReplicaState(data.get("state", ReplicaState.STARTING.value)),
        )


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


@dataclass(frozen=True)
class ComponentRecord:
    name: str
    entry: str
    """The catalog entry id, name@version."""
    image: str
    level: int
    address: str
    """Its service address."""
    host: str = ""
    reservation: str = ""
    container: str = ""
    state: ComponentState = ComponentState.PLACED
    error: str = ""
    volumes: tuple[str, ...] = ()
    """Names of the shared volumes it mounts."""
    left_behind: bool = False
    """A teardown could not remove its container (its host did not answer); retried until it can."""
    requires: tuple[str, ...] = ()
    """The components it depends on, in manifest order."""
    waiting_on: tuple[str, ...] = ()
    """Those of `requires` that are degraded now: how a dependent is told."""
    degraded_since: float = 0.0
    """When it went degraded (0: it is not)."""
    replicas: tuple[ReplicaRecord, ...] = ()
    """Its copies beyond the first (coordinator/deployments/replicas.py), by index."""
    metrics_port: int = 0
    """Port of its request metrics endpoint on each copy's address (its manifest's; 0: none)."""

    @property
    def replica_count(self) -> int:
        """How many copies serve or are about to: itself and every replica neither draining nor a
        standby."""
        return 1 + sum(r.state not in (ReplicaState.DRAINING, ReplicaState.STANDBY) for r in self.replicas)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "entry": self.entry,
            "image": self.image,
            "level": self.level,
            "address": self.address,
            "host": self.host,
            "reservation": self.reservation,
            "container": self.container,
            "state": self.state.value,
            "error": self.error,
            "volumes": list(self.volumes),
            "left_behind": self.left_behind,
            "requires": list(self.requires),
            "waiting_on": list(self.waiting_on),
            "degraded_since": self.degraded_since,
            "replicas": [r.to_dict() for r in self.replicas],
            "metrics_port": self.metrics_port,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ComponentRecord:
        return cls(
            name=data["name"],
            entry=data["entry"],
            image=data["image"],
            level=int(data["level"]),
            address=data["address"],
            host=data.get("host", ""),
            reservation=data.get("reservation", ""),
            container=data.get("container", ""),
            state=ComponentState(data.get("state", ComponentState.PLACED.value)),
            error=data.get("error", ""),
            volumes=tuple(data.get("volumes", ())),
            left_behind=bool(data.get("left_behind", False)),
            requires=tuple(data.get("requires", ())),
            waiting_on=tuple(data.get("waiting_on", ())),
            degraded_since=float(data.get("degraded_since", 0.0)),
            replicas=tuple(ReplicaRecord.from_dict(r) for r in data.get("replicas", ())),
            metrics_port=int(data.get("metrics_port", 0)),
        )


@dataclass(frozen=True)
class DeploymentRecord:
    id: str
    root: str
    """The catalog entry deployed, name@version."""
    state: State
    components: tuple[ComponentRecord, ...]
    """In start order (level, then name)."""
    level: int = 0
    """STARTING: the level being started."""
    created_at: float = 0.0
    updated_at: float = 0.0
    requested_by: str = ""
    failed_component: str = ""
    error: str = ""
    history: tuple[tuple[str, float], ...] = field(default=())
    """(state, time) of every state entered, oldest first."""

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(a for c in self.components for a in (c.address, *(r.address for r in c.replicas)))

    def component(self, name: str) -> ComponentRecord:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(name)

    def advance(self, event: Event, now: float, **changes: Any) -> DeploymentRecord:
        """The record after `event` at `now` (IllegalTransition, record unchanged, if not allowed)."""
        state = next_state(self.state, event)
        return dataclasses.replace(
            self, state=state, updated_at=now, history=(*self.history, (state.value, now)), **changes
        )

    def with_component(self, component: ComponentRecord, now: float) -> DeploymentRecord:
        parts = tuple(component if c.name == component.name else c for c in self.components)
        return dataclasses.replace(self, components=parts, updated_at=now)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "root": self.root,
            "state": self.state.value,
            "level": self.level,
            "components": [c.to_dict() for c in self.components],
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "created": iso(self.created_at),
            "requested_by": self.requested_by,
            "failed_component": self.failed_component,
            "error": self.error,
            "history": [{"state": s, "at": iso(t), "ts": t} for s, t in self.history],
        }

    def for_storage(self) -> dict[str, Any]:
        return self.to_dict()

    @classmethod
    def from_storage(cls, data: Mapping[str, Any]) -> DeploymentRecord:
        return cls(
            id=data["id"],
            root=data["root"],
            state=State(data["state"]),
            level=int(data.get("level", 0)),
            components=tuple(ComponentRecord.from_dict(c) for c in data["components"]),
            created_at=float(data.get("created_at", 0.0)),
            updated_at=float(data.get("updated_at", 0.0)),
            requested_by=data.get("requested_by", ""),
            failed_component=data.get("failed_component", ""),
            error=data.get("error", ""),
            history=tuple((h["state"], float(h["ts"])) for h in data.get("history", ())),
        )


def started_in_reverse(components: Sequence[ComponentRecord]) -> list[list[ComponentRecord]]:
    """The components that hold anything (a reservation or a container), grouped by level, highest
    level first: the order of a teardown, each group removed in parallel."""
    holding = [c for c in components if c.state is not ComponentState.REMOVED and (c.reservation or c.container)]
    levels = sorted({c.level for c in holding}, reverse=True)
    return [[c for c in holding if c.level == level] for level in levels]


def component_health(record: DeploymentRecord, name: str, healthy: bool, error: str, now: float) -> DeploymentRecord:
    """The HEALTHY or DEGRADED record after component `name` was seen healthy or not (`error` says
    why not): the component's state, every dependent's `waiting_on`, and the deployment's state,
    DEGRADED while any component is. The same record when nothing changed."""
    component = record.component(name)
    if component.state is (ComponentState.HEALTHY if healthy else ComponentState.DEGRADED):
        return record
    if healthy:
        changed = dataclasses.replace(component, state=ComponentState.HEALTHY, error="", degraded_since=0.0)
    else:
        changed = dataclasses.replace(component, state=ComponentState.DEGRADED, error=error, degraded_since=now)
    parts = [changed if c.name == name else c for c in record.components]
    degraded = {c.name for c in parts if c.state is ComponentState.DEGRADED}
    parts = [dataclasses.replace(c, waiting_on=tuple(d for d in c.requires if d in degraded)) for c in parts]
    out = dataclasses.replace(record, components=tuple(parts), updated_at=now)
    if degraded and record.state is State.HEALTHY:
        return out.advance(Event.COMPONENT_DEGRADED, now)
    if not degraded and record.state is State.DEGRADED:
        return out.advance(Event.RECOVERED, now)
    return out


def dependents(record: DeploymentRecord, name: str) -> list[str]:
    """The components that require `name`, in start order."""
    return [c.name for c in record.components if name in c.requires]


class Whereabouts(enum.StrEnum):
    """Where a component's container is, when the host in its record says it has none."""

    MOVED = "moved"
    """It runs on another host now (a migration or a drain moved it): follow it there."""
    MOVING = "moving"
    """A migration of it is under way: wait, it lands on its target or stays where it was."""
    LOST = "lost"
    """Nowhere known: the component is degraded, as any that stops answering."""


def whereabouts(
    recorded: str, reporting: Collection[str], migrating: bool, committed_to: str | None
) -> tuple[Whereabouts, str]:
    """(what, host) for a container its recorded host does not have: the hosts whose telemetry
    reports it, whether a migration of it is active, and the target of the last committed migration
    of it out of the recorded host. A migration the coordinator ran is known at once; one an
    operator ran on the agents directly shows in the target's next telemetry."""
    if migrating:
        return Whereabouts.MOVING, recorded
    elsewhere = sorted(set(reporting) - {recorded})
    if len(elsewhere) == 1:
        return Whereabouts.MOVED, elsewhere[0]
    if committed_to and committed_to != recorded:
        return Whereabouts.MOVED, committed_to
    return Whereabouts.LOST, ""
