"""Key agreement, per-direction AES-256-GCM sealing, and lz4 compression of chunks.

Key schedule (all primitives from `cryptography`):
  * each side makes an ephemeral X25519 key and sends its public half in HELLO (over mTLS);
  * shared = X25519(own private, peer public); an all-zero result is refused;
  * transcript = SHA-256(initiator HELLO frame || responder HELLO frame), so a HELLO altered on
    the way yields different keys and the first sealed frame fails authentication;
  * key(direction) = HKDF-SHA256(shared, salt=migration id, info=LABEL(direction) || transcript),
    32 bytes, one key for initiator->responder and another for responder->initiator.

Nonce rule: 4-byte direction prefix (1 = initiator->responder, 2 = responder->initiator) followed by
the frame's 64-bit sequence number. Sequence numbers only go up within a direction and every
direction has its own key, so a (key, nonce) pair is never used twice.

Header protection (only when the channel has left TLS records, see handshake.establish): a second
key per direction, HKDF with the label + " header", masks each sealed frame's 32-byte header with
AES-256-CTR keyed by it and started at the frame's first 16 ciphertext bytes (the scheme of QUIC,
RFC 9001 5.4). The header stays the AEAD's associated data, so a flipped header bit is still
caught; the mask only keeps kind, sequence, length and migration tag off the wire.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import lz4.block
import lz4.frame
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agent.stream.buffers import BufferPool
from agent.stream.errors import AuthenticationFailed, MalformedFrame, StreamHandshakeError
from agent.stream.frames import (
    HEADER_SIZE,
    MAX_HELLO,
    PROTOCOL_VERSION,
    TAG_SIZE,
    Flag,
    Header,
    Kind,
    decode_json,
    encode_json,
)

_LABELS = {
    True: b"ferryman-stream v1 initiator->responder",
    False: b"ferryman-stream v1 responder->initiator",
}
_PREFIX = {True: b"\x00\x00\x00\x01", False: b"\x00\x00\x00\x02"}
_SEQ = struct.Struct(">Q")

# Send a chunk compressed only when that saves at least 3%; below that the receiver's
# decompression costs more than the bytes saved.
COMPRESS_KEEP_RATIO = 0.97
# A chunk is probed with a few spread-out samples first, and compressed whole only when the
# samples save >= 10%. Random data (encrypted or already compressed memory) then costs a few
# small lz4 calls instead of a full pass that would be thrown away.
_PROBE_SAMPLES = 8
_PROBE_SIZE = 2048
_PROBE_MIN_CHUNK = 64 << 10
_PROBE_KEEP_RATIO = 0.9


class Compression(Enum):
    AUTO = "auto"  # probe, then compress if it pays
    ALWAYS = "always"  # compress every chunk (still sent raw if it does not shrink)
    NEVER = "never"


def nonce(initiator_to_responder: bool, seq: int) -> bytes:
    return _PREFIX[initiator_to_responder] + _SEQ.pack(seq)


# ---- HELLO and key agreement ----


@dataclass(frozen=True)
class Hello:
    migration_id: str
    host: str
    initiator: bool
    public_key: bytes
    max_frame: int
    version: int = PROTOCOL_VERSION
    direct: bool = False
    """This side can and wants to leave TLS records after the HELLOs (see handshake.establish)."""
    speaks: tuple[int, ...] = ()
    """The versions of the protocol inside the stream (a session kind's) that this side speaks; opaque
    to the stream. Left out when empty; agents from before it send none, and ignore it."""

    def encode(self) -> bytes:
        hello: dict[str, object] = {
            "v": self.version,
            "migration": self.migration_id,
            "host": self.host,
            "role": "initiator" if self.initiator else "responder",
            "x25519": base64.b64encode(self.public_key).decode(),
            "max_frame": self.max_frame,
            "direct": self.direct,
        }
        if self.speaks:
            hello["speaks"] = list(self.speaks)
        return encode_json(hello)

    @classmethod
    def decode(cls, payload: bytes) -> Hello:
        if len(payload) > MAX_HELLO:
            raise StreamHandshakeError(f"HELLO of {len(payload)} bytes is too large")
        try:
            obj = decode_json(payload, "HELLO")
        except MalformedFrame as exc:
            raise StreamHandshakeError(exc.message) from exc
        version, migration, host, role = obj.get("v"), obj.get("migration"), obj.get("host"), obj.get("role")
        max_frame = obj.get("max_frame")
        if not isinstance(version, int) or not isinstance(migration, str) or not isinstance(host, str):
            raise StreamHandshakeError("HELLO lacks version, migration or host")
        if version != PROTOCOL_VERSION:
            raise StreamHandshakeError(f"peer's HELLO speaks stream version {version}, we speak {PROTOCOL_VERSION}")
        if role not in ("initiator", "responder"):
            raise StreamHandshakeError(f"HELLO has bad role {role!r}")
        if not isinstance(max_frame, int) or max_frame < 64 << 10:
            raise StreamHandshakeError(f"HELLO has bad max_frame {max_frame!r}")
        try:
            public = base64.b64decode(str(obj.get("x25519")), validate=True)
        except ValueError as exc:
            raise StreamHandshakeError("HELLO public key is not base64") from exc
        if len(public) != 32:
            raise StreamHandshakeError("HELLO public key is not 32 bytes")
        direct = obj.get("direct", False)  # absent from older agents: they keep TLS records
        if not isinstance(direct, bool):
            raise StreamHandshakeError(f"HELLO has bad direct {direct!r}")
        speaks = obj.get("speaks", [])  # absent from older agents: they speak their kind's first version
        if not isinstance(speaks, list) or len(speaks) > 64 or not all(type(v) is int and v > 0 for v in speaks):
            raise StreamHandshakeError(f"HELLO has bad speaks {speaks!r}")
        return cls(migration, host, role == "initiator", public, max_frame, version, direct, tuple(speaks))


@dataclass(frozen=True)
class DirectionKeys:
    """One direction's keys: the AEAD key of its frames and the key that masks their headers."""

    aead: bytes
    header: bytes


class KeyExchange:
    """One side's ephemeral X25519 key; used once, then dropped with the channel."""

    def __init__(self) -> None:
        self._private = X25519PrivateKey.generate()
        self.public = self._private.public_key().public_bytes_raw()

    def derive(
        self, peer_public: bytes, migration_id: str, transcript: bytes, initiator: bool
    ) -> tuple[DirectionKeys, DirectionKeys]:
        """(send keys, receive keys) for this side."""
        try:
            shared = self._private.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError as exc:  # low-order point: all-zero shared secret
            raise StreamHandshakeError(f"key agreement failed: {exc}") from exc

        def hkdf(info: bytes) -> bytes:
            return HKDF(algorithm=hashes.SHA256(), length=32, salt=migration_id.encode(), info=info).derive(shared)

        keys = {
            direction: DirectionKeys(hkdf(label + transcript), hkdf(label + b" header" + transcript))
            for direction, label in _LABELS.items()
        }
        return keys[initiator], keys[not initiator]


SAMPLE_SIZE = 16  # ciphertext bytes that seed a header mask; every sealed payload has >= 16 (the tag)


class HeaderMask:
    """Masks and unmasks frame headers (XOR with AES-256-CTR keystream seeded by a ciphertext sample)."""

    def __init__(self, key: bytes) -> None:
        self._cipher = algorithms.AES(key)

    def apply(self, header: memoryview | bytearray, sample: bytes | memoryview) -> None:
        """XOR the mask into `header` in place: masks a clear header, unmasks a masked one."""
        mask = Cipher(self._cipher, modes.CTR(bytes(sample))).encryptor().update(bytes(HEADER_SIZE))
        header[:HEADER_SIZE] = (int.from_bytes(header[:HEADER_SIZE]) ^ int.from_bytes(mask)).to_bytes(HEADER_SIZE)


def transcript_hash(initiator_hello: bytes, responder_hello: bytes) -> bytes:
    return hashlib.sha256(initiator_hello + responder_hello).digest()


# ---- compression ----


def _probe_says_skip(plain: memoryview) -> bool:
    size = len(plain)
    step = size // _PROBE_SAMPLES
    sample = b"".join(plain[i * step : i * step + _PROBE_SIZE] for i in range(_PROBE_SAMPLES))
    return len(lz4.block.compress(sample, store_size=False)) >= _PROBE_KEEP_RATIO * len(sample)


def compress_worth_trying(plain: memoryview, policy: Compression) -> bool:
    if policy is Compression.NEVER or len(plain) < 256:
        return False
    return not (policy is Compression.AUTO and len(plain) >= _PROBE_MIN_CHUNK and _probe_says_skip(plain))


def compress_chunk(plain: memoryview) -> bytes | None:
    """lz4-frame bytes of `plain`, or None when that does not save enough to be worth it."""
    packed: bytes = lz4.frame.compress(plain, store_size=True, content_checksum=False)
    return packed if len(packed) < COMPRESS_KEEP_RATIO * len(plain) else None


def decompress_chunk(packed: bytes | memoryview, limit: int) -> bytes:
    try:
        size = lz4.frame.get_frame_info(packed).get("content_size")
    except RuntimeError as exc:
        raise MalformedFrame(f"compressed chunk has a bad lz4 frame header: {exc}") from exc
    if not isinstance(size, int) or not 0 < size <= limit:
        raise MalformedFrame(f"compressed chunk announces {size!r} bytes (limit {limit})")
    try:
        plain: bytes = lz4.frame.decompress(packed)
    except RuntimeError as exc:
        raise MalformedFrame(f"compressed chunk does not decompress: {exc}") from exc
    if len(plain) != size:
        raise MalformedFrame(f"compressed chunk gave {len(plain)} bytes, announced {size}")
    return plain


# ---- sealing ----


class SealedFrame:
    """A frame ready for the wire: header and ciphertext back to back in `view`."""

    __slots__ = ("_buf", "_pool", "compressed", "kind", "pages", "payload_len", "view", "wire_len", "zero_pages")

    def __init__(
        self,
        kind: int,
        view: memoryview,
        payload_len: int,
        compressed: bool,
        buf: bytearray | None,
        pool: BufferPool | None,
    ) -> None:
        self.kind = kind
        self.view = view
        self.wire_len = len(view)
        self.payload_len = payload_len
        self.compressed = compressed
        self.pages = 0
        self.zero_pages = 0
        self._buf = buf
        self._pool = pool

    def release(self) -> None:
        """Give a pooled buffer back once the bytes are written (never touch `view` after)."""
        if self._buf is not None and self._pool is not None:
            self.view.release()
            self._pool.release(self._buf)
        self._buf = None


Buffer = bytes | bytearray | memoryview


class Sealer:
    """Seals one direction's frames. Thread-safe: each call is independent given its `seq`."""

    def __init__(
        self,
        key: bytes,
        initiator_to_responder: bool,
        migration: bytes,
        compression: Compression,
        pool: BufferPool | None,
        mask: HeaderMask | None = None,
    ) -> None:
        self._key = key
        self._aead = AESGCM(key)
        self._direction = initiator_to_responder
        self._migration = migration
        self._compression = compression
        self._pool = pool
        self._mask = mask

    def seal(self, kind: int, seq: int, plain: Buffer | list[Buffer], optional: bool = False) -> SealedFrame:
        """One frame whose plaintext is `plain`, or the concatenation of its parts."""
        parts = [memoryview(p) for p in plain] if isinstance(plain, list) else [memoryview(plain)]
        size = sum(len(p) for p in parts)
        packed = None
        if kind in _COMPRESSIBLE:
            # Probe the largest part (the page or file data); join only what is worth compressing.
            largest = max(parts, key=len)
            if compress_worth_trying(largest, self._compression):
                packed = compress_chunk(memoryview(b"".join(parts)) if len(parts) > 1 else parts[0])
        body = [memoryview(packed)] if packed is not None else parts
        flags = (Flag.COMPRESSED if packed is not None else 0) | (Flag.OPTIONAL if optional else 0)
        length = sum(len(p) for p in body) + TAG_SIZE
        header = Header(PROTOCOL_VERSION, kind, int(flags), self._migration, seq, length).pack()
        total = HEADER_SIZE + length
        # +16: the incremental GCM API wants a block of room past each part it writes
        buf = self._pool.acquire(total + 16) if self._pool is not None else bytearray(total + 16)
        out = memoryview(buf)
        out[:HEADER_SIZE] = header
        iv = nonce(self._direction, seq)
        if len(body) == 1:
            self._aead.encrypt_into(iv, body[0], header, out[HEADER_SIZE:total])
        else:
            # Several parts (a page index, then runs of pages): encrypt them in sequence instead
            # of joining them first; the result is the same AES-GCM message.
            enc = Cipher(algorithms.AES(self._key), modes.GCM(iv)).encryptor()
            enc.authenticate_additional_data(header)
            offset = HEADER_SIZE
            for part in body:
                offset += enc.update_into(part, out[offset:])
            enc.finalize()
            out[offset : offset + TAG_SIZE] = enc.tag
        if self._mask is not None:
            self._mask.apply(out[:HEADER_SIZE], out[HEADER_SIZE : HEADER_SIZE + SAMPLE_SIZE])
        return SealedFrame(kind, out[:total], size, packed is not None, buf, self._pool)


# Kinds whose payloads can be large enough to be worth compressing.
_COMPRESSIBLE = frozenset({Kind.CONTROL, Kind.FILE_DATA, Kind.PAGES, Kind.PAGE_REPLY})


class Opener:
    """Verifies and decrypts one direction's frames. Thread-safe like Sealer."""

    def __init__(self, key: bytes, initiator_to_responder: bool, max_plain: int, pool: BufferPool | None) -> None:
        self._aead = AESGCM(key)
        self._direction = initiator_to_responder
        self._max_plain = max_plain
        self._pool = pool

    def open(
        self,
        header: Header,
        header_raw: bytes,
        payload: bytearray | bytes,
        payload_len: int,
        release: Callable[[], None],
    ) -> tuple[bytes | memoryview, bytearray | None]:
        """Plaintext of a frame whose header already passed the sequence checks.

        `payload[:payload_len]` is the ciphertext; `release` hands that buffer back once it is
        no longer read. Returns the plaintext and the pooled buffer it lives in (None when it is
        a bytes object of its own): the caller lends or releases that buffer.
        """
        ciphertext = memoryview(payload)[:payload_len]
        size = payload_len - TAG_SIZE
        iv = nonce(self._direction, header.seq)
        try:
            # Decrypt into a pooled buffer: a fresh 1 MiB result per frame faults its pages in
            # every time (the allocator hands trimmed memory back), which cost more than AES.
            scratch = self._pool.acquire(size) if self._pool is not None else bytearray(size)
            out = memoryview(scratch)[:size]
            try:
                self._aead.decrypt_into(iv, ciphertext, header_raw, out)
            except InvalidTag:
                self._give_back(scratch)
                raise _auth_failed(header) from None
            if not header.flags & Flag.COMPRESSED:
                # read-only, as the bytes it replaces were: the file hash may still be reading it
                return out.toreadonly(), scratch if self._pool is not None else None
            try:
                return decompress_chunk(out, self._max_plain), None
            finally:
                out.release()
                self._give_back(scratch)
        finally:
            ciphertext.release()
            release()

    def _give_back(self, buf: bytearray) -> None:
        if self._pool is not None:
            self._pool.release(buf)

    def give_back(self, buf: bytearray | None, lend: bool) -> None:
        """Return a plaintext buffer from open(): now, or (`lend`) once its views are all gone."""
        if buf is None or self._pool is None:
            return
        if lend:
            self._pool.lend(buf)
        else:
            self._pool.release(buf)


def _auth_failed(header: Header) -> AuthenticationFailed:
    return AuthenticationFailed(
        f"authentication failed for {header.kind_name()} frame #{header.seq}: payload or header altered, or wrong key"
    )
