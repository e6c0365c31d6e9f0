"""Opening a channel: the HELLO exchange, key agreement and the switch out of TLS records.

Separate from channel.py because it runs before there is a channel (on the bare link, with its
own timeout and failure handling) and produces one: Channel only ever sees agreed keys.
"""

from __future__ import annotations

import asyncio
from typing import Any

from agent.stream.channel import Channel
from agent.stream.errors import StreamHandshakeError
from agent.stream.frames import HEADER_SIZE, MAX_HELLO, PROTOCOL_VERSION, Header, Kind, migration_tag
from agent.stream.links import make_link
from agent.stream.options import CHUNK_SLACK, StreamOptions, StreamTotals
from agent.stream.seal import Hello, KeyExchange, transcript_hash
from core.errors import InvalidRequest


async def establish(
    conn: object,
    migration_id: str,
    local_host: str,
    *,
    initiator: bool,
    expected_peer: str | None = None,
    options: StreamOptions | None = None,
    totals: StreamTotals | None = None,
) -> Channel:
    """Exchange HELLOs, agree on keys, and return the running channel.

    Both sides send their HELLO first and then read the peer's, so it does not matter who
    connected. `initiator` only decides which direction key is which: exactly one side must set it.
    `expected_peer`, if given, must equal the host the peer names in its HELLO (check it against
    the mTLS peer identity too). With `totals`, the channel adds its frames and bytes there as well.

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
    payload = Hello(
        migration_id, local_host, initiator, kx.public, opts.max_frame, direct=offer_direct, speaks=opts.speaks
    ).encode()
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
        if peer.max_frame < opts.chunk_size + CHUNK_SLACK:
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
    return Channel(
        link, migration_id, tag, local_host, peer, initiator, tx_keys, rx_keys, opts, direct=direct, totals=totals
    )


async def open_sender(conn: object, migration_id: str, local_host: str, **kwargs: Any) -> Channel:
    """The source side of a migration: the initiator of the key schedule."""
    return await establish(conn, migration_id, local_host, initiator=True, **kwargs)


async def accept_receiver(conn: object, migration_id: str, local_host: str, **kwargs: Any) -> Channel:
    """The target side of a migration."""
    return await establish(conn, migration_id, local_host, initiator=False, **kwargs)
