"""Plain records that the services return and the API serialises.

They hold what containerd reports at the moment of the call; the agent keeps no copy of its own.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any

LABEL_PREFIX = "io.ferryman."
LABEL_MANAGED = LABEL_PREFIX + "managed"
LABEL_IMAGE = LABEL_PREFIX + "image"
LABEL_LOG_PATH = LABEL_PREFIX + "log-path"
LABEL_SERVICE_IP = LABEL_PREFIX + "service-ip"
"""The container's service address (agent/network): its own network namespace, routed to this host."""
LABEL_SERVICE_PUBLISH = LABEL_PREFIX + "service-publish"
# Set by the user (outside the reserved prefix): "never" keeps a workload out of post-copy, whose
# failure window (pages only on the source) it cannot accept; it then migrates by pre-copy only.
LABEL_POSTCOPY = "ferryman.postcopy"
""""on-start" (publish when started) or "manual" (a standby copy, published by POST /v1/network/publish)."""


@dataclass
class LayerProgress:
    digest: str
    size: int
    done: int = 0
    status: str = "waiting"  # waiting | exists | downloading | done | unpacked | failed


@dataclass
class PullProgress:
    """Live progress of one pull; the pull engine mutates it, readers copy `snapshot()`."""

    ref: str
    layers: list[LayerProgress] = field(default_factory=list)
    status: str = "resolving"  # resolving | fetching | unpacking | done | failed
    error: str | None = None
    _source: PullProgress | None = field(default=None, init=False, repr=False, compare=False)

    def follow(self, source: PullProgress) -> None:
        """Show `source`'s progress from now on: this pull shares another's work (a concurrent pull
        of the same image). `snapshot()`, `total` and `done` read through; `refresh()` copies."""
        self._source = source if source is not self else None
        self.refresh()

    def refresh(self) -> None:
        if self._source is not None:
            self.layers, self.status, self.error = self._source.layers, self._source.status, self._source.error

    @property
    def total(self) -> int:
        self.refresh()
        return sum(layer.size for layer in self.layers)

    @property
    def done(self) -> int:
        self.refresh()
        return sum(layer.done for layer in self.layers)

    def snapshot(self) -> dict[str, Any]:
        self.refresh()
        return {
            "ref": self.ref,
            "layers": [asdict(layer) for layer in self.layers],
            "status": self.status,
            "error": self.error,
            "total": self.total,
            "done": self.done,
        }


@dataclass(frozen=True)
class ImageSummary:
    name: str
    digest: str
    """The image target's digest (an index or a manifest), as `ctr images ls` shows it."""
    media_type: str
    size: int
    """Bytes of content for this platform: manifest, config and layers."""
    bytes_fetched: int = 0
    """Layer bytes this pull transferred (0 when every layer was already present)."""
    layers_fetched: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class ContainerState(enum.StrEnum):
    CREATED = "created"  # container record exists, no task
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"  # task exited
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Resources:
    cpus: float | None = None
    """CPU limit in cores (cgroup quota over a 100 ms period)."""
    memory: int | None = None
    """Memory limit in bytes."""


@dataclass(frozen=True)
class CreateRequest:
    id: str
    image: str
    args: tuple[str, ...] | None = None
    """Replaces the image's entrypoint + cmd when given."""
    env: dict[str, str] = field(default_factory=dict)
    """Added to (and overriding) the image's environment."""
    workdir: str | None = None
    user: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    service_ip: str | None = None
    """An IPv4 service address: the container gets its own network namespace with this /32, routed here."""
    publish_service: bool = True
    """Publish service_ip when the container starts; False for a standby copy (a move's target)."""


@dataclass(frozen=True)
class ContainerSummary:
    id: str
    image: str
    state: ContainerState
    pid: int | None
    exit_status: int | None
    labels: dict[str, str]
    created_at: str
    """ISO-8601 UTC, from containerd."""

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["state"] = self.state.value
        return out
