"""The sending direction of a channel: sequencing, backpressure, and the send_* calls.

Each send turns its payload into sealing jobs; the loop gives every job the next sequence number
and a worker thread seals it, and the link writes the sealed frames strictly in sequence order.
At most `depth` frames are in flight (a credit each), which is the backpressure. Files go one at
a time as FILE_BEGIN, FILE_DATA..., FILE_END. See docs/stream.md for the frames.

Sender is a mixin: Channel (channel.py) owns the connection and the shared worker threads and
combines this with the receiving direction (receiver.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import hashlib
import os
from array import array
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from io import BufferedReader
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.stream.buffers import BufferPool
from agent.stream.chunking import PagesPayload, any_chunks, read_hash, sync_chunks, u64_array
from agent.stream.errors import MalformedFrame, StreamClosed, StreamError
from agent.stream.frames import FileDone, Kind, check_path, encode_file_begin, encode_file_end, encode_json
from agent.stream.links import Link
from agent.stream.options import Counters, StreamOptions
from agent.stream.seal import DirectionKeys, HeaderMask, SealedFrame, Sealer
from core.errors import InvalidRequest


class TxState(enum.Enum):
    """Where this side's direction is; Channel's abort() and close() move it too."""

    OPEN = "open"
    ENDED = "ended"
    ABORTED = "aborted"
    FAILED = "failed"
    CLOSED = "closed"


def _corrupting(job: Callable[[int], SealedFrame]) -> Callable[[int], SealedFrame]:
    def corrupted(seq: int) -> SealedFrame:
        frame = job(seq)
        frame.view[-1] ^= 0x01  # the tag's last byte, after sealing: only the receiver's AEAD check notices
        return frame

    return corrupted


class Sender:
    """The sending half of Channel. Use from the event loop thread only."""

    # Set up by Channel, shared with the receiving side.
    options: StreamOptions
    initiator: bool
    direct: bool
    _link: Link
    _tag: bytes
    _loop: asyncio.AbstractEventLoop
    _workers: ThreadPoolExecutor

    if TYPE_CHECKING:

        async def abort(self, reason: str, code: str = "aborted") -> None: ...

    def _init_sending(
        self, keys: DirectionKeys, pool: BufferPool | None, slots: int, peer_max_frame: int, total: Counters | None
    ) -> None:
        opts = self.options
        self.sent = Counters()
        self._sent_total = total
        """The endpoint's totals (StreamTotals.sent), if it keeps them."""
        self._peer_max_frame = peer_max_frame
        self._read_pool = BufferPool(opts.chunk_size, slots)
        mask = HeaderMask(keys.header) if self.direct else None
        self._sealer = Sealer(keys.aead, self.initiator, self._tag, opts.compression, pool, mask)
        # Hashing and file reads are sequential by nature: one thread per direction keeps them
        # in order and off the loop.
        self._tx_serial = ThreadPoolExecutor(1, thread_name_prefix="stream-tx-serial")
        self._tx_state = TxState.OPEN
        self._tx_error: StreamError | None = None
        self._tx_seq = 1
        self._tx_credits = asyncio.Semaphore(opts.depth)
        self._tx_inflight = 0
        self._tx_idle = asyncio.Event()
        self._tx_idle.set()
        self._file_lock = asyncio.Lock()

    def _check_tx(self) -> None:
        if self._tx_error is not None:
            raise self._tx_error
        if self._tx_state is not TxState.OPEN:
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

    def _seal_pages(self, pages: PagesPayload) -> Callable[[int], SealedFrame]:
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
        if (total := self._sent_total) is not None:
            total.frames += 1
            total.payload_bytes += frame.payload_len
            total.wire_bytes += frame.wire_len
        self._tx_credits.release()
        self._tx_inflight -= 1
        if self._tx_inflight == 0:
            self._tx_idle.set()

    def _on_tx_error(self, error: StreamError) -> None:
        if self._tx_error is None:
            self._tx_error = error
            self._tx_state = TxState.FAILED
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
        numbers = u64_array(page_numbers)
        zeros = u64_array(zero_pages)
        view = memoryview(data).cast("B")
        if len(view) != len(numbers) * ps:
            raise InvalidRequest(f"{len(numbers)} page numbers need {len(numbers) * ps} bytes, got {len(view)}")
        per = max(1, self.options.chunk_size // ps)
        # Caller-known zero pages ride along with the data batches, 8 bytes each.
        zeros_per = max(1, self.options.chunk_size // 8)
        batches = max(-(-len(numbers) // per), -(-len(zeros) // zeros_per))
        for b in range(batches):
            first, last = min(b * per, len(numbers)), min((b + 1) * per, len(numbers))
            batch = PagesPayload(
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
            return await self._send_chunks(sync_chunks([data], self.options.chunk_size), name, len(data), mode, sha256)
        if size is None:
            raise InvalidRequest("send_file from an iterable needs its size")
        return await self._send_chunks(any_chunks(source, self.options.chunk_size), name, size, mode, sha256)

    @contextlib.asynccontextmanager
    async def _file_guard(self, name: str) -> AsyncIterator[None]:
        """A file half sent (cancelled, source error) leaves the peer inside it: no later send
        could be understood, so the direction is failed here, loudly, instead of at the peer."""
        try:
            yield
        except BaseException:
            if self._tx_error is None and self._tx_state is TxState.OPEN:
                self._tx_error = StreamClosed(f"sending {name} was interrupted; this stream cannot continue")
                self._tx_state = TxState.FAILED
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
                    n = await loop.run_in_executor(self._tx_serial, read_hash, handle, buf, hasher)
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
        if self._tx_state is TxState.ENDED:
            return
        await self._submit(Kind.END, self._seal_bytes(Kind.END, b""))
        self._tx_state = TxState.ENDED
        await self.flush()
