"""The storage interface the coordinator's logic uses, and nothing else: one small Protocol per concern.

`Store` is their union. The default backend is SQLite (coordinator/sqlite_store.py), which implements
every concern. The etcd backend (coordinator/etcd/) implements the concerns a fleet of coordinator
replicas must share; telemetry time series never go to etcd (see docs/coordinator.md, "Running on
etcd"). The one hard requirement on any backend is that `ReservationStore.reserve` is atomic (check
free capacity and insert in one transaction), because that is what keeps placements from
double-booking. tests/test_store_conformance.py runs the same cases against every backend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from coordinator.catalog.model import Catalog, CatalogEntry
from coordinator.chains.store import ChainStore
from coordinator.deployments.store import DeploymentStore
from coordinator.model import (
    Capacity,
    ContainerUsage,
    Decision,
    Drain,
    Host,
    HostAdmin,
    HostHealth,
    Migration,
    Prediction,
    Reservation,
    StartRecord,
)


@dataclass(frozen=True)
class TelemetryUpdate:
    """One accepted push: the samples to keep and the host summary taken from the newest one."""

    host: str
    samples: Sequence[tuple[float, dict[str, Any]]]
    """(ts, sample as protobuf JSON) oldest first."""
    received_at: float
    used: Capacity
    containers: tuple[ContainerUsage, ...]
    pressure: Mapping[str, float]
    dropped: int = 0
    heartbeat_only: bool = False
    """A push without samples: refresh the heartbeat, keep the last summary (used, containers, PSI)."""


class HistoryExchange(Protocol):
    """Where the leader finds the other replicas' summaries of the pushes they took
    (coordinator/history_share.py); only the etcd store has other replicas."""

    def peer_shares(self) -> Mapping[str, tuple[int, Mapping[str, Mapping[str, Any]]]]:
        """host -> (a version that changes with every new share, replica -> share JSON)."""
        ...


class CatalogStore(Protocol):
    """The catalog's entries (coordinator/catalog/). Writes are conditional on the revision the
    caller read: what was checked against one snapshot still holds when the write lands, however
    many coordinators write (a backend on a distributed store compares a revision key in a
    transaction the same way). A write that finds the catalog moved raises CatalogChanged."""

    async def catalog(self) -> Catalog:
        """Every entry, oldest registration first, and the revision they are at."""
        ...

    async def add_catalog_entry(self, entry: CatalogEntry, revision: int) -> int:
        """Insert `entry` if the catalog is still at `revision`; the new revision.

        CatalogChanged if the revision moved; CatalogEntryExists if `entry.id` is taken."""
        ...

    async def remove_catalog_entries(self, ids: Sequence[str], revision: int) -> int:
        """Delete the entries `ids` (name@version) if the catalog is still at `revision`; the new
        revision. CatalogChanged if the revision moved."""
        ...


class HostStore(Protocol):
    """Registered hosts: identity, capacity, addresses, liveness and admin state."""

    async def register_host(self, host: Host) -> Host:
        """Insert or update identity, capacity and addresses; keeps the admin state; health ready."""
        ...

    async def get_host(self, name: str) -> Host | None: ...
    async def list_hosts(self) -> list[Host]: ...
    async def set_health(self, name: str, health: HostHealth) -> None: ...
    async def set_admin(self, name: str, admin: HostAdmin) -> None: ...


class TelemetryStore(Protocol):
    """Pushed samples (a bounded history per host) and the host summary each push refreshes.

    A backend may hold the summaries back and write them in bulk (etcd): its own reads of a host
    see them at once, other clients after the next `flush_telemetry`."""

    async def record_telemetry(self, update: TelemetryUpdate, keep: int, max_age: float) -> int:
        """Store the samples (bounded to `keep` per host and `max_age` seconds) and mark a heartbeat.

        Returns the number of samples stored. Raises HostNotFound for an unregistered host.
        """
        ...

    async def flush_telemetry(self) -> None:
        """Write the summaries held back since the last flush, so that other clients see them."""
        ...

    async def telemetry(self, host: str, since: float = 0.0) -> list[tuple[float, dict[str, Any]]]: ...
    async def telemetry_all(self, since: float = 0.0) -> dict[str, list[tuple[float, dict[str, Any]]]]: ...


class ReservationStore(Protocol):
    """Capacity held on hosts with a deadline; `reserve` is the double-booking guarantee."""

    async def reserve(self, reservation: Reservation, now: float) -> Reservation:
        """Atomically: if the host's free capacity holds it, insert it; else InsufficientCapacity."""
        ...

    async def mark_held(self, reservation_id: str) -> None: ...
    async def get_reservation(self, reservation_id: str) -> Reservation | None: ...
    async def release(self, reservation_id: str) -> Reservation | None: ...
    async def expired_reservations(self, now: float) -> list[Reservation]: ...
    async def list_reservations(self, now: float | None = None) -> list[Reservation]:
        """Active reservations (all of them when `now` is None)."""
        ...

    async def free_capacity(self, host: str, now: float) -> Capacity: ...


class MigrationStore(Protocol):
    """The coordinator's migrations and their state history."""

    async def put_migration(self, migration: Migration) -> None: ...
    async def get_migration(self, migration_id: str) -> Migration | None: ...
    async def list_migrations(self, *, active_only: bool = False) -> list[Migration]: ...


class DecisionStore(Protocol):
    """Predictions (P(drain) per host) and the decisions taken on them, with their evidence."""

    async def record_predictions(self, predictions: Sequence[Prediction]) -> None: ...
    async def latest_predictions(self) -> dict[str, Prediction]: ...
    async def record_decision(self, decision: Decision) -> Decision: ...
    async def list_decisions(self, host: str | None = None, limit: int = 100) -> list[Decision]: ...


@dataclass(frozen=True)
class StoredModel:
    """A drain model file as the store keeps it: every replica loads the same bytes."""

    sha256: str
    data: bytes


@dataclass(frozen=True)
class ModelSlots:
    """The drain models activated at run time (`ferryctl model activate|rollback`, retraining)."""

    active: StoredModel
    previous: StoredModel | None = None


class ModelStore(Protocol):
    """Which drain model is active, kept where every replica reads it: a replica that becomes the
    leader scores with the model the previous leader had activated."""

    async def model_slots(self) -> ModelSlots | None:
        """The active model and the one before it; None until a model is activated at run time."""
        ...

    async def set_model_slots(self, slots: ModelSlots) -> None: ...


class DrainStore(Protocol):
    """Drains, started by the policy or by ops, until done or cancelled."""

    async def put_drain(self, drain: Drain) -> None: ...
    async def list_drains(self, host: str | None = None) -> list[Drain]: ...


class StartHistoryStore(Protocol):
    """Task starts per host: signature, time, the layers needed and which were there (the layer
    predictor's history). Bounded per host by count and age, like telemetry."""

    async def record_start(self, start: StartRecord, keep: int, max_age: float) -> None:
        """Keep `start`, dropping the host's starts beyond the newest `keep` or older than
        `max_age` seconds before it."""
        ...

    async def starts(self, host: str | None = None, since: float = 0.0) -> list[StartRecord]:
        """Starts at or after `since` (one host's, or every host's), oldest first."""
        ...


class ScalingStore(Protocol):
    """Predictive scaling's decisions with their inputs, each deployment's policy and its decisions'
    state (coordinator/scaling/autoscaler.py), kept in the store so that a new leader shows and
    continues them."""

    async def record_scaling_decision(self, deployment: str, entry: Mapping[str, Any], keep: int) -> None:
        """Append one decision (a JSON object) and keep the deployment's last `keep`."""
        ...

    async def scaling_decisions(self, deployment: str) -> list[dict[str, Any]]:
        """The deployment's decisions, oldest first."""
        ...

    async def put_scaling_policy(self, deployment: str, policy: str) -> None:
        """The policy the leader follows for the deployment (predictive, reactive, off)."""
        ...

    async def scaling_policy(self, deployment: str) -> str | None:
        """The deployment's policy; None when none was set."""
        ...

    async def put_scaling_state(self, deployment: str, state: Mapping[str, Any]) -> None:
        """Replace the deployment's decisions' state (a JSON object: hold windows, recommendations)."""
        ...

    async def scaling_state(self, deployment: str) -> dict[str, Any] | None:
        """The deployment's decisions' state as last put; None before one."""
        ...

    async def forget_scaling_decisions(self, deployment: str) -> None:
        """Forget the deployment's decisions, its policy and its state."""
        ...


class Store(
    HostStore,
    TelemetryStore,
    ReservationStore,
    MigrationStore,
    DecisionStore,
    DrainStore,
    StartHistoryStore,
    CatalogStore,
    DeploymentStore,
    ChainStore,
    ModelStore,
    ScalingStore,
    Protocol,
):
    """Every concern, on one backend (what the coordinator's services are wired with)."""

    async def close(self) -> None: ...
