"""The image service the API calls: pull, import, export, list, remove.

Concurrent pulls of one reference are one pull: the first starts it, the others wait for it and
show its progress, and all get its result or its error (six at once used to fight over containerd's
ingest locks, five failing with "ref locked").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Protocol

from agent.cache.policy import Origin
from agent.config import PullConfig
from agent.containerd import Containerd
from agent.errors import (
    ContainerdConflict,
    ContainerdNotFound,
    DigestMismatch,
    ImageNotFound,
    InvalidArchive,
    RegistryError,
    UnsafeLayer,
)
from agent.images.archive import Archive, read_archive
from agent.images.export import plan_export, write_export
from agent.images.local import read_image
from agent.images.peersource import PeerSharing
from agent.images.pull import Puller
from agent.images.sources import BlobSource, LocalFirst, resolve_target
from agent.metrics import AgentMetrics
from agent.model import ImageSummary, PullProgress
from agent.oci import Descriptor, Platform, Reference, normalize_name
from agent.registry.client import RegistryClient
from core.errors import FerrymanError, InvalidRequest
from core.singleflight import SingleFlight

log = logging.getLogger(__name__)
SPOOL_CHUNK = 1 << 20


class ImageUses(Protocol):
    """Told of every use of an image (the layer cache, agent/cache: last use, origin, the bound)."""

    async def used(self, name: str, origin: Origin | None = None) -> None: ...


class ImageService:
    def __init__(
        self,
        cd: Containerd,
        registry: RegistryClient,
        config: PullConfig,
        metrics: AgentMetrics,
        spool_dir: Path | None = None,
        sharing: PeerSharing | None = None,
    ) -> None:
        self._cd = cd
        self._config = config
        self._spool_dir = spool_dir or Path(tempfile.gettempdir())
        """Where an imported archive is spooled (an unnamed file: nothing is left there after a crash)."""
        self._puller = Puller(cd, registry, config, metrics, sharing)
        self.puller = self._puller
        """The blob path, shared with composition assembly (agent/composition)."""
        self._pulls: SingleFlight[Reference, PullProgress, ImageSummary] = SingleFlight(
            "pull", lambda image: PullProgress(ref=str(image))
        )
        self.platform = Platform.parse(config.platform) if config.platform else Platform.host()
        self._importing: Counter[str] = Counter()
        """Names of the images archive imports in progress are storing."""
        self.uses: ImageUses | None = None
        """The layer cache, set by the agent once it exists (it pulls through this service)."""

    def pulling(self) -> list[str]:
        """The images being pulled or imported now (the cache must not evict them)."""
        return [*(str(ref) for ref in self._pulls.in_flight()), *self._importing]

    async def _used(self, name: str, origin: Origin | None) -> None:
        if self.uses is not None:
            await self.uses.used(name, origin)

    async def pull(self, ref: str, progress: PullProgress | None = None) -> ImageSummary:
        image = Reference.parse(ref)
        # Before any traffic: which hosts this agent connects to is the operator's choice, not the caller's.
        if not self._config.allows_registry(image.host):
            raise InvalidRequest(
                f"registry {image.host} is not allowed on this host ([pull] allowed_registries:"
                f" {', '.join(self._config.allowed_registries)})"
            )
        mine = progress or PullProgress(ref=ref)
        try:
            summary = await self._pulls.run(image, lambda shared: self._puller.pull(image, shared), joined=mine.follow)
        finally:
            mine.refresh()
        await self._used(summary.name, Origin.REGISTRY)
        return summary

    async def import_archive(self, body: AsyncIterator[bytes], name: str | None = None) -> list[ImageSummary]:
        """Store the images of an archive (OCI layout or docker save) streamed in `body`, under their
        names in the archive or, for an archive of one image, under `name`.

        All or nothing: InvalidArchive (or UnsafeLayer) when anything in it fails to verify, and then
        no image, content or lease of the import is left (each image's lease is deleted with a
        synchronous GC, and the images recorded before the failure are deleted again)."""
        if name is not None:
            name = normalize_name(name)
        await asyncio.to_thread(self._spool_dir.mkdir, parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=self._spool_dir) as spool:
            await _spool(body, spool)
            archive = await asyncio.to_thread(read_archive, spool, self._config.max_manifest_bytes)
            plans = _import_names(archive, name)
            importing = [each for _, names in plans for each in names]
            # Until every image of the archive is stored and counted, the cache keeps them all.
            self._importing.update(importing)
            try:
                done = await self._install_archive(archive, plans)
                log.info("imported archive", extra={"format": archive.format, "images": [s.name for s in done]})
                for summary in done:
                    await self._used(summary.name, Origin.ARCHIVE)
            finally:
                self._importing.subtract(importing)
                self._importing = +self._importing  # drop the names at 0
        return done

    async def _install_archive(
        self, archive: Archive, plans: list[tuple[Descriptor, tuple[str, ...]]]
    ) -> list[ImageSummary]:
        done: list[ImageSummary] = []
        try:
            for target, names in plans:
                what = f"image {names[0]} in the archive"
                limit = self._config.max_manifest_bytes
                image = await resolve_target(target, archive.blobs, self.platform, limit, what)
                for each in names:
                    progress = PullProgress(ref=each)
                    done.append(await self._puller.install(each, image, archive.blobs, progress, "archive"))
        except BaseException as exc:
            for summary in done:
                await self._cd.images.delete(summary.name, sync=True)
            if isinstance(exc, DigestMismatch | RegistryError | ContainerdConflict):
                raise InvalidArchive(f"{exc}") from exc
            raise
        return done

    async def export(self, name: str) -> tuple[int, AsyncIterator[bytes]]:
        """An image as an OCI archive: its size in bytes, and its bytes (export.py)."""
        plan = await plan_export(self._cd, str(Reference.parse(name)), self.platform)
        return plan.size, write_export(self._cd, plan)

    async def ensure(self, name: str, target: Descriptor, peer: BlobSource) -> str:
        """Make image `name` point at `target` here, unpacked, for a container that arrives from a
        peer; returns where it came from: "local", "peer" or "registry".

        In that order, for time (docs/migration.md, "The image on the target"): what this host holds
        is used without any traffic (the same name and digest, or the digest's blobs under another
        name); the rest comes from `peer`, the migration's source, which has every blob and is
        reachable by definition; the registry only when the peer cannot serve them (a source from
        before blob sessions, say), since it may be slow, unreachable, or no origin at all (an
        image imported from an archive)."""
        name = str(Reference.parse(name))
        with contextlib.suppress(ImageNotFound, ContainerdNotFound):
            image = await read_image(self._cd, name, self.platform)
            if image.record.digest == target.digest and await self._cd.snapshots.exists(image.chain_id):
                await self._used(name, None)
                return "local"
        limit = self._config.max_manifest_bytes
        # Large blobs striped from the fleet peers that hold them (the source among them, when it
        # serves blobs), the rest from the source over the migration's own session.
        source = LocalFirst(self._cd, self._puller.behind_peers(peer), limit)
        progress = PullProgress(ref=name)
        try:
            resolved = await resolve_target(target, source, self.platform, limit, f"image {name} of the source")
            summary = await self._puller.install(name, resolved, source, progress, "peer")
            await self._used(name, Origin.PEER)
            return "peer" if summary.bytes_fetched else "local"
        except (FerrymanError, OSError, TimeoutError) as exc:
            if isinstance(exc, UnsafeLayer) or not self._config.allows_registry(Reference.parse(name).host):
                raise
            log.warning("the source could not serve the image, pulling it", extra={"image": name, "error": str(exc)})
        await self.pull(name)
        return "registry"

    async def list(self) -> list[ImageSummary]:
        out = []
        for record in await self._cd.images.list():
            try:
                size = (await read_image(self._cd, record.name, self.platform)).size
            except (ImageNotFound, ContainerdNotFound):
                size = record.size  # content for another platform, or being collected
            out.append(ImageSummary(name=record.name, digest=record.digest, media_type=record.media_type, size=size))
        return out

    async def layer_digests(self) -> tuple[str, ...]:
        """Every layer this host holds for its platform: placement counts the bytes a target would pull."""
        held: dict[str, None] = {}
        for record in await self._cd.images.list():
            try:
                held.update(dict.fromkeys((await read_image(self._cd, record.name, self.platform)).layers))
            except (ImageNotFound, ContainerdNotFound):
                continue
        return tuple(held)

    async def remove(self, name: str) -> None:
        try:
            await self._cd.images.delete(str(Reference.parse(name)))
        except ContainerdNotFound as exc:
            raise ImageNotFound(f"image {name} is not pulled on this host") from exc


async def _spool(body: AsyncIterator[bytes], file: IO[bytes]) -> None:
    """The request body into the spool file, in writes of about SPOOL_CHUNK bytes off the loop."""
    pending = bytearray()
    async for chunk in body:
        pending += chunk
        if len(pending) >= SPOOL_CHUNK:
            await asyncio.to_thread(file.write, bytes(pending))
            pending.clear()
    await asyncio.to_thread(file.write, bytes(pending))
    await asyncio.to_thread(file.flush)


def _import_names(archive: Archive, name: str | None) -> list[tuple[Descriptor, tuple[str, ...]]]:
    """(target, names) of each image to import: `name` replaces the archive's names, for one image only."""
    if not archive.images:
        raise InvalidArchive("the archive holds no image")
    if name is not None:
        if len(archive.images) != 1:
            raise InvalidArchive(f"the archive holds {len(archive.images)} images: --name needs exactly one")
        return [(archive.images[0].target, (name,))]
    unnamed = [image.target.digest for image in archive.images if not image.names]
    if unnamed:
        raise InvalidArchive(f"the archive does not name image {unnamed[0]}: give it a name (--name)")
    return [(image.target, image.names) for image in archive.images]
