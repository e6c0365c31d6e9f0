"""Cutting what a channel sends into frame-sized payloads, with no channel state involved.

Files and page ranges arrive in pieces of any size; frames carry chunk_size bytes. Rechunker and
the chunk generators re-cut byte sources, PagesPayload packs one PAGES frame (eliding zero
pages), and read_hash reads a file chunk by chunk. Kept apart from sender.py so that the
sending logic (sequencing, backpressure, file framing) reads without the byte slicing.
"""

from __future__ import annotations

from array import array
from collections.abc import AsyncIterable, Iterable, Sequence
from dataclasses import dataclass
from io import BufferedReader
from typing import Any

from agent.stream.frames import encode_pages_parts, find_zero_pages
from core.errors import InvalidRequest


class Rechunker:
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
class PagesPayload:
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


def u64_array(values: Sequence[int] | array[int]) -> array[int]:
    if isinstance(values, array) and values.typecode == "Q":
        return values
    try:
        return array("Q", values)
    except (OverflowError, TypeError) as exc:
        raise InvalidRequest(f"page numbers must be integers in 0..2**64-1: {exc}") from exc


def read_hash(handle: BufferedReader, buf: bytearray, hasher: Any) -> int:
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


async def sync_chunks(pieces: Iterable[bytes | bytearray | memoryview], size: int) -> Any:
    rechunk = Rechunker(size)
    for piece in pieces:
        for chunk in rechunk.feed(piece):
            yield chunk
    for chunk in rechunk.finish():
        yield chunk


async def any_chunks(source: Iterable[bytes] | AsyncIterable[bytes], size: int) -> Any:
    if isinstance(source, AsyncIterable):
        rechunk = Rechunker(size)
        async for piece in source:
            for chunk in rechunk.feed(piece):
                yield chunk
        for chunk in rechunk.finish():
            yield chunk
    else:
        async for chunk in sync_chunks(source, size):
            yield chunk
