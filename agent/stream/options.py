"""A channel's settings (StreamOptions) and its per-direction totals (Counters).

The handshake, both directions (sender.py, receiver.py) and Channel all need them; Channel
imports the directions, so these cannot live in channel.py without an import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.stream.frames import HARD_MAX_FRAME
from agent.stream.seal import Compression
from core.errors import InvalidRequest

# Room for a PAGES header and page-number lists on top of the data of one chunk.
CHUNK_SLACK = 64 << 10


@dataclass(frozen=True)
class StreamOptions:
    chunk_size: int = 1 << 20
    """Bytes of file data or page data per frame."""
    max_frame: int = 4 << 20
    """Largest plaintext this side accepts in one frame; announced in HELLO."""
    depth: int = 8
    """Frames in flight per direction (being sealed or written; received but not consumed)."""
    workers: int = 2
    """Threads sealing and opening frames (lz4 and AES-GCM run there, off the event loop)."""
    compression: Compression = Compression.AUTO
    page_size: int = 4096
    handshake_timeout: float = 30.0
    close_timeout: float = 5.0
    """How long close() waits for queued frames and for the peer's EOF."""
    leave_tls: bool = True
    """After the HELLOs, send frames straight on the TCP connection instead of inside TLS records,
    if the peer agrees. The frames' AEAD already encrypts and authenticates every payload (and the
    headers get masked); TLS on top would encrypt everything twice, which costs ~30 % of the
    throughput on a 2-core host. False keeps TLS records for the whole connection."""
    speaks: tuple[int, ...] = ()
    """The versions of the protocol the stream carries that this side speaks, announced in HELLO (the
    peer's are in `Channel.peer.speaks`): how two releases agree on one before the first message."""
    corrupt_frame: int = 0
    """Fault injection for tests only: flip a bit in the ciphertext of this outgoing frame (0: never)."""

    def __post_init__(self) -> None:
        if not 64 << 10 <= self.max_frame <= HARD_MAX_FRAME:
            raise InvalidRequest(f"max_frame must be 64 KiB..{HARD_MAX_FRAME >> 20} MiB")
        if not 4096 <= self.chunk_size <= self.max_frame - CHUNK_SLACK:
            raise InvalidRequest("chunk_size must be >= 4 KiB and leave 64 KiB of max_frame free")
        if self.depth < 1 or self.workers < 1:
            raise InvalidRequest("depth and workers must be >= 1")


@dataclass
class Counters:
    """Totals of one direction, for progress and metrics (updated on the event loop thread)."""

    frames: int = 0
    payload_bytes: int = 0
    """Plaintext bytes before compression (file data, page data, control JSON, ...)."""
    wire_bytes: int = 0
    """Frame bytes: header + ciphertext + tag (TLS records, when kept, add ~0.1% on top)."""
    compressed_frames: int = 0
    file_bytes: int = 0
    files: int = 0
    pages: int = 0
    zero_pages: int = 0


@dataclass
class StreamTotals:
    """Frames and bytes of every channel that was given this (establish's `totals`), added up as the
    frames go: the agent's stream metrics read it at scrape time, so they move during a transfer, not
    only when a channel ends. Only `frames`, `payload_bytes` and `wire_bytes` are kept here."""

    sent: Counters = field(default_factory=Counters)
    received: Counters = field(default_factory=Counters)
