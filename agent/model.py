"""Plain records that the services return and the API serialises.

They hold what containerd reports at the moment of the call; the agent keeps no copy of its own.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any

from agent.health.spec import HealthCheck
from core.errors import InvalidRequest
from core.http.validate import check_keys, json_type, positive_field

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
LABEL_EXIT_STATUS = LABEL_PREFIX + "exit-status"
"""The exit status of a task that stop() deleted."""
LABEL_FINISHED_AT = LABEL_PREFIX + "finished-at"
LABEL_RESTART_POLICY = LABEL_PREFIX + "restart-policy"
"""The restart policy in docker's spelling (`on-failure:3`); absent means `no`. It travels with the
container's other labels, so a migrated container keeps it."""
LABEL_RESTART_COUNT = LABEL_PREFIX + "restart-count"
"""Restarts the agent made since an operator last started the container."""
LABEL_STARTED_AT = LABEL_PREFIX + "started-at"
"""When the current run started (ISO-8601 UTC), by an operator or by the agent: it names the run, and
gives the run's length when it exits."""
LABEL_OPERATOR_STOP = LABEL_PREFIX + "operator-stop"
"""When an operator stopped the container through the API; set before the signal, cleared by a start.
No restart policy undoes such a stop."""
LABEL_LAST_EXIT_STATUS = LABEL_PREFIX + "last-exit-status"
"""The exit the agent last restarted the container after ("" when its task was lost, e.g. at a reboot)."""
LABEL_LAST_EXIT_AT = LABEL_PREFIX + "last-exit-at"
LABEL_MIGRATED_TO = LABEL_PREFIX + "migrated-to"
LABEL_CHECKPOINT = LABEL_PREFIX + "checkpoint"
"""A checkpointed standby's CRIU image directory on this host (`POST /v1/containers/{id}/checkpoint`)."""
LABEL_VOLUMES = LABEL_PREFIX + "volumes"
LABEL_SIGNATURE = LABEL_PREFIX + "signature"
"""The workload signature's id (core/workloads.py): which kind of workload this is, for the layer
predictor's start history."""
"""The names of the shared volumes the container mounts, comma-separated (agent/runtime/volumes.py)."""
"""Set on a migration source's copy just before it is removed after the commit: the workload runs on
that host now, and a copy left behind here is never restarted."""


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
    bytes_from_peers: int = 0
    """Of `bytes_fetched`, the bytes peers served (agent/images/peersource.py); the rest came from the
    pull's own source (the registry for a pull): what a pull's time pays for is mostly the latter."""

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


class RestartName(enum.StrEnum):
    """Docker's restart policies, under docker's names."""

    NO = "no"  # never restarted by the agent
    ON_FAILURE = "on-failure"  # after a non-zero exit (or a lost task), at most max_retries times
    ALWAYS = "always"  # after any exit
    UNLESS_STOPPED = "unless-stopped"  # the same as always here: no policy undoes an operator's stop


MAX_RESTART_RETRIES = 1_000_000
"""A bound on on-failure's retry limit: at the 10 s backoff cap, four months of restarts."""


@dataclass(frozen=True)
class RestartPolicy:
    """When the agent restarts a container whose task exited (agent/runtime/restarts.py decides)."""

    name: RestartName = RestartName.NO
    max_retries: int | None = None
    """on-failure only: after this many restarts a failing container stays exited; None: no limit."""

    @property
    def spelling(self) -> str:
        """docker's `--restart` spelling, also the label value: `on-failure:3`, `always`."""
        return self.name.value if self.max_retries is None else f"{self.name.value}:{self.max_retries}"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name.value, "max_retries": self.max_retries}

    @classmethod
    def from_spelling(cls, text: str) -> RestartPolicy:
        """A policy from docker's spelling, checked like the API's field (InvalidRequest)."""
        return parse_restart_policy(spelling_json(text), "restart policy")


def spelling_json(text: str) -> dict[str, Any]:
    """docker's `--restart` spelling as the API's `restart_policy` object, unchecked: the API's
    validator (parse_restart_policy) says what is wrong with it, in its own words."""
    name, sep, retries = text.partition(":")
    out: dict[str, Any] = {"name": name}
    if sep:
        out["max_retries"] = int(retries) if retries.isdecimal() and retries.isascii() else retries
    return out


def parse_restart_policy(value: Any, where: str) -> RestartPolicy:
    """The API's `restart_policy` object (absent or null: `no`), or InvalidRequest naming the field."""
    if value is None:
        return RestartPolicy()
    if not isinstance(value, dict):
        raise InvalidRequest(f'{where}: expected an object such as {{"name": "on-failure"}}, got {json_type(value)}')
    check_keys(value, {"name", "max_retries"}, {"name"}, where)
    name = value["name"]
    names = [n.value for n in RestartName]
    if name not in names:
        shown = repr(name) if isinstance(name, str) else json_type(name)
        raise InvalidRequest(f"{where}.name: expected one of {', '.join(names)}, got {shown}")
    if value.get("max_retries") == 0 and not isinstance(value["max_retries"], bool):  # docker's "no limit"
        raise InvalidRequest(f"{where}.max_retries: expected a positive integer, got 0 (omit it for no limit)")
    retries = positive_field(value, "max_retries", where, integer=True, maximum=MAX_RESTART_RETRIES)
    if retries is not None and name != RestartName.ON_FAILURE:
        raise InvalidRequest(f"{where}.max_retries: only on-failure has a retry limit, not {name}")
    return RestartPolicy(RestartName(name), retries)


@dataclass(frozen=True)
class Volume:
    """A shared volume: a directory the agent keeps under its state dir, mounted at `path`."""

    name: str
    path: str

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "path": self.path}


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
    restart_policy: RestartPolicy = field(default_factory=RestartPolicy)
    reservation: str | None = None
    """A reservation on this host (placed by the coordinator) the container's resources are charged to."""
    health: HealthCheck | None = None
    """The health check the agent runs while the container runs (agent/health)."""
    volumes: tuple[Volume, ...] = ()
    """Shared volumes (directories of this host) bind-mounted into the container (agent/runtime/volumes.py)."""
    signature: str = ""
    """The workload signature's id of the request as sent (before a composition became an image);
    empty: taken from the image, args and labels."""


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
    restart_policy: RestartPolicy = field(default_factory=RestartPolicy)
    restart_count: int = 0
    """Restarts the agent made since an operator last started it."""

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["state"] = self.state.value
        out["restart_policy"] = self.restart_policy.to_json()
        return out
