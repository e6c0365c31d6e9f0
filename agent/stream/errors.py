"""Errors of the migration stream.

They hang off the agent's tree (agent/errors.py) so API handlers translate them like any other:

FerrymanError
├── StreamError                  base of everything below (code "stream_error")
│   ├── StreamHandshakeError     HELLO refused: version, migration id, roles, peer identity
│   ├── StreamAborted            the peer sent ABORT; `reason` and `peer_code` say why
│   ├── StreamClosed             this side already ended, aborted or closed the channel
│   ├── ConnectionLost           the connection failed while this side was sending
│   └── StreamIntegrityError     the received stream cannot be trusted (code "stream_integrity")
│       ├── SequenceError        a chunk arrived out of sequence
│       │   ├── ReplayedChunk    ... with a sequence number already seen
│       │   └── OutOfOrderChunk  ... ahead of the next expected one (reordered or dropped)
│       ├── AuthenticationFailed AES-GCM tag check failed: payload or header altered, wrong key
│       ├── MigrationMismatch    a frame of another migration
│       ├── TruncatedStream      connection ended mid-frame, before END, or inside a file
│       ├── UnexpectedKind       a kind that is unknown, reserved, or wrong in this state
│       ├── MalformedFrame       authenticated but unparseable, or a header out of bounds
│       └── FileDigestMismatch   a reassembled file does not hash to its SHA-256 (also a DigestMismatch)

Every integrity error keeps code "stream_integrity" (one code for alerting and API clients); the
subclass and its `reason` name the kind of failure.
"""

from __future__ import annotations

from agent.errors import DigestMismatch
from core.errors import FerrymanError


class StreamError(FerrymanError):
    code = "stream_error"
    http_status = 502


class StreamHandshakeError(StreamError):
    code = "stream_handshake"


class StreamClosed(StreamError):
    code = "stream_closed"
    http_status = 409


class ConnectionLost(StreamError):
    code = "stream_connection_lost"


class StreamAborted(StreamError):
    """The peer gave up and said why; not an integrity problem."""

    code = "stream_aborted"

    def __init__(self, reason: str, peer_code: str = "aborted") -> None:
        super().__init__(f"peer aborted the stream ({peer_code}): {reason}")
        self.reason = reason
        self.peer_code = peer_code


class StreamIntegrityError(StreamError):
    code = "stream_integrity"
    reason = "integrity"


class SequenceError(StreamIntegrityError):
    reason = "sequence"

    def __init__(self, message: str, expected: int, got: int) -> None:
        super().__init__(message)
        self.expected = expected
        self.got = got


class ReplayedChunk(SequenceError):
    reason = "replayed"


class OutOfOrderChunk(SequenceError):
    reason = "out_of_order"


class AuthenticationFailed(StreamIntegrityError):
    reason = "authentication_failed"


class MigrationMismatch(StreamIntegrityError):
    reason = "migration_mismatch"


class TruncatedStream(StreamIntegrityError):
    reason = "truncated"


class UnexpectedKind(StreamIntegrityError):
    reason = "unexpected_kind"


class MalformedFrame(StreamIntegrityError):
    reason = "malformed"


class FileDigestMismatch(StreamIntegrityError, DigestMismatch):
    reason = "file_digest_mismatch"

    def __init__(self, message: str, path: str, expected: str, actual: str) -> None:
        super().__init__(message)
        self.path = path
        self.expected = expected
        self.actual = actual
