"""A session's stream as sessions use it: control bodies, whole files landed on disk, page batches.

agent.stream delivers files chunk by chunk and pages as numbered batches; `StreamChannel` writes
each file to a temporary name in the session's `files_dir` and hands over the renamed file once the
stream has verified it, and sends zero pages by number only. Control bodies stay undecoded: what
they mean is the session kind's business.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import AsyncIterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.checkpoint.images import PAGE_SIZE
from agent.peers.errors import PeerFailed
from agent.stream import Channel, Control, FileChunk, FileDone, FileStart, PageBatch
from core.files import confined

_ZERO = bytes(PAGE_SIZE)


@dataclass(frozen=True)
class FileIn:
    """A file the peer sent, complete and verified, at `path`."""

    name: str
    path: Path
    size: int


@dataclass(frozen=True)
class PagesIn:
    """A batch of pages: `data` holds one page per key of `keys`; `zeros` are all-zero pages."""

    keys: array[int]
    data: memoryview
    zeros: array[int]


Incoming = Control | FileIn | PagesIn
"""What a session's stream delivers."""


class StreamChannel:
    """agent.stream's Channel in the shape sessions want; received files land in `files_dir`."""

    def __init__(self, channel: Channel, files_dir: Path) -> None:
        self._ch = channel
        self.files_dir = files_dir
        self._file: tuple[str, int, Path] | None = None  # (name, fd, temp path)

    @property
    def peer_speaks(self) -> tuple[int, ...]:
        """The versions of the session kind's protocol the peer announced (none: an agent from before)."""
        return self._ch.peer_speaks

    @property
    def bytes_raw(self) -> int:
        return self._ch.sent.payload_bytes + self._ch.received.payload_bytes

    @property
    def bytes_wire(self) -> int:
        return self._ch.sent.wire_bytes + self._ch.received.wire_bytes

    async def send_control(self, obj: dict[str, Any]) -> None:
        await self._ch.send_control(obj)

    async def send_file(self, path: Path | bytes, name: str) -> None:
        await self._ch.send_file(path, name)

    async def send_stream(self, chunks: AsyncIterable[bytes], name: str, size: int, sha256: str) -> None:
        """A file of `size` bytes as it is read (from containerd's content store, say); the receiver
        checks it against `sha256` (hex) as well as the digest the stream computes."""
        await self._ch.send_file(chunks, name, size, sha256=sha256)

    async def send_pages(self, keys: array[int], data: bytes, zeros: array[int]) -> None:
        if zeros:
            # The channel finds zero pages itself and sends only their numbers; keep address order so
            # the receiver's store mirrors the dump's layout.
            keys, data = _merge_zero_pages(keys, data, zeros)
        if keys:
            await self._ch.send_pages(keys, data)

    async def recv(self) -> Incoming:
        while True:
            msg = await self._ch.receive()
            if msg is None:
                raise PeerFailed("the peer ended the stream")
            if isinstance(msg, Control):
                return msg
            if isinstance(msg, PageBatch):
                return PagesIn(keys=msg.pages, data=msg.data, zeros=msg.zero_pages)
            if isinstance(msg, FileStart):
                self._start_file(msg.path)
            elif isinstance(msg, FileChunk):
                self._write_chunk(msg)
            elif isinstance(msg, FileDone):
                return self._finish_file(msg)

    def _start_file(self, name: str) -> None:
        if "/" in name or name in ("", ".", ".."):
            raise PeerFailed(f"a file named {name!r}: only plain file names")
        self.files_dir.mkdir(parents=True, exist_ok=True)
        tmp = confined(self.files_dir, f".{name}.part")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        self._file = (name, fd, tmp)

    def _write_chunk(self, chunk: FileChunk) -> None:
        if self._file is None or self._file[0] != chunk.path:
            raise PeerFailed(f"file data for {chunk.path!r} outside its file")
        os.pwrite(self._file[1], chunk.data, chunk.offset)

    def _finish_file(self, done: FileDone) -> FileIn:
        if self._file is None or self._file[0] != done.path:
            raise PeerFailed(f"end of {done.path!r} outside its file")
        name, fd, tmp = self._file
        self._file = None
        os.close(fd)
        final = confined(self.files_dir, name)
        tmp.replace(final)  # verified by the channel (size and SHA-256) before FileDone arrived
        return FileIn(name=name, path=final, size=done.size)

    async def abort(self, reason: str) -> None:
        await self._ch.abort(reason)

    async def close(self) -> None:
        if self._file is not None:
            os.close(self._file[1])
            self._file = None
        await self._ch.close()


def _merge_zero_pages(keys: array[int], data: bytes, zeros: array[int]) -> tuple[array[int], bytes]:
    merged = sorted([(k, i) for i, k in enumerate(keys)] + [(k, -1) for k in zeros])
    view = memoryview(data)
    pages = [_ZERO if i < 0 else view[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] for _, i in merged]
    return array("Q", (k for k, _ in merged)), b"".join(pages)
