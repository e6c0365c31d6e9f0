"""The two ways a channel moves frames: I/O threads over a blocking connection, or asyncio streams.

Both keep the same contract with Channel:
  * `submit(future)`: futures of sealed frames arrive in sequence order and are written in that
    order, each as soon as its sealing is done; after writing, `on_written(frame)` runs on the loop;
  * the receiving side reads header + payload, passes them to `ingest` (sequence checks, then a
    decrypt job) and hands the result to `deliver` on the loop, holding at most `depth` frames
    that the consumer has not taken yet.

The threaded link is the fast path (see net.py for why); the asyncio link accepts any
(StreamReader, StreamWriter) pair, e.g. from asyncio.open_connection(ssl=...).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import queue
import socket
import ssl
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol

from agent.stream.buffers import BufferPool
from agent.stream.errors import (
    AuthenticationFailed,
    ConnectionLost,
    StreamError,
    StreamHandshakeError,
    TruncatedStream,
)
from agent.stream.frames import HEADER_SIZE, Header, Kind
from agent.stream.net import TlsSocket, _drain_socket
from agent.stream.seal import SAMPLE_SIZE, HeaderMask, SealedFrame

# What the reader posts to the loop: a verified-later frame, a stream-level error, or a clean EOF.
RxItem = tuple[Header, "Future[Any]"] | StreamError | None
Ingest = Callable[[Header, bytes, bytearray | bytes, Callable[[], None]], tuple[Header, "Future[Any]"]]
CheckHeader = Callable[[bytes], Header]


class BlockingConn(Protocol):
    """What the threaded link needs from a connection (TlsSocket, or a socket adapter)."""

    def sendall(self, data: bytes | bytearray | memoryview) -> None: ...
    def recv_into(self, buf: memoryview) -> int: ...
    def shutdown_write(self) -> None: ...
    def abort(self) -> None: ...
    def drain(self, timeout: float) -> None: ...
    def close(self, grace: float) -> None: ...
    def peer_cert_der(self) -> bytes | None: ...


class SocketConn:
    """A plain or ssl.SSLSocket behind the BlockingConn interface.

    An ssl.SSLSocket works but is slow (a syscall per 16 KiB TLS record); prefer TlsSocket.
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        self._sock = sock

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        self._sock.sendall(data)

    def recv_into(self, buf: memoryview) -> int:
        try:
            return self._sock.recv_into(buf)
        except ssl.SSLZeroReturnError:
            return 0

    def shutdown_write(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            if isinstance(self._sock, ssl.SSLSocket):
                return  # shutting down TCP under TLS would leave the TLS layer confused
            self._sock.shutdown(socket.SHUT_WR)

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self._sock, socket.SHUT_RDWR)

    def drain(self, timeout: float) -> None:
        if not isinstance(self._sock, ssl.SSLSocket):
            _drain_socket(self._sock, timeout)

    def close(self, grace: float) -> None:
        self.abort()  # wakes a reader blocked in recv (close() alone would not)
        self._sock.close()

    def peer_cert_der(self) -> bytes | None:
        if isinstance(self._sock, ssl.SSLSocket):
            return self._sock.getpeercert(True)
        return None


def read_exact(conn: BlockingConn, view: memoryview) -> int:
    """Fill `view`; returns how many bytes arrived before EOF (== len(view) unless truncated)."""
    got = 0
    while got < len(view):
        n = conn.recv_into(view[got:])
        if n == 0:
            return got
        got += n
    return got


class Link(Protocol):
    pooled_writes: bool
    """True if a written frame's buffer may be reused right after the write returns."""
    can_leave_tls: bool
    """True if the connection is TLS that leave_tls() can switch to direct frames."""

    async def write_direct(self, data: bytes) -> None: ...
    async def read_direct(self, n: int) -> bytes: ...
    def leave_tls(self) -> None: ...
    def start(
        self,
        check: CheckHeader,
        ingest: Ingest,
        deliver: Callable[[RxItem], None],
        on_written: Callable[[SealedFrame], None],
        on_tx_error: Callable[[StreamError], None],
        depth: int,
        payload_pool: BufferPool | None,
        mask: HeaderMask | None = None,
    ) -> None: ...
    def submit(self, frame: Future[SealedFrame]) -> None: ...
    def consumed(self) -> None: ...
    def peer_cert_der(self) -> bytes | None: ...
    async def close(self, *, drain: bool, grace: float) -> None: ...
    def abort(self) -> None: ...


def _classify_rx(exc: BaseException) -> StreamError:
    if isinstance(exc, StreamError):
        return exc
    if isinstance(exc, ssl.SSLEOFError):
        return TruncatedStream(f"TLS connection ended without close: {exc}")
    if isinstance(exc, ssl.SSLError):
        return AuthenticationFailed(f"TLS layer rejected the stream: {exc}")
    return TruncatedStream(f"connection lost before END: {exc}")


class ThreadLink:
    """Frames over a blocking connection, with one writer and one reader thread."""

    pooled_writes = True

    def __init__(self, conn: BlockingConn) -> None:
        self.conn = conn
        self.can_leave_tls = isinstance(conn, TlsSocket)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tx_queue: queue.SimpleQueue[Future[SealedFrame] | None] = queue.SimpleQueue()
        self._tx_thread: threading.Thread | None = None
        self._rx_thread: threading.Thread | None = None
        self._rx_slots: threading.Semaphore | None = None
        self._stopping = threading.Event()

    async def write_direct(self, data: bytes) -> None:
        await asyncio.to_thread(self.conn.sendall, data)

    async def read_direct(self, n: int) -> bytes:
        buf = bytearray(n)
        got = await asyncio.to_thread(read_exact, self.conn, memoryview(buf))
        if got < n:
            raise StreamHandshakeError(f"connection closed during HELLO ({got} of {n} bytes)")
        return bytes(buf)

    def peer_cert_der(self) -> bytes | None:
        return self.conn.peer_cert_der()

    def leave_tls(self) -> None:
        if not isinstance(self.conn, TlsSocket):
            raise TypeError("only a TlsSocket connection can leave TLS")
        self.conn.leave_tls()

    def start(
        self,
        check: CheckHeader,
        ingest: Ingest,
        deliver: Callable[[RxItem], None],
        on_written: Callable[[SealedFrame], None],
        on_tx_error: Callable[[StreamError], None],
        depth: int,
        payload_pool: BufferPool | None,
        mask: HeaderMask | None = None,
    ) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._rx_slots = threading.Semaphore(depth)

        def post(fn: Callable[..., None], *args: Any) -> None:
            with contextlib.suppress(RuntimeError):  # loop already closed: nobody is listening
                loop.call_soon_threadsafe(fn, *args)

        self._tx_thread = threading.Thread(
            target=self._tx_main, args=(post, on_written, on_tx_error), name="stream-tx", daemon=True
        )
        self._rx_thread = threading.Thread(
            target=self._rx_main, args=(post, check, ingest, deliver, payload_pool, mask), name="stream-rx", daemon=True
        )
        self._tx_thread.start()
        self._rx_thread.start()

    def submit(self, frame: Future[SealedFrame]) -> None:
        self._tx_queue.put(frame)

    def consumed(self) -> None:
        assert self._rx_slots is not None
        self._rx_slots.release()

    def _tx_main(
        self,
        post: Callable[..., None],
        on_written: Callable[[SealedFrame], None],
        on_tx_error: Callable[[StreamError], None],
    ) -> None:
        while (item := self._tx_queue.get()) is not None:
            try:
                frame = item.result()
            except BaseException as exc:
                post(on_tx_error, ConnectionLost(f"sealing failed: {exc!r}"))
                return
            try:
                self.conn.sendall(frame.view)
            except (OSError, ssl.SSLError, ValueError) as exc:
                post(on_tx_error, ConnectionLost(f"connection lost while sending: {exc}"))
                return
            finally:
                frame.release()
            post(on_written, frame)

    def _rx_main(
        self,
        post: Callable[..., None],
        check: CheckHeader,
        ingest: Ingest,
        deliver: Callable[[RxItem], None],
        pool: BufferPool | None,
        mask: HeaderMask | None,
    ) -> None:
        assert self._rx_slots is not None
        # A masked header is read with the ciphertext sample that unmasks it.
        sample = SAMPLE_SIZE if mask is not None else 0
        header_buf = bytearray(HEADER_SIZE + sample)
        header_view = memoryview(header_buf)
        while True:
            while not self._rx_slots.acquire(timeout=0.2):
                if self._stopping.is_set():
                    return
            if self._stopping.is_set():
                return
            try:
                got = read_exact(self.conn, header_view)
                if got == 0:
                    post(deliver, None)  # EOF between frames: fine only if END came first
                    return
                if got < len(header_buf):
                    raise TruncatedStream(f"connection closed mid-frame: {got} of {HEADER_SIZE} header bytes")
                if mask is not None:
                    mask.apply(header_view[:HEADER_SIZE], header_view[HEADER_SIZE:])
                raw = bytes(header_view[:HEADER_SIZE])
                header = check(raw)
                buf = pool.acquire(header.length) if pool is not None else bytearray(header.length)
                payload = memoryview(buf)[: header.length]
                payload[:sample] = header_view[HEADER_SIZE:]  # check() ensured length >= 16
                got = sample + read_exact(self.conn, payload[sample:])
                payload.release()
                if got < header.length:
                    raise TruncatedStream(
                        f"connection closed mid-frame: {got} of {header.length} bytes of "
                        f"{header.kind_name()} frame #{header.seq}"
                    )
                release = functools.partial(pool.release, buf) if pool is not None else _nothing
                post(deliver, ingest(header, raw, buf, release))
                if header.kind in (Kind.END, Kind.ABORT):
                    return  # nothing may follow in this direction
            except BaseException as exc:
                if not self._stopping.is_set():
                    post(deliver, _classify_rx(exc))
                return

    def abort(self) -> None:
        self._stopping.set()
        self.conn.abort()

    async def close(self, *, drain: bool, grace: float) -> None:
        self._tx_queue.put(None)
        tx, rx = self._tx_thread, self._rx_thread
        if tx is not None:
            await asyncio.to_thread(tx.join, grace)
            if tx.is_alive():  # stuck in sendall: the peer stopped reading
                self.conn.abort()
                await asyncio.to_thread(tx.join)
        if drain:
            self.conn.shutdown_write()
            await asyncio.to_thread(self.conn.drain, grace)
        self._stopping.set()
        await asyncio.to_thread(self.conn.close, grace)
        if rx is not None:
            await asyncio.to_thread(rx.join)


def _nothing() -> None:
    return None


class StreamLink:
    """Frames over an asyncio (StreamReader, StreamWriter) pair, e.g. asyncio's own TLS."""

    pooled_writes = False  # StreamWriter.write keeps a reference until the bytes are sent
    can_leave_tls = False  # asyncio's TLS transport cannot hand over its socket mid-stream

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._tx_queue: asyncio.Queue[Future[SealedFrame] | None] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._rx_slots: asyncio.Semaphore | None = None

    async def write_direct(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def read_direct(self, n: int) -> bytes:
        try:
            return await self._reader.readexactly(n)
        except asyncio.IncompleteReadError as exc:
            raise StreamHandshakeError(f"connection closed during HELLO ({len(exc.partial)} of {n} bytes)") from exc
        except OSError as exc:
            raise StreamHandshakeError(f"connection lost during HELLO: {exc}") from exc

    def peer_cert_der(self) -> bytes | None:
        obj = self._writer.get_extra_info("ssl_object")
        return obj.getpeercert(True) if obj is not None else None

    def leave_tls(self) -> None:
        raise TypeError("an asyncio stream cannot leave TLS")

    def start(
        self,
        check: CheckHeader,
        ingest: Ingest,
        deliver: Callable[[RxItem], None],
        on_written: Callable[[SealedFrame], None],
        on_tx_error: Callable[[StreamError], None],
        depth: int,
        payload_pool: BufferPool | None,
        mask: HeaderMask | None = None,
    ) -> None:
        if mask is not None:
            raise TypeError("header masks belong to direct frames, which an asyncio stream never carries")
        self._rx_slots = asyncio.Semaphore(depth)
        self._tasks = [
            asyncio.create_task(self._tx_main(on_written, on_tx_error), name="stream-tx"),
            asyncio.create_task(self._rx_main(check, ingest, deliver), name="stream-rx"),
        ]

    def submit(self, frame: Future[SealedFrame]) -> None:
        self._tx_queue.put_nowait(frame)

    def consumed(self) -> None:
        assert self._rx_slots is not None
        self._rx_slots.release()

    async def _tx_main(
        self, on_written: Callable[[SealedFrame], None], on_tx_error: Callable[[StreamError], None]
    ) -> None:
        while (item := await self._tx_queue.get()) is not None:
            try:
                frame = await asyncio.wrap_future(item)
            except Exception as exc:
                on_tx_error(ConnectionLost(f"sealing failed: {exc!r}"))
                return
            try:
                self._writer.write(frame.view)
                await self._writer.drain()
            except (OSError, RuntimeError) as exc:
                on_tx_error(ConnectionLost(f"connection lost while sending: {exc}"))
                return
            on_written(frame)

    async def _rx_main(self, check: CheckHeader, ingest: Ingest, deliver: Callable[[RxItem], None]) -> None:
        assert self._rx_slots is not None
        while True:
            await self._rx_slots.acquire()
            try:
                try:
                    raw = await self._reader.readexactly(HEADER_SIZE)
                except asyncio.IncompleteReadError as exc:
                    if not exc.partial:
                        deliver(None)
                        return
                    raise TruncatedStream(
                        f"connection closed mid-frame: {len(exc.partial)} of {HEADER_SIZE} header bytes"
                    ) from None
                header = check(raw)
                try:
                    payload = await self._reader.readexactly(header.length)
                except asyncio.IncompleteReadError as exc:
                    raise TruncatedStream(
                        f"connection closed mid-frame: {len(exc.partial)} of {header.length} bytes of "
                        f"{header.kind_name()} frame #{header.seq}"
                    ) from None
                deliver(ingest(header, raw, payload, _nothing))
                if header.kind in (Kind.END, Kind.ABORT):
                    return
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                deliver(_classify_rx(exc))
                return

    def abort(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._writer.transport.abort()

    async def close(self, *, drain: bool, grace: float) -> None:
        tx = self._tasks[0] if self._tasks else None
        self._tx_queue.put_nowait(None)
        if tx is not None:
            try:
                await asyncio.wait_for(asyncio.shield(tx), grace)
            except (TimeoutError, asyncio.CancelledError):
                tx.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._writer.close()
        with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
            await asyncio.wait_for(self._writer.wait_closed(), grace if drain else 0.5)


def make_link(conn: object) -> Link:
    if isinstance(conn, TlsSocket):
        return ThreadLink(conn)
    if isinstance(conn, socket.socket):
        return ThreadLink(SocketConn(conn))
    if isinstance(conn, tuple) and len(conn) == 2:
        reader, writer = conn
        if isinstance(reader, asyncio.StreamReader) and isinstance(writer, asyncio.StreamWriter):
            return StreamLink(reader, writer)
    raise TypeError(f"cannot stream over {type(conn).__name__}: want TlsSocket, socket or (reader, writer)")
