"""The peer port: mutual-TLS sessions between agents, each one encrypted stream, routed by session kind.

Agents talk to each other for more than a migration (layer transfer is next), so the port itself
is an adapter of its own, like containerd's or CRIU's: it dials and accepts sessions, names the
session kind and id in a short preamble, establishes the stream (agent.stream), and hands each
inbound session to the handler registered for its kind. What a session says is its kind's business
(agent/migration/protocol.py for migrations); this package never imports the packages it serves.

  port.py      PeerEndpoint: dial a peer, serve the port
  routing.py   the preamble, PeerSession and SessionRouter (kind -> handler)
  received.py  StreamChannel: a session's stream as control bodies, landed files and page batches
  errors.py    PeerFailed, UnknownSessionKind
"""

from agent.peers.errors import PeerFailed, UnknownSessionKind
from agent.peers.port import PeerEndpoint
from agent.peers.received import FileIn, Incoming, PagesIn, StreamChannel
from agent.peers.routing import PeerSession, SessionHandler, SessionRouter

__all__ = [
    "FileIn",
    "Incoming",
    "PagesIn",
    "PeerEndpoint",
    "PeerFailed",
    "PeerSession",
    "SessionHandler",
    "SessionRouter",
    "StreamChannel",
    "UnknownSessionKind",
]
