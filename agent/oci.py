"""OCI image-spec vocabulary shared by the registry client, the pull engine and the runtime.

Pure data and pure functions: no I/O here.
"""

from __future__ import annotations

import hashlib
import platform as _platform
import re
from dataclasses import dataclass, field
from typing import Any, NewType

from core.errors import InvalidRequest
from core.imagerefs import split_reference

Digest = NewType("Digest", str)

MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MEDIA_DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MEDIA_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"

INDEX_TYPES = frozenset({MEDIA_OCI_INDEX, MEDIA_DOCKER_MANIFEST_LIST})
MANIFEST_TYPES = frozenset({MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST})
LAYER_TYPES = frozenset(
    {MEDIA_OCI_LAYER, MEDIA_OCI_LAYER_GZIP, MEDIA_OCI_LAYER_ZSTD, MEDIA_DOCKER_LAYER_GZIP, MEDIA_DOCKER_LAYER}
)
DOCKER_HUB = "docker.io"

_DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}$")


def parse_digest(value: str) -> Digest:
    """Accept only sha256 digests: the algorithm containerd and every registry we target use."""
    if not _DIGEST_RE.match(value):
        raise InvalidRequest(f"not a sha256 digest: {value!r}")
    return Digest(value)


def sha256_digest(data: bytes) -> Digest:
    return Digest("sha256:" + hashlib.sha256(data).hexdigest())


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise InvalidRequest(f"platform must be os/arch[/variant], got {text!r}")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else "")

    @classmethod
    def host(cls) -> Platform:
        machine = _platform.machine().lower()
        arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(machine, machine)
        return cls("linux", arch, "v8" if arch == "arm64" else "")

    def matches(self, other: dict[str, Any]) -> bool:
        """True when a manifest's platform object can run here (variant only checked if both set)."""
        if other.get("os") != self.os or other.get("architecture") != self.architecture:
            return False
        theirs = other.get("variant", "")
        return not (self.variant and theirs and theirs != self.variant)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: dict[str, Any] | None = None
    """Build descriptors from registry JSON with agent.manifests.parse_descriptor, which validates them."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            out["annotations"] = self.annotations
        if self.platform:
            out["platform"] = self.platform
        return out


def chain_ids(diff_ids: list[Digest]) -> list[Digest]:
    """ChainID(L0) = DiffID(L0); ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))."""
    chain: list[Digest] = []
    for diff_id in diff_ids:
        if not chain:
            chain.append(diff_id)
        else:
            chain.append(sha256_digest(f"{chain[-1]} {diff_id}".encode()))
    return chain


def normalize_name(text: str) -> str:
    """A name as docker writes it (`busybox`, `user/app:1`) made whole the way docker and containerd
    read it (`docker.io/library/busybox:latest`, `docker.io/user/app:1`); a whole name is kept as it is.
    InvalidRequest when the result is no valid reference."""
    first, slash, _ = text.partition("/")
    has_host = slash and ("." in first or ":" in first or first == "localhost")
    if not has_host:
        text = f"{DOCKER_HUB}/{text}" if slash else f"{DOCKER_HUB}/library/{text}"
    return str(Reference.parse(text))


@dataclass(frozen=True)
class Reference:
    """A parsed image reference: registry host, repository, and tag or digest."""

    host: str
    repository: str
    tag: str | None = None
    digest: Digest | None = None

    @property
    def object(self) -> str:
        """What goes after /manifests/ in the distribution API."""
        return self.digest or self.tag or "latest"

    @classmethod
    def parse(cls, text: str) -> Reference:
        if not text or any(c.isspace() for c in text):
            raise InvalidRequest(f"invalid image reference {text!r}")
        name, tag, raw = split_reference(text)
        digest = None if raw is None else parse_digest(raw)
        if "/" not in name:
            raise InvalidRequest(f"image reference needs a registry host: {text!r}")
        host, repository = name.split("/", 1)
        if not re.fullmatch(r"[a-z0-9]+(?:[._/-][a-z0-9]+)*", repository):
            raise InvalidRequest(f"invalid repository in {text!r}")
        if tag is not None and not re.fullmatch(r"[\w][\w.-]{0,127}", tag):
            raise InvalidRequest(f"invalid tag in {text!r}")
        if tag is None and digest is None:
            tag = "latest"
        return cls(host=host, repository=repository, tag=tag, digest=digest)

    def __str__(self) -> str:
        out = f"{self.host}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out
