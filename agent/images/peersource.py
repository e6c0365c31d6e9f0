"""The peers as a blob source, the registry behind them: local -> peers -> registry.

For each blob (of at least `[sharing] min_peer_size`) the source asks the candidates the directory
names (the coordinator's layer tracker, else `[[peers]]`: directory.py) what they hold (a HEAD each,
at once); a peer still pulling the blob itself counts, and serves what it has as
it arrives. When nobody holds it, hosts that pull the same image at once wait for each other in
rendezvous order (striping.rendezvous_rank), so one of them goes to the registry and the others
read from it. The blob is then cut into ranges spread over the holders (striping.choose_peer) and
yielded in order; a peer that fails or stalls is dropped for this pull and its ranges go to the
others; whatever the peers did not send comes from the registry, which is always last, so a pull
never fails because of peers.

Bytes from peers are checked where every blob is: containerd refuses the commit unless the whole
blob hashes to its digest. The pull then calls `fetch_blob` again (pull.py): this time the blob comes
from the registry alone, hashed range by range, and the peers whose ranges differ (striping.culprits)
are reported and dropped.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from agent.config import SharingConfig
from agent.images.directory import PeerDirectory
from agent.images.sources import BlobSource, read_verified, resolve_target
from agent.oci import Descriptor, Digest, Platform
from agent.registry.client import ResolvedImage
from agent.sharing.client import Peer
from agent.sharing.errors import PeerBlobError
from agent.sharing.server import BlobState, ImageTarget
from agent.sharing.striping import ByteRange, Served, Step, choose_peer, culprits, next_step, plan_ranges

log = logging.getLogger(__name__)


class PeerBlobs(Protocol):
    """agent.sharing.client.PeerBlobClient, or a fake."""

    async def probe(self, peer: Peer, digest: str) -> BlobState | None: ...

    async def fetch(self, peer: Peer, digest: str, rng: ByteRange) -> bytes: ...

    async def image(self, peer: Peer, name: str) -> ImageTarget | None: ...


Report = Callable[[str, str, str], None]
"""(peer, digest, reason) of a peer dropped from a download: "failed", "stalled" or "bad_bytes"."""


class PeersFirst:
    """A BlobSource for one pull: the peers that hold a blob (`directory` names the candidates),
    then `registry`."""

    def __init__(
        self,
        client: PeerBlobs,
        directory: PeerDirectory,
        registry: BlobSource,
        config: SharingConfig,
        host: str,
        report: Report = lambda peer, digest, reason: None,
        on_peer_bytes: Callable[[int], None] = lambda n: None,
        max_document: int = 4 << 20,
    ) -> None:
        self._client = client
        self._directory = directory
        self._registry = registry
        self._config = config
        self._host = host
        self._report = report
        self._on_peer_bytes = on_peer_bytes
        self.dropped: set[str] = set()
        """Peers dropped for this pull (failed, stalled or sent bad bytes)."""
        self._served: dict[str, list[Served]] = {}
        self._distrusted: dict[str, list[Served]] = {}
        self.peer_bytes = 0
        self._bytes_from: dict[str, collections.Counter[str]] = {}
        """digest -> bytes of it from "peer" and from "registry" (served_from)."""
        self._max_document = max_document
        self._registry_down = False
        """Set when the image was resolved through peers: then even small blobs come from them."""
        self._image_peers: list[Peer] = []
        """The peers that named the image's target when it was resolved through them."""
        self._transfer_started: dict[str, float] = {}
        """digest -> when its bytes were first requested (monotonic)."""

    @property
    def labels(self) -> Mapping[str, str]:
        return self._registry.labels

    async def fetch_bytes(self, desc: Descriptor) -> bytes:
        if not self._registry_down:
            return await self._registry.fetch_bytes(desc)
        return await read_verified(self, desc, self._max_document, "blob from peers")

    async def resolve(self, name: str, platform: Platform) -> ResolvedImage | None:
        """Image `name` through the peers, for when its registry cannot be reached: the target its
        name points at on most of the peers that have it, then its documents, verified by digest as a
        registry's are. None when no peer has the image."""
        peers = self._live(await self._directory.peers(None))
        answers = await asyncio.gather(*(self._client.image(p, name) for p in peers))
        targets = collections.Counter(t for t in answers if t is not None)
        if not targets:
            return None
        target, _ = targets.most_common(1)[0]
        self._registry_down = True
        # They hold every blob of it, which a tracker may not know of (it tracks layers, not documents).
        self._image_peers = [p for p, t in zip(peers, answers, strict=True) if t == target]
        desc = Descriptor(target.media_type, Digest(target.digest), target.size)
        return await resolve_target(desc, self, platform, self._max_document, f"{name} from peers")

    def served_from(self, digest: str) -> str | None:
        """Where most of `digest` came from, "peer" or "registry" (agent.images.sources.ServedFrom:
        the cache counts the blob there); None for a blob this source did not fetch."""
        counts = self._bytes_from.get(digest)
        return counts.most_common(1)[0][0] if counts else None

    def transfer_started(self, digest: str) -> float | None:
        """When this source began to request `digest`'s bytes, from the peers or the registry, after
        asking the tracker and the peers (agent.images.sources.TransferStarts)."""
        return self._transfer_started.get(digest)

    def distrust(self, digest: str) -> bool:
        """The whole blob `digest` failed its digest check: True when peers sent some of it (the next
        fetch_blob then takes it from the registry and finds out which)."""
        served = self._served.pop(digest, [])
        if not served:
            return False
        self._distrusted[digest] = served
        return True

    async def fetch_blob(self, desc: Descriptor, offset: int = 0) -> AsyncIterator[bytes]:
        counts = self._bytes_from.setdefault(desc.digest, collections.Counter())
        if desc.digest in self._distrusted:
            async for chunk in self._check_against_registry(desc, offset):
                counts["registry"] += len(chunk)
                yield chunk
            return
        position = offset
        holders = await self._holders(desc) if self._wants_peers(desc) else []
        self._transfer_started.setdefault(desc.digest, time.monotonic())
        if holders:
            async for chunk in self._striped(desc, offset, holders):
                position += len(chunk)
                counts["peer"] += len(chunk)
                yield chunk
        if position < desc.size:
            async for chunk in self._registry.fetch_blob(desc, position):
                counts["registry"] += len(chunk)
                yield chunk

    def _wants_peers(self, desc: Descriptor) -> bool:
        return self._registry_down or desc.size >= self._config.min_peer_size

    def _live(self, peers: Sequence[Peer]) -> list[Peer]:
        return [p for p in peers if p.name not in self.dropped and p.name != self._host]

    async def _probe(self, desc: Descriptor, by_name: dict[str, Peer]) -> dict[str, int]:
        """Peer -> bytes of `desc` it can serve now, for the live candidates that hold or are pulling
        it (asked of the directory each round: hosts that start the blob meanwhile join)."""
        named = await self._directory.peers(desc.digest)
        peers = self._live([*named, *(p for p in self._image_peers if p not in named)])
        by_name.update((p.name, p) for p in peers)
        states = await asyncio.gather(*(self._client.probe(p, desc.digest) for p in peers))
        return {
            p.name: s.available for p, s in zip(peers, states, strict=True) if s is not None and s.size == desc.size
        }

    async def _holders(self, desc: Descriptor) -> list[Peer]:
        """The peers to read `desc` from; none: the registry (striping.next_step decides)."""
        by_name: dict[str, Peer] = {}
        # Before the first look: hosts pulling the same image now learn of this one at theirs.
        await self._directory.fetching(desc.digest)
        for waited in itertools.count():
            held = await self._probe(desc, by_name)
            if self._config.rendezvous_delay <= 0:
                return [by_name[name] for name, available in held.items() if available > 0]
            if not by_name:
                # Nobody named holds or fetches it, after this host's announcement: a host that
                # starts it later is told of this one and waits for it, so there is no one to wait for.
                return []
            step, sources = next_step(self._host, desc.digest, held, waited)
            if step is Step.PEERS:
                return [by_name[name] for name in sources]
            if step is Step.REGISTRY:
                return []
            await asyncio.sleep(self._config.rendezvous_delay)
        raise AssertionError("unreachable")

    async def _striped(self, desc: Descriptor, offset: int, holders: list[Peer]) -> AsyncIterator[bytes]:
        """Bytes [offset, size) from `holders` in order, until the blob is done or no holder is left."""
        holders = holders[: self._config.max_peers_per_blob]
        by_name = {p.name: p for p in holders}
        order = plan_ranges(offset, desc.size, self._config.range_size)
        queue = collections.deque(order)
        tasks: dict[ByteRange, asyncio.Task[bytes]] = {}
        in_flight: collections.Counter[str] = collections.Counter()
        throughput: dict[str, float] = {}
        served = self._served.setdefault(desc.digest, [])
        # Ranges fetched or fetching, not yet yielded: the memory bound, twice what is in flight so
        # the peers keep sending while containerd takes the range before.
        window = 2 * len(holders) * self._config.ranges_per_peer
        closing = False

        def live() -> list[str]:
            return [name for name in by_name if name not in self.dropped]

        async def fetch(peer: Peer, rng: ByteRange) -> bytes:
            started = time.monotonic()
            try:
                data = await self._client.fetch(peer, desc.digest, rng)
            except PeerBlobError as exc:
                if peer.name not in self.dropped:
                    self.dropped.add(peer.name)
                    reason = "stalled" if exc.code == "peer_blob_stalled" else "failed"
                    log.warning("peer dropped", extra={"peer": peer.name, "digest": desc.digest, "error": str(exc)})
                    self._report(peer.name, desc.digest, reason)
                raise
            finally:
                in_flight[peer.name] -= 1
            throughput[peer.name] = rng.size / max(time.monotonic() - started, 1e-6)
            digest = await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
            served.append(Served(peer.name, rng, digest))
            return data

        def fill(_: object = None) -> None:
            """Start ranges while a peer has room and the window allows; also as each range ends."""
            while queue and not closing and len(tasks) < window:
                name = choose_peer(live(), in_flight, throughput, self._config.ranges_per_peer)
                if name is None:
                    return
                rng = queue.popleft()
                in_flight[name] += 1
                task = asyncio.create_task(fetch(by_name[name], rng), name=f"peer-range-{rng.start}")
                tasks[rng] = task
                task.add_done_callback(fill)

        try:
            for rng in order:
                while True:
                    fill()
                    task = tasks.get(rng)
                    if task is None:
                        if not live():
                            return  # the registry takes over from here
                        await asyncio.wait(tasks.values(), return_when=asyncio.FIRST_COMPLETED)
                        continue
                    try:
                        data = await task
                    except PeerBlobError:
                        del tasks[rng]
                        queue.appendleft(rng)
                        continue
                    del tasks[rng]
                    break
                self.peer_bytes += len(data)
                self._on_peer_bytes(len(data))
                yield data
        finally:
            closing = True
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)

    async def _check_against_registry(self, desc: Descriptor, offset: int) -> AsyncIterator[bytes]:
        """The blob from the registry, hashed at the ranges the peers served; then who lied."""
        served = self._distrusted[desc.digest]
        hashers = {s.range: hashlib.sha256() for s in served}
        position = offset
        async for chunk in self._registry.fetch_blob(desc, offset):
            end = position + len(chunk)
            for rng, hasher in hashers.items():
                lo, hi = max(rng.start, position), min(rng.end, end)
                if lo < hi:
                    hasher.update(chunk[lo - position : hi - position])
            position = end
            yield chunk
        # Only ranges the registry sent whole count (a resumed download skips some).
        truth = {rng: h.hexdigest() for rng, h in hashers.items() if offset <= rng.start and rng.end <= position}
        del self._distrusted[desc.digest]
        for peer in sorted(culprits(served, truth)):
            log.warning("peer sent bad bytes: dropped", extra={"peer": peer, "digest": desc.digest})
            self.dropped.add(peer)
            self._report(peer, desc.digest, "bad_bytes")


@dataclass(frozen=True)
class PeerSharing:
    """What a pull needs to fetch from peers: the client, who to ask, and the limits."""

    client: PeerBlobs
    directory: PeerDirectory
    """Who to ask: the coordinator's tracker and `[[peers]]` (agent/images/directory.py)."""
    config: SharingConfig
    host: str
    """This host's name (its rank in a rendezvous)."""
    max_document: int = 4 << 20
    """[pull] max_manifest_bytes."""

    async def held_elsewhere(self, blobs: Mapping[str, int]) -> frozenset[str]:
        """Which of `blobs` (digest -> size) a peer holds whole now: a HEAD to each peer the directory
        names for each blob a pull would take from peers (`min_peer_size` and up), all at once, each
        within `probe_timeout`. The cache evicts those first (agent/cache/policy.py)."""
        if self.directory.empty:
            return frozenset()
        digests = [d for d, size in blobs.items() if size >= self.config.min_peer_size]
        peers = [p for p in await self.directory.peers(None) if p.name != self.host]
        pairs = [(p, d) for p in peers for d in digests]
        states = await asyncio.gather(*(self.client.probe(p, d) for p, d in pairs))
        return frozenset(d for (_, d), s in zip(pairs, states, strict=True) if s is not None and s.complete)

    def before(self, registry: BlobSource, report: Report, on_peer_bytes: Callable[[int], None]) -> BlobSource:
        """`registry` behind the peers, or alone when there are none to ask."""
        if self.directory.empty:
            return registry
        return PeersFirst(
            self.client, self.directory, registry, self.config, self.host, report, on_peer_bytes, self.max_document
        )
