"""Where an image's blobs come from: a registry repository, an image archive, or a peer agent.

The pull pipeline (pull.py) stores, unpacks and records an image the same way whatever its blobs
come from; a `BlobSource` is the one thing that differs. Every source is untrusted the same way: a
blob is accepted only when it hashes to the digest its descriptor names (containerd checks at
commit, `read_verified` for the small documents read into memory).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Protocol, runtime_checkable

from agent.containerd import Containerd
from agent.errors import ContentTooLarge, DigestMismatch, InvalidManifest
from agent.images import labels as L
from agent.manifests import ImageIndex, ImageManifest, choose_manifest, decode_json, parse_document
from agent.oci import Descriptor, Platform, Reference, sha256_digest
from agent.registry.client import RegistryClient, ResolvedImage


class BlobSource(Protocol):
    """Blobs by descriptor. `fetch_blob` streams from `offset`, never more than `desc.size` bytes in
    all (more is ContentTooLarge); it raises RegistryUnavailable where a retry may resume."""

    @property
    def labels(self) -> Mapping[str, str]:
        """Content labels for blobs from here (a registry's distribution source; none for others)."""
        ...

    def fetch_blob(self, desc: Descriptor, offset: int = 0) -> AsyncIterator[bytes]: ...

    async def fetch_bytes(self, desc: Descriptor) -> bytes:
        """A whole small blob (manifest, index, config), verified against its descriptor."""
        ...


@runtime_checkable
class ServedFrom(Protocol):
    """A source that fetches each blob from one of several places (peers, then the registry) says
    which one served `digest`: "peer", "registry"; None when it does not know. The cache counts
    each blob under that name (agent/cache/stats.py); other sources count under the pull's origin."""

    def served_from(self, digest: str) -> str | None: ...


@runtime_checkable
class TransferStarts(Protocol):
    """A source that asks others before it reads a blob (the layer tracker, the peers' HEADs) says
    when it began to request `digest`'s bytes (monotonic clock; None: it has not). What came before is
    a fixed cost per fetch, not a slow link: the measured rates leave it out (agent/composition/costs.py)."""

    def transfer_started(self, digest: str) -> float | None: ...


class RegistryBlobs:
    """One repository of a registry as a blob source."""

    def __init__(self, registry: RegistryClient, ref: Reference) -> None:
        self._registry = registry
        self.ref = ref

    @property
    def labels(self) -> Mapping[str, str]:
        return {L.distribution_source(self.ref.host): self.ref.repository}

    def fetch_blob(self, desc: Descriptor, offset: int = 0) -> AsyncIterator[bytes]:
        return self._registry.fetch_blob(self.ref, desc, offset)

    async def fetch_bytes(self, desc: Descriptor) -> bytes:
        return await self._registry.fetch_bytes(self.ref, desc)


class LocalFirst:
    """The content store first, `other` for the blobs it lacks: what this host holds is never fetched."""

    def __init__(self, cd: Containerd, other: BlobSource, max_document: int) -> None:
        self._cd = cd
        self._other = other
        self._max_document = max_document

    @property
    def labels(self) -> Mapping[str, str]:
        return self._other.labels

    async def fetch_blob(self, desc: Descriptor, offset: int = 0) -> AsyncIterator[bytes]:
        if await self._cd.content.exists(desc.digest) is not None:
            async for chunk in self._cd.content.read(desc.digest, offset):
                yield chunk
            return
        async for chunk in self._other.fetch_blob(desc, offset):
            yield chunk

    async def fetch_bytes(self, desc: Descriptor) -> bytes:
        return await read_verified(self, desc, self._max_document, "blob")


async def read_verified(source: BlobSource, desc: Descriptor, limit: int, what: str) -> bytes:
    """A whole blob from `source` into memory, refused over `limit` bytes and checked against `desc`."""
    if desc.size > limit:
        raise ContentTooLarge(f"{what} {desc.digest} is {desc.size} bytes, over the {limit} bytes allowed")
    data = b"".join([chunk async for chunk in source.fetch_blob(desc)])
    if len(data) != desc.size or sha256_digest(data) != desc.digest:
        raise DigestMismatch(f"{what} {desc.digest}: got {len(data)} bytes hashing to {sha256_digest(data)}")
    return data


async def resolve_target(
    target: Descriptor, source: BlobSource, platform: Platform, limit: int, what: str
) -> ResolvedImage:
    """An image from its target descriptor (index or manifest), its documents read from `source` (at
    most `limit` bytes each, verified): the same checks as a registry pull, for archives and peers."""
    target_bytes = await read_verified(source, target, limit, what)
    document = parse_document(decode_json(target_bytes, what), target.media_type, what)
    manifest, manifest_bytes = target, target_bytes
    if isinstance(document, ImageIndex):
        chosen = choose_manifest(document, platform, what)
        manifest_bytes = await read_verified(source, chosen, limit, f"manifest of {what}")
        where = f"manifest {chosen.digest} of {what}"
        document = parse_document(decode_json(manifest_bytes, where), chosen.media_type, where)
        manifest = chosen
    if not isinstance(document, ImageManifest):
        raise InvalidManifest(f"{what} for {platform} points at {manifest.media_type}, not an image manifest")
    return ResolvedImage.of(target, target_bytes, manifest, manifest_bytes, document)
