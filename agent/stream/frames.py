"""Wire format of the migration stream: the frame header, message kinds and payload layouts.

Every frame is a fixed 32-byte header followed by `length` payload bytes:

    offset size field
    0      1    version      PROTOCOL_VERSION (1)
    1      1    kind         Kind
    2      2    flags        Flag bits; unknown bits are an error
    4      16   migration    SHA-256("ferryman-stream migration " + migration id)[:16]
    20     8    sequence     per direction: HELLO is 0, sealed frames count up from 1
    28     4    length       payload bytes (for sealed frames: ciphertext + 16-byte GCM tag)

All integers are big-endian. HELLO is the only frame sent in clear (inside mTLS); every other
payload is AES-256-GCM ciphertext and the whole header is its associated data. The plaintext of
each kind is described with its encoder below.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import struct
import sys
from array import array
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Any

from agent.stream.errors import MalformedFrame

PROTOCOL_VERSION = 1
HEADER = struct.Struct(">BBH16sQI")
HEADER_SIZE = HEADER.size  # 32
TAG_SIZE = 16
MIGRATION_TAG_SIZE = 16

# A receiver never buffers more than this for one frame, whatever the peer announces.
HARD_MAX_FRAME = 64 << 20
# HELLO is small JSON; bound it before the keys exist.
MAX_HELLO = 16 << 10
PAGE_HEADER = struct.Struct("<IIII")  # page_size, n_data, n_zero, reserved (0)
# Paths name files under the receiver's image dir; keep them short and plain.
MAX_PATH = 1024


class Kind(IntEnum):
    """Message kinds, grouped by range so new ones slot in without renumbering."""

    HELLO = 0x01  # key agreement; clear (inside mTLS)
    END = 0x02  # clean end of this direction; empty payload
    ABORT = 0x03  # JSON {"reason", "code"}; ends this direction
    CONTROL = 0x10  # JSON object: state changes, acks, errors
    FILE_BEGIN = 0x20  # JSON {"path", "size", "mode", "sha256" | null}
    FILE_DATA = 0x21  # raw bytes of the open file, in order
    FILE_END = 0x22  # JSON {"size", "sha256"}
    PAGES = 0x30  # a batch of memory pages (see encode_pages)
    PAGE_REQUEST = 0x31  # reserved for post-copy: page faults asked of the source
    PAGE_REPLY = 0x32  # reserved for post-copy: pages answering a request


RESERVED_KINDS = frozenset({Kind.PAGE_REQUEST, Kind.PAGE_REPLY})


class Flag(IntFlag):
    COMPRESSED = 0x0001  # the plaintext is one lz4 frame (with its content size)
    OPTIONAL = 0x0002  # a receiver that does not know `kind` may skip the frame (after verifying it)


KNOWN_FLAGS = int(Flag.COMPRESSED | Flag.OPTIONAL)
_KNOWN_KINDS = frozenset(int(k) for k in Kind)


def migration_tag(migration_id: str) -> bytes:
    """The 16 header bytes that name a migration (fixed size whatever the id's length)."""
    return hashlib.sha256(b"ferryman-stream migration " + migration_id.encode()).digest()[:MIGRATION_TAG_SIZE]


@dataclass(frozen=True, slots=True)
class Header:
    version: int
    kind: int
    flags: int
    migration: bytes
    seq: int
    length: int

    def pack(self) -> bytes:
        return HEADER.pack(self.version, self.kind, self.flags, self.migration, self.seq, self.length)

    @classmethod
    def unpack(cls, raw: bytes | bytearray | memoryview) -> Header:
        return cls(*HEADER.unpack(raw))

    @property
    def known_kind(self) -> bool:
        return self.kind in _KNOWN_KINDS

    def kind_name(self) -> str:
        return Kind(self.kind).name if self.known_kind else f"0x{self.kind:02x}"


# ---- decoded messages (what Channel.receive() yields) ----


@dataclass(frozen=True, slots=True)
class Control:
    """A small JSON object: state changes, acks, errors of the migration protocol."""

    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class FileStart:
    path: str
    size: int
    mode: int
    sha256: str | None
    """The digest the sender promised up front, if it knew one; FILE_END always carries one."""


@dataclass(frozen=True, slots=True)
class FileChunk:
    path: str
    offset: int
    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class FileDone:
    """Delivered only after the reassembled bytes matched the size and SHA-256."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class PageBatch:
    """Memory pages: `pages[i]` is the page number (address >> page shift) of data page i.

    `data` holds the non-zero pages back to back; `zero_pages` are page numbers whose content is
    all zeros and was not sent. Page numbers are array('Q') (native order, decoded from LE).
    """

    page_size: int
    pages: array[int]
    data: memoryview
    zero_pages: array[int]

    def page(self, index: int) -> memoryview:
        return self.data[index * self.page_size : (index + 1) * self.page_size]

    @property
    def raw_size(self) -> int:
        """Bytes of memory this batch stands for, zero pages included."""
        return (len(self.pages) + len(self.zero_pages)) * self.page_size


Message = Control | FileStart | FileChunk | FileDone | PageBatch


# ---- payload codecs; decoders raise MalformedFrame (the payload was authentic but nonsense) ----


def encode_json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def decode_json(payload: bytes | memoryview, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(bytes(payload))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedFrame(f"{what}: payload is not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise MalformedFrame(f"{what}: payload is not a JSON object")
    return obj


def check_path(path: object) -> str:
    """A file path the receiver may create under its own dir: relative, no '..', no NUL."""
    if not isinstance(path, str) or not path or len(path) > MAX_PATH or "\x00" in path:
        raise MalformedFrame(f"bad file path {path!r}")
    norm = posixpath.normpath(path)
    if path.startswith("/") or norm != path or norm == "." or norm.split("/")[0] == "..":
        raise MalformedFrame(f"file path {path!r} is not a plain relative path")
    return path


def _int_field(obj: dict[str, Any], key: str, what: str, low: int = 0, high: int = 1 << 62) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise MalformedFrame(f"{what}: bad {key} {value!r}")
    return value


def _digest_field(obj: dict[str, Any], key: str, what: str, *, optional: bool) -> str | None:
    value = obj.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or len(value) != 64 or value.strip("0123456789abcdef"):
        raise MalformedFrame(f"{what}: bad {key} {value!r}")
    return value


def encode_file_begin(path: str, size: int, mode: int, sha256: str | None) -> bytes:
    return encode_json({"path": path, "size": size, "mode": mode, "sha256": sha256})


def decode_file_begin(payload: bytes | memoryview) -> FileStart:
    obj = decode_json(payload, "FILE_BEGIN")
    return FileStart(
        path=check_path(obj.get("path")),
        size=_int_field(obj, "size", "FILE_BEGIN"),
        mode=_int_field(obj, "mode", "FILE_BEGIN", high=0o7777),
        sha256=_digest_field(obj, "sha256", "FILE_BEGIN", optional=True),
    )


def encode_file_end(size: int, sha256: str) -> bytes:
    return encode_json({"size": size, "sha256": sha256})


def decode_file_end(payload: bytes | memoryview) -> tuple[int, str]:
    obj = decode_json(payload, "FILE_END")
    digest = _digest_field(obj, "sha256", "FILE_END", optional=False)
    assert digest is not None  # optional=False never returns None
    return _int_field(obj, "size", "FILE_END"), digest


def encode_abort(reason: str, code: str) -> bytes:
    return encode_json({"reason": reason[:4096], "code": code[:64]})


def decode_abort(payload: bytes | memoryview) -> tuple[str, str]:
    obj = decode_json(payload, "ABORT")
    reason, code = obj.get("reason"), obj.get("code")
    return (reason if isinstance(reason, str) else "?", code if isinstance(code, str) else "aborted")


# PAGES plaintext (little-endian, so page-number arrays are used as-is on x86/arm):
#   u32 page_size | u32 n_data | u32 n_zero | u32 reserved=0
#   n_data x u64  page numbers of the pages carried, in the order of the data
#   n_zero x u64  page numbers of all-zero pages (elided: no data follows for them)
#   n_data x page_size bytes of page data


def _le_array(values: array[int]) -> bytes:
    if sys.byteorder == "little":
        return values.tobytes()
    swapped = array("Q", values)
    swapped.byteswap()
    return swapped.tobytes()


def encode_pages_parts(page_size: int, pages: array[int], zero: array[int]) -> list[bytes]:
    """The fixed part of a PAGES payload; the caller appends the page data."""
    return [PAGE_HEADER.pack(page_size, len(pages), len(zero), 0), _le_array(pages), _le_array(zero)]


def decode_pages(payload: bytes | memoryview) -> PageBatch:
    view = memoryview(payload)
    if len(view) < PAGE_HEADER.size:
        raise MalformedFrame("PAGES: payload shorter than its header")
    page_size, n_data, n_zero, reserved = PAGE_HEADER.unpack_from(view)
    if reserved or page_size < 512 or page_size > (1 << 21) or page_size & (page_size - 1):
        raise MalformedFrame(f"PAGES: bad page size {page_size} or reserved field {reserved}")
    numbers_end = PAGE_HEADER.size + 8 * (n_data + n_zero)
    if len(view) != numbers_end + n_data * page_size:
        raise MalformedFrame(f"PAGES: {len(view)} bytes do not hold {n_data} pages + {n_zero} zero pages")
    numbers = array("Q")
    numbers.frombytes(view[PAGE_HEADER.size : numbers_end])
    if sys.byteorder != "little":
        numbers.byteswap()
    return PageBatch(
        page_size=page_size,
        pages=numbers[:n_data],
        data=view[numbers_end:],
        zero_pages=numbers[n_data:],
    )


def find_zero_pages(view: memoryview, page_size: int) -> list[int]:
    """Indexes of the all-zero pages in `view` (a whole number of pages, format "B").

    Memory bandwidth is the scarce resource here, so no full pass over the data: a strided copy
    picks the first and last 8 bytes of every page (one cache line each), and only pages where
    both are zero are compared in full. Random or text pages cost nothing beyond that sample.
    """
    count = len(view) // page_size
    if count == 0:
        return []
    stride = page_size // 8
    firsts = view.cast("Q")[::stride].tobytes()
    lasts = view[page_size - 8 :].cast("Q")[::stride].tobytes()
    both = (int.from_bytes(firsts, "little") | int.from_bytes(lasts, "little")).to_bytes(len(firsts), "little")
    zero = bytes(page_size)
    word = bytes(8)
    found: list[int] = []
    pos = 0
    while (hit := both.find(word, pos)) >= 0:
        misalign = hit % 8
        if misalign:  # zero bytes straddling two words: look again from the next word
            pos = hit + 8 - misalign
            continue
        index = hit // 8
        if view[index * page_size : (index + 1) * page_size].tobytes() == zero:
            found.append(index)
        pos = hit + 8
    return found
