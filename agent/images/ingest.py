"""Copy one blob from a blob source (registry, archive, peer) into containerd's content store, resumably."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Mapping

from agent.containerd import Containerd
from agent.containerd.content import ContentWriter
from agent.errors import (
    ContainerdAlreadyExists,
    ContentTooLarge,
    DigestMismatch,
    IngestLocked,
    RegistryUnavailable,
)
from agent.images.sources import BlobSource
from agent.oci import Descriptor

log = logging.getLogger(__name__)

DEFAULT_LOCK_TIMEOUT = 60.0
"""Seconds to wait for an ingest another writer holds, when the caller has no [pull] config."""


def ingest_ref(desc: Descriptor) -> str:
    return ingest_ref_of(desc.digest)


def ingest_ref_of(digest: str) -> str:
    # Deterministic, so an interrupted pull of the same blob resumes the same ingest. The price: two
    # writers of one blob meet on one ref, which containerd locks (see open_ingest). Peers are served
    # a blob still being pulled from the ingest of this ref (agent/images/shared.py).
    return f"ferryman-{digest}"


def locked_ingest_delay(attempt: int, waited: float, timeout: float) -> float | None:
    """Seconds to wait before opening a locked ingest again (50 ms doubling to 1 s), or None once
    `timeout` would be exceeded."""
    delay = min(0.05 * 2**attempt, 1.0)
    return delay if waited + delay <= timeout else None


@contextlib.asynccontextmanager
async def open_ingest(cd: Containerd, desc: Descriptor, lock_timeout: float) -> AsyncIterator[ContentWriter]:
    """The ingest of `desc`, waiting up to `lock_timeout` s while another writer holds its ref.

    The holder is another process writing the same blob, or one of our own streams that containerd
    has not finished closing (right after a broken download). When it lets go, the blob is either
    committed (the STAT then answers AlreadyExists) or left partial, and we resume it.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with contextlib.AsyncExitStack() as stack:
        for attempt in itertools.count():
            try:
                writer = await stack.enter_async_context(cd.content.writer(ingest_ref(desc), desc.size, desc.digest))
                break
            except IngestLocked as exc:
                delay = locked_ingest_delay(attempt, loop.time() - started, lock_timeout)
                if delay is None:
                    raise IngestLocked(
                        f"ingest of {desc.digest} is still locked by another writer after {lock_timeout:g} s:"
                        f" {exc.message}",
                        exc.grpc_code,
                    ) from exc
                log.debug("ingest locked, waiting", extra={"digest": desc.digest, "attempt": attempt})
                await asyncio.sleep(delay)
        yield writer


async def ingest_blob(
    cd: Containerd,
    source: BlobSource,
    desc: Descriptor,
    chunk_size: int,
    retries: int,
    on_bytes: Callable[[int], None] = lambda n: None,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
) -> int:
    """Make `desc` present in the content store from `source`; returns the bytes downloaded (0 if present).

    containerd hashes what it receives and refuses a commit that does not match the digest; the
    partial ingest is then aborted so that a retry starts clean. The same goes for a registry that
    sends more than the descriptor declares: fetch_blob stops at the declared size (containerd itself
    would keep appending), and what came before is thrown away.
    """
    if await cd.content.exists(desc.digest) is not None:
        return 0
    fetched = 0
    for attempt in range(retries + 1):
        try:
            async with open_ingest(cd, desc, lock_timeout) as writer:
                if writer.offset:
                    log.info("resuming ingest", extra={"digest": desc.digest, "offset": writer.offset})
                if writer.offset < desc.size:
                    blob = source.fetch_blob(desc, offset=writer.offset)
                    fetched += await _copy(blob, writer, chunk_size, on_bytes)
                if writer.offset != desc.size:
                    raise DigestMismatch(
                        f"{desc.digest}: the source sent {writer.offset} bytes, the manifest says {desc.size}"
                    )
                await writer.commit(source.labels)
            return fetched
        except ContainerdAlreadyExists:
            return fetched  # a concurrent pull committed it first
        except (DigestMismatch, ContentTooLarge):
            await cd.content.abort(ingest_ref(desc))
            raise
        except RegistryUnavailable as exc:
            if attempt == retries:
                raise
            log.warning("blob download broke, resuming", extra={"digest": desc.digest, "error": str(exc)})
            await asyncio.sleep(min(0.2 * 2**attempt, 2.0))
    raise AssertionError("unreachable")


async def _copy(
    blob: AsyncIterator[bytes], writer: ContentWriter, chunk_size: int, on_bytes: Callable[[int], None]
) -> int:
    """Stream registry bytes into containerd in chunk_size writes; returns the bytes received."""
    received = 0
    buf = bytearray()
    try:
        async for chunk in blob:
            received += len(chunk)
            on_bytes(len(chunk))
            if not buf and len(chunk) >= chunk_size:  # the common case: a full chunk, sent without copying
                await writer.write(chunk)
                continue
            buf += chunk
            if len(buf) >= chunk_size:
                await writer.write(bytes(buf))
                buf.clear()
    finally:
        if buf:  # keep what arrived before a break, so the resume starts after it
            await writer.write(bytes(buf))
    return received


async def ensure_labels(cd: Containerd, digest: str, labels: Mapping[str, str]) -> None:
    """Add labels to content that a previous pull stored without them."""
    info = await cd.content.info(digest)
    missing = {k: v for k, v in labels.items() if info.labels.get(k) != v}
    if missing:
        await cd.content.update_labels(digest, missing)


async def put_blob(
    cd: Containerd,
    desc: Descriptor,
    data: bytes,
    labels: Mapping[str, str],
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
) -> None:
    """Store a small blob we already hold (manifest, config), or label it if it is there."""
    if await cd.content.exists(desc.digest) is not None:
        await ensure_labels(cd, desc.digest, labels)
        return
    try:
        async with open_ingest(cd, desc, lock_timeout) as writer:
            # A partial (or complete, uncommitted) earlier ingest: containerd verifies the whole at commit.
            if writer.offset < desc.size:
                await writer.write(data[writer.offset :])
            await writer.commit(labels)
    except ContainerdAlreadyExists:
        await ensure_labels(cd, desc.digest, labels)
