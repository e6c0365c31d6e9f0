"""The agent's own errors, on top of the shared tree in core/errors.py.

Adapters raise these `from` the library error they wrap, so the original stays in the traceback.

FerrymanError (core.errors)
├── NotFound (core.errors)
│   ├── ImageNotFound
│   ├── VolumeNotFound          no shared volume of that name on this host
│   └── ManifestNotFound        the registry has no such tag or digest
├── ContainerdError             a containerd call failed; `grpc_code` names the status
│   ├── ContainerdNotFound      (also a NotFound)
│   ├── ContainerdAlreadyExists (also an AlreadyExists)
│   ├── ContainerdConflict      FAILED_PRECONDITION (also a Conflict)
│   └── ContainerdUnavailable   the socket does not answer
│       └── IngestLocked        another writer holds the ingest ("ref locked")
├── RegistryError               the registry answered with something unusable
│   ├── RegistryUnavailable     connection refused, reset or timed out
│   ├── RegistryAuthError       credentials missing or refused
│   ├── PlatformNotFound        an index has no manifest for our platform
│   ├── InvalidManifest         a manifest, index or image config is malformed
│   └── ContentTooLarge         a body is larger than its descriptor or the manifest cap allows
├── DigestMismatch              content does not hash to what was promised
├── InvalidArchive              an image archive is malformed, or its content does not verify
└── UnsafeLayer                 a layer tries to write outside the rootfs
"""

from __future__ import annotations

from core.errors import AlreadyExists, Conflict, FerrymanError, NotFound


class ImageNotFound(NotFound):
    code = "image_not_found"


class VolumeNotFound(NotFound):
    code = "volume_not_found"


class ManifestNotFound(NotFound):
    code = "manifest_not_found"


class ContainerdError(FerrymanError):
    code = "containerd_error"
    http_status = 502

    def __init__(self, message: str, grpc_code: str = "UNKNOWN") -> None:
        super().__init__(message)
        self.grpc_code = grpc_code


class ContainerdUnavailable(ContainerdError):
    code = "containerd_unavailable"
    http_status = 503


class IngestLocked(ContainerdUnavailable):
    """containerd refused to open an ingest because another writer holds its ref (a concurrent
    pull, another process, or our own previous stream still closing). Worth waiting for."""

    code = "ingest_locked"


class ContainerdNotFound(ContainerdError, NotFound):
    code = "not_found"
    http_status = 404


class ContainerdAlreadyExists(ContainerdError, AlreadyExists):
    code = "already_exists"
    http_status = 409


class ContainerdConflict(ContainerdError, Conflict):
    code = "conflict"
    http_status = 409


class RegistryError(FerrymanError):
    code = "registry_error"
    http_status = 502


class RegistryUnavailable(RegistryError):
    code = "registry_unavailable"
    http_status = 503


class RegistryAuthError(RegistryError):
    code = "registry_auth_failed"
    http_status = 401


class PlatformNotFound(RegistryError):
    code = "platform_not_found"
    http_status = 404


class InvalidManifest(RegistryError):
    """A manifest, index or image config from a registry is not valid JSON of the expected shape
    (agent/manifests.py says what is checked). The registry's fault, so 502, never a 500."""

    code = "invalid_manifest"
    http_status = 502


class ContentTooLarge(RegistryError):
    """More bytes than a descriptor declares, or a manifest, index or config over `[pull]
    max_manifest_bytes`. Nothing past the limit is stored, and the pull leaves nothing behind."""

    code = "content_too_large"
    http_status = 502


class DigestMismatch(FerrymanError):
    code = "digest_mismatch"
    http_status = 502


class UnsafeLayer(FerrymanError):
    code = "unsafe_layer"
    http_status = 422


class InvalidArchive(FerrymanError):
    """An image archive that is not an OCI layout or a docker save, or whose documents or blobs do not
    verify. The caller's fault (422): the import leaves nothing behind."""

    code = "invalid_archive"
    http_status = 422
