"""Blob sharing without containerd: the pure decisions, the HTTPS server and client over real mutual
TLS (a fleet CA from core.security.pki, on loopback) with an in-memory store, and the peer source
(local -> peers -> registry) over fake peers behind its own Protocol."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.config import SharingConfig
from agent.images.directory import StaticPeers
from agent.images.peersource import PeersFirst, PeerSharing
from agent.images.sources import TransferStarts
from agent.oci import Descriptor, Digest
from agent.sharing.client import Peer, PeerBlobClient
from agent.sharing.errors import BlobNotHeld, PeerBlobError, PeerStalled
from agent.sharing.server import BlobServer, BlobState, ImageTarget
from agent.sharing.striping import (
    ByteRange,
    Served,
    Step,
    choose_peer,
    culprits,
    next_step,
    plan_ranges,
    rendezvous_rank,
)
from agent.sharing.throttle import Bucket
from core.security.pki import HostCertPaths, init_ca, issue_client, issue_host
from tests.harness.registry import free_port

# ---- pure decisions


@given(st.integers(0, 10_000), st.integers(0, 10_000), st.integers(1, 3000))
def test_ranges_cover_the_rest_of_the_blob_exactly(start: int, size: int, range_size: int) -> None:
    ranges = plan_ranges(start, size, range_size)
    if start >= size:
        assert ranges == []
        return
    assert ranges[0].start == start and ranges[-1].end == size
    assert all(a.end == b.start for a, b in itertools.pairwise(ranges))
    assert all(0 < r.size <= range_size for r in ranges)


def test_range_header_is_inclusive() -> None:
    assert ByteRange(0, 10).header() == "bytes=0-9"


@given(st.dictionaries(st.sampled_from("abcd"), st.integers(0, 3)), st.integers(1, 3))
def test_choose_peer_takes_the_least_busy_below_the_limit(in_flight: dict[str, int], per_peer: int) -> None:
    live = ["a", "b", "c", "d"]
    chosen = choose_peer(live, in_flight, {}, per_peer)
    free = [p for p in live if in_flight.get(p, 0) < per_peer]
    if not free:
        assert chosen is None
        return
    assert chosen in free
    assert in_flight.get(chosen, 0) == min(in_flight.get(p, 0) for p in free)


def test_choose_peer_prefers_the_faster_on_a_tie() -> None:
    assert choose_peer(["a", "b"], {}, {"a": 1.0, "b": 5.0}, 2) == "b"
    assert choose_peer(["a", "b"], {"b": 1}, {"a": 1.0, "b": 5.0}, 2) == "a"


def test_culprits_are_the_peers_whose_ranges_differ() -> None:
    r1, r2, r3 = ByteRange(0, 10), ByteRange(10, 20), ByteRange(20, 30)
    served = [Served("a", r1, "x"), Served("b", r2, "bad"), Served("c", r3, "z")]
    assert culprits(served, {r1: "x", r2: "y"}) == {"b"}  # r3 unchecked proves nothing


@given(st.lists(st.text("abcdefgh", min_size=1, max_size=6), min_size=1, max_size=6, unique=True), st.text())
def test_rendezvous_ranks_are_a_permutation(hosts: list[str], digest: str) -> None:
    ranks = sorted(rendezvous_rank(h, hosts, digest) for h in hosts)
    assert ranks == list(range(len(hosts)))


@given(st.lists(st.integers(1, 5 << 20), min_size=1, max_size=30))
def test_bucket_paces_to_its_rate(chunks: list[int]) -> None:
    bucket = Bucket(rate=10 << 20, burst=1 << 20, tokens=0, at=0.0)
    now = 0.0
    for n in chunks:
        bucket, wait = bucket.take(n, now)
        now += wait
    # Sending everything took at least what the rate allows, minus the burst.
    assert now >= (sum(chunks) - (1 << 20)) / (10 << 20) - 1e-9


# ---- the server and client over mutual TLS


class MemoryStore:
    """Blobs in memory; `growing` ones reveal `available` bytes until released."""

    def __init__(self, blobs: Mapping[str, bytes], available: Mapping[str, int] | None = None) -> None:
        self.blobs = dict(blobs)
        self.available = dict(available or {})
        self.grow = asyncio.Event()

    async def image(self, name: str) -> ImageTarget | None:
        return ImageTarget("sha256:" + "0" * 64, "application/vnd.oci.image.manifest.v1+json", 10) if name else None

    async def state(self, digest: str) -> BlobState | None:
        data = self.blobs.get(digest)
        if data is None:
            return None
        return BlobState(len(data), self.available.get(digest, len(data)))

    async def read(self, digest: str, start: int, end: int) -> AsyncIterator[bytes]:
        data = self.blobs.get(digest)
        if data is None:
            raise BlobNotHeld(digest)
        have = self.available.get(digest, len(data))
        if end > have:
            yield data[start:have]
            await self.grow.wait()
            yield data[have:end]
            return
        yield data[start:end]


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, HostCertPaths]:
    base = tmp_path_factory.mktemp("pki")
    init_ca(base / "ca")
    return {
        "server": issue_host(base / "ca", "hosta", base / "hosta", addresses=["127.0.0.1"]),
        "client": issue_host(base / "ca", "hostb", base / "hostb", addresses=["127.0.0.1"]),
        "ops": issue_client(base / "ca", "alice", base / "ops"),
    }


async def _serve(store: MemoryStore, tls: HostCertPaths, **config: object) -> BlobServer:
    listen = f"127.0.0.1:{free_port()}"
    server = BlobServer(store, SharingConfig(listen=listen, **config), tls)  # type: ignore[arg-type]
    await server.start()
    return server


async def test_range_served_over_mutual_tls(pki: dict[str, HostCertPaths]) -> None:
    data = bytes(range(256)) * 1000
    server = await _serve(MemoryStore({sha(data): data}), pki["server"])
    client = PeerBlobClient(SharingConfig(), pki["client"])
    peer = Peer("hosta", f"127.0.0.1:{server.port}")
    try:
        assert await client.probe(peer, sha(data)) == BlobState(len(data), len(data))
        assert await client.probe(peer, sha(b"other")) is None
        assert (await client.image(peer, "some/image:v1")) is not None
        assert await client.fetch(peer, sha(data), ByteRange(1000, 5000)) == data[1000:5000]
        # A certificate for another host than the one asked is refused by hostname checking.
        with pytest.raises(PeerBlobError):
            await client.fetch(Peer("hostc", f"127.0.0.1:{server.port}"), sha(data), ByteRange(0, 10))
    finally:
        await client.close()
        await server.close()


async def test_ops_certificates_and_plain_clients_are_refused(pki: dict[str, HostCertPaths], tmp_path: Path) -> None:
    data = b"x" * 100
    server = await _serve(MemoryStore({sha(data): data}), pki["server"])
    ops = pki["ops"]
    client = PeerBlobClient(SharingConfig(), ops)
    try:
        # The handshake passes (a fleet certificate), the role does not.
        assert await client.probe(Peer("hosta", f"127.0.0.1:{server.port}"), sha(data)) is None
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.ClientError):
                await http.get(f"http://127.0.0.1:{server.port}/v1/blobs/{sha(data)}")
    finally:
        await client.close()
        await server.close()


async def test_a_growing_blob_is_served_as_it_arrives(pki: dict[str, HostCertPaths]) -> None:
    data = bytes(range(256)) * 400
    store = MemoryStore({sha(data): data}, {sha(data): 1000})
    server = await _serve(store, pki["server"])
    client = PeerBlobClient(SharingConfig(stall_timeout=5), pki["client"])
    peer = Peer("hosta", f"127.0.0.1:{server.port}")
    try:
        assert await client.probe(peer, sha(data)) == BlobState(len(data), 1000)
        fetch = asyncio.create_task(client.fetch(peer, sha(data), ByteRange(0, len(data))))
        await asyncio.sleep(0.2)
        assert not fetch.done()
        store.grow.set()
        assert await fetch == data
    finally:
        await client.close()
        await server.close()


async def test_a_stalled_peer_is_abandoned_within_the_stall_timeout(pki: dict[str, HostCertPaths]) -> None:
    data = b"y" * 5000
    store = MemoryStore({sha(data): data}, {sha(data): 10})
    server = await _serve(store, pki["server"])
    client = PeerBlobClient(SharingConfig(stall_timeout=0.5), pki["client"])
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        with pytest.raises(PeerStalled):
            await client.fetch(Peer("hosta", f"127.0.0.1:{server.port}"), sha(data), ByteRange(0, 5000))
        assert loop.time() - started < 2
    finally:
        store.grow.set()
        await client.close()
        await server.close()


# ---- the peer source


class FakePeers:
    def __init__(self, blobs: Mapping[str, bytes], behaviour: Mapping[str, str]) -> None:
        self.blobs = blobs
        self.behaviour = behaviour  # peer -> "ok" | "corrupt" | "fail" | "absent"
        self.fetched: dict[str, int] = {}

    async def probe(self, peer: Peer, digest: str) -> BlobState | None:
        if self.behaviour[peer.name] == "absent" or digest not in self.blobs:
            return None
        size = len(self.blobs[digest])
        return BlobState(size, size)

    async def image(self, peer: Peer, name: str) -> ImageTarget | None:
        return None

    async def fetch(self, peer: Peer, digest: str, rng: ByteRange) -> bytes:
        what = self.behaviour[peer.name]
        self.fetched[peer.name] = self.fetched.get(peer.name, 0) + rng.size
        if what == "fail":
            raise PeerBlobError(f"{peer.name} broke")
        data = self.blobs[digest][rng.start : rng.end]
        return bytes(b ^ 1 for b in data) if what == "corrupt" else data


class FakeRegistry:
    def __init__(self, blobs: Mapping[str, bytes]) -> None:
        self.blobs = blobs
        self.sent = 0

    @property
    def labels(self) -> Mapping[str, str]:
        return {}

    async def fetch_blob(self, desc: Descriptor, offset: int = 0) -> AsyncIterator[bytes]:
        data = self.blobs[desc.digest]
        for i in range(offset, len(data), 7000):
            chunk = data[i : i + 7000]
            self.sent += len(chunk)
            yield chunk

    async def fetch_bytes(self, desc: Descriptor) -> bytes:
        return self.blobs[desc.digest]


def _source(behaviour: dict[str, str], data: bytes) -> tuple[PeersFirst, FakePeers, FakeRegistry, list[str]]:
    blobs = {sha(data): data}
    peers, registry = FakePeers(blobs, behaviour), FakeRegistry(blobs)
    reports: list[str] = []
    config = SharingConfig(range_size=4096, min_peer_size=0, rendezvous_delay=0)
    candidates = [Peer(name, "127.0.0.1:1") for name in behaviour]
    source = PeersFirst(
        peers, StaticPeers(lambda: candidates), registry, config, "me", lambda p, d, r: reports.append(f"{p}:{r}")
    )
    return source, peers, registry, reports


async def test_held_elsewhere_names_the_blobs_a_peer_holds_whole() -> None:
    """What the cache evicts first: blobs a peer (not this host) holds, of a size pulls take from peers."""
    big, small, nowhere = b"x" * 5000, b"y" * 10, b"z" * 5000
    peers = FakePeers({sha(big): big, sha(small): small}, {"a": "ok", "me": "ok"})
    config = SharingConfig(min_peer_size=1000)
    sharing = PeerSharing(
        peers, StaticPeers(lambda: [Peer("a", "127.0.0.1:1"), Peer("me", "127.0.0.1:2")]), config, "me"
    )
    asked = {sha(big): len(big), sha(small): len(small), sha(nowhere): len(nowhere)}
    assert await sharing.held_elsewhere(asked) == {sha(big)}
    # this host alone holds them: nothing is elsewhere
    alone = PeerSharing(peers, StaticPeers(lambda: [Peer("me", "127.0.0.1:2")]), config, "me")
    assert await alone.held_elsewhere(asked) == frozenset()


async def _all(source: PeersFirst, desc: Descriptor, offset: int = 0) -> bytes:
    return b"".join([c async for c in source.fetch_blob(desc, offset)])


async def test_one_blob_is_striped_across_the_holders() -> None:
    data = bytes(range(256)) * 200
    source, peers, registry, _ = _source({"a": "ok", "b": "ok", "c": "absent"}, data)
    desc = Descriptor("application/octet-stream", Digest(sha(data)), len(data))
    assert await _all(source, desc) == data
    assert registry.sent == 0 and peers.fetched.get("a") and peers.fetched.get("b") and "c" not in peers.fetched
    assert source.served_from(desc.digest) == "peer" and source.served_from(sha(b"other")) is None
    assert await _all(source, desc, 10_000) == data[10_000:]


async def test_a_failing_peer_is_dropped_and_the_others_finish() -> None:
    data = bytes(range(256)) * 200
    source, _, registry, reports = _source({"a": "fail", "b": "ok"}, data)
    desc = Descriptor("application/octet-stream", Digest(sha(data)), len(data))
    assert await _all(source, desc) == data
    assert reports == ["a:failed"] and registry.sent == 0 and source.dropped == {"a"}


async def test_without_good_peers_the_registry_sends_the_rest() -> None:
    data = bytes(range(256)) * 200
    source, _, registry, reports = _source({"a": "fail"}, data)
    desc = Descriptor("application/octet-stream", Digest(sha(data)), len(data))
    assert await _all(source, desc) == data
    assert registry.sent == len(data) and reports == ["a:failed"]
    assert source.served_from(desc.digest) == "registry"


async def test_bad_bytes_are_traced_to_their_peer_through_the_registry() -> None:
    data = bytes(range(256)) * 200
    source, _, registry, reports = _source({"a": "ok", "b": "corrupt"}, data)
    desc = Descriptor("application/octet-stream", Digest(sha(data)), len(data))
    first = await _all(source, desc)
    assert first != data and registry.sent == 0
    assert source.distrust(desc.digest)  # what containerd's commit check leads the pull to call
    assert await _all(source, desc) == data
    assert registry.sent == len(data) and reports == ["b:bad_bytes"] and source.dropped == {"b"}
    registry.sent = 0
    assert await _all(source, desc) == data  # "a" alone from now on
    assert registry.sent == 0


def test_peers_with_bytes_are_read_at_once() -> None:
    assert next_step("h1", "d", {"h2": 0, "h3": 10}, 0) == (Step.PEERS, ["h3"])


@given(st.lists(st.sampled_from(["h1", "h2", "h3", "h4"]), min_size=1, max_size=4, unique=True), st.text())
def test_hosts_starting_a_blob_together_elect_one_registry_fetcher(wanting: list[str], digest: str) -> None:
    # Every host that wants the blob sees the others with 0 bytes: after the first round exactly one
    # of them goes to the registry, and nobody waits for ever.
    steps = {h: next_step(h, digest, {o: 0 for o in wanting if o != h}, 1)[0] for h in wanting}
    assert list(steps.values()).count(Step.REGISTRY) == 1
    assert all(next_step(h, digest, {o: 0 for o in wanting if o != h}, 0)[0] is Step.WAIT for h in wanting)
    assert all(next_step(h, digest, {o: 0 for o in wanting if o != h}, 5)[0] is Step.REGISTRY for h in wanting)


async def test_a_blob_nobody_is_named_for_comes_from_the_registry_at_once() -> None:
    # The rendezvous wait is for hosts starting the blob together: with no candidate named (the
    # tracker knows of nobody holding or fetching it) there is nobody to wait for.
    data = bytes(range(256)) * 200
    blobs = {sha(data): data}
    registry = FakeRegistry(blobs)
    desc = Descriptor("application/octet-stream", Digest(sha(data)), len(data))

    def source(candidates: list[Peer], delay: float) -> PeersFirst:
        config = SharingConfig(range_size=4096, min_peer_size=0, rendezvous_delay=delay)
        return PeersFirst(FakePeers(blobs, {"a": "absent"}), StaticPeers(lambda: candidates), registry, config, "me")

    assert await asyncio.wait_for(_all(source([], 30.0), desc), 5.0) == data
    # A named candidate (here one without the blob) is still waited for, one round per wanting host.
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await _all(source([Peer("a", "127.0.0.1:1")], 0.2), desc) == data
    assert loop.time() - started >= 0.2


async def test_the_transfer_starts_after_the_peers_were_asked() -> None:
    # Asking the tracker and the peers is a cost per fetch, not bytes: the source says when the bytes
    # were first requested, so the measured rates can leave the asking out.
    data = bytes(range(256)) * 200
    blobs = {sha(data): data}
    desc = Descriptor("application/octet-stream", Digest(sha(data)), len(data))

    class SlowDirectory(StaticPeers):
        async def peers(self, digest: str | None) -> list[Peer]:
            await asyncio.sleep(0.2)
            return await super().peers(digest)

    config = SharingConfig(range_size=4096, min_peer_size=0, rendezvous_delay=0)
    candidates = [Peer("a", "127.0.0.1:1")]
    source = PeersFirst(
        FakePeers(blobs, {"a": "ok"}), SlowDirectory(lambda: candidates), FakeRegistry(blobs), config, "me"
    )
    assert source.transfer_started(desc.digest) is None
    started = time.monotonic()
    assert await _all(source, desc) == data
    transfer = source.transfer_started(desc.digest)
    assert transfer is not None and started + 0.2 <= transfer <= time.monotonic()
    assert isinstance(source, TransferStarts)
