"""The agent's exception tree, translated at each adapter boundary.

Every error carries a stable `code` (used in API responses) and an HTTP status. Adapters raise these
`from` the library error they wrap, so the original stays in the traceback.

FerrymanError
├── ConfigError                 bad or missing configuration
├── InvalidRequest              a caller's input is wrong (bad reference, bad override)
├── NotFound                    something asked for does not exist
│   ├── ImageNotFound
│   ├── ContainerNotFound
│   └── ManifestNotFound        the registry has no such tag or digest
├── AlreadyExists
├── Conflict                    the object is in the wrong state for the request
├── ContainerdError             a containerd call failed; `grpc_code` names the status
│   ├── ContainerdNotFound      (also a NotFound)
│   ├── ContainerdAlreadyExists (also an AlreadyExists)
│   ├── ContainerdConflict      FAILED_PRECONDITION (also a Conflict)
│   └── ContainerdUnavailable   the socket does not answer
├── RegistryError               the registry answered with something unusable
│   ├── RegistryUnavailable     connection refused, reset or timed out
│   ├── RegistryAuthError       credentials missing or refused
│   └── PlatformNotFound        an index has no manifest for our platform
├── DigestMismatch              content does not hash to what was promised
└── UnsafeLayer                 a layer tries to write outside the rootfs

Subsystems extend the tree in their own modules, next to the code that raises them:
  agent/stream/errors.py        StreamError: handshake, closed, aborted, and StreamIntegrityError
                                (out-of-order / replayed / truncated / altered chunk, file digest)
  agent/security/               PkiError, TlsConfigError (a ConfigError), PeerIdentityError
  agent/checkpoint/             CriuUnavailable, IncompleteImage, RuncCheckpointError
  agent/migration/              PeerFailed, InsufficientSpace, IllegalTransition (a Conflict),
                                MigrationNotFound and UnknownPeer (NotFound), FailpointError
  agent/network/                NetworkError, UplinkNotFound
"""

from __future__ import annotations


class FerrymanError(Exception):
    """Base of every error the agent raises on purpose."""

    code = "internal"
    http_status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(FerrymanError):
    code = "config_invalid"
    http_status = 500


class InvalidRequest(FerrymanError):
    code = "invalid_request"
    http_status = 400


class NotFound(FerrymanError):
    code = "not_found"
    http_status = 404


class ImageNotFound(NotFound):
    code = "image_not_found"


class ContainerNotFound(NotFound):
    code = "container_not_found"


class ManifestNotFound(NotFound):
    code = "manifest_not_found"


class AlreadyExists(FerrymanError):
    code = "already_exists"
    http_status = 409


class Conflict(FerrymanError):
    code = "conflict"
    http_status = 409


class ContainerdError(FerrymanError):
    code = "containerd_error"
    http_status = 502

    def __init__(self, message: str, grpc_code: str = "UNKNOWN") -> None:
        super().__init__(message)
        self.grpc_code = grpc_code


class ContainerdUnavailable(ContainerdError):
    code = "containerd_unavailable"
    http_status = 503


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


class DigestMismatch(FerrymanError):
    code = "digest_mismatch"
    http_status = 502


class UnsafeLayer(FerrymanError):
    code = "unsafe_layer"
    http_status = 422
