"""The layer cache on real components: a registry, a containerd of its own, running containers.

Each test ends as the issue asks: `ctr` runs the images that remain, and no lease, ingest or
snapshot of an evicted image is left.
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from agent.app import Agent
from agent.cache.service import ImageInUse
from agent.config import CacheConfig
from agent.images.sources import RegistryBlobs
from agent.model import CreateRequest, PullProgress
from agent.oci import Reference
from agent.registry.client import RegistryClient
from tests.harness.agent import agent_config, running_agent
from tests.harness.containerd import PrivateContainerd
from tests.harness.images import Image, ImageBuilder, busybox_layer, random_layer
from tests.harness.registry import DockerRegistry

MIB = 1 << 20


async def push(registry: DockerRegistry, image: Image) -> str:
    name = f"test/cache-{secrets.token_hex(4)}"
    await image.push(registry.host, name, "v1")
    return f"{registry.host}/{name}:v1"


def sleeper(seed: int, size: int = MIB) -> Image:
    """busybox (shared by every image here) + `size` random bytes of its own; runs `sleep`."""
    return ImageBuilder([busybox_layer(), random_layer(size, seed=seed)], cmd=["/bin/sleep", "600"]).build()


def stored(*images: Image) -> int:
    """Bytes the content store holds for `images`: manifests, configs, layers, each blob once."""
    blobs: dict[str, int] = {}
    for image in images:
        blobs[image.digest] = len(image.manifest)
        blobs.update({d: len(b) for d, b in image.blobs().items()})
    return sum(blobs.values())


@pytest.fixture
async def ctrd(workdir: Path) -> AsyncIterator[PrivateContainerd]:
    """A containerd of its own: an empty content store, so every byte count is exact."""
    daemon = PrivateContainerd(workdir / "ctrd")
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.stop()


def cache_agent(
    ctrd: PrivateContainerd, registry: DockerRegistry, workdir: Path, max_bytes: int
) -> contextlib.AbstractAsyncContextManager[Agent]:
    config = agent_config(ctrd, [registry.registry_config()], workdir)
    return running_agent(dataclasses.replace(config, cache=CacheConfig(max_bytes=max_bytes, low_watermark=1.0)))


def counters(agent: Agent) -> dict[str, tuple[int, int]]:
    served = agent.metrics.cache.to_json()["served"]
    return {s: (v["requests"], v["bytes"]) for s, v in served.items() if v["requests"]}


def scraped(agent: Agent, name: str, source: str) -> float:
    value = agent.metrics.registry.get_sample_value(f"ferryman_cache_{name}_total", {"source": source})
    return value or 0.0


async def assert_clean(agent: Agent, ctrd: PrivateContainerd, runnable: Sequence[str], gone: Sequence[Image]) -> None:
    cd = agent.containerd
    ns = cd.namespace
    assert await cd.leases.list() == [], "no lease left"
    assert await cd.content.list_statuses() == [], "no ingest left"
    present = {c.digest for c in await cd.content.infos()}
    for image in gone:
        assert image.layers[-1].digest not in present and image.digest not in present
        top = image.layers[-1].diff_id
        assert top not in ctrd.ctr("snapshots", "ls", namespace=ns).stdout
    for ref in runnable:
        cid = f"ctr{secrets.token_hex(3)}"
        out = ctrd.ctr("run", "--rm", *ctrd.run_flags(cid), ref, cid, "/bin/echo", "runs", namespace=ns).stdout
        assert "runs" in out, ref


async def test_hits_and_fetches_are_counted_exactly(
    ctrd: PrivateContainerd, registry: DockerRegistry, workdir: Path
) -> None:
    x, y = sleeper(1), sleeper(2)
    ref_x, ref_y = await push(registry, x), await push(registry, y)
    busybox, rx, ry = x.layers[0], x.layers[1], y.layers[1]
    assert busybox.digest == y.layers[0].digest
    async with cache_agent(ctrd, registry, workdir, max_bytes=1 << 40) as agent:
        await agent.images.pull(ref_x)  # all from the registry: config, busybox, rx
        assert counters(agent) == {"registry": (3, len(x.config) + busybox.size + rx.size)}
        await agent.images.pull(ref_x)  # the config is asked again (it is how a pull starts), both layers hit
        assert counters(agent) == {
            "registry": (4, 2 * len(x.config) + busybox.size + rx.size),
            "local": (2, busybox.size + rx.size),
        }
        await agent.images.pull(ref_y)  # busybox is shared: a hit; ry and y's config from the registry
        registry_total = (6, 2 * len(x.config) + len(y.config) + busybox.size + rx.size + ry.size)
        local_total = (3, 2 * busybox.size + rx.size)
        assert counters(agent) == {"registry": registry_total, "local": local_total}
        # Prometheus says the same, and the status's hit rates are those of the counters.
        assert (scraped(agent, "requests", "registry"), scraped(agent, "bytes", "registry")) == registry_total
        assert (scraped(agent, "requests", "local"), scraped(agent, "bytes", "local")) == local_total
        # The gauges follow every check of the bound, before anyone asks for the status.
        assert agent.metrics.registry.get_sample_value("ferryman_cache_used_bytes") == stored(x, y)
        status = await agent.cache.status()
        assert status["hit_rate"]["requests"] == pytest.approx(3 / 9)
        assert status["hit_rate"]["bytes"] == pytest.approx(local_total[1] / (local_total[1] + registry_total[1]))
        assert status["used_bytes"] == stored(x, y) and status["entries"] == 2 and status["evictions"] == 0
        uses = {i["name"]: i["uses"] for i in status["images"]}
        assert uses == {ref_x: 2, ref_y: 1}
        assert b"ferryman_cache_used_bytes" in generate_latest(agent.metrics.registry)
        await assert_clean(agent, ctrd, [ref_x, ref_y], [])


async def test_eviction_under_a_small_bound_spares_what_is_in_use(
    ctrd: PrivateContainerd, registry: DockerRegistry, workdir: Path
) -> None:
    a, b, c, d = (sleeper(seed) for seed in (11, 12, 13, 14))
    refs = [await push(registry, image) for image in (a, b, c, d)]
    ref_a, ref_b, ref_c, ref_d = refs
    # Room for three of them (they share busybox): the fourth pull is over the bound.
    bound = stored(a, b, c) + 1000
    async with cache_agent(ctrd, registry, workdir, max_bytes=bound) as agent:
        await agent.images.pull(ref_a)
        await agent.containers.create(CreateRequest(id="web", image=ref_a))
        await agent.containers.start("web")
        await agent.images.pull(ref_b)
        await agent.containers.create(CreateRequest(id="standby", image=ref_b))  # created, never started
        await agent.images.pull(ref_c)
        assert agent.metrics.cache.evictions == 0
        # The fourth: over the bound. a and b are in use (one running, one created), so c goes,
        # though d is the one that made the store too big: it is the latest used.
        await agent.images.pull(ref_d)
        status = await agent.cache.status()
        names = {i["name"] for i in status["images"]}
        assert names == {ref_a, ref_b, ref_d}
        freed = stored(a, b, c, d) - stored(a, b, d)
        assert (status["evictions"], status["evicted_bytes"]) == (1, freed)
        assert status["used_bytes"] == stored(a, b, d) <= bound
        assert agent.metrics.registry.get_sample_value("ferryman_cache_evictions_total") == 1
        assert agent.metrics.registry.get_sample_value("ferryman_cache_evicted_bytes_total") == freed
        assert agent.metrics.registry.get_sample_value("ferryman_cache_capacity_bytes") == bound
        # What is in use cannot be evicted by hand either; a pin keeps d through any bound.
        with pytest.raises(ImageInUse, match="in use by container web"):
            await agent.cache.evict(ref_a)
        await agent.cache.pin(ref_d)
        with pytest.raises(ImageInUse, match="pinned"):
            await agent.cache.evict(ref_d)
        status = await agent.cache.status()
        assert status["pinned_bytes"] == stored(d)
        # Pulled again, c comes back: kept for the use it was pulled for, though the store is over
        # the bound (d is pinned, a and b in use). The next check evicts it again (the periodic one
        # once c has gone unused for its interval).
        await agent.images.pull(ref_c)
        status = await agent.cache.status()
        assert {i["name"] for i in status["images"]} == {ref_a, ref_b, ref_c, ref_d}
        assert status["used_bytes"] > bound and status["evictions"] == 1
        # The periodic check keeps what was used within its interval: c's container may be on its way.
        kept = await agent.cache.enforce(recent=300.0)
        assert kept.evict == () and kept.short > 0
        done = await agent.cache.enforce()
        assert done.evict == (ref_c,) and done.short == 0
        status = await agent.cache.status()
        assert {i["name"] for i in status["images"]} == {ref_a, ref_b, ref_d}
        assert (status["evictions"], status["evicted_bytes"]) == (2, 2 * freed)
        running = [s for s in await agent.containers.list() if s.id == "web"]
        assert running and running[0].state.value == "running"
        await assert_clean(agent, ctrd, [ref_a, ref_b, ref_d], [c])
        # Unpinned and evicted by hand: the record and the blobs only d had are gone.
        await agent.cache.pin(ref_d, pinned=False)
        result = await agent.cache.evict(ref_d)
        assert result["freed_bytes"] == stored(a, b, d) - stored(a, b)
        await assert_clean(agent, ctrd, [ref_a, ref_b], [c, d])


async def test_over_the_bound_an_image_peers_hold_goes_before_the_last_copy(
    ctrd: PrivateContainerd, registry: DockerRegistry, workdir: Path
) -> None:
    a, b, c = (sleeper(seed, 2 * MIB) for seed in (21, 22, 23))
    ref_a, ref_b, ref_c = [await push(registry, image) for image in (a, b, c)]
    asked: list[list[str]] = []

    async def on_peers(blobs: Mapping[str, int]) -> frozenset[str]:
        asked.append(list(blobs))
        return frozenset({b.layers[1].digest})  # another host holds b's own layer, nobody a's

    async with cache_agent(ctrd, registry, workdir, max_bytes=stored(a, b, c) - MIB) as agent:
        agent.cache.on_peers = on_peers
        for ref in (ref_a, ref_b):
            await agent.images.pull(ref)
        assert asked == [], "under the bound the fleet is not asked"
        await agent.images.pull(ref_c)
        # a is the least recently used, but the fleet's last copy of its layer: b goes
        names = {i["name"] for i in (await agent.cache.status())["images"]}
        assert names == {ref_a, ref_c}
        assert b.layers[1].digest in asked[0] and c.layers[1].digest not in asked[0], "c, just used, is kept"
        await assert_clean(agent, ctrd, [ref_a, ref_c], [b])


async def test_pins_and_uses_survive_a_restart_and_prefetch_pins(
    ctrd: PrivateContainerd, registry: DockerRegistry, workdir: Path
) -> None:
    x, y = sleeper(21), sleeper(22)
    ref_x, ref_y = await push(registry, x), await push(registry, y)
    config = dataclasses.replace(
        agent_config(ctrd, [registry.registry_config()], workdir), cache=CacheConfig(max_bytes=1 << 40)
    )
    first = await Agent.open(config)
    try:
        done = await first.cache.prefetch(ref_x, pin=True)
        assert (done["name"], done["pinned"], done["bytes_fetched"]) == (ref_x, True, sum(la.size for la in x.layers))
        await first.images.pull(ref_y)
        await first.images.pull(ref_y)
    finally:
        await first.close()  # no clean-up: the images stay in containerd, as after a crash or upgrade
    async with running_agent(config) as agent:
        images = {i["name"]: i for i in (await agent.cache.status())["images"]}
        assert (images[ref_x]["pinned"], images[ref_x]["protected"]) == (True, "pinned")
        assert (images[ref_y]["pinned"], images[ref_y]["uses"], images[ref_y]["protected"]) == (False, 2, None)
        with pytest.raises(ImageInUse, match="pinned"):
            await agent.cache.evict(ref_x)
        # A re-pull keeps the pin (the record's labels are updated, not replaced).
        await agent.images.pull(ref_x)
        images = {i["name"]: i for i in (await agent.cache.status())["images"]}
        assert images[ref_x]["pinned"] is True and images[ref_x]["uses"] == 2
        # A migration in progress holds its image before any container does.
        migrating = {ref_y: "migration m-1 in progress"}
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(agent.cache, "_busy", lambda: migrating)
            with pytest.raises(ImageInUse, match="migration m-1 in progress"):
                await agent.cache.evict(ref_y)
        assert (await agent.cache.evict(ref_y))["freed_bytes"] == stored(x, y) - stored(x)
        await assert_clean(agent, ctrd, [ref_x], [y])


class SaysPeer(RegistryBlobs):
    """A registry source that says one layer came from a peer: what the peer-to-peer source does."""

    def __init__(self, registry: RegistryClient, ref: Reference, peer_digest: str) -> None:
        super().__init__(registry, ref)
        self.peer_digest = peer_digest

    def served_from(self, digest: str) -> str | None:
        return "peer" if digest == self.peer_digest else None


async def test_a_source_that_fetches_from_several_places_is_counted_per_blob(
    ctrd: PrivateContainerd, registry: DockerRegistry, workdir: Path
) -> None:
    x = sleeper(31)
    ref = await push(registry, x)
    async with cache_agent(ctrd, registry, workdir, max_bytes=1 << 40) as agent:
        reference = Reference.parse(ref)
        image = await agent.registry.resolve(reference, agent.images.platform)
        source = SaysPeer(agent.registry, reference, x.layers[1].digest)
        summary = await agent.images._puller.install(ref, image, source, PullProgress(ref=ref))
        assert counters(agent) == {
            "registry": (2, len(x.config) + x.layers[0].size),
            "peer": (1, x.layers[1].size),
        }
        # the pull's answer says the same: which of its bytes peers served
        assert summary.bytes_from_peers == x.layers[1].size
        assert summary.bytes_fetched == x.layers[0].size + x.layers[1].size
        await assert_clean(agent, ctrd, [ref], [])


async def test_a_kept_layer_outlives_an_eviction_that_takes_an_unkept_one(
    ctrd: PrivateContainerd, registry: DockerRegistry, workdir: Path
) -> None:
    """A warm of a layer already here keeps it (a lease, nothing fetched, not counted as a warm):
    over the bound, the eviction takes the images as their value says, but the kept layer stays
    while the unkept one of the same value goes."""
    a, b, c = (sleeper(seed) for seed in (31, 32, 33))
    ref_a, ref_b, ref_c = [await push(registry, image) for image in (a, b, c)]
    async with cache_agent(ctrd, registry, workdir, max_bytes=stored(a, b) + 1000) as agent:
        await agent.images.pull(ref_a)
        await agent.images.pull(ref_b)
        kept = await agent.assembly.warm_layer(a.layers[1].digest, ref_a, ttl=60)
        assert (kept["kept"], kept["bytes_fetched"], kept["size"]) == (True, 0, a.layers[1].size)
        warms = agent.metrics.cache.to_json()["warms"]
        assert warms["warmed"] == 0, "a keep moved no bytes: not a warm"
        assert (warms["keeps"]["kept"], warms["keeps"]["kept_bytes"]) == (1, a.layers[1].size), "but a keep"
        await agent.images.pull(ref_c)  # over the bound: a and b are worth the same, a is older
        present = {i.digest for i in await agent.containerd.content.infos()}
        assert a.layers[1].digest in present, "the kept layer stays"
        assert b.layers[1].digest not in present, "the unkept one goes"
        names = {i["name"] for i in (await agent.cache.status())["images"]}
        assert ref_b not in names and ref_c in names
