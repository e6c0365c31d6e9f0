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

This module holds what belongs to the channel as a whole: the buffers and threads both
directions share, the link, and the lifecycle (abort, close). The directions themselves are in
sender.py and receiver.py; establish() (handshake.py) makes the channel.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from agent.stream.buffers import BufferPool
from agent.stream.errors import StreamClosed, StreamError
from agent.stream.frames import HEADER_SIZE, TAG_SIZE, Kind, encode_abort
from agent.stream.links import Link
from agent.stream.options import CHUNK_SLACK, StreamOptions, StreamTotals
from agent.stream.receiver import Receiver
from agent.stream.seal import DirectionKeys, HeaderMask, Hello
from agent.stream.sender import Sender, TxState


class Channel(Sender, Receiver):
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
        totals: StreamTotals | None = None,
    ) -> None:
        self.migration_id = migration_id
        self.direct = direct
        """True when frames travel straight on TCP (masked headers), False when inside TLS or plain TCP."""
        self.local_host = local_host
        self.peer_host = peer.host
        self.peer_speaks = peer.speaks
        """The versions of the carried protocol the peer speaks (its HELLO's; empty from older agents)."""
        self.initiator = initiator
        self.options = opts
        self._link = link
        self._tag = tag
        self._loop = asyncio.get_running_loop()
        slots = 2 * (opts.depth + opts.workers + 2)
        frame_size = HEADER_SIZE + TAG_SIZE + 16 + opts.chunk_size + CHUNK_SLACK
        tx_pool = BufferPool(frame_size, slots) if link.pooled_writes else None
        rx_pool = BufferPool(frame_size, slots)
        self._workers = ThreadPoolExecutor(opts.workers, thread_name_prefix="stream-seal")
        self._init_sending(tx_keys, tx_pool, slots, peer.max_frame, totals.sent if totals else None)
        self._init_receiving(rx_keys, rx_pool, totals.received if totals else None)
        self._pools = [pool for pool in (tx_pool, rx_pool, self._read_pool) if pool is not None]
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

    # ---- lifecycle ----

    async def abort(self, reason: str, code: str = "aborted") -> None:
        """Tell the peer why we give up (best effort), then close."""
        if self._tx_state is TxState.OPEN and self._tx_error is None:
            try:
                async with asyncio.timeout(self.options.close_timeout):
                    await self._submit(Kind.ABORT, self._seal_bytes(Kind.ABORT, encode_abort(reason, code)))
                    self._tx_state = TxState.ABORTED
                    await self.flush()
            except (TimeoutError, StreamError):
                pass
        self._tx_state = TxState.ABORTED
        await self.close()

    async def close(self) -> None:
        """Release the connection and threads. Without a prior end(), the peer sees a truncated stream."""
        if self._closed:
            return
        self._closed = True
        clean = self._tx_state is TxState.ENDED and self._rx_ended
        if self._tx_state is TxState.OPEN:
            self._tx_state = TxState.CLOSED
        try:
            await self._link.close(drain=clean, grace=self.options.close_timeout)
        finally:
            self._rx_queue.put_nowait(StreamClosed("channel closed"))
            for pool in (self._workers, self._tx_serial, self._rx_serial):
                pool.shutdown(wait=False, cancel_futures=True)
            for buffers in self._pools:
                buffers.clear()

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
