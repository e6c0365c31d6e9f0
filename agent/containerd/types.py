"""Plain records for what containerd returns, so no protobuf type leaves the adapter."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    options: tuple[str, ...] = ()
    target: str = ""


@dataclass(frozen=True)
class ContentInfo:
    digest: str
    size: int
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class IngestStatus:
    ref: str
    offset: int
    total: int
    expected: str


class SnapshotKind(enum.Enum):
    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3


@dataclass(frozen=True)
class SnapshotInfo:
    name: str
    parent: str
    kind: SnapshotKind
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ImageRecord:
    name: str
    media_type: str
    digest: str
    size: int
    labels: dict[str, str] = field(default_factory=dict)
    created_at: datetime | None = None


@dataclass(frozen=True)
class ContainerRecord:
    id: str
    image: str
    labels: dict[str, str]
    runtime: str
    spec: bytes
    """The OCI runtime spec JSON."""
    snapshotter: str
    snapshot_key: str
    created_at: datetime | None = None


class TaskStatus(enum.Enum):
    UNKNOWN = 0
    CREATED = 1
    RUNNING = 2
    STOPPED = 3
    PAUSED = 4
    PAUSING = 5


@dataclass(frozen=True)
class ProcessInfo:
    container_id: str
    pid: int
    status: TaskStatus
    exit_status: int
    stdout: str = ""
    exited_at: datetime | None = None
    """When a STOPPED task exited (UTC); None for one that has not."""


@dataclass(frozen=True)
class Event:
    namespace: str
    topic: str
    type_url: str
    payload: bytes


@dataclass(frozen=True)
class TaskExit:
    """A container's main process exited (containerd's /tasks/exit for the init process)."""

    container_id: str
    exit_status: int
    exited_at: datetime | None


@dataclass(frozen=True)
class TaskStart:
    """A container's task started (containerd's /tasks/start; a restored task starts too)."""

    container_id: str
    pid: int
