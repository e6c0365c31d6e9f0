"""mTLS connections for the stream's fast path: TLS through memory BIOs over a blocking socket.

Why not ssl.SSLSocket: it writes every 16 KiB TLS record with its own send() and reads each
record with two recv() calls. Over a veth pair that capped a plain SSLSocket at ~0.5 GB/s while
the raw socket did ~3 GB/s. Encrypting into a memory BIO and sending the result with one
sendall() per frame (and receiving in large recv_into() calls) cut the syscalls ~60x and tripled
TLS throughput. The same ssl.SSLContext is used, so certificate checks are unchanged.

Why not asyncio's TLS: it runs encryption and its buffer copies on the event loop thread. Here the
caller's threads do it, and OpenSSL releases the GIL while it encrypts.

Why no socket threads of its own: moving the socket send/recv into two extra threads (so TLS and
socket copies run on different cores) cost 15% more CPU per byte in handoffs and was not faster
on a 2-core host. The channel's writer and reader threads do TLS and socket I/O themselves.

One thread may send while another receives: `_ssl` guards the SSLObject and its BIOs (OpenSSL
objects are not safe for concurrent use); `_send` keeps TLS bytes leaving the BIO in the order
they go to the socket.

`leave_tls()` ends TLS record protection on an established connection: from then on bytes go to
and come from the TCP socket as they are. The stream does that after its HELLOs, once its own
AEAD frames protect everything (see handshake.establish); the identity checks stay TLS's.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time

from agent.stream.errors import StreamHandshakeError

_HANDSHAKE_TIMEOUT = 30.0
_RECV_CHUNK = 256 << 10


class TlsSocket:
    """An established TLS session over a connected blocking TCP socket."""

    def __init__(
        self, sock: socket.socket, obj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO
    ) -> None:
        self._sock = sock
        self._obj = obj
        self._in = incoming
        self._out = outgoing
        self._ssl = threading.Lock()
        self._send = threading.Lock()
        self._rbuf = bytearray(_RECV_CHUNK)
        self._rview = memoryview(self._rbuf)
        self._eof = False
        self._direct = False
        self._leftover = b""  # raw bytes that arrived behind the last TLS record

    @classmethod
    def handshake(
        cls,
        sock: socket.socket,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        timeout: float = _HANDSHAKE_TIMEOUT,
    ) -> TlsSocket:
        """Run the TLS handshake (blocking). Raises StreamHandshakeError on any failure."""
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        try:
            obj = context.wrap_bio(incoming, outgoing, server_side=server_side, server_hostname=server_hostname)
        except (ssl.SSLError, ValueError) as exc:
            raise StreamHandshakeError(f"cannot start TLS: {exc}") from exc
        deadline = time.monotonic() + timeout
        sock.setblocking(True)
        try:
            while True:
                try:
                    obj.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    pending = outgoing.read()
                    if pending:
                        sock.sendall(pending)
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError("TLS handshake timed out") from None
                    sock.settimeout(remaining)
                    data = sock.recv(65536)
                    if not data:
                        raise ConnectionError("peer closed the connection during the TLS handshake") from None
                    incoming.write(data)
            pending = outgoing.read()  # client Finished / server session tickets
            if pending:
                sock.sendall(pending)
        except (ssl.SSLError, OSError) as exc:
            raise StreamHandshakeError(f"TLS handshake failed: {exc}") from exc
        finally:
            sock.settimeout(None)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock, obj, incoming, outgoing)

    # ---- data ----

    def leave_tls(self) -> None:
        """Stop TLS record protection in both directions (call with no send or receive running).

        The peer must switch at the same point of the byte stream: after its last TLS record it
        sends raw bytes, and raw bytes that already arrived behind that record are kept.
        """
        with self._send, self._ssl:
            if self._obj.pending():
                raise StreamHandshakeError("peer sent TLS data past the switch to direct frames")
            if self._out.pending:
                self._sock.sendall(self._out.read())
            self._leftover = self._in.read()
            self._direct = True

    @property
    def direct(self) -> bool:
        return self._direct

    def set_timeout(self, seconds: float | None) -> None:
        """Bound each blocking read and write (TimeoutError past it); None: wait for ever."""
        self._sock.settimeout(seconds)

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        if self._direct:
            self._sock.sendall(data)
            return
        with self._send:
            with self._ssl:
                self._obj.write(data)
                wire = self._out.read()
            self._sock.sendall(wire)

    def recv_into(self, buf: memoryview) -> int:
        """Up to len(buf) plaintext bytes; 0 at end of stream (close_notify or TCP EOF)."""
        if self._direct:
            return self._recv_direct(buf)
        want = len(buf)
        while True:
            got = 0
            with self._ssl:
                # Drain every record already received in one go: SSL_read returns one record
                # (16 KiB) per call, so a 1 MiB frame is 64 calls; one lock hold covers them.
                try:
                    while got < want:
                        n = int(self._obj.read(want - got, buf[got:]))  # a count when given a buffer
                        if n == 0:  # close_notify received
                            self._eof = True
                            break
                        got += n
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLZeroReturnError:
                    self._eof = True
                if got or self._eof:
                    return got
                pending = self._out.pending
            if pending:
                self._flush_from_reader()
            if self._eof:
                return 0
            n = self._sock.recv_into(self._rview)
            if n == 0:
                self._eof = True
                return 0
            with self._ssl:
                self._in.write(self._rview[:n])

    def _recv_direct(self, buf: memoryview) -> int:
        if self._leftover:
            n = min(len(buf), len(self._leftover))
            buf[:n] = self._leftover[:n]
            self._leftover = self._leftover[n:]
            return n
        return self._sock.recv_into(buf)

    def _flush_from_reader(self) -> None:
        # Reading can queue TLS output (a KeyUpdate reply). If a writer holds the send lock it
        # will carry these bytes with its next frame; never block the reader on it.
        if self._send.acquire(blocking=False):
            try:
                with self._ssl:
                    wire = self._out.read()
                if wire:
                    self._sock.sendall(wire)
            finally:
                self._send.release()

    # ---- identity and lifecycle ----

    def getpeercert(self, binary_form: bool = False) -> object:
        return self._obj.getpeercert(binary_form)

    def peer_cert_der(self) -> bytes | None:
        return self._obj.getpeercert(True)

    def version(self) -> str | None:
        return self._obj.version()

    def cipher(self) -> tuple[str, str, int] | None:
        return self._obj.cipher()

    def shutdown_write(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)

    def abort(self) -> None:
        """Unblock any thread stuck in send or receive (the connection is dead after this)."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def drain(self, timeout: float) -> None:
        """Read and drop raw bytes until the peer closes, so close() does not reset the connection
        while the peer still has our last frames unread."""
        if not self._eof:
            _drain_socket(self._sock, timeout)

    def close(self, grace: float = 0.0) -> None:
        """Tear down; everything sendall() returned for is already in the kernel."""
        self.abort()
        self._sock.close()

    def fileno(self) -> int:
        return self._sock.fileno()


def _drain_socket(sock: socket.socket, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    scratch = bytearray(65536)
    try:
        while (remaining := deadline - time.monotonic()) > 0:
            sock.settimeout(remaining)
            if sock.recv_into(scratch) == 0:
                return
    except OSError:
        return


async def connect_tls(
    host: str,
    port: int,
    context: ssl.SSLContext,
    *,
    server_hostname: str | None = None,
    handshake_timeout: float = _HANDSHAKE_TIMEOUT,
) -> TlsSocket:
    """Connect and complete the mTLS handshake (in a worker thread: it blocks)."""

    def run() -> TlsSocket:
        try:
            sock = socket.create_connection((host, port), timeout=handshake_timeout)
        except OSError as exc:
            raise StreamHandshakeError(f"cannot connect to {host}:{port}: {exc}") from exc
        try:
            return TlsSocket.handshake(
                sock, context, server_side=False, server_hostname=server_hostname or host, timeout=handshake_timeout
            )
        except BaseException:
            sock.close()
            raise

    return await asyncio.to_thread(run)


async def accept_tls(
    listener: socket.socket, context: ssl.SSLContext, *, handshake_timeout: float = _HANDSHAKE_TIMEOUT
) -> TlsSocket:
    """Accept one connection on a listening socket and complete the server side of mTLS."""
    listener.setblocking(False)
    sock, _ = await asyncio.get_running_loop().sock_accept(listener)

    def run() -> TlsSocket:
        try:
            return TlsSocket.handshake(sock, context, server_side=True, timeout=handshake_timeout)
        except BaseException:
            sock.close()
            raise

    return await asyncio.to_thread(run)
