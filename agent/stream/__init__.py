"""The migration stream: one mTLS connection per migration carrying sealed, ordered frames.

See docs/stream.md for the frame layout, key schedule and error semantics.
"""

from agent.stream.channel import Channel
from agent.stream.errors import (
    AuthenticationFailed,
    ConnectionLost,
    FileDigestMismatch,
    MalformedFrame,
    MigrationMismatch,
    OutOfOrderChunk,
    ReplayedChunk,
    SequenceError,
    StreamAborted,
    StreamClosed,
    StreamError,
    StreamHandshakeError,
    StreamIntegrityError,
    TruncatedStream,
    UnexpectedKind,
)
from agent.stream.files import FileSink, ReceivedFile
from agent.stream.frames import Control, FileChunk, FileDone, FileStart, Kind, Message, PageBatch
from agent.stream.handshake import accept_receiver, establish, open_sender
from agent.stream.net import TlsSocket, accept_tls, connect_tls
from agent.stream.options import Counters, StreamOptions, StreamTotals
from agent.stream.seal import Compression

__all__ = [
    "AuthenticationFailed",
    "Channel",
    "Compression",
    "ConnectionLost",
    "Control",
    "Counters",
    "FileChunk",
    "FileDigestMismatch",
    "FileDone",
    "FileSink",
    "FileStart",
    "Kind",
    "MalformedFrame",
    "Message",
    "MigrationMismatch",
    "OutOfOrderChunk",
    "PageBatch",
    "ReceivedFile",
    "ReplayedChunk",
    "SequenceError",
    "StreamAborted",
    "StreamClosed",
    "StreamError",
    "StreamHandshakeError",
    "StreamIntegrityError",
    "StreamOptions",
    "StreamTotals",
    "TlsSocket",
    "TruncatedStream",
    "UnexpectedKind",
    "accept_receiver",
    "accept_tls",
    "connect_tls",
    "establish",
    "open_sender",
]
