"""Crash-safe file writes: the one way ferryman replaces a file's content.

Temp file in the same directory, fsync, rename over the target, fsync the directory: after a crash
the file holds either the old or the new content, never a mix, and the rename itself survived.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from core.errors import InvalidRequest


def atomic_write(path: Path, data: bytes | str, *, mode: int = 0o644) -> None:
    """Replace `path` with `data` (str as UTF-8), created with permission bits `mode`."""
    payload = data.encode() if isinstance(data, str) else data
    with atomic_writer(path, mode=mode) as fh:
        fh.write(payload)


@contextlib.contextmanager
def atomic_writer(path: Path, *, mode: int = 0o644) -> Iterator[BinaryIO]:
    """A file to write `path`'s new content into, piece by piece (an image archive): it replaces
    `path` when the block ends, and is removed, leaving `path` as it was, when the block raises."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)  # mkstemp creates 0600
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def confined(root: Path | str, *parts: str) -> Path:
    """`root` joined with `parts`, refused (InvalidRequest) unless the result, with every symlink
    resolved, lies inside `root`: a path the agent derives from a peer's or a caller's id can never
    leave the directory it belongs in, whatever the id or the files already there look like."""
    base = Path(root).resolve()
    path = base.joinpath(*parts)
    if not path.resolve().is_relative_to(base) or path == base:
        raise InvalidRequest(f"{'/'.join(parts)!r} leaves {base}")
    return path


def fsync_dir(directory: Path) -> None:
    """Make a rename or create in `directory` durable (a crash could otherwise bring the old entry back)."""
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with contextlib.suppress(OSError):  # some filesystems refuse fsync on directories
            os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
