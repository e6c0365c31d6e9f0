"""The blobs this host serves to its peers (agent.sharing's BlobStore): committed content, and the
blobs this host is still pulling, up to the bytes already written.

A blob being pulled is readable while it downloads, so hosts starting the same image at once share
it as it arrives instead of each downloading it from the registry. Bytes of an ingest are not yet
verified: the receiver checks the whole blob's digest before it commits, which catches a download
here that turns out bad (its ingest is then aborted, and this host stops offering it).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

from agent.containerd import Containerd
from agent.containerd.content import blob_file, ingest_data_file
from agent.errors import ContainerdNotFound
from agent.images.ingest import ingest_ref_of
from agent.sharing.errors import BlobNotHeld, PeerStalled
from agent.sharing.server import BlobState, ImageTarget

READ_CHUNK = 1 << 20
POLL = 0.05
"""Seconds between looks at a growing ingest."""


class SharedBlobs:
    def __init__(self, cd: Containerd, content_root: str, partial_wait: float) -> None:
        self._cd = cd
        self._content_root = content_root
        self._partial_wait = partial_wait

    async def image(self, name: str) -> ImageTarget | None:
        if not name:
            return None
        try:
            record = await self._cd.images.get(name)
        except ContainerdNotFound:
            return None
        return ImageTarget(record.digest, record.media_type, record.size)

    async def state(self, digest: str) -> BlobState | None:
        info = await self._cd.content.exists(digest)
        if info is not None:
            return BlobState(info.size, info.size)
        status = await self._cd.content.status(ingest_ref_of(digest))
        if status is None or status.total <= 0:
            return None
        return BlobState(status.total, status.offset)

    async def read(self, digest: str, start: int, end: int) -> AsyncIterator[bytes]:
        position = start
        loop = asyncio.get_running_loop()
        progress_at = loop.time()
        while position < end:
            if await self._cd.content.exists(digest) is not None:
                async for chunk in self._committed(digest, position, end):
                    yield chunk
                return
            status = await self._cd.content.status(ingest_ref_of(digest))
            path = ingest_data_file(self._content_root, ingest_ref_of(digest)) if status else None
            if status is None or path is None:
                # Committed between the two looks, or gone (aborted): one more look at the store.
                if await self._cd.content.exists(digest) is not None:
                    continue
                raise BlobNotHeld(f"{digest} is no longer held here")
            before = position
            if status.offset > position:
                async for chunk in _read_file(path, position, min(status.offset, end)):
                    position += len(chunk)
                    yield chunk
            if position > before:
                progress_at = loop.time()
                continue
            if loop.time() - progress_at > self._partial_wait:
                raise PeerStalled(f"the pull of {digest} here has not grown for {self._partial_wait:g} s")
            await asyncio.sleep(POLL)

    async def _committed(self, digest: str, start: int, end: int) -> AsyncIterator[bytes]:
        """A committed blob's bytes: from its file in the content store, else through containerd."""
        position = start
        async for chunk in _read_file(blob_file(self._content_root, digest), start, end):
            position += len(chunk)
            yield chunk
        if position < end:
            async for chunk in self._cd.content.read(digest, position, end - position):
                yield chunk


async def _read_file(path: os.PathLike[str], start: int, end: int) -> AsyncIterator[bytes]:
    try:
        fd = await asyncio.to_thread(os.open, path, os.O_RDONLY)
    except FileNotFoundError:
        return  # committed (moved into the store) or aborted since the look: the caller looks again
    try:
        position = start
        while position < end:
            chunk = await asyncio.to_thread(os.pread, fd, min(READ_CHUNK, end - position), position)
            if not chunk:
                return
            position += len(chunk)
            yield chunk
    finally:
        os.close(fd)
