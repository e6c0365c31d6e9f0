"""Writing received image files to disk: each goes to a temporary name and is renamed into place
only after the channel verified its size and SHA-256 (FileDone), so a cut or corrupt transfer
never leaves a plausible-looking file behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from dataclasses import dataclass
from io import BufferedWriter
from pathlib import Path

from agent.stream.errors import MalformedFrame, UnexpectedKind
from agent.stream.frames import FileChunk, FileDone, FileStart, Message


@dataclass(frozen=True)
class ReceivedFile:
    name: str
    """The relative path the sender gave."""
    path: Path
    """Where it now is, under the sink's root."""
    size: int
    sha256: str


@dataclass
class _Open:
    start: FileStart
    target: Path
    temp: Path
    handle: BufferedWriter


RECEIVED_MODE_MASK = 0o755
"""The mode bits a received file may keep from the sender's."""


class FileSink:
    """Materialises the files of one channel under `root`. Feed it every message; it ignores the
    ones that are not about files. Call discard() when the stream fails."""

    def __init__(self, root: Path, *, fsync: bool = False) -> None:
        self.root = root
        self._fsync = fsync
        self._open: _Open | None = None

    async def feed(self, msg: Message) -> ReceivedFile | None:
        """Handle one message; returns the file once it is complete and in place."""
        if isinstance(msg, FileStart):
            if self._open is not None:
                raise UnexpectedKind(f"{msg.path} started while {self._open.start.path} is open")
            self._open = await asyncio.to_thread(self._create, msg)
        elif isinstance(msg, FileChunk):
            current = self._require(msg.path)
            await asyncio.to_thread(current.handle.write, msg.data)
        elif isinstance(msg, FileDone):
            current = self._require(msg.path)
            await asyncio.to_thread(self._finish, current)
            self._open = None
            return ReceivedFile(msg.path, current.target, msg.size, msg.sha256)
        return None

    async def discard(self) -> None:
        """Drop the partly written file, if any."""
        current, self._open = self._open, None
        if current is not None:
            await asyncio.to_thread(_remove, current)

    def _require(self, path: str) -> _Open:
        if self._open is None or self._open.start.path != path:
            raise UnexpectedKind(f"data for {path}, which is not the open file")
        return self._open

    def _create(self, start: FileStart) -> _Open:
        root = self.root.resolve()
        target = root / start.path
        target.parent.mkdir(parents=True, exist_ok=True)
        # The path was checked for '..' and absolute forms; this also refuses symlinked dirs.
        if not target.parent.resolve().is_relative_to(root):
            raise MalformedFrame(f"file path {start.path!r} leaves {root}")
        temp = target.parent / f".{target.name}.part-{secrets.token_hex(4)}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        return _Open(start, target, temp, os.fdopen(fd, "wb"))

    def _finish(self, current: _Open) -> None:
        handle = current.handle
        handle.flush()
        if self._fsync:
            os.fsync(handle.fileno())
        # Permission bits only, and never group/other write: a peer is authenticated, not trusted to
        # make setuid, setgid or world-writable files here.
        os.fchmod(handle.fileno(), current.start.mode & RECEIVED_MODE_MASK)
        handle.close()
        current.temp.replace(current.target)


def _remove(current: _Open) -> None:
    current.handle.close()
    with contextlib.suppress(FileNotFoundError):
        current.temp.unlink()
