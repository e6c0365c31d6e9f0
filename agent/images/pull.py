"""One image pull as a pipeline: resolve, store metadata, fetch layers in parallel, unpack in order.

Layers download concurrently (bounded), and layer N is unpacked as soon as layers 0..N are in,
so unpacking overlaps the downloads. Everything runs under one containerd lease, so a failed pull
leaves no half-registered image: the image record is written last, and the lease (deleted at the
end, or expiring if the agent dies) lets containerd's GC reclaim whatever was not referenced.

Blob downloads are shared between pulls: two images with a common layer (or two tags of one image)
pulled at once download it once. A shared download runs under a lease of its own, since the pulls
waiting for it may end in any order; each pull adds the blob to its own lease before it waits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from agent.config import PullConfig
from agent.containerd import Containerd, ImageRecord
from agent.errors import DigestMismatch, InvalidManifest, PlatformNotFound, RegistryUnavailable
from agent.images import labels as L
from agent.images.ingest import ensure_labels, ingest_blob, put_blob
from agent.images.peersource import PeersFirst, PeerSharing
from agent.images.pullgate import PullGate, YieldsToPulls
from agent.images.sources import BlobSource, RegistryBlobs, ServedFrom
from agent.images.unpack import unpack_layer
from agent.manifests import decode_json, parse_image_config
from agent.metrics import AgentMetrics
from agent.model import ImageSummary, LayerProgress, PullProgress
from agent.oci import Descriptor, Platform, Reference, chain_ids, parse_digest
from agent.registry.client import RegistryClient, ResolvedImage
from core.singleflight import SingleFlight

log = logging.getLogger(__name__)


@dataclass
class PullContext:
    name: str
    image: ResolvedImage
    source: BlobSource
    diff_ids: list[str]
    progress: PullProgress
    downloads: asyncio.Semaphore
    origin: str = "registry"
    """Where `source` fetches from, for the cache's counters: "registry", "peer" or "archive"."""
    layers_fetched: int = 0
    bytes_from_peers: int = 0


class Puller:
    def __init__(
        self,
        cd: Containerd,
        registry: RegistryClient,
        config: PullConfig,
        metrics: AgentMetrics,
        sharing: PeerSharing | None = None,
    ) -> None:
        self._cd = cd
        self._sharing = sharing
        self._registry = registry
        self._config = config
        self._metrics = metrics
        self._platform = Platform.parse(config.platform) if config.platform else Platform.host()
        # By digest, across every pull on this host.
        self._layer_downloads: SingleFlight[str, None, int] = SingleFlight("download", _no_state)
        self._config_downloads: SingleFlight[str, None, bytes] = SingleFlight("download config", _no_state)
        self.gate = PullGate()
        """The pulls fetching layers now: warms wait for them (agent/images/pullgate.py)."""

    async def pull(self, ref: Reference, progress: PullProgress) -> ImageSummary:
        started = time.monotonic()
        result = "error"
        try:
            summary = await self._pull(ref, progress)
            result = "ok"
            progress.status = "done"
            return summary
        except BaseException as exc:
            progress.status = "failed"
            progress.error = str(exc)
            raise
        finally:
            self._metrics.pulls.labels(result=result).inc()
            self._metrics.pull_duration.labels(result=result).observe(time.monotonic() - started)

    def behind_peers(self, source: BlobSource) -> BlobSource:
        """`source` behind the fleet peers that hold a blob (agent/images/peersource.py), or alone
        without blob sharing."""
        if self._sharing is None:
            return source
        return self._sharing.before(source, self._peer_dropped, self._metrics.peer_bytes.labels("in").inc)

    def source(self, ref: Reference) -> BlobSource:
        """Where a pull of `ref` reads blobs: local (ingest_blob looks first) -> peers -> registry."""
        return self.behind_peers(RegistryBlobs(self._registry, ref))

    def warm_source(self, ref: Reference) -> BlobSource:
        """Where a warm of a layer of `ref` reads it: the pull's path, yielding to every pull."""
        return YieldsToPulls(self.source(ref), self.gate)

    async def fetch_blob(self, source: BlobSource, desc: Descriptor, on_bytes: Callable[[int], None]) -> int:
        """One blob into the content store through this host's shared downloads (one per digest, under
        a lease of its own): the layer fetches of compositions and warm requests. Returns the bytes
        this call downloaded; 0 when the blob was present or another caller's download brought it.
        The caller protects the blob with a lease of its own before calling."""
        ours = False

        def download(_: None) -> Awaitable[int]:
            nonlocal ours
            ours = True
            return self._download(source, desc, on_bytes)

        fetched = await self._layer_downloads.run(desc.digest, download)
        return fetched if ours else 0

    async def _pull(self, ref: Reference, progress: PullProgress) -> ImageSummary:
        source = self.source(ref)  # local (ingest_blob looks first) -> peers -> registry
        try:
            image = await self._registry.resolve(ref, self._platform)
        except RegistryUnavailable:
            # The registry is down: a peer that holds the image can still say what it is.
            found = await source.resolve(str(ref), self._platform) if isinstance(source, PeersFirst) else None
            if found is None:
                raise
            log.warning("registry unreachable; image resolved through peers", extra={"image": str(ref)})
            image = found
        return await self.install(str(ref), image, source, progress)

    def _peer_dropped(self, peer: str, digest: str, reason: str) -> None:
        self._metrics.peers_dropped.labels(reason=reason).inc()

    async def install(
        self, name: str, image: ResolvedImage, source: BlobSource, progress: PullProgress, origin: str = "registry"
    ) -> ImageSummary:
        """Store a resolved image's blobs from `source`, unpack its layers and record it as `name`.

        The pull's second half, shared with archive imports and migrations (whose blobs come from
        the source agent): whatever the source, nothing is recorded unless every blob verified.
        `origin` names the source in the cache's counters."""
        fetched_config = False

        def fetch_config(_: None) -> Awaitable[bytes]:
            nonlocal fetched_config
            fetched_config = True
            return source.fetch_bytes(image.config)

        config_bytes = await self._config_downloads.run(image.config.digest, fetch_config)
        config_origin = _served_from(source, image.config, origin)
        self._served(config_origin, image.config, image.config.size if fetched_config else 0)
        diff_ids = _diff_ids(config_bytes, image.config, len(image.layers), self._platform, name)
        progress.layers = [LayerProgress(digest=d.digest, size=d.size) for d in image.layers]
        progress.status = "fetching"
        pull = PullContext(
            name, image, source, diff_ids, progress, asyncio.Semaphore(self._config.max_concurrent_layers), origin
        )

        with self.gate.pulling(d.digest for d in image.layers):
            record = await self._store(pull, config_bytes)
        log.info("stored image", extra={"image": record.name, "digest": record.digest, "bytes": progress.done})
        return ImageSummary(
            name=record.name,
            digest=record.digest,
            media_type=record.media_type,
            size=image.manifest.size + image.config.size + sum(d.size for d in image.layers),
            bytes_fetched=progress.done,
            layers_fetched=pull.layers_fetched,
            bytes_from_peers=pull.bytes_from_peers,
        )

    async def _store(self, pull: PullContext, config_bytes: bytes) -> ImageRecord:
        """The pull's blobs fetched and unpacked, its record written last, all under one lease."""
        image = pull.image
        async with self._cd.leases.held("pull", self._config.lease_expiry) as lease_id:
            cd = self._cd.leased(lease_id)
            await self._store_metadata(cd, pull, config_bytes)
            fetches = [
                asyncio.create_task(self._fetch_layer(cd, pull, i), name=f"fetch-layer-{i}")
                for i in range(len(image.layers))
            ]
            try:
                top_chain = await self._unpack_in_order(cd, pull, fetches)
            finally:
                for task in fetches:
                    task.cancel()
                await asyncio.gather(*fetches, return_exceptions=True)
            snapshotter = cd.snapshotter_name
            await ensure_labels(cd, image.config.digest, {L.gc_snapshot(snapshotter): top_chain})
            return await cd.images.put(
                ImageRecord(
                    name=pull.name,
                    media_type=image.target.media_type,
                    digest=image.target.digest,
                    size=image.target.size,
                )
            )

    async def _store_metadata(self, cd: Containerd, pull: PullContext, config_bytes: bytes) -> None:
        """Index (if any), manifest and config, with the GC labels that tie them together."""
        image = pull.image
        source = dict(pull.source.labels)
        manifest_labels: dict[str, str] = {
            **source,
            L.GC_CONFIG: image.config.digest,
            **{L.gc_layer(i): d.digest for i, d in enumerate(image.layers)},
        }
        blobs: list[tuple[Descriptor, bytes, dict[str, str]]] = [
            (image.config, config_bytes, source),
            (image.manifest, image.manifest_bytes, manifest_labels),
        ]
        if image.target.digest != image.manifest.digest:
            blobs.append((image.target, image.target_bytes, {**source, L.gc_manifest(0): image.manifest.digest}))
        for desc, data, labels in blobs:
            await put_blob(cd, desc, data, labels, self._config.ingest_lock_timeout)

    async def _fetch_layer(self, cd: Containerd, pull: PullContext, index: int) -> None:
        desc = pull.image.layers[index]
        layer = pull.progress.layers[index]
        async with pull.downloads:
            started = time.monotonic()
            layer.status = "downloading"

            def count(n: int) -> None:
                layer.done += n
                self._metrics.pull_bytes.inc(n)

            ours = False

            def download(_: None) -> Awaitable[int]:
                nonlocal ours
                ours = True
                return self._download(pull.source, desc, count)

            try:
                # Before waiting: whoever commits the blob, this pull's lease already holds it.
                assert cd.lease is not None, "pulls run under a lease"
                await cd.leases.add_content(cd.lease, desc.digest)
                fetched = await self._layer_downloads.run(desc.digest, download)
            except BaseException:
                layer.status = "failed"
                raise
            if not ours:
                fetched = 0  # another pull's download: the bytes are counted there
            origin = _served_from(pull.source, desc, pull.origin)
            self._served(origin, desc, fetched)
            pull.bytes_from_peers += fetched if origin == "peer" else 0
            layer.status = "done" if fetched else "exists"
            pull.layers_fetched += 1 if fetched else 0
            if fetched:
                self._metrics.layer_duration.labels(phase="fetch").observe(time.monotonic() - started)

    def _served(self, origin: str, desc: Descriptor, fetched: int) -> None:
        """The cache's count of one blob this pull needed: `fetched` bytes from `origin`, or (0) a hit."""
        if fetched:
            self._metrics.cache.blob(origin, fetched)
        else:
            self._metrics.cache.blob("local", desc.size, desc.digest)

    async def _download(self, source: BlobSource, desc: Descriptor, on_bytes: Callable[[int], None]) -> int:
        """One blob into the content store, under a lease of its own (see the module docstring)."""
        async with self._cd.leases.held("download", self._config.lease_expiry) as lease_id:
            cd = self._cd.leased(lease_id)
            args = (self._config.chunk_size, self._config.retries, on_bytes, self._config.ingest_lock_timeout)
            try:
                return await ingest_blob(cd, source, desc, *args)
            except DigestMismatch:
                # Peers sent some of it: once more from the registry, which also tells who lied.
                peers = source.inner if isinstance(source, YieldsToPulls) else source
                if not (isinstance(peers, PeersFirst) and peers.distrust(desc.digest)):
                    raise
                log.warning("blob from peers failed its digest check; from the registry", extra={"digest": desc.digest})
                return await ingest_blob(cd, source, desc, *args)

    async def _unpack_in_order(self, cd: Containerd, pull: PullContext, fetches: list[asyncio.Task[None]]) -> str:
        chains = chain_ids([parse_digest(d) for d in pull.diff_ids])
        parent = ""
        for index, (task, chain) in enumerate(zip(fetches, chains, strict=True)):
            await task
            started = time.monotonic()
            desc = pull.image.layers[index]
            applied = await unpack_layer(cd, desc, pull.diff_ids[index], chain, parent)
            await ensure_labels(cd, desc.digest, {L.UNCOMPRESSED: pull.diff_ids[index]})
            if applied:
                self._metrics.layer_duration.labels(phase="unpack").observe(time.monotonic() - started)
            pull.progress.layers[index].status = "unpacked"
            parent = chain
        return parent


def _served_from(source: BlobSource, desc: Descriptor, origin: str) -> str:
    """Where `source` fetched `desc` from, as far as it says (ServedFrom), else the pull's origin."""
    said = source.served_from(desc.digest) if isinstance(source, ServedFrom) else None
    return said or origin


def _no_state(_: str) -> None:
    return None


def _diff_ids(config_bytes: bytes, desc: Descriptor, layer_count: int, platform: Platform, ref: str) -> list[str]:
    """The layers' diff IDs from the image config, after checking the image can run here."""
    where = f"image config {desc.digest} of {ref}"
    config = parse_image_config(decode_json(config_bytes, where), where)
    # A tag may point straight at a manifest: only its config says which platform it is for.
    if not platform.matches(config.platform()):
        found = "/".join(p or "None" for p in (config.os, config.architecture))
        raise PlatformNotFound(f"{ref} is an image for {found}, this host needs {platform}")
    # The agent pulls images to run them, and a root filesystem needs at least one layer.
    if not layer_count:
        raise InvalidManifest(f"the manifest of {ref} lists no layers: there is no root filesystem to run")
    if len(config.diff_ids) != layer_count:
        raise InvalidManifest(f"{where} lists {len(config.diff_ids)} diff IDs for {layer_count} layers")
    return list(config.diff_ids)
