"""The duplex, encrypted migration channel.

    ch = await establish(conn, migration_id, "host-a", initiator=True)
    await ch.send_control({"type": "precopy", "round": 1})
    await ch.send_file("/var/lib/ferryman/dump/core-1.img", "core-1.img")
    await ch.send_pages(page_numbers, page_bytes)
    await ch.end()                       # our direction is complete
    async for msg in ch: ...             # the peer's messages, until its END
    await ch.close()

`conn` is a TlsSocket (net.connect_tls / net.accept_tls: the fast path), a connected socket
(plain TCP for tests, or an ssl.SSLSocket), or an asyncio (StreamReader, StreamWriter) pair.

Data path, per chunk: the loop assigns the next sequence number and hands the chunk to a worker
thread (lz4 + AES-GCM, both release the GIL); the link's writer takes the sealed frames strictly
in sequence order. At most `depth` frames per direction are in flight, which is the
backpressure. Receiving mirrors it: the reader checks each header in arrival order, workers
verify and decrypt, and the consumer gets messages in order. The first integrity failure is
raised to the consumer and again on every later call: nothing after it is delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import hashlib
import os
from array import array
from collections.abc import AsyncIterable, AsyncIterator, Callable, Generator, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from io import BufferedReader
from pathlib import Path
from typing import Any

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
    StreamHandshakeError,
    StreamIntegrityError,
    TruncatedStream,
    UnexpectedKind,
)
from agent.stream.frames import (
    HARD_MAX_FRAME,
    HEADER_SIZE,
    KNOWN_FLAGS,
    MAX_HELLO,
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
    check_path,
    decode_abort,
    decode_file_begin,
    decode_file_end,
    decode_json,
    decode_pages,
    encode_abort,
    encode_file_begin,
    encode_file_end,
    encode_json,
    encode_pages_parts,
    find_zero_pages,
    migration_tag,
)
from agent.stream.links import Link, RxItem, make_link
from agent.stream.seal import (
    Compression,
    DirectionKeys,
    HeaderMask,
    Hello,
    KeyExchange,
    Opener,
    SealedFrame,
    Sealer,
    transcript_hash,
)
from core.errors import InvalidRequest

# Room for a PAGES header and page-number lists on top of the data of one chunk.
_CHUNK_SLACK = 64 << 10


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
    corrupt_frame: int = 0
    """Fault injection for tests only: flip a bit in the ciphertext of this outgoing frame (0: never)."""

    def __post_init__(self) -> None:
        if not 64 << 10 <= self.max_frame <= HARD_MAX_FRAME:
            raise InvalidRequest(f"max_frame must be 64 KiB..{HARD_MAX_FRAME >> 20} MiB")
        if not 4096 <= self.chunk_size <= self.max_frame - _CHUNK_SLACK:
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


class _TxState(enum.Enum):
    OPEN = "open"
    ENDED = "ended"
    ABORTED = "aborted"
    FAILED = "failed"
    CLOSED = "closed"


@dataclass
class _RxFile:
    start: FileStart
    hasher: Any = field(default_factory=hashlib.sha256)
    received: int = 0
    last_hash: Future[None] | None = None


_END = object()  # internal marker: the peer's END arrived
_SKIP = object()  # an OPTIONAL frame of a kind we do not know


class _Rechunker:
    """Turns pieces of any size into chunk_size pieces; big pieces are sliced without copying."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._pending: list[memoryview] = []
        self._have = 0

    def feed(self, piece: bytes | bytearray | memoryview) -> list[bytes | memoryview]:
        out: list[bytes | memoryview] = []
        view = memoryview(piece).cast("B")
        while view:
            if not self._pending and len(view) >= self._size:
                out.append(view[: self._size])
                view = view[self._size :]
                continue
            take = min(self._size - self._have, len(view))
            self._pending.append(view[:take])
            self._have += take
            view = view[take:]
            if self._have == self._size:
                out.append(self._flush())
        return out

    def _flush(self) -> bytes:
        joined = b"".join(self._pending)
        self._pending, self._have = [], 0
        return joined

    def finish(self) -> list[bytes | memoryview]:
        return [self._flush()] if self._pending else []


@dataclass(frozen=True)
class _Pages:
    """A PAGES payload to build in a worker: the zero-page search stays off the loop, and the
    parts go to the sealer as they are (no join: it encrypts them in sequence)."""

    data: memoryview
    numbers: array[int]
    page_size: int
    known_zero: array[int]

    def build(self) -> tuple[list[bytes | bytearray | memoryview], int, int]:
        view, ps = self.data, self.page_size
        zero_idx = find_zero_pages(view, ps)
        if not zero_idx:
            parts = encode_pages_parts(ps, self.numbers, self.known_zero)
            return [*parts, view], len(self.numbers), len(self.known_zero)
        pages, zero = array("Q"), array("Q", self.known_zero)
        runs: list[bytes | bytearray | memoryview] = []
        prev = 0
        for idx in zero_idx:  # one step per zero page; runs of data pages are sliced whole
            if idx > prev:
                pages.extend(self.numbers[prev:idx])
                runs.append(view[prev * ps : idx * ps])
            zero.append(self.numbers[idx])
            prev = idx + 1
        if prev < len(self.numbers):
            pages.extend(self.numbers[prev:])
            runs.append(view[prev * ps :])
        return [*encode_pages_parts(ps, pages, zero), *runs], len(pages), len(zero)


def _u64_array(values: Sequence[int] | array[int]) -> array[int]:
    if isinstance(values, array) and values.typecode == "Q":
        return values
    try:
        return array("Q", values)
    except (OverflowError, TypeError) as exc:
        raise InvalidRequest(f"page numbers must be integers in 0..2**64-1: {exc}") from exc


def _corrupting(job: Callable[[int], SealedFrame]) -> Callable[[int], SealedFrame]:
    def corrupted(seq: int) -> SealedFrame:
        frame = job(seq)
        frame.view[-1] ^= 0x01  # the tag's last byte, after sealing: only the receiver's AEAD check notices
        return frame

    return corrupted


async def establish(
    conn: object,
    migration_id: str,
    local_host: str,
    *,
    initiator: bool,
    expected_peer: str | None = None,
    options: StreamOptions | None = None,
) -> Channel:
    """Exchange HELLOs, agree on keys, and return the running channel.

    Both sides send their HELLO first and then read the peer's, so it does not matter who
    connected. `initiator` only decides which direction key is which: exactly one side must set it.
    `expected_peer`, if given, must equal the host the peer names in its HELLO (check it against
    the mTLS peer identity too).

    Over a TlsSocket, when both sides offer it in HELLO (`StreamOptions.leave_tls`), the
    connection then leaves TLS records: TLS has authenticated both hosts and carried the HELLOs,
    so the keys are known only to them, and every later frame is AES-GCM sealed with its header
    masked. That is QUIC's split (TLS handshake, own record protection) and it encrypts once
    instead of twice.
    """
    opts = options or StreamOptions()
    if not migration_id or len(migration_id) > 256:
        raise InvalidRequest("migration id must be 1..256 characters")
    link = make_link(conn)
    tag = migration_tag(migration_id)
    kx = KeyExchange()
    offer_direct = opts.leave_tls and link.can_leave_tls
    payload = Hello(migration_id, local_host, initiator, kx.public, opts.max_frame, direct=offer_direct).encode()
    own = Header(PROTOCOL_VERSION, Kind.HELLO, 0, tag, 0, len(payload)).pack() + payload
    try:
        async with asyncio.timeout(opts.handshake_timeout):
            await link.write_direct(own)
            raw = await link.read_direct(HEADER_SIZE)
            header = Header.unpack(raw)
            if header.version != PROTOCOL_VERSION:
                raise StreamHandshakeError(f"peer speaks stream version {header.version}, we speak {PROTOCOL_VERSION}")
            if header.kind != Kind.HELLO or header.seq != 0 or header.flags:
                raise StreamHandshakeError(f"expected HELLO, got {header.kind_name()} #{header.seq}")
            if header.length > MAX_HELLO:
                raise StreamHandshakeError(f"HELLO of {header.length} bytes is too large")
            peer_payload = await link.read_direct(header.length)
        peer = Hello.decode(peer_payload)
        if header.migration != tag or peer.migration_id != migration_id:
            raise StreamHandshakeError(f"peer is on migration {peer.migration_id!r}, we are on {migration_id!r}")
        if peer.initiator == initiator:
            raise StreamHandshakeError("both sides claim the same role")
        if expected_peer is not None and peer.host != expected_peer:
            raise StreamHandshakeError(f"peer says it is {peer.host!r}, expected {expected_peer!r}")
        if peer.max_frame < opts.chunk_size + _CHUNK_SLACK:
            raise StreamHandshakeError(f"peer accepts frames of {peer.max_frame} bytes, our chunks need more")
        first, second = (own, raw + peer_payload) if initiator else (raw + peer_payload, own)
        tx_keys, rx_keys = kx.derive(peer.public_key, migration_id, transcript_hash(first, second), initiator)
        direct = offer_direct and peer.direct
        if direct:
            link.leave_tls()
    except TimeoutError:
        link.abort()
        await link.close(drain=False, grace=0)
        raise StreamHandshakeError(f"no HELLO from the peer within {opts.handshake_timeout} s") from None
    except BaseException:
        link.abort()
        await link.close(drain=False, grace=0)
        raise
    return Channel(link, migration_id, tag, local_host, peer, initiator, tx_keys, rx_keys, opts, direct=direct)


async def open_sender(conn: object, migration_id: str, local_host: str, **kwargs: Any) -> Channel:
    """The source side of a migration: the initiator of the key schedule."""
    return await establish(conn, migration_id, local_host, initiator=True, **kwargs)


async def accept_receiver(conn: object, migration_id: str, local_host: str, **kwargs: Any) -> Channel:
    """The target side of a migration."""
    return await establish(conn, migration_id, local_host, initiator=False, **kwargs)


class Channel:
    """One migration's duplex stream. Use from one event loop; one receiver task at a time."""

    def __init__(
        self,
        link: Link,
        migration_id: str,
        tag: bytes,
        local_host: str,
        peer: Hello,
        initiator: bool,
        tx_keys: DirectionKeys,
        rx_keys: DirectionKeys,
        opts: StreamOptions,
        *,
        direct: bool = False,
    ) -> None:
        self.migration_id = migration_id
        self.direct = direct
        """True when frames travel straight on TCP (masked headers), False when inside TLS or plain TCP."""
        self.local_host = local_host
        self.peer_host = peer.host
        self.initiator = initiator
        self.options = opts
        self.sent = Counters()
        self.received = Counters()
        self._link = link
        self._tag = tag
        self._loop = asyncio.get_running_loop()
        self._peer_max_frame = peer.max_frame
        slots = 2 * (opts.depth + opts.workers + 2)
        frame_size = HEADER_SIZE + TAG_SIZE + 16 + opts.chunk_size + _CHUNK_SLACK
        self._read_pool = BufferPool(opts.chunk_size, slots)
        tx_pool = BufferPool(frame_size, slots) if link.pooled_writes else None
        rx_pool = BufferPool(frame_size, slots)
        tx_mask = HeaderMask(tx_keys.header) if direct else None
        self._sealer = Sealer(tx_keys.aead, initiator, tag, opts.compression, tx_pool, tx_mask)
        self._opener = Opener(rx_keys.aead, not initiator, opts.max_frame, rx_pool)
        self._workers = ThreadPoolExecutor(opts.workers, thread_name_prefix="stream-seal")
        # Hashing and file reads are sequential by nature: one thread per direction keeps them
        # in order and off the loop.
        self._tx_serial = ThreadPoolExecutor(1, thread_name_prefix="stream-tx-serial")
        self._rx_serial = ThreadPoolExecutor(1, thread_name_prefix="stream-rx-serial")
        # send side
        self._tx_state = _TxState.OPEN
        self._tx_error: StreamError | None = None
        self._tx_seq = 1
        self._tx_credits = asyncio.Semaphore(opts.depth)
        self._tx_inflight = 0
        self._tx_idle = asyncio.Event()
        self._tx_idle.set()
        self._file_lock = asyncio.Lock()
        # receive side
        self._rx_next_seq = 1  # only touched by the link's reader
        self._rx_queue: asyncio.Queue[RxItem | StreamError] = asyncio.Queue()
        self._rx_current: RxItem | StreamError | None = None
        self._rx_has_current = False
        self._rx_error: StreamError | None = None
        self._rx_ended = False
        self._rx_file: _RxFile | None = None
        self._rx_lock = asyncio.Lock()
        self._closed = False
        link.start(
            self._check_header,
            self._ingest,
            self._rx_queue.put_nowait,
            self._on_written,
            self._on_tx_error,
            opts.depth,
            rx_pool,
            HeaderMask(rx_keys.header) if direct else None,
        )

    # ---- identity and totals ----

    @property
    def bytes_raw(self) -> int:
        """Plaintext payload bytes sent and received so far (before compression)."""
        return self.sent.payload_bytes + self.received.payload_bytes

    @property
    def bytes_wire(self) -> int:
        """Frame bytes sent and received so far (after compression and sealing)."""
        return self.sent.wire_bytes + self.received.wire_bytes

    @property
    def peer_cert_der(self) -> bytes | None:
        """The peer's TLS certificate (DER), if the connection is TLS."""
        return self._link.peer_cert_der()

    # ---- sending ----

    def _check_tx(self) -> None:
        if self._tx_error is not None:
            raise self._tx_error
        if self._tx_state is not _TxState.OPEN:
            raise StreamClosed(f"cannot send: this side's stream is {self._tx_state.value}")

    async def _submit(self, kind: Kind, job: Callable[[int], SealedFrame]) -> None:
        self._check_tx()
        await self._tx_credits.acquire()
        try:
            self._check_tx()
        except StreamError:
            self._tx_credits.release()
            raise
        seq = self._tx_seq
        self._tx_seq += 1
        self._tx_inflight += 1
        self._tx_idle.clear()
        if seq == self.options.corrupt_frame:
            job = _corrupting(job)
        self._link.submit(self._workers.submit(job, seq))

    def _seal_bytes(
        self, kind: Kind, payload: bytes | bytearray | memoryview, after: Callable[[], None] | None = None
    ) -> Callable[[int], SealedFrame]:
        def job(seq: int) -> SealedFrame:
            try:
                return self._sealer.seal(kind, seq, payload)
            finally:
                if after is not None:
                    after()

        return job

    def _seal_pages(self, pages: _Pages) -> Callable[[int], SealedFrame]:
        def job(seq: int) -> SealedFrame:
            parts, n_data, n_zero = pages.build()
            frame = self._sealer.seal(Kind.PAGES, seq, parts)
            frame.pages, frame.zero_pages = n_data, n_zero
            return frame

        return job

    def _on_written(self, frame: SealedFrame) -> None:
        c = self.sent
        c.frames += 1
        c.payload_bytes += frame.payload_len
        c.wire_bytes += frame.wire_len
        c.compressed_frames += frame.compressed
        c.pages += frame.pages
        c.zero_pages += frame.zero_pages
        if frame.kind == Kind.FILE_DATA:
            c.file_bytes += frame.payload_len
        self._tx_credits.release()
        self._tx_inflight -= 1
        if self._tx_inflight == 0:
            self._tx_idle.set()

    def _on_tx_error(self, error: StreamError) -> None:
        if self._tx_error is None:
            self._tx_error = error
            self._tx_state = _TxState.FAILED
        self._tx_idle.set()
        # Wake every sender waiting for a credit; each re-checks and raises.
        for _ in range(self.options.depth):
            self._tx_credits.release()

    async def flush(self) -> None:
        """Wait until every frame submitted so far is written to the connection."""
        await self._tx_idle.wait()
        if self._tx_error is not None:
            raise self._tx_error

    async def send_control(self, body: dict[str, Any]) -> None:
        """Send a small JSON object (state changes, acks, errors of the migration protocol)."""
        if not isinstance(body, dict):
            raise InvalidRequest("control messages are JSON objects")
        payload = encode_json(body)
        if len(payload) > self._peer_max_frame:
            raise InvalidRequest(f"control message of {len(payload)} bytes is larger than a frame")
        await self._submit(Kind.CONTROL, self._seal_bytes(Kind.CONTROL, payload))

    async def send_pages(
        self,
        page_numbers: Sequence[int] | array[int],
        data: bytes | bytearray | memoryview,
        zero_pages: Sequence[int] | array[int] = (),
        *,
        page_size: int = 0,
    ) -> None:
        """Send memory pages: `data` holds len(page_numbers) pages back to back.

        `zero_pages` are page numbers the caller already knows to be all zeros (sent as numbers
        only); all-zero pages inside `data` are found as well (in the workers) and elided the same
        way. Batches of chunk_size bytes go out as PAGES frames; `data` must not change until this
        returns.
        """
        ps = page_size or self.options.page_size
        numbers = _u64_array(page_numbers)
        zeros = _u64_array(zero_pages)
        view = memoryview(data).cast("B")
        if len(view) != len(numbers) * ps:
            raise InvalidRequest(f"{len(numbers)} page numbers need {len(numbers) * ps} bytes, got {len(view)}")
        per = max(1, self.options.chunk_size // ps)
        # Caller-known zero pages ride along with the data batches, 8 bytes each.
        zeros_per = max(1, self.options.chunk_size // 8)
        batches = max(-(-len(numbers) // per), -(-len(zeros) // zeros_per))
        for b in range(batches):
            first, last = min(b * per, len(numbers)), min((b + 1) * per, len(numbers))
            batch = _Pages(
                view[first * ps : last * ps], numbers[first:last], ps, zeros[b * zeros_per : (b + 1) * zeros_per]
            )
            await self._submit(Kind.PAGES, self._seal_pages(batch))

    async def send_file(
        self,
        source: str | os.PathLike[str] | bytes | bytearray | memoryview | Iterable[bytes] | AsyncIterable[bytes],
        name: str,
        size: int | None = None,
        *,
        mode: int | None = None,
        sha256: str | None = None,
    ) -> FileDone:
        """Send one file as FILE_BEGIN, FILE_DATA..., FILE_END; returns what was sent.

        `source` is a path, a bytes-like object, or an (async) iterable of bytes (then `size` is
        required). `sha256`, if the caller knows it, goes in FILE_BEGIN and the receiver checks the
        content against it as well as against the digest computed while sending (in FILE_END).
        Files go one at a time; control messages and pages may interleave with them.
        """
        try:
            check_path(name)
        except MalformedFrame as exc:
            raise InvalidRequest(exc.message) from exc
        if isinstance(source, str | os.PathLike):
            return await self._send_path(Path(source), name, size, mode, sha256)
        if isinstance(source, bytes | bytearray | memoryview):
            data = memoryview(source).cast("B")
            return await self._send_chunks(_sync_chunks([data], self.options.chunk_size), name, len(data), mode, sha256)
        if size is None:
            raise InvalidRequest("send_file from an iterable needs its size")
        return await self._send_chunks(_any_chunks(source, self.options.chunk_size), name, size, mode, sha256)

    @contextlib.asynccontextmanager
    async def _file_guard(self, name: str) -> AsyncIterator[None]:
        """A file half sent (cancelled, source error) leaves the peer inside it: no later send
        could be understood, so the direction is failed here, loudly, instead of at the peer."""
        try:
            yield
        except BaseException:
            if self._tx_error is None and self._tx_state is _TxState.OPEN:
                self._tx_error = StreamClosed(f"sending {name} was interrupted; this stream cannot continue")
                self._tx_state = _TxState.FAILED
            raise

    async def _begin_file(self, name: str, size: int, mode: int, sha256: str | None) -> None:
        await self._submit(
            Kind.FILE_BEGIN, self._seal_bytes(Kind.FILE_BEGIN, encode_file_begin(name, size, mode, sha256))
        )

    async def _finish_file(self, name: str, size: int, total: int, digest: str) -> FileDone:
        if total != size:
            reason = f"file {name}: source gave {total} bytes, {size} announced"
            await self.abort(reason, code="file_size_changed")
            raise InvalidRequest(reason)
        await self._submit(Kind.FILE_END, self._seal_bytes(Kind.FILE_END, encode_file_end(total, digest)))
        self.sent.files += 1
        return FileDone(name, total, digest)

    async def _send_path(
        self, path: Path, name: str, size: int | None, mode: int | None, sha256: str | None
    ) -> FileDone:
        loop = self._loop
        try:
            handle: BufferedReader = await loop.run_in_executor(self._tx_serial, path.open, "rb")
        except OSError as exc:
            raise InvalidRequest(f"cannot read {path}: {exc}") from exc
        try:
            st = os.fstat(handle.fileno())
            if size is not None and size != st.st_size:
                raise InvalidRequest(f"{path} has {st.st_size} bytes, not {size}")
            size = st.st_size
            async with self._file_lock, self._file_guard(name):
                await self._begin_file(name, size, st.st_mode & 0o7777 if mode is None else mode, sha256)
                hasher = hashlib.sha256()
                total = 0
                pool = self._read_pool
                while True:
                    buf = pool.acquire(self.options.chunk_size)
                    n = await loop.run_in_executor(self._tx_serial, _read_hash, handle, buf, hasher)
                    if n == 0:
                        pool.release(buf)
                        break
                    total += n
                    view = memoryview(buf)[:n]
                    await self._submit(
                        Kind.FILE_DATA, self._seal_bytes(Kind.FILE_DATA, view, functools.partial(pool.release, buf))
                    )
                return await self._finish_file(name, size, total, hasher.hexdigest())
        finally:
            await loop.run_in_executor(self._tx_serial, handle.close)

    async def _send_chunks(
        self, chunks: AsyncIterable[bytes | memoryview], name: str, size: int, mode: int | None, sha256: str | None
    ) -> FileDone:
        async with self._file_lock, self._file_guard(name):
            await self._begin_file(name, size, 0o644 if mode is None else mode, sha256)
            hasher = hashlib.sha256()
            total = 0
            last: Future[None] | None = None
            async for chunk in chunks:
                total += len(chunk)
                # Hash in order on the serial thread; the chunk is only read, never changed.
                last = self._tx_serial.submit(hasher.update, chunk)
                await self._submit(Kind.FILE_DATA, self._seal_bytes(Kind.FILE_DATA, chunk))
            if last is not None:
                await asyncio.wrap_future(last)
            return await self._finish_file(name, size, total, hasher.hexdigest())

    async def end(self) -> None:
        """Send END (our direction is complete) and wait until everything is written."""
        if self._tx_state is _TxState.ENDED:
            return
        await self._submit(Kind.END, self._seal_bytes(Kind.END, b""))
        self._tx_state = _TxState.ENDED
        await self.flush()

    async def abort(self, reason: str, code: str = "aborted") -> None:
        """Tell the peer why we give up (best effort), then close."""
        if self._tx_state is _TxState.OPEN and self._tx_error is None:
            try:
                async with asyncio.timeout(self.options.close_timeout):
                    await self._submit(Kind.ABORT, self._seal_bytes(Kind.ABORT, encode_abort(reason, code)))
                    self._tx_state = _TxState.ABORTED
                    await self.flush()
            except (TimeoutError, StreamError):
                pass
        self._tx_state = _TxState.ABORTED
        await self.close()

    async def close(self) -> None:
        """Release the connection and threads. Without a prior end(), the peer sees a truncated stream."""
        if self._closed:
            return
        self._closed = True
        clean = self._tx_state is _TxState.ENDED and self._rx_ended
        if self._tx_state is _TxState.OPEN:
            self._tx_state = _TxState.CLOSED
        try:
            await self._link.close(drain=clean, grace=self.options.close_timeout)
        finally:
            self._rx_queue.put_nowait(StreamClosed("channel closed"))
            for pool in (self._workers, self._tx_serial, self._rx_serial):
                pool.shutdown(wait=False, cancel_futures=True)

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- receiving: reader side (link thread or task), in arrival order ----

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

    # ---- receiving: consumer side (event loop), in order ----

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

    def recv(self) -> _Receive:
        """`msg = await ch.recv()` (None after the peer's END) or `async for msg in ch.recv()`."""
        return _Receive(self)

    def __aiter__(self) -> Channel:
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
            self._rx_file = _RxFile(decoded)
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

    async def _finish_rx_file(self, current: _RxFile, size: int, digest: str) -> FileDone:
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


class _Receive:
    """What recv() returns: await it for one message, or iterate it for all of them."""

    __slots__ = ("_channel",)

    def __init__(self, channel: Channel) -> None:
        self._channel = channel

    def __await__(self) -> Generator[Any, None, Message | None]:
        return self._channel.receive().__await__()

    def __aiter__(self) -> Channel:
        return self._channel


def _read_hash(handle: BufferedReader, buf: bytearray, hasher: Any) -> int:
    """Fill `buf` from the file (short only at EOF) and hash what was read; runs on the serial thread."""
    view = memoryview(buf)
    got = 0
    while got < len(buf):
        n = handle.readinto(view[got:])
        if not n:
            break
        got += n
    hasher.update(view[:got])
    return got


async def _sync_chunks(pieces: Iterable[bytes | bytearray | memoryview], size: int) -> Any:
    rechunk = _Rechunker(size)
    for piece in pieces:
        for chunk in rechunk.feed(piece):
            yield chunk
    for chunk in rechunk.finish():
        yield chunk


async def _any_chunks(source: Iterable[bytes] | AsyncIterable[bytes], size: int) -> Any:
    if isinstance(source, AsyncIterable):
        rechunk = _Rechunker(size)
        async for piece in source:
            for chunk in rechunk.feed(piece):
                yield chunk
        for chunk in rechunk.finish():
            yield chunk
    else:
        async for chunk in _sync_chunks(source, size):
            yield chunk
