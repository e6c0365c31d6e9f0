"""The migration stream: round trips over real mTLS sockets, and every kind of tampering detected.

Tampering is injected by a frame-aware TCP proxy between the two ends. TLS would reject any
altered byte before our framing saw it, so the tamper tests run the framing over plain TCP on
loopback; the round-trip tests prove the same code over mutual TLS (TlsSocket and asyncio TLS).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import ipaddress
import json
import os
import socket
import ssl
import stat
import threading
from array import array
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import lz4.frame
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.errors import DigestMismatch
from agent.metrics import AgentMetrics
from agent.stream import (
    AuthenticationFailed,
    Channel,
    Compression,
    Control,
    FileChunk,
    FileDigestMismatch,
    FileDone,
    FileSink,
    FileStart,
    MalformedFrame,
    Message,
    MigrationMismatch,
    OutOfOrderChunk,
    PageBatch,
    ReplayedChunk,
    StreamAborted,
    StreamClosed,
    StreamError,
    StreamHandshakeError,
    StreamIntegrityError,
    StreamOptions,
    StreamTotals,
    TlsSocket,
    TruncatedStream,
    UnexpectedKind,
    accept_receiver,
    accept_tls,
    connect_tls,
    establish,
    open_sender,
)
from agent.stream.buffers import BufferPool
from agent.stream.frames import (
    HEADER,
    HEADER_SIZE,
    PAGE_HEADER,
    PROTOCOL_VERSION,
    Kind,
    check_path,
    decode_pages,
    encode_file_begin,
    encode_pages_parts,
    find_zero_pages,
    migration_tag,
)
from agent.stream.seal import HeaderMask, Hello, SealedFrame, Sealer, decompress_chunk
from core.errors import InvalidRequest
from tests.harness.links import tcp_pair
from tests.harness.tls import CertAuthority

PAGE = 4096
MIB = 1 << 20


# ---- helpers: certificates, sockets, a tampering proxy ----


@dataclass
class Peer:
    cert: Path
    key: Path


def issue_peer(ca: CertAuthority, name: str) -> Peer:
    """An agent-style certificate: usable as TLS server and client (mutual TLS)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    cert_path, key_path = ca.directory / f"{name}.pem", ca.directory / f"{name}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return Peer(cert_path, key_path)


def mtls_contexts(ca: CertAuthority, server: Peer, client: Peer) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(server.cert, server.key)
    sctx.load_verify_locations(ca.cert_path)
    sctx.verify_mode = ssl.CERT_REQUIRED
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.load_cert_chain(client.cert, client.key)
    cctx.load_verify_locations(ca.cert_path)
    return sctx, cctx


@pytest.fixture(autouse=True)
async def no_leaked_threads() -> AsyncIterator[None]:
    """Every channel a test opens must take its threads down when closed."""
    yield
    for _ in range(100):
        left = [t.name for t in threading.enumerate() if t.name.startswith("stream-")]
        if not left:
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"stream threads still running after the test: {left}")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = CertAuthority(tmp_path_factory.mktemp("stream-ca"))
    return mtls_contexts(ca, issue_peer(ca, "target-host"), issue_peer(ca, "source-host"))


async def channels(
    a: object, b: object, migration: str = "mig-1", options: StreamOptions | None = None
) -> tuple[Channel, Channel]:
    return await asyncio.gather(
        open_sender(a, migration, "source-host", options=options),
        accept_receiver(b, migration, "target-host", options=options),
    )


class Cut(Exception):
    """Raised by a mutation: send `partial`, then close the connection towards the receiver."""

    def __init__(self, partial: bytes = b"") -> None:
        super().__init__("cut")
        self.partial = partial


Mutation = Callable[[int, bytes], list[bytes]]


class TamperProxy:
    """Forwards a TCP connection; frames from the sender pass through `mutate(ordinal, frame)`
    (ordinal 0 is the HELLO, then ordinal == sequence number) and may be dropped, repeated,
    held back, rewritten or cut. The other direction passes untouched."""

    def __init__(self, mutate: Mutation) -> None:
        self.sender_end, self._from_sender = tcp_pair()
        self._to_receiver, self.receiver_end = tcp_pair()
        self._mutate = mutate
        self._threads = [
            threading.Thread(target=self._forward, daemon=True),
            threading.Thread(target=self._backward, daemon=True),
        ]
        for t in self._threads:
            t.start()

    @staticmethod
    def _read(sock: socket.socket, n: int) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return bytes(buf)

    def _forward(self) -> None:
        ordinal = 0
        try:
            while True:
                header = self._read(self._from_sender, HEADER_SIZE)
                if header is None:
                    break
                length = HEADER.unpack(header)[5]
                payload = self._read(self._from_sender, length)
                if payload is None:
                    break
                try:
                    out = self._mutate(ordinal, header + payload)
                except Cut as cut:
                    self._to_receiver.sendall(cut.partial)
                    break
                for frame in out:
                    self._to_receiver.sendall(frame)
                ordinal += 1
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                self._to_receiver.shutdown(socket.SHUT_WR)

    def _backward(self) -> None:
        with contextlib.suppress(OSError):
            while data := self._to_receiver.recv(65536):
                self._from_sender.sendall(data)
        with contextlib.suppress(OSError):
            self._from_sender.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        for sock in (self._from_sender, self._to_receiver):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(5)
        for sock in (self._from_sender, self._to_receiver):
            sock.close()


@dataclass
class Outcome:
    received: list[Message] = field(default_factory=list)
    error: StreamError | None = None
    receiver: Channel | None = None


async def attack(mutate: Mutation, send: Callable[[Channel], Awaitable[None]]) -> Outcome:
    """Run `send` through a tampering proxy and collect what the receiver got until it failed."""
    proxy = TamperProxy(mutate)
    tx, rx = await channels(proxy.sender_end, proxy.receiver_end)
    outcome = Outcome(receiver=rx)

    async def sending() -> None:
        with contextlib.suppress(StreamError):
            await send(tx)

    async def receiving() -> None:
        try:
            async for msg in rx:
                outcome.received.append(msg)
        except StreamError as exc:
            outcome.error = exc

    try:
        async with asyncio.timeout(30):
            await asyncio.gather(sending(), receiving())
            if outcome.error is not None:
                # Sticky: the receiver never delivers anything after the first failure.
                with pytest.raises(type(outcome.error)):
                    await rx.receive()
    finally:
        await tx.close()
        await rx.close()
        await asyncio.to_thread(proxy.close)
    return outcome


async def six_controls(tx: Channel) -> None:
    for i in range(1, 7):
        await tx.send_control({"i": i})
    await tx.end()


def controls(*numbers: int) -> list[Message]:
    return [Control({"i": i}) for i in numbers]


def flip(frame: bytes, offset: int, mask: int = 0x01) -> bytes:
    out = bytearray(frame)
    out[offset] ^= mask
    return bytes(out)


def at(target: int, change: Callable[[bytes], list[bytes]]) -> Mutation:
    def mutate(ordinal: int, frame: bytes) -> list[bytes]:
        return change(frame) if ordinal == target else [frame]

    return mutate


def random_pages(n: int) -> bytes:
    return os.urandom(n * PAGE)


# ---- round trips ----


def file_set() -> dict[str, bytes]:
    text = b"".join(b"line %d: the quick brown fox jumps over the lazy dog\n" % i for i in range(140_000))
    return {
        "pages-1.img": os.urandom(5 * MIB + 123),  # incompressible, not a whole chunk
        "logs/text.img": text,  # compressible, ~7 MiB
        "core-1.img": os.urandom(1000),
        "empty.img": b"",
    }


async def round_trip(tx: Channel, rx: Channel, tmp: Path) -> None:
    files = file_set()
    numbers = array("Q", range(1000, 1000 + 600))
    pages = bytearray(random_pages(600))
    zero_idx = [0, 1, 2, 77, 300, 301, 599]
    for i in zero_idx:
        pages[i * PAGE : (i + 1) * PAGE] = bytes(PAGE)
    # A page that is zero except in its middle must not be taken for a zero page.
    pages[10 * PAGE : 11 * PAGE] = bytes(2000) + b"x" + bytes(PAGE - 2001)
    known_zero = array("Q", [5_000_000, 5_000_001])

    async def source() -> dict[str, FileDone]:
        await tx.send_control({"type": "begin", "files": len(files)})
        sent = {}
        for name, data in files.items():
            sent[name] = await tx.send_file(data, name)
            await tx.send_control({"type": "progress", "file": name})
        await tx.send_pages(numbers, pages, known_zero)
        await tx.end()
        reply = await tx.recv()
        assert reply == Control({"type": "ack", "files": len(files)})
        assert await tx.recv() is None
        return sent

    async def target() -> tuple[list[Message], dict[str, Path], list[PageBatch]]:
        sink = FileSink(tmp)
        seen: list[Message] = []
        written: dict[str, Path] = {}
        batches: list[PageBatch] = []
        async for msg in rx.recv():
            if not isinstance(msg, FileChunk):
                seen.append(msg)
            if isinstance(msg, PageBatch):
                batches.append(msg)
            done = await sink.feed(msg)
            if done is not None:
                written[done.name] = done.path
        await rx.send_control({"type": "ack", "files": len(written)})
        await rx.end()
        return seen, written, batches

    async with asyncio.timeout(60):
        sent, (seen, written, batches) = await asyncio.gather(source(), target())

    # Files: intact on disk, SHA-256 as sent, in order with the control messages around them.
    for name, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        assert sent[name] == FileDone(name, len(data), digest)
        assert written[name].read_bytes() == data
        assert written[name] == tmp / name
    starts = [m for m in seen if isinstance(m, FileStart)]
    assert [s.path for s in starts] == list(files)
    assert seen[0] == Control({"type": "begin", "files": 4})
    assert [m for m in seen if isinstance(m, FileDone)] == list(sent.values())

    # Pages: every page back at its number, zero pages only as numbers.
    got: dict[int, bytes] = {}
    zeros: list[int] = []
    for batch in batches:
        for i, number in enumerate(batch.pages):
            got[number] = bytes(batch.page(i))
        zeros.extend(batch.zero_pages)
    expected_zero = [numbers[i] for i in zero_idx] + list(known_zero)
    assert sorted(zeros) == sorted(expected_zero)
    for i, number in enumerate(numbers):
        if i not in zero_idx:
            assert got[number] == pages[i * PAGE : (i + 1) * PAGE]
    assert len(got) == len(numbers) - len(zero_idx)

    # Counters agree on both sides, and compression paid off for the text file only.
    assert tx.sent.frames == rx.received.frames
    assert tx.sent.wire_bytes == rx.received.wire_bytes
    assert tx.sent.payload_bytes == rx.received.payload_bytes
    assert rx.received.files == len(files)
    assert rx.received.zero_pages == len(expected_zero)
    assert rx.received.pages == len(numbers) - len(zero_idx)
    assert 0 < tx.sent.compressed_frames < tx.sent.frames
    assert tx.sent.file_bytes == sum(len(d) for d in files.values())
    assert tx.bytes_wire < tx.bytes_raw  # the text file shrank more than headers and tags added


async def test_round_trip_over_mtls(pki: tuple[ssl.SSLContext, ssl.SSLContext], tmp_path: Path) -> None:
    sctx, cctx = pki
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    try:
        server_tls, client_tls = await asyncio.gather(
            accept_tls(listener, sctx), connect_tls("127.0.0.1", port, cctx, server_hostname="target-host")
        )
    finally:
        listener.close()
    assert client_tls.version() == "TLSv1.3"
    tx, rx = await asyncio.gather(
        establish(client_tls, "mig-tls", "source-host", initiator=True, expected_peer="target-host"),
        establish(server_tls, "mig-tls", "target-host", initiator=False, expected_peer="source-host"),
    )
    try:
        assert tx.direct and rx.direct and client_tls.direct and server_tls.direct
        assert rx.peer_host == "source-host" and tx.peer_host == "target-host"
        peer_cert = x509.load_der_x509_certificate(rx.peer_cert_der or b"")
        assert peer_cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "source-host"
        await round_trip(tx, rx, tmp_path)
    finally:
        await asyncio.gather(tx.close(), rx.close())


async def test_round_trip_over_asyncio_tls(pki: tuple[ssl.SSLContext, ssl.SSLContext], tmp_path: Path) -> None:
    """The same stream over an asyncio (StreamReader, StreamWriter) pair with asyncio's TLS."""
    sctx, cctx = pki
    accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accepted.put((reader, writer))

    server = await asyncio.start_server(on_client, "127.0.0.1", 0, ssl=sctx)
    port = server.sockets[0].getsockname()[1]
    try:
        client = await asyncio.open_connection("127.0.0.1", port, ssl=cctx, server_hostname="target-host")
        tx, rx = await channels(client, await accepted.get(), "mig-asyncio")
        try:
            assert not tx.direct and not rx.direct  # asyncio's TLS keeps its records
            assert rx.peer_cert_der is not None
            await round_trip(tx, rx, tmp_path)
        finally:
            await asyncio.gather(tx.close(), rx.close())
    finally:
        server.close()
        await server.wait_closed()


async def test_plain_ssl_socket_works(pki: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    """An already-wrapped ssl.SSLSocket is accepted too (slower, but correct)."""
    sctx, cctx = pki
    a, b = tcp_pair()
    client, server = await asyncio.gather(
        asyncio.to_thread(cctx.wrap_socket, a, server_hostname="target-host"),
        asyncio.to_thread(sctx.wrap_socket, b, server_side=True),
    )
    tx, rx = await channels(client, server, "mig-sslsocket")
    try:
        data = os.urandom(3 * MIB)
        send = asyncio.ensure_future(tx.send_file(data, "f.img"))
        got = bytearray()
        async for msg in rx:
            if isinstance(msg, FileChunk):
                got += msg.data
            if isinstance(msg, FileDone):
                break
        await send
        assert got == data
    finally:
        await asyncio.gather(tx.close(), rx.close())


class WireTap:
    """A TCP forwarder between a TLS client and server: records the client's bytes and can flip one."""

    def __init__(self, flip_at: int | None = None) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.upstream = socket.create_server(("127.0.0.1", 0))
        self.captured = bytearray()
        self._flip_at = flip_at
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []

    def start(self) -> None:
        self._threads.append(threading.Thread(target=self._run, daemon=True))
        self._threads[0].start()

    def _run(self) -> None:
        client, _ = self.listener.accept()
        server = socket.create_connection(self.upstream.getsockname())
        self._socks += [client, server]
        back = threading.Thread(target=self._pump, args=(server, client, False), daemon=True)
        back.start()
        self._threads.append(back)
        self._pump(client, server, True)

    def _pump(self, src: socket.socket, dst: socket.socket, tap: bool) -> None:
        with contextlib.suppress(OSError):
            while data := bytearray(src.recv(65536)):
                if tap:
                    at = self._flip_at
                    if at is not None and len(self.captured) <= at < len(self.captured) + len(data):
                        data[at - len(self.captured)] ^= 0x04
                    self.captured += data
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        for sock in self._socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(5)
        for sock in (*self._socks, self.listener, self.upstream):
            sock.close()


async def tapped_channels(
    pki: tuple[ssl.SSLContext, ssl.SSLContext], tap: WireTap, migration: str, receiver: StreamOptions
) -> tuple[Channel, Channel]:
    sctx, cctx = pki
    tap.start()
    server_tls, client_tls = await asyncio.gather(
        accept_tls(tap.upstream, sctx), connect_tls("127.0.0.1", tap.port, cctx, server_hostname="target-host")
    )
    sender = StreamOptions(compression=Compression.NEVER)
    return await asyncio.gather(
        establish(client_tls, migration, "source-host", initiator=True, options=sender),
        establish(server_tls, migration, "target-host", initiator=False, options=receiver),
    )


@pytest.mark.parametrize("leave_tls", [True, False], ids=["direct-frames", "tls-records-kept"])
async def test_nothing_readable_on_the_wire(pki: tuple[ssl.SSLContext, ssl.SSLContext], leave_tls: bool) -> None:
    """Direct frames (the default) and frames inside TLS records both leave no clear payload and no
    clear header: the migration tag, a kind+flags pair or a sequence number would show up here."""
    tap = WireTap()
    marker = "plain-text-marker-" + os.urandom(8).hex()
    try:
        tx, rx = await tapped_channels(pki, tap, "mig-wire", StreamOptions(leave_tls=leave_tls))
        try:
            assert tx.direct is rx.direct is leave_tls  # one side declining keeps TLS records for both
            for _ in range(3):
                await tx.send_control({"type": "note", "text": marker})
            await tx.send_file(marker.encode() * 1000, "m.txt")
            await tx.end()
            got = [m async for m in rx]
            assert sum(isinstance(m, Control) and m.body.get("text") == marker for m in got) == 3
        finally:
            await asyncio.gather(tx.close(), rx.close())
    finally:
        tap.close()
    wire = bytes(tap.captured)
    assert len(wire) > 1000 * len(marker)
    assert marker.encode() not in wire
    assert migration_tag("mig-wire") not in wire
    assert HEADER.pack(1, Kind.CONTROL, 0, migration_tag("mig-wire"), 1, 0)[:4] not in wire


async def test_flipped_byte_in_direct_frames(pki: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    """A bit flipped on the wire after TLS has been left is caught by the frame AEAD, not by TLS."""
    tap = WireTap(flip_at=600_000)  # inside the file's first 1 MiB frame: far past TLS and HELLO
    try:
        tx, rx = await tapped_channels(pki, tap, "mig-flip", StreamOptions())
        try:
            assert tx.direct and rx.direct
            await tx.send_control({"type": "before"})
            send = asyncio.ensure_future(tx.send_file(os.urandom(2 * MIB), "f.img"))
            got: list[Message] = []
            with pytest.raises(AuthenticationFailed, match="authentication failed for FILE_DATA"):
                async for msg in rx:
                    got.append(msg)
            assert [m for m in got if isinstance(m, Control)] == [Control({"type": "before"})]
            assert not any(isinstance(m, FileChunk | FileDone) for m in got)
            send.cancel()
            with contextlib.suppress(asyncio.CancelledError, StreamError):
                await send
        finally:
            await asyncio.gather(tx.close(), rx.close())
    finally:
        tap.close()


def test_header_mask_round_trip_and_sample_binding() -> None:
    mask = HeaderMask(os.urandom(32))
    clear = HEADER.pack(1, Kind.PAGES, 0, migration_tag("m"), 7, 4096 + 16)
    sample = os.urandom(16)
    masked = bytearray(clear)
    mask.apply(masked, sample)
    assert masked != bytearray(clear) and clear[4:20] not in masked
    back = bytearray(masked)
    mask.apply(back, sample)
    assert back == bytearray(clear)
    other = bytearray(masked)
    mask.apply(other, bytes([sample[0] ^ 1]) + sample[1:])  # a flipped sample bit: a wholly different header
    assert sum(a != b for a, b in zip(other, clear, strict=True)) > 16


async def test_untrusted_client_certificate_is_refused(
    pki: tuple[ssl.SSLContext, ssl.SSLContext], tmp_path: Path
) -> None:
    sctx, _ = pki
    stranger_ca = CertAuthority(tmp_path / "stranger")
    _, stranger_ctx = mtls_contexts(stranger_ca, issue_peer(stranger_ca, "x"), issue_peer(stranger_ca, "y"))
    stranger_ctx.check_hostname = False
    stranger_ctx.verify_mode = ssl.CERT_NONE  # it does not even check us: the server must refuse it
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        results = await asyncio.gather(
            accept_tls(listener, sctx),
            connect_tls("127.0.0.1", listener.getsockname()[1], stranger_ctx),
            return_exceptions=True,
        )
    finally:
        listener.close()
    assert isinstance(results[0], StreamHandshakeError)
    for r in results:
        if isinstance(r, TlsSocket):
            r.close()


async def test_duplex_and_interleaved_sends() -> None:
    """Both sides send at once; control messages interleave with a file, order kept per side."""
    a, b = tcp_pair()
    tx, rx = await channels(a, b, options=StreamOptions(chunk_size=64 << 10, depth=3))
    data = os.urandom(2 * MIB)

    async def side(ch: Channel, label: str) -> list[Message]:
        async def sends() -> None:
            await asyncio.gather(ch.send_file(data, f"{label}.img"), *(ch.send_control({"n": i}) for i in range(20)))
            await ch.end()

        got: list[Message] = []

        async def receives() -> None:
            async for msg in ch:
                got.append(msg)

        await asyncio.gather(sends(), receives())
        return got

    try:
        async with asyncio.timeout(30):
            got_tx, got_rx = await asyncio.gather(side(tx, "a"), side(rx, "b"))
    finally:
        await asyncio.gather(tx.close(), rx.close())
    for got, name in ((got_rx, "a.img"), (got_tx, "b.img")):
        assert [m.body["n"] for m in got if isinstance(m, Control)] == list(range(20))
        assert b"".join(bytes(m.data) for m in got if isinstance(m, FileChunk)) == data
        assert [m.path for m in got if isinstance(m, FileDone)] == [name]


async def test_endpoint_totals_move_with_every_frame_of_every_channel() -> None:
    """Channels given one StreamTotals add their frames there as they go: the agent's
    ferryman_stream_bytes_total reads it at scrape time, mid-transfer included."""
    metrics = AgentMetrics()
    sample = metrics.registry.get_sample_value
    peer_totals = StreamTotals()
    opened: list[Channel] = []
    data = os.urandom(2 * MIB)
    try:
        for migration in ("mig-1", "mig-2"):
            a, b = tcp_pair()
            tx, rx = await asyncio.gather(
                establish(a, migration, "source-host", initiator=True, totals=metrics.streams),
                establish(b, migration, "target-host", initiator=False, totals=peer_totals),
            )
            opened += (tx, rx)
            async with asyncio.timeout(30):
                await tx.send_file(data, "a.img")
                first = await rx.receive()
                while not isinstance(first, FileChunk):
                    first = await rx.receive()
                assert (sample("ferryman_stream_bytes_total", {"direction": "sent", "kind": "wire"}) or 0) > 0
                await tx.end()
                async for _ in rx:
                    pass
    finally:
        await asyncio.gather(*(ch.close() for ch in opened))
    sources, targets = opened[0::2], opened[1::2]
    for direction, kind, counted in (
        ("sent", "payload", sum(ch.sent.payload_bytes for ch in sources)),
        ("sent", "wire", sum(ch.sent.wire_bytes for ch in sources)),
        ("received", "wire", sum(ch.received.wire_bytes for ch in sources)),
    ):
        assert sample("ferryman_stream_bytes_total", {"direction": direction, "kind": kind}) == counted
    assert metrics.streams.sent.payload_bytes > 2 * len(data)  # both files, and their control frames
    assert peer_totals.received.wire_bytes == sum(ch.received.wire_bytes for ch in targets)
    assert peer_totals.received.frames == sum(ch.received.frames for ch in targets)
    assert peer_totals.sent.wire_bytes == metrics.streams.received.wire_bytes  # what the targets sent back


async def test_send_file_from_path_and_async_iterable(tmp_path: Path) -> None:
    src = tmp_path / "in.img"
    src.write_bytes(os.urandom(3 * MIB + 7))
    src.chmod(0o640)
    a, b = tcp_pair()
    tx, rx = await channels(a, b)

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(100):
            yield bytes([i]) * 50_000

    async def send() -> None:
        await tx.send_file(src, "one.img")
        await tx.send_file(pieces(), "two.img", 5_000_000)
        await tx.end()

    try:
        async with asyncio.timeout(30):
            sink = FileSink(tmp_path / "out")
            done = []

            async def recv() -> None:
                async for msg in rx:
                    if isinstance(msg, FileStart) and msg.path == "one.img":
                        assert msg.mode == 0o640 and msg.size == 3 * MIB + 7
                    if (r := await sink.feed(msg)) is not None:
                        done.append(r)

            await asyncio.gather(send(), recv())
    finally:
        await asyncio.gather(tx.close(), rx.close())
    assert (tmp_path / "out" / "one.img").read_bytes() == src.read_bytes()
    assert (tmp_path / "out" / "one.img").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "out" / "two.img").read_bytes() == b"".join(bytes([i]) * 50_000 for i in range(100))
    assert [r.name for r in done] == ["one.img", "two.img"]


async def test_receive_is_cancellation_safe() -> None:
    a, b = tcp_pair()
    tx, rx = await channels(a, b)
    try:

        async def slow_sender() -> None:
            for i in range(30):
                await tx.send_control({"i": i})
                await asyncio.sleep(0.003)
            await tx.end()

        sender = asyncio.ensure_future(slow_sender())
        got = []
        while True:
            try:
                msg = await asyncio.wait_for(rx.receive(), 0.002)
            except TimeoutError:
                continue
            if msg is None:
                break
            got.append(msg)
        await sender
        assert got == [Control({"i": i}) for i in range(30)]
    finally:
        await asyncio.gather(tx.close(), rx.close())


async def test_abort_reaches_the_peer() -> None:
    a, b = tcp_pair()
    tx, rx = await channels(a, b)
    await tx.send_control({"i": 1})
    await tx.abort("disk full on source", code="source_failed")
    try:
        assert await rx.receive() == Control({"i": 1})
        with pytest.raises(StreamAborted) as info:
            await rx.receive()
        assert info.value.reason == "disk full on source" and info.value.peer_code == "source_failed"
        with pytest.raises(StreamAborted):
            await rx.receive()
    finally:
        await rx.close()


# ---- handshake refusals ----


async def test_handshake_refusals() -> None:
    a, b = tcp_pair()
    results = await asyncio.gather(
        establish(a, "mig-a", "src", initiator=True),
        establish(b, "mig-b", "dst", initiator=False),
        return_exceptions=True,
    )
    assert all(isinstance(r, StreamHandshakeError) for r in results), results
    assert "migration" in str(results[0])

    a, b = tcp_pair()
    results = await asyncio.gather(
        establish(a, "m", "src", initiator=True), establish(b, "m", "dst", initiator=True), return_exceptions=True
    )
    assert all(isinstance(r, StreamHandshakeError) for r in results), results

    a, b = tcp_pair()
    results = await asyncio.gather(
        establish(a, "m", "src", initiator=True, expected_peer="someone-else"),
        establish(b, "m", "dst", initiator=False),
        return_exceptions=True,
    )
    assert isinstance(results[0], StreamHandshakeError)
    for r in results:
        if isinstance(r, Channel):
            await r.close()

    a, b = tcp_pair()
    b.close()  # nobody there: the HELLO exchange fails, it does not hang
    with pytest.raises(StreamHandshakeError):
        await establish(a, "m", "src", initiator=True, options=StreamOptions(handshake_timeout=5))


# ---- tampering: every attack detected, nothing delivered after it ----


async def test_reordered_chunk() -> None:
    held: list[bytes] = []

    def swap_3_and_4(ordinal: int, frame: bytes) -> list[bytes]:
        if ordinal == 3:
            held.append(frame)
            return []
        if ordinal == 4:
            return [frame, *held]
        return [frame]

    out = await attack(swap_3_and_4, six_controls)
    assert isinstance(out.error, OutOfOrderChunk)
    assert (out.error.expected, out.error.got) == (3, 4)
    assert "out of order" in str(out.error)
    assert out.received == controls(1, 2)


async def test_replayed_chunk() -> None:
    out = await attack(at(2, lambda f: [f, f]), six_controls)
    assert isinstance(out.error, ReplayedChunk)
    assert "replayed" in str(out.error) and out.error.code == "stream_integrity"
    assert out.received == controls(1, 2)


async def test_dropped_chunk() -> None:
    out = await attack(at(3, lambda f: []), six_controls)
    assert isinstance(out.error, OutOfOrderChunk)
    assert out.received == controls(1, 2)


async def test_truncated_mid_frame() -> None:
    def cut(frame: bytes) -> list[bytes]:
        raise Cut(frame[: HEADER_SIZE + 5])

    out = await attack(at(3, cut), six_controls)
    assert isinstance(out.error, TruncatedStream)
    assert "mid-frame" in str(out.error)
    assert out.received == controls(1, 2)


async def test_truncated_in_header() -> None:
    def cut(frame: bytes) -> list[bytes]:
        raise Cut(frame[:10])

    out = await attack(at(3, cut), six_controls)
    assert isinstance(out.error, TruncatedStream)
    assert out.received == controls(1, 2)


async def test_closed_before_end() -> None:
    def cut(frame: bytes) -> list[bytes]:
        raise Cut()

    out = await attack(at(7, cut), six_controls)  # frame 7 is END
    assert isinstance(out.error, TruncatedStream)
    assert "before the peer's END" in str(out.error)
    assert out.received == controls(1, 2, 3, 4, 5, 6)


async def test_flipped_payload_bit() -> None:
    out = await attack(at(3, lambda f: [flip(f, HEADER_SIZE + 2)]), six_controls)
    assert isinstance(out.error, AuthenticationFailed)
    assert "authentication failed" in str(out.error)
    assert out.received == controls(1, 2)


async def test_flipped_tag_bit() -> None:
    out = await attack(at(3, lambda f: [flip(f, len(f) - 1, 0x80)]), six_controls)
    assert isinstance(out.error, AuthenticationFailed)
    assert out.received == controls(1, 2)


async def test_flipped_kind_bit_to_another_known_kind() -> None:
    # CONTROL (0x10) -> PAGES (0x30): a valid kind, but the header is authenticated data.
    out = await attack(at(3, lambda f: [flip(f, 1, 0x20)]), six_controls)
    assert isinstance(out.error, AuthenticationFailed)
    assert out.received == controls(1, 2)


async def test_flipped_kind_bit_to_unknown_kind() -> None:
    out = await attack(at(3, lambda f: [flip(f, 1, 0x40)]), six_controls)
    assert isinstance(out.error, UnexpectedKind)
    assert "unexpected" in str(out.error)
    assert out.received == controls(1, 2)


async def test_flipped_sequence_bit() -> None:
    out = await attack(at(3, lambda f: [flip(f, 27, 0x01)]), six_controls)  # seq 3 -> 2
    assert isinstance(out.error, ReplayedChunk)
    out = await attack(at(3, lambda f: [flip(f, 27, 0x08)]), six_controls)  # seq 3 -> 11
    assert isinstance(out.error, OutOfOrderChunk)
    assert out.received == controls(1, 2)


async def test_flipped_flag_bits() -> None:
    out = await attack(at(3, lambda f: [flip(f, 3, 0x01)]), six_controls)  # COMPRESSED
    assert isinstance(out.error, AuthenticationFailed)
    out = await attack(at(3, lambda f: [flip(f, 2, 0x80)]), six_controls)  # an undefined flag
    assert isinstance(out.error, MalformedFrame)
    assert out.received == controls(1, 2)


async def test_flipped_version_and_length() -> None:
    out = await attack(at(3, lambda f: [flip(f, 0, 0x02)]), six_controls)
    assert isinstance(out.error, MalformedFrame)
    out = await attack(at(3, lambda f: [flip(f, 28, 0x40)]), six_controls)  # length + 1 GiB
    assert isinstance(out.error, MalformedFrame)
    assert out.received == controls(1, 2)


def forged(migration: str, seq: int, tag: bytes | None = None) -> bytes:
    """A well-formed CONTROL frame sealed with another migration's key."""
    sealer = Sealer(os.urandom(32), True, tag or migration_tag(migration), Compression.NEVER, None)
    frame = sealer.seal(Kind.CONTROL, seq, json.dumps({"i": 99}).encode())
    return bytes(frame.view)


async def test_chunk_from_another_migration() -> None:
    out = await attack(at(3, lambda f: [forged("mig-2", 3)]), six_controls)
    assert isinstance(out.error, MigrationMismatch)
    assert out.received == controls(1, 2)


async def test_chunk_with_our_header_but_another_key() -> None:
    out = await attack(at(3, lambda f: [forged("mig-2", 3, tag=migration_tag("mig-1"))]), six_controls)
    assert isinstance(out.error, AuthenticationFailed)
    assert out.received == controls(1, 2)


async def test_altered_hello_breaks_the_keys() -> None:
    """A HELLO changed on the way (here: the sender's public key) yields keys that do not match."""

    def other_key(frame: bytes) -> list[bytes]:
        hello = json.loads(frame[HEADER_SIZE:])
        hello["x25519"] = "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE="  # 32 bytes of 'A'
        payload = json.dumps(hello).encode()
        header = HEADER.pack(*HEADER.unpack(frame[:HEADER_SIZE])[:5], len(payload))
        return [header + payload]

    out = await attack(at(0, other_key), six_controls)
    assert isinstance(out.error, AuthenticationFailed)
    assert out.received == []


async def test_file_digest_mismatch(tmp_path: Path) -> None:
    data = os.urandom(3 * MIB)
    wrong = hashlib.sha256(b"something else").hexdigest()

    async def send(tx: Channel) -> None:
        await tx.send_file(data, "pages-1.img", sha256=wrong)
        await tx.end()

    out = await attack(lambda i, f: [f], send)
    assert isinstance(out.error, FileDigestMismatch)
    assert isinstance(out.error, DigestMismatch) and out.error.code == "stream_integrity"
    assert out.error.path == "pages-1.img" and out.error.expected == wrong
    assert out.error.actual == hashlib.sha256(data).hexdigest()
    assert not any(isinstance(m, FileDone) for m in out.received)

    # A sink fed the same messages leaves nothing behind once discarded.
    sink = FileSink(tmp_path)
    for msg in out.received:
        await sink.feed(msg)
    await sink.discard()
    assert list(tmp_path.iterdir()) == [] or all(p.is_dir() for p in tmp_path.iterdir())


async def test_altered_file_chunk_is_caught_by_the_aead_first() -> None:
    data = os.urandom(3 * MIB)

    async def send(tx: Channel) -> None:
        await tx.send_file(data, "f.img")
        await tx.end()

    out = await attack(at(3, lambda f: [flip(f, HEADER_SIZE + 1000)]), send)  # the second FILE_DATA
    assert isinstance(out.error, AuthenticationFailed)
    assert [type(m) for m in out.received] == [FileStart, FileChunk]


async def test_protocol_state_violations() -> None:
    """Authentic frames in the wrong order: data outside a file, END inside one."""

    async def data_outside_file(tx: Channel) -> None:
        await tx._submit(Kind.FILE_DATA, tx._seal_bytes(Kind.FILE_DATA, b"stray"))
        await tx.end()

    out = await attack(lambda i, f: [f], data_outside_file)
    assert isinstance(out.error, UnexpectedKind)

    async def end_inside_file(tx: Channel) -> None:
        begin = encode_file_begin("half.img", 10, 0o644, None)
        await tx._submit(Kind.FILE_BEGIN, tx._seal_bytes(Kind.FILE_BEGIN, begin))
        await tx._submit(Kind.FILE_DATA, tx._seal_bytes(Kind.FILE_DATA, b"12345"))
        await tx.end()

    out = await attack(lambda i, f: [f], end_inside_file)
    assert isinstance(out.error, TruncatedStream)
    assert "inside half.img" in str(out.error)
    assert [type(m) for m in out.received] == [FileStart, FileChunk]

    async def reserved_kind(tx: Channel) -> None:
        await tx._submit(Kind.PAGE_REQUEST, tx._seal_bytes(Kind.PAGE_REQUEST, b"\x00" * 8))
        await tx.end()

    out = await attack(lambda i, f: [f], reserved_kind)
    assert isinstance(out.error, UnexpectedKind)
    assert "reserved" in str(out.error)


async def test_optional_unknown_kind_is_skipped() -> None:
    """Forward compatibility: an authentic OPTIONAL frame of a kind we do not know is ignored."""

    async def send(tx: Channel) -> None:
        await tx.send_control({"i": 1})

        def job(seq: int) -> SealedFrame:
            return tx._sealer.seal(0x7A, seq, b"future", optional=True)

        await tx._submit(Kind.CONTROL, job)
        await tx.send_control({"i": 2})
        await tx.end()

    out = await attack(lambda i, f: [f], send)
    assert out.error is None
    assert out.received == controls(1, 2)


# ---- units: layouts and limits ----


async def test_received_data_kept_by_the_consumer_is_never_overwritten() -> None:
    """Received pages and file data are views of pooled buffers: a consumer that keeps them (whole
    batches, or only a slice of one page) must still read what was sent after many more frames
    have passed through the pool; a consumer that drops them lets the buffers be reused."""
    a, b = tcp_pair()
    options = StreamOptions(chunk_size=64 << 10, depth=2, workers=2)
    tx, rx = await channels(a, b, options=options)
    batches = [os.urandom(64 << 10) for _ in range(40)]  # far more frames than the pool keeps
    file_data = os.urandom(1 << 20)
    kept: list[tuple[bytes, memoryview]] = []  # (expected, the view the consumer kept)
    chunks: list[FileChunk] = []

    async def send() -> None:
        for i, data in enumerate(batches):
            await tx.send_pages(range(i * 16, (i + 1) * 16), data)
        await tx.send_file(file_data, "kept.img")
        await tx.end()

    async def receive() -> None:
        n = 0
        async for msg in rx:
            if isinstance(msg, PageBatch):
                if n % 3 == 0:
                    kept.append((batches[n], msg.data))  # the whole batch
                elif n % 3 == 1:
                    kept.append((batches[n][PAGE : 2 * PAGE], msg.page(1)))  # one page of it
                # n % 3 == 2: dropped, so its buffer may be reused
                n += 1
            elif isinstance(msg, FileChunk):
                chunks.append(msg)

    try:
        async with asyncio.timeout(30):
            await asyncio.gather(send(), receive())
        await rx.end()
    finally:
        await asyncio.gather(tx.close(), rx.close())
    assert len(kept) == 27
    for expected, view in kept:
        assert bytes(view) == expected
    assert b"".join(bytes(c.data) for c in chunks) == file_data


def test_buffer_pool_reuses_a_lent_buffer_only_when_unreferenced() -> None:
    pool = BufferPool(4096, keep=4)
    lent = pool.acquire(4096)
    lent_id = id(lent)  # no name may keep it alive: the pool counts references
    view = memoryview(lent)[100:200]
    pool.lend(lent)
    del lent
    first = pool.acquire(4096)
    assert id(first) != lent_id  # a view of the lent buffer is still alive: a new buffer
    del view
    second = pool.acquire(4096)
    assert id(second) == lent_id  # no views left: reused
    # A consumer that keeps everything does not grow the pool's bookkeeping.
    kept = []
    for _ in range(10):
        buf = pool.acquire(4096)
        kept.append(memoryview(buf))
        pool.lend(buf)
    assert len(pool._lent) <= 4
    assert len({id(v.obj) for v in kept}) == 10


def test_pages_layout_and_zero_page_search() -> None:
    data = bytearray(os.urandom(4 * PAGE))
    data[PAGE : 2 * PAGE] = bytes(PAGE)
    data[3 * PAGE + 100] = 0  # not a zero page
    assert find_zero_pages(memoryview(data), PAGE) == [1]
    # all-zero first/last words but a non-zero middle
    data[2 * PAGE : 2 * PAGE + 8] = bytes(8)
    data[3 * PAGE - 8 : 3 * PAGE] = bytes(8)
    assert find_zero_pages(memoryview(data), PAGE) == [1]

    parts = encode_pages_parts(PAGE, array("Q", [7, 9, 1 << 40]), array("Q", [8]))
    payload = b"".join([*parts, data[:PAGE], data[2 * PAGE :]])
    batch = decode_pages(payload)
    assert list(batch.pages) == [7, 9, 1 << 40] and list(batch.zero_pages) == [8]
    assert bytes(batch.page(2)) == bytes(data[3 * PAGE :])
    assert batch.raw_size == 4 * PAGE
    with pytest.raises(MalformedFrame):
        decode_pages(payload[:-1])
    with pytest.raises(MalformedFrame):
        decode_pages(PAGE_HEADER.pack(1000, 0, 0, 0))


def test_paths_must_stay_inside() -> None:
    for ok in ("a.img", "dir/pages-1.img", "x..y"):
        assert check_path(ok) == ok
    for bad in ("", "/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a/", ".", "a\x00b", "x" * 2000):
        with pytest.raises(MalformedFrame):
            check_path(bad)


def test_decompression_is_bounded() -> None:
    bomb = lz4.frame.compress(bytes(8 * MIB), store_size=True)
    with pytest.raises(MalformedFrame):
        decompress_chunk(bomb, 4 * MIB)
    assert decompress_chunk(bomb, 8 * MIB) == bytes(8 * MIB)
    with pytest.raises(MalformedFrame):
        decompress_chunk(b"not lz4 at all", MIB)


def test_hello_rejects_garbage() -> None:
    for payload in (b"nope", b"[]", b'{"v":1}', json.dumps({"v": 1, "migration": "m", "host": "h"}).encode()):
        with pytest.raises(StreamHandshakeError):
            Hello.decode(payload)
    good = Hello("m", "h", True, os.urandom(32), 4 * MIB)
    assert Hello.decode(good.encode()) == good
    newer = Hello("m", "h", True, os.urandom(32), 4 * MIB, version=PROTOCOL_VERSION + 1)
    with pytest.raises(StreamHandshakeError, match="stream version"):
        Hello.decode(newer.encode())


def test_hello_announces_the_carried_protocols_and_reads_hellos_without_them() -> None:
    """`speaks` (the versions of the protocol inside the stream) is left out when empty, which is the
    HELLO of agents from before it; older agents read only the keys they know, so they ignore it."""
    key = os.urandom(32)
    speaking = Hello("m", "h", True, key, 4 * MIB, speaks=(1, 2))
    assert json.loads(speaking.encode())["speaks"] == [1, 2]
    assert Hello.decode(speaking.encode()) == speaking
    silent = Hello("m", "h", True, key, 4 * MIB)
    assert "speaks" not in json.loads(silent.encode())
    assert Hello.decode(silent.encode()).speaks == ()
    for bad in ("2", [0], [1, "2"], [True], list(range(1, 100))):
        wire = {**json.loads(silent.encode()), "speaks": bad}
        with pytest.raises(StreamHandshakeError, match="bad speaks"):
            Hello.decode(json.dumps(wire).encode())


async def test_received_files_keep_no_setuid_or_group_write(tmp_path: Path) -> None:
    sink = FileSink(tmp_path)
    data = b"#!/bin/sh\n"
    digest = hashlib.sha256(data).hexdigest()
    await sink.feed(FileStart("tool", len(data), 0o6777, digest))
    await sink.feed(FileChunk("tool", 0, data))
    done = await sink.feed(FileDone("tool", len(data), digest))
    assert done is not None
    assert stat.S_IMODE(done.path.stat().st_mode) == 0o755


def test_options_are_validated() -> None:
    with pytest.raises(InvalidRequest):
        StreamOptions(chunk_size=4 * MIB, max_frame=4 * MIB)
    with pytest.raises(InvalidRequest):
        StreamOptions(depth=0)


async def test_send_argument_checks() -> None:
    a, b = tcp_pair()
    tx, rx = await channels(a, b)
    try:
        with pytest.raises(InvalidRequest):
            await tx.send_file(b"x", "../escape")
        with pytest.raises(InvalidRequest):
            await tx.send_pages([1, 2], bytes(PAGE))
        with pytest.raises(InvalidRequest):
            await tx.send_pages([-1], bytes(PAGE))
        with pytest.raises(InvalidRequest):
            await tx.send_file(iter([b"x"]), "f.img")  # an iterable needs its size
        await tx.end()
        with pytest.raises(StreamClosed):
            await tx.send_control({"late": True})
    finally:
        await asyncio.gather(tx.close(), rx.close())


async def test_interrupted_file_fails_the_direction() -> None:
    """A file cut short on the sending side must not let later frames look like its content."""
    a, b = tcp_pair()
    tx, rx = await channels(a, b, options=StreamOptions(chunk_size=64 << 10, depth=1))
    try:
        send = asyncio.ensure_future(tx.send_file(os.urandom(8 * MIB), "big.img"))
        first = await rx.receive()
        assert isinstance(first, FileStart)
        send.cancel()
        with pytest.raises(asyncio.CancelledError):
            await send
        with pytest.raises(StreamClosed, match="interrupted"):
            await tx.send_control({"after": "cancel"})
    finally:
        await asyncio.gather(tx.close(), rx.close())


def test_integrity_errors_share_one_code() -> None:
    for cls in (OutOfOrderChunk, ReplayedChunk):
        assert cls("x", 1, 2).code == "stream_integrity"
    for cls2 in (AuthenticationFailed, TruncatedStream, UnexpectedKind, MalformedFrame, MigrationMismatch):
        err = cls2("x")
        assert isinstance(err, StreamIntegrityError) and err.code == "stream_integrity" and err.http_status == 502
