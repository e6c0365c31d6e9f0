"""The coordinator's domain records: what the store keeps and the API shows. No I/O."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from core.errors import Conflict, FerrymanError, NotFound


class HostHealth(enum.StrEnum):
    """Liveness, from telemetry pushes alone."""

    READY = "ready"
    SUSPECT = "suspect"
    DOWN = "down"


class HostAdmin(enum.StrEnum):
    """What policy or ops decided about a host, independent of its liveness."""

    ACTIVE = "active"
    DRAINING = "draining"
    DRAINED = "drained"


class MigrationState(enum.StrEnum):
    PENDING = "pending"  # accepted, waiting for a slot under the concurrency limits
    RUNNING = "running"  # started on the source agent
    COMMITTED = "committed"
    FAILED = "failed"  # this attempt rolled back or could not start; may be retried elsewhere
    ABANDONED = "abandoned"  # no attempt left, or the agents need the operator (never retried)


TERMINAL_MIGRATION = frozenset({MigrationState.COMMITTED, MigrationState.ABANDONED})


class HostNotFound(NotFound):
    code = "host_not_found"


class MigrationNotFound(NotFound):
    code = "migration_not_found"


class InsufficientCapacity(Conflict):
    """The host cannot hold the reservation without eating capacity already reserved or used."""

    code = "insufficient_capacity"


class NoTarget(Conflict):
    code = "no_target"


class Unauthorized(FerrymanError):
    code = "unauthorized"
    http_status = 401


class Forbidden(FerrymanError):
    code = "forbidden"
    http_status = 403


def host_state(health: HostHealth, admin: HostAdmin) -> str:
    """A host's state in one word for people: liveness wins over the admin state when it is unwell."""
    if health is not HostHealth.READY:
        return health.value
    return HostHealth.READY.value if admin is HostAdmin.ACTIVE else admin.value


@dataclass(frozen=True, slots=True)
class Capacity:
    cpu_millis: int = 0
    memory_bytes: int = 0
    disk_bytes: int = 0

    def __add__(self, other: Capacity) -> Capacity:
        return Capacity(
            self.cpu_millis + other.cpu_millis,
            self.memory_bytes + other.memory_bytes,
            self.disk_bytes + other.disk_bytes,
        )

    def __sub__(self, other: Capacity) -> Capacity:
        return Capacity(
            self.cpu_millis - other.cpu_millis,
            self.memory_bytes - other.memory_bytes,
            self.disk_bytes - other.disk_bytes,
        )

    def fits(self, need: Capacity) -> bool:
        return (
            need.cpu_millis <= self.cpu_millis
            and need.memory_bytes <= self.memory_bytes
            and need.disk_bytes <= self.disk_bytes
        )

    def to_dict(self) -> dict[str, int]:
        return {"cpu_millis": self.cpu_millis, "memory_bytes": self.memory_bytes, "disk_bytes": self.disk_bytes}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Capacity:
        data = data or {}
        return cls(int(data.get("cpu_millis", 0)), int(data.get("memory_bytes", 0)), int(data.get("disk_bytes", 0)))


@dataclass(frozen=True, slots=True)
class ContainerUsage:
    id: str
    image: str = ""
    memory_bytes: int = 0
    cpu_millis: float = 0.0
    labels: dict[str, str] = field(default_factory=dict)
    packets_in_per_s: float | None = None
    """Packets per second its network took in (its request rate, in packets); None: not measured."""

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ContainerUsage:
        """One from a stored record, ignoring keys it does not know: during a rolling upgrade a
        newer replica writes records with fields an older one reads."""
        return cls(**{k: v for k, v in record.items() if k in _CONTAINER_USAGE_FIELDS})


_CONTAINER_USAGE_FIELDS = frozenset(f.name for f in fields(ContainerUsage))


@dataclass(frozen=True)
class Host:
    name: str
    capacity: Capacity
    peer_address: str = ""
    api_url: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    agent_version: str = ""
    layer_digests: tuple[str, ...] = ()
    blob_address: str = ""
    """host:port of the agent's blob server (the tracker names it to peers); empty: serves none."""
    criu_features: dict[str, str] = field(default_factory=dict)
    telemetry_period: float = 0.0
    health: HostHealth = HostHealth.READY
    admin: HostAdmin = HostAdmin.ACTIVE
    registered_at: float = 0.0
    last_heartbeat: float = 0.0
    used: Capacity = field(default_factory=Capacity)
    """What the containers use, from the last telemetry sample."""
    containers: tuple[ContainerUsage, ...] = ()
    pressure: dict[str, float] = field(default_factory=dict)
    """The last sample's PSI avg10 values (percent)."""

    @property
    def state(self) -> str:
        """One word for people (`host_state`)."""
        return host_state(self.health, self.admin)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["state"] = self.state
        out["health"] = self.health.value
        out["admin"] = self.admin.value
        out["layer_digests"] = list(self.layer_digests)
        out["containers"] = [asdict(c) for c in self.containers]
        return out


@dataclass(frozen=True)
class Reservation:
    id: str
    host: str
    capacity: Capacity
    expires_at: float
    purpose: str = ""
    created_at: float = 0.0
    held_by_agent: bool = False
    """The target agent confirmed it holds the reservation too."""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["capacity"] = self.capacity.to_dict()
        return out


@dataclass(frozen=True)
class Migration:
    id: str
    container: str
    source: str
    target: str = ""
    """The target of the current (or last) attempt."""
    requested_to: str = "auto"
    """What was asked for: "auto" or a host name."""
    mode: str = ""
    state: MigrationState = MigrationState.PENDING
    attempt: int = 0
    reservation_id: str = ""
    agent_migration_id: str = ""
    requested_by: str = ""
    reason: str = ""
    error: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0
    tried_targets: tuple[str, ...] = ()
    history: tuple[tuple[str, float, str], ...] = ()
    """(state, time, detail) for every state entered."""

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_MIGRATION

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["state"] = self.state.value
        out["tried_targets"] = list(self.tried_targets)
        out["history"] = [{"state": s, "ts": t, "detail": d} for s, t, d in self.history]
        out["done"] = self.done
        return out


@dataclass(frozen=True)
class Prediction:
    host: str
    ts: float
    probability: float
    model_version: str

    def to_dict(self) -> dict[str, Any]:
        # Not asdict (a deep copy): a tick writes one per host, 10 000 of them.
        return {"host": self.host, "ts": self.ts, "probability": self.probability, "model_version": self.model_version}


@dataclass(frozen=True)
class Decision:
    """Something the coordinator decided, with the evidence behind it."""

    ts: float
    host: str
    kind: str  # e.g. "drain", "undrain", "migrate", "retry", "give_up"
    probability: float | None = None
    model_version: str = ""
    detail: str = ""
    id: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Drain:
    id: str
    host: str
    reason: str
    started_at: float
    state: str = "running"  # running | done | cancelled
    finished_at: float = 0.0
    probability: float | None = None
    model_version: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class StartRecord:
    """One task start, as the layer predictor learns from it (coordinator/warm_features.py)."""

    host: str
    ts: float
    signature: str
    """The workload signature's id (core/workloads.py)."""
    layers: tuple[str, ...]
    """Every layer the start needed, bottom first."""
    hits: tuple[str, ...] = ()
    """Layers that were on the host already."""
    warm_hits: tuple[str, ...] = ()
    """Of the hits, the layers there because they were warmed for it (prefetched, unused until now)."""
    workload_class: str = ""
    source: str = ""
    """`image:<ref>` or `composition:<name>`."""
    sizes: tuple[int, ...] = ()
    """Bytes of each layer, in `layers` order (empty when not known)."""

    @property
    def misses(self) -> tuple[str, ...]:
        held = set(self.hits)
        return tuple(d for d in self.layers if d not in held)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "misses": list(self.misses)}
