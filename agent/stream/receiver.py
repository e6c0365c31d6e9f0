"""The receiving direction of a channel: header checks, decryption, file reassembly, receive().

The link's reader checks each header in arrival order (_check_header: version, migration,
sequence, kind, length) and hands the frame to a worker thread that verifies, decrypts and
decodes it (_open_job). The consumer then takes the frames in order (receive()): _apply keeps
track of the open file, hashes its data on a serial thread and checks size and digest at
FILE_END. The first integrity failure is raised to the consumer and again on every later call:
nothing after it is delivered.

Receiver is a mixin: Channel (channel.py) owns the connection and the shared worker threads and
combines this with the sending direction (sender.py).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Generator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Self

from agent.stream.buffers import BufferPool
from agent.stream.errors import (
    FileDigestMismatch,
    MalformedFrame,
    MigrationMismatch,
    OutOfOrderChunk,
    ReplayedChunk,
    StreamAborted,
    StreamClosed,
    StreamError,
    StreamIntegrityError,
    TruncatedStream,
    UnexpectedKind,
)
from agent.stream.frames import (
    HEADER_SIZE,
    KNOWN_FLAGS,
    PROTOCOL_VERSION,
    RESERVED_KINDS,
    TAG_SIZE,
    Control,
    FileChunk,
    FileDone,
    FileStart,
    Flag,
    Header,
    Kind,
    Message,
    PageBatch,
    decode_abort,
    decode_file_begin,
    decode_file_end,
    decode_json,
    decode_pages,
)
from agent.stream.links import Link, RxItem
from agent.stream.options import Counters, StreamOptions
from agent.stream.seal import DirectionKeys, Opener


@dataclass
class RxFile:
    """The file the peer is sending: its FILE_BEGIN and what arrived of it so far."""

    start: FileStart
    hasher: Any = field(default_factory=hashlib.sha256)
    received: int = 0
    last_hash: Future[None] | None = None


_END = object()  # internal marker: the peer's END arrived
_SKIP = object()  # an OPTIONAL frame of a kind we do not know


class Receiver:
    """The receiving half of Channel: one consumer task at a time."""

    # Set up by Channel, shared with the sending side.
    options: StreamOptions
    initiator: bool
    _link: Link
    _tag: bytes
    _workers: ThreadPoolExecutor

    def _init_receiving(self, keys: DirectionKeys, pool: BufferPool, total: Counters | None) -> None:
        self.received = Counters()
        self._received_total = total
        """The endpoint's totals (StreamTotals.received), if it keeps them."""
        self._opener = Opener(keys.aead, not self.initiator, self.options.max_frame, pool)
        # File hashing is sequential by nature: one thread per direction keeps it in order and
        # off the loop.
        self._rx_serial = ThreadPoolExecutor(1, thread_name_prefix="stream-rx-serial")
        self._rx_next_seq = 1  # only touched by the link's reader
        self._rx_queue: asyncio.Queue[RxItem | StreamError] = asyncio.Queue()
        self._rx_current: RxItem | StreamError | None = None
        self._rx_has_current = False
        self._rx_error: StreamError | None = None
        self._rx_ended = False
        self._rx_file: RxFile | None = None
        self._rx_lock = asyncio.Lock()

    # ---- reader side (link thread or task), in arrival order ----

    def _check_header(self, raw: bytes) -> Header:
        h = Header.unpack(raw)
        if h.version != PROTOCOL_VERSION:
            raise MalformedFrame(f"frame #{h.seq} has protocol version {h.version}")
        if h.migration != self._tag:
            raise MigrationMismatch(f"{h.kind_name()} frame #{h.seq} belongs to another migration")
        expected = self._rx_next_seq
        if h.seq != expected:
            if h.seq < expected:
                raise ReplayedChunk(
                    f"replayed {h.kind_name()} frame: sequence {h.seq} was already received (expected {expected})",
                    expected,
                    h.seq,
                )
            raise OutOfOrderChunk(
                f"{h.kind_name()} frame out of order: sequence {h.seq}, expected {expected}", expected, h.seq
            )
        if h.flags & ~KNOWN_FLAGS:
            raise MalformedFrame(f"frame #{h.seq} has unknown flags 0x{h.flags:04x}")
        optional = bool(h.flags & Flag.OPTIONAL)
        if h.kind == Kind.HELLO or (not optional and (not h.known_kind or h.kind in RESERVED_KINDS)):
            what = "reserved (post-copy) " if h.kind in RESERVED_KINDS else ""
            raise UnexpectedKind(f"unexpected {what}frame kind {h.kind_name()} at #{h.seq}")
        if not TAG_SIZE <= h.length <= self.options.max_frame + TAG_SIZE:
            raise MalformedFrame(f"frame #{h.seq} claims {h.length} payload bytes")
        self._rx_next_seq = expected + 1
        return h

    def _ingest(
        self, header: Header, raw: bytes, payload: bytearray | bytes, release: Callable[[], None]
    ) -> tuple[Header, Future[Any]]:
        return header, self._workers.submit(self._open_job, header, raw, payload, release)

    def _open_job(
        self, header: Header, raw: bytes, payload: bytearray | bytes, release: Callable[[], None]
    ) -> tuple[Any, int]:
        plain, owner = self._opener.open(header, raw, payload, header.length, release)
        try:
            decoded = self._decode(header.kind, plain)
        except BaseException:
            self._opener.give_back(owner, lend=False)
            raise
        # Page and file data reach the consumer as views of `owner`; everything else was copied out.
        self._opener.give_back(owner, lend=header.kind in (Kind.PAGES, Kind.FILE_DATA))
        return decoded, len(plain)

    @staticmethod
    def _decode(kind: int, plain: bytes | memoryview) -> Any:
        if kind == Kind.FILE_DATA:
            return plain
        if kind == Kind.PAGES:
            return decode_pages(plain)
        if kind == Kind.CONTROL:
            return Control(decode_json(plain, "CONTROL"))
        if kind == Kind.FILE_BEGIN:
            return decode_file_begin(plain)
        if kind == Kind.FILE_END:
            return decode_file_end(plain)
        if kind == Kind.ABORT:
            return decode_abort(plain)
        if kind == Kind.END:
            if plain:
                raise MalformedFrame("END frame carries a payload")
            return None
        return _SKIP  # OPTIONAL frame of an unknown kind: verified, then ignored

    # ---- consumer side (event loop), in order ----

    async def receive(self) -> Message | None:
        """The next message from the peer, or None after its END.

        Raises the first integrity error (and again on every later call), or StreamAborted if
        the peer aborted. Cancellation-safe: an interrupted call loses no message.
        """
        async with self._rx_lock:
            while True:
                if self._rx_error is not None:
                    raise self._rx_error
                if self._rx_ended:
                    return None
                if not self._rx_has_current:
                    self._rx_current = await self._rx_queue.get()
                    self._rx_has_current = True
                try:
                    message = await self._process(self._rx_current)
                except (StreamIntegrityError, StreamAborted, StreamClosed) as exc:
                    self._rx_error = exc
                    self._rx_done()
                    raise
                self._rx_done()
                if message is _END:
                    self._rx_ended = True
                    return None
                if message is not _SKIP:
                    assert isinstance(message, Control | FileStart | FileChunk | FileDone | PageBatch)
                    return message

    def _rx_done(self) -> None:
        if self._rx_has_current and not isinstance(self._rx_current, StreamClosed):
            self._link.consumed()
        self._rx_current = None
        self._rx_has_current = False

    def recv(self) -> Receive:
        """`msg = await ch.recv()` (None after the peer's END) or `async for msg in ch.recv()`."""
        return Receive(self)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Message:
        message = await self.receive()
        if message is None:
            raise StopAsyncIteration
        return message

    async def _process(self, item: RxItem | StreamError | None) -> object:
        if item is None:
            raise TruncatedStream("connection closed before the peer's END frame")
        if isinstance(item, StreamError):
            raise item
        header, job = item
        # shield: cancelling receive() must not cancel the decrypt job of a frame we still own
        decoded, plain_len = await asyncio.shield(asyncio.wrap_future(job))
        result = await self._apply(header, decoded)
        c = self.received
        c.frames += 1
        c.payload_bytes += plain_len
        c.wire_bytes += HEADER_SIZE + header.length
        c.compressed_frames += bool(header.flags & Flag.COMPRESSED)
        if (total := self._received_total) is not None:
            total.frames += 1
            total.payload_bytes += plain_len
            total.wire_bytes += HEADER_SIZE + header.length
        return result

    async def _apply(self, header: Header, decoded: Any) -> object:
        kind = header.kind
        c = self.received
        current = self._rx_file
        if kind == Kind.FILE_DATA:
            if current is None:
                raise UnexpectedKind(f"FILE_DATA frame #{header.seq} outside a file")
            if current.received + len(decoded) > current.start.size:
                raise MalformedFrame(f"{current.start.path}: more data than the announced {current.start.size} bytes")
            chunk = FileChunk(current.start.path, current.received, decoded)
            current.last_hash = self._rx_serial.submit(current.hasher.update, decoded)
            current.received += len(decoded)
            c.file_bytes += len(decoded)
            return chunk
        if kind == Kind.PAGES:
            assert isinstance(decoded, PageBatch)
            c.pages += len(decoded.pages)
            c.zero_pages += len(decoded.zero_pages)
            return decoded
        if kind == Kind.CONTROL:
            return decoded
        if kind == Kind.FILE_BEGIN:
            if current is not None:
                raise UnexpectedKind(f"FILE_BEGIN for {decoded.path} while {current.start.path} is open")
            self._rx_file = RxFile(decoded)
            return decoded
        if kind == Kind.FILE_END:
            if current is None:
                raise UnexpectedKind(f"FILE_END frame #{header.seq} outside a file")
            return await self._finish_rx_file(current, *decoded)
        if kind == Kind.END:
            if current is not None:
                raise TruncatedStream(
                    f"stream ended inside {current.start.path} ({current.received} of {current.start.size} bytes)"
                )
            return _END
        if kind == Kind.ABORT:
            reason, code = decoded
            raise StreamAborted(reason, code)
        return _SKIP

    async def _finish_rx_file(self, current: RxFile, size: int, digest: str) -> FileDone:
        if current.last_hash is not None:
            await asyncio.shield(asyncio.wrap_future(current.last_hash))
        path = current.start.path
        if size != current.start.size:
            raise MalformedFrame(f"{path}: FILE_END says {size} bytes, FILE_BEGIN said {current.start.size}")
        if current.received != size:
            raise TruncatedStream(f"{path}: got {current.received} of {size} bytes")
        actual = current.hasher.hexdigest()
        for promised in (digest, current.start.sha256):
            if promised is not None and promised != actual:
                raise FileDigestMismatch(
                    f"{path}: content hashes to {actual}, expected {promised}", path, promised, actual
                )
        self._rx_file = None
        self.received.files += 1
        return FileDone(path, size, actual)


class Receive:
    """What recv() returns: await it for one message, or iterate it for all of them."""

    __slots__ = ("_channel",)

    def __init__(self, channel: Receiver) -> None:
        self._channel = channel

    def __await__(self) -> Generator[Any, None, Message | None]:
        return self._channel.receive().__await__()

    def __aiter__(self) -> Receiver:
        return self._channel
