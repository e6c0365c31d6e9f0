"""The peer port's errors.

PeerFailed                  the peer reported a failure, or broke a protocol (502)
└── UnknownSessionKind      a session of a kind nobody here serves
(agent/migration/protocol.py adds PeerReportedFailure and ProtocolError under PeerFailed.)
"""

from __future__ import annotations

from core.errors import FerrymanError


class PeerFailed(FerrymanError):
    """The peer reported a failure, or broke the protocol."""

    code = "peer_failed"
    http_status = 502


class UnknownSessionKind(PeerFailed):
    """A peer opened a session of a kind no handler is registered for here."""

    code = "unknown_session_kind"
