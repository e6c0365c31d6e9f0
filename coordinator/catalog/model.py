"""Catalog records: service images with their Dependency Manifests, and the catalog as a pure index.

An entry is immutable once registered: `name@version` always means the same image and manifest,
so a deployment resolved yesterday resolves the same way today unless it asked for the newest
version (`NAME` without `@VERSION`). No I/O here; `coordinator/catalog/validation.py` builds
these records from checked documents and `coordinator/catalog/service.py` stores them.

Errors (all FerrymanError, with a stable code):
  ManifestInvalid          400 manifest_invalid: the document breaks the schema or a rule of its own
  UnknownReference         400 catalog_unknown_reference: a required image is not in the catalog
  DependencyCycle          400 catalog_cycle: the entry would close a cycle across the catalog
  CatalogEntryNotFound     404 catalog_entry_not_found
  CatalogEntryExists       409 catalog_entry_exists: name@version is taken by a different entry
  CatalogEntryInUse        409 catalog_entry_in_use: other entries require it (they are named)
  CatalogChanged           409 catalog_changed: the catalog kept changing under a write (retry)
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from core.errors import AlreadyExists, Conflict, InvalidRequest, NotFound


class ManifestInvalid(InvalidRequest):
    code = "manifest_invalid"

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("invalid catalog entry: " + "; ".join(self.problems))


class UnknownReference(InvalidRequest):
    code = "catalog_unknown_reference"


class DependencyCycle(InvalidRequest):
    code = "catalog_cycle"

    def __init__(self, message: str, cycle: Sequence[str]) -> None:
        super().__init__(message)
        self.cycle = tuple(cycle)


class CatalogEntryNotFound(NotFound):
    code = "catalog_entry_not_found"


class CatalogEntryExists(AlreadyExists):
    code = "catalog_entry_exists"


class CatalogEntryInUse(Conflict):
    code = "catalog_entry_in_use"


class CatalogChanged(Conflict):
    code = "catalog_changed"


class HealthCheckKind(enum.StrEnum):
    HTTP = "http"  # GET http://<service address>:port/path answers 2xx or 3xx
    TCP = "tcp"  # a TCP connection to port is accepted
    GRPC = "grpc"  # grpc.health.v1.Health/Check for `service` answers SERVING
    EXEC = "exec"  # `command` run inside the container exits 0


class TransferProtocol(enum.StrEnum):
    GRPC = "grpc"  # gRPC to the dependency's service address and port
    HTTP = "http"  # HTTP(S) to the dependency's service address, port and base path
    MESSAGE_QUEUE = "message_queue"  # the dependency is a broker: its address, port, scheme and queue
    SHARED_VOLUME = "shared_volume"  # a volume both mount at `path`; the two run on one host


@dataclass(frozen=True)
class HealthCheck:
    kind: HealthCheckKind
    port: int = 0
    path: str = ""
    """http: the request path."""
    service: str = ""
    """grpc: the service name asked about ("" is the server as a whole)."""
    command: tuple[str, ...] = ()
    """exec: argv, run in the container."""
    interval: float = 1.0
    """Seconds between checks."""
    timeout: float = 1.0
    """Seconds one check may take; at most `interval`."""
    retries: int = 3
    """Consecutive failures (after the start period) that make the component unhealthy."""
    start_period: float = 0.0
    """Seconds after start during which failures do not count."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind.value}
        if self.kind is HealthCheckKind.EXEC:
            out["command"] = list(self.command)
        else:
            out["port"] = self.port
        if self.kind is HealthCheckKind.HTTP:
            out["path"] = self.path
        if self.kind is HealthCheckKind.GRPC:
            out["service"] = self.service
        out.update(interval=self.interval, timeout=self.timeout, retries=self.retries, start_period=self.start_period)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HealthCheck:
        kind = HealthCheckKind(data["kind"])
        return cls(
            kind=kind,
            port=int(data.get("port", 0)),
            path=str(data.get("path", "/" if kind is HealthCheckKind.HTTP else "")),
            service=str(data.get("service", "")),
            command=tuple(data.get("command", ())),
            interval=float(data.get("interval", 1.0)),
            timeout=float(data.get("timeout", 1.0)),
            retries=int(data.get("retries", 3)),
            start_period=float(data.get("start_period", 0.0)),
        )


DEFAULT_SCHEMES = {
    TransferProtocol.HTTP: "http",
    TransferProtocol.GRPC: "",
    TransferProtocol.MESSAGE_QUEUE: "tcp",
    TransferProtocol.SHARED_VOLUME: "",
}


@dataclass(frozen=True)
class Transfer:
    """How a dependent talks to one of its required images."""

    protocol: TransferProtocol
    port: int = 0
    path: str = ""
    """http: the base path of URLs ("/" by default); shared_volume: where both containers mount it."""
    scheme: str = ""
    """http: http or https; message_queue: the URL scheme of the broker's clients (amqp, nats, ...)."""
    queue: str = ""
    """message_queue: the queue or topic name."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"protocol": self.protocol.value}
        for key in ("port", "path", "scheme", "queue"):
            if value := getattr(self, key):
                out[key] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Transfer:
        protocol = TransferProtocol(data["protocol"])
        return cls(
            protocol=protocol,
            port=int(data.get("port", 0)),
            path=str(data.get("path", "/" if protocol is TransferProtocol.HTTP else "")),
            scheme=str(data.get("scheme", DEFAULT_SCHEMES[protocol])),
            queue=str(data.get("queue", "")),
        )


@dataclass(frozen=True, order=True)
class Reference:
    """`name` or `name@version` in `required_images`: the newest registration, or that one."""

    name: str
    version: str | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        name, at, version = text.partition("@")
        return cls(name, version if at else None)

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"


@dataclass(frozen=True)
class Manifest:
    required_images: tuple[Reference, ...]
    data_transfer_protocols: Mapping[str, Transfer]
    """Keyed by required image name, in the document's order."""
    dependency_health_check: HealthCheck
    replicas: int = 1
    """Copies behind the service address once deployed (docs/deployments.md, "Replicas")."""
    metrics_port: int = 0
    """Port of its request metrics endpoint (`GET /metrics`, docs/scaling.md); 0: it has none."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "required_images": [str(r) for r in self.required_images],
            "data_transfer_protocols": {k: t.to_dict() for k, t in self.data_transfer_protocols.items()},
            "dependency_health_check": self.dependency_health_check.to_dict(),
        }
        if self.replicas != 1:  # an entry registered before replicas existed reads back the same
            out["replicas"] = self.replicas
        if self.metrics_port:
            out["metrics_port"] = self.metrics_port
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        return cls(
            required_images=tuple(Reference.parse(r) for r in data["required_images"]),
            data_transfer_protocols={k: Transfer.from_dict(v) for k, v in data["data_transfer_protocols"].items()},
            dependency_health_check=HealthCheck.from_dict(data["dependency_health_check"]),
            replicas=int(data.get("replicas", 1)),
            metrics_port=int(data.get("metrics_port", 0)),
        )


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    version: str
    image: str
    manifest: Manifest
    description: str = ""
    registered_at: float = 0.0
    registered_by: str = ""

    @property
    def id(self) -> str:
        return f"{self.name}@{self.version}"

    def document(self) -> dict[str, Any]:
        """The registration document, defaults filled in: two registrations are the same entry when
        their documents are equal."""
        return {
            "name": self.name,
            "version": self.version,
            "image": self.image,
            "description": self.description,
            "manifest": self.manifest.to_dict(),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.document(),
            "id": self.id,
            "registered_at": self.registered_at,
            "registered_by": self.registered_by,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CatalogEntry:
        return cls(
            name=data["name"],
            version=data["version"],
            image=data["image"],
            manifest=Manifest.from_dict(data["manifest"]),
            description=data.get("description", ""),
            registered_at=float(data.get("registered_at", 0.0)),
            registered_by=data.get("registered_by", ""),
        )


@dataclass(frozen=True)
class Catalog:
    """Every registered entry, oldest registration first, at one store revision. Pure lookups."""

    entries: tuple[CatalogEntry, ...] = ()
    revision: int = 0
    _by_name: dict[str, tuple[CatalogEntry, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_name: dict[str, list[CatalogEntry]] = {}
        for entry in self.entries:
            by_name.setdefault(entry.name, []).append(entry)
        object.__setattr__(self, "_by_name", {k: tuple(v) for k, v in by_name.items()})

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def versions(self, name: str) -> tuple[CatalogEntry, ...]:
        """`name`'s entries, oldest registration first (empty when there is none)."""
        return self._by_name.get(name, ())

    def get(self, name: str, version: str) -> CatalogEntry | None:
        return next((e for e in self.versions(name) if e.version == version), None)

    def resolve(self, ref: Reference) -> CatalogEntry:
        """The entry `ref` means now: its version, or the newest registration; else UnknownReference."""
        versions = self.versions(ref.name)
        if not versions:
            raise UnknownReference(f"no catalog entry named {ref.name!r}")
        if ref.version is None:
            return versions[-1]
        found = self.get(ref.name, ref.version)
        if found is None:
            known = ", ".join(e.version for e in versions)
            raise UnknownReference(f"no catalog entry {ref} (registered versions of {ref.name}: {known})")
        return found

    def required_by(self, name: str) -> list[tuple[CatalogEntry, Reference]]:
        """The entries with a reference to any version of `name`, and that reference."""
        return [(e, ref) for e in self.entries for ref in e.manifest.required_images if ref.name == name]

    def with_entry(self, entry: CatalogEntry) -> Catalog:
        return Catalog((*self.entries, entry), self.revision)

    def without(self, removed: Iterable[CatalogEntry]) -> Catalog:
        ids = {e.id for e in removed}
        return Catalog(tuple(e for e in self.entries if e.id not in ids), self.revision)

    def dependents(self, removed: Sequence[CatalogEntry]) -> list[tuple[CatalogEntry, Reference]]:
        """The remaining entries with a reference that `removed` leaves unresolvable, and that reference."""
        rest = self.without(removed)
        gone = {e.id for e in removed}
        out = []
        for entry in rest.entries:
            for ref in entry.manifest.required_images:
                try:
                    rest.resolve(ref)
                except UnknownReference:
                    if ref.version is None or f"{ref.name}@{ref.version}" in gone:
                        out.append((entry, ref))
        return out
