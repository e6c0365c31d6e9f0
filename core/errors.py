"""The error tree every ferryman program shares: agent, coordinator and ferryctl.

Every error carries a stable `code` (used in API responses) and an HTTP status. Adapters raise these
`from` the library error they wrap, so the original stays in the traceback.

FerrymanError
├── ConfigError                 bad or missing configuration
├── InvalidRequest              a caller's input is wrong (bad reference, bad override)
├── NotFound                    something asked for does not exist
│   └── ContainerNotFound
├── AlreadyExists
├── Conflict                    the object is in the wrong state for the request
└── Busy                        as much of this work is under way as the server takes: try again
                                after `retry_after` seconds (503 with Retry-After)

Each program extends the tree next to the code that raises it:
  agent/errors.py               containerd, registry, digest and layer errors
  agent/stream/errors.py        StreamError and StreamIntegrityError
  core/security/                PkiError, TlsConfigError (a ConfigError), PeerIdentityError
  agent/checkpoint/             CriuUnavailable, IncompleteImage, RuncCheckpointError
  agent/migration/              PeerFailed, InsufficientSpace, IllegalTransition (a Conflict), ...
  agent/network/                NetworkError, UplinkNotFound
  coordinator/                  its store, placement and agent-call errors
"""

from __future__ import annotations


class FerrymanError(Exception):
    """Base of every error ferryman raises on purpose."""

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


class ContainerNotFound(NotFound):
    code = "container_not_found"


class AlreadyExists(FerrymanError):
    code = "already_exists"
    http_status = 409


class Conflict(FerrymanError):
    code = "conflict"
    http_status = 409


class Busy(FerrymanError):
    """Nothing was done: the server has as much of this work under way as it takes. The answer is
    503 with `Retry-After: retry_after`; a client waits at least that long, plus a random part so a
    crowd does not come back at once."""

    code = "busy"
    http_status = 503

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after
