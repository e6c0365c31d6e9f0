"""The image's blobs from the source agent: a `blobs` session beside the migration's own.

The target learns from the source which digest the container's image is (`prepare` names only the
image, and stays as older agents read it), and asks the source for the blobs it lacks instead of a
registry: the source is reachable by definition
(the migration talks to it), holds exactly the image the container runs, and needs no registry
origin (an image imported from an archive has none). The session is one more migration session on
the peer port (mutual TLS, the encrypted stream), opened by the target:

    target -> source   blobs {migration}          first message: the session is about this migration
    source -> target   blobs_image {digest, media_type, size}
                                                  what the image's name points at on the source: the
                                                  target compares it with its own copy
    target -> source   blob_want {digest}         one blob, any number of times, one at a time
    source -> target   file blob-<hex>            the blob, streamed from the content store, with its
                                                  SHA-256 in the file's header (the stream checks it)
    target -> source   blobs_done                 the end (or the target just closes)
    either way         failed {error}             the sender gives up; the session ends

The source serves only while it is the source of that migration to that peer, and only the blobs
of that container's image (index, platform manifest, config, layers): a fleet peer gets no other
content. The target verifies each blob twice: the stream checks the SHA-256 the source announced,
containerd checks the digest the image's documents name when it commits the blob.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path

from agent.containerd import Containerd, ImageRecord
from agent.errors import DigestMismatch
from agent.images.local import read_image
from agent.images.sources import read_verified
from agent.migration.link import FileIn, Link, describe
from agent.migration.protocol import Blobs, BlobsDone, BlobsImage, BlobWant, ProtocolError
from agent.oci import Descriptor, Digest, Platform
from core.errors import FerrymanError

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 20


def blob_file_name(digest: str) -> str:
    return "blob-" + digest.removeprefix("sha256:")


class PeerBlobs:
    """A BlobSource (agent.images.sources) over a `blobs` session to the migration's source.

    The session opens on the first blob wanted (a target with every blob opens none). Blobs come
    one at a time; each lands as a file in the migration's work directory, verified by the stream,
    and is read from there into containerd, then removed."""

    def __init__(self, connect: Callable[[], Awaitable[Link]], migration_id: str, max_document: int) -> None:
        self._connect = connect
        self._migration = migration_id
        self._max_document = max_document
        self._link: Link | None = None
        self._lock = asyncio.Lock()
        self.bytes = 0
        """Blob bytes received."""
        self.blobs = 0

    @property
    def labels(self) -> Mapping[str, str]:
        return {}

    async def fetch_blob(self, desc: Descriptor, offset: int = 0) -> AsyncIterator[bytes]:
        path = await self._fetch(desc)
        try:
            with path.open("rb") as file:
                position = offset
                while chunk := await asyncio.to_thread(os.pread, file.fileno(), READ_CHUNK, position):
                    position += len(chunk)
                    yield chunk
        finally:
            path.unlink(missing_ok=True)

    async def fetch_bytes(self, desc: Descriptor) -> bytes:
        return await read_verified(self, desc, self._max_document, "blob from the source")

    async def image(self) -> Descriptor:
        """What the image's name points at on the source: the session's first answer. A source from
        before `blobs` sessions fails it (PeerReportedFailure: it does not know the message)."""
        async with self._lock:
            link = await self._session()
            answer = await link.expect(BlobsImage)
            return Descriptor(answer.media_type, Digest(answer.digest), answer.size)

    async def _session(self) -> Link:
        if self._link is None:
            self._link = await self._connect()
            await self._link.send(Blobs(migration=self._migration))
        return self._link

    async def _fetch(self, desc: Descriptor) -> Path:
        async with self._lock:
            link = await self._session()
            await link.send(BlobWant(digest=desc.digest))
            received = await link.recv()
            if not isinstance(received, FileIn) or received.name != blob_file_name(desc.digest):
                raise ProtocolError(f"file {blob_file_name(desc.digest)!r}", describe(received))
            if received.size != desc.size:
                received.path.unlink(missing_ok=True)
                raise DigestMismatch(f"the source sent {received.size} bytes of {desc.digest}, not {desc.size}")
            self.bytes += received.size
            self.blobs += 1
            return received.path

    async def close(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            with contextlib.suppress(TimeoutError, OSError, FerrymanError):
                await link.send(BlobsDone())
            await link.close()


async def image_blobs(cd: Containerd, name: str, platform: Platform) -> tuple[ImageRecord, dict[str, int]]:
    """Image `name`'s record, and the blobs a target may ask for, digest -> size: its target (index or
    manifest), the platform's manifest, config and layers."""
    image = await read_image(cd, name, platform)
    wanted = {image.record.digest: image.record.size}
    for digest in (image.manifest_digest, *image.layers):
        info = await cd.content.info(digest)
        wanted[digest] = info.size
    config = await cd.content.info(image.config_digest)
    wanted[config.digest] = config.size
    return image.record, wanted


async def serve_blobs(link: Link, cd: Containerd, image: ImageRecord, allowed: Mapping[str, int]) -> int:
    """Say what the image is, then answer `blob_want`s with blobs from the content store, until
    `blobs_done` or the link closes; returns the bytes sent. A digest not in `allowed` fails the session."""
    await link.send(BlobsImage(digest=image.digest, media_type=image.media_type, size=image.size))
    sent = 0
    while True:
        try:
            message = await link.expect_one_of((BlobWant, BlobsDone))
        except (TimeoutError, OSError, FerrymanError) as exc:
            log.info("blob session ended", extra={"error": str(exc), "bytes": sent})
            return sent
        if isinstance(message, BlobsDone):
            return sent
        assert isinstance(message, BlobWant)
        size = allowed.get(message.digest)
        if size is None:
            raise ProtocolError("a blob of the migrating container's image", f"blob {message.digest}")
        hex_digest = message.digest.removeprefix("sha256:")
        await link.send_stream(cd.content.read(message.digest), blob_file_name(message.digest), size, hex_digest)
        sent += size
