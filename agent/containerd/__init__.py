"""The containerd adapter: thin async wrappers over containerd's gRPC API.

Only this package imports grpc and the generated stubs. Calls raise agent.errors types.
"""

from agent.containerd.client import Containerd
from agent.containerd.types import (
    ContainerRecord,
    ContentInfo,
    Event,
    ImageRecord,
    IngestStatus,
    Mount,
    ProcessInfo,
    SnapshotInfo,
    SnapshotKind,
    TaskExit,
    TaskStart,
    TaskStatus,
)

__all__ = [
    "ContainerRecord",
    "Containerd",
    "ContentInfo",
    "Event",
    "ImageRecord",
    "IngestStatus",
    "Mount",
    "ProcessInfo",
    "SnapshotInfo",
    "SnapshotKind",
    "TaskExit",
    "TaskStart",
    "TaskStatus",
]
