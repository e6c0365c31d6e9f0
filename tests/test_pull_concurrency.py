"""Concurrent pulls share downloads, and a locked containerd ingest is waited for.

The probe: six concurrent pulls of one image, five failed with 503 "ref locked". Now the pulls of
one reference are one pull, blobs are downloaded once whichever images need them, and an ingest
another writer holds is waited for. A proxy in front of the real registry counts what was served.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.app import Agent
from agent.config import PullConfig, RegistryConfig
from agent.errors import IngestLocked
from agent.images.ingest import ingest_ref
from agent.model import PullProgress
from tests.harness.agent import agent_config, running_agent
from tests.harness.containerd import PrivateContainerd
from tests.harness.images import Image, ImageBuilder, random_layer
from tests.harness.proxy import FaultyProxy
from tests.harness.registry import DockerRegistry


def unique_image(size: int) -> Image:
    """An image no other test has pulled: every blob is new to containerd's content store, which the
    tests' namespaces share (a blob another test pulled exists here already and is not fetched)."""
    layers = [random_layer(size, seed=secrets.randbits(31)), random_layer(64 << 10, seed=secrets.randbits(31))]
    return ImageBuilder(layers, cmd=["/data/random/0"], labels={"unique": secrets.token_hex(4)}).build()


def repo() -> str:
    return f"test/conc-{secrets.token_hex(4)}"


@pytest.fixture
async def proxy(registry: DockerRegistry) -> AsyncIterator[FaultyProxy]:
    front = FaultyProxy(registry.url)
    await front.start()
    try:
        yield front
    finally:
        await front.stop()


@pytest.fixture
async def agent(containerd: PrivateContainerd, proxy: FaultyProxy, workdir: Path) -> AsyncIterator[Agent]:
    config = agent_config(
        containerd,
        [RegistryConfig(host=proxy.host, plain_http=True)],
        workdir,
        pull=PullConfig(read_timeout=10.0, retries=2, ingest_lock_timeout=20.0),
    )
    async with running_agent(config) as a:
        yield a


def served(proxy: FaultyProxy, kind: str) -> Counter[str]:
    """GETs the registry answered, by last path element (digest or tag)."""
    return Counter(r.path.rsplit("/", 1)[-1] for r in proxy.requests if r.method == "GET" and f"/{kind}/" in r.path)


async def test_six_concurrent_pulls_of_one_image_share_one_download(
    agent: Agent, registry: DockerRegistry, proxy: FaultyProxy
) -> None:
    image = unique_image(1 << 20)
    name = repo()
    await image.push(registry.host, name, "v1")
    ref = f"{proxy.host}/{name}:v1"
    proxy.blob_delay = 0.2  # the pulls overlap however the scheduler runs them
    progresses = [PullProgress(ref=ref) for _ in range(6)]

    summaries = await asyncio.gather(*(agent.images.pull(ref, p) for p in progresses))

    assert {s.digest for s in summaries} == {image.digest}
    assert [p.status for p in progresses] == ["done"] * 6
    assert all(p.done == p.total == sum(la.size for la in image.layers) for p in progresses)
    blobs = served(proxy, "blobs")
    assert blobs[image.config_digest] == 1
    assert {layer.digest: blobs[layer.digest] for layer in image.layers} == dict.fromkeys(
        (layer.digest for layer in image.layers), 1
    )
    assert served(proxy, "manifests") == Counter({"v1": 1})
    assert [i.name for i in await agent.images.list()] == [ref]
    assert await agent.containerd.leases.list() == []
    assert await agent.containerd.content.list_statuses() == []


async def test_two_tags_pulled_at_once_download_each_blob_once(
    agent: Agent, registry: DockerRegistry, proxy: FaultyProxy
) -> None:
    image = unique_image(1 << 20)
    name = repo()
    await image.push(registry.host, name, "a")
    await image.push(registry.host, name, "b")
    proxy.blob_delay = 0.3

    first, second = await asyncio.gather(
        agent.images.pull(f"{proxy.host}/{name}:a"), agent.images.pull(f"{proxy.host}/{name}:b")
    )

    assert first.digest == second.digest == image.digest
    blobs = served(proxy, "blobs")
    assert all(blobs[d] == 1 for d in [image.config_digest, *(la.digest for la in image.layers)]), blobs
    # Each byte is counted by the pull that downloaded it, once.
    layer_bytes = sum(la.size for la in image.layers)
    assert first.bytes_fetched + second.bytes_fetched == layer_bytes
    assert agent.metrics.pull_bytes._value.get() == layer_bytes
    assert sorted(i.name for i in await agent.images.list()) == [f"{proxy.host}/{name}:a", f"{proxy.host}/{name}:b"]
    assert await agent.containerd.leases.list() == []


async def test_a_cancelled_caller_does_not_cancel_the_shared_pull(
    agent: Agent, registry: DockerRegistry, proxy: FaultyProxy
) -> None:
    image = unique_image(1 << 20)
    name = repo()
    await image.push(registry.host, name, "v1")
    ref = f"{proxy.host}/{name}:v1"
    proxy.blob_delay = 0.5
    leaving = asyncio.create_task(agent.images.pull(ref))
    staying = asyncio.create_task(agent.images.pull(ref))
    await asyncio.sleep(0.3)
    leaving.cancel()
    assert (await staying).digest == image.digest
    with pytest.raises(asyncio.CancelledError):
        await leaving

    # When every caller leaves, the pull stops and cleans up after itself.
    other = f"{proxy.host}/{name}:v2"
    await unique_image(1 << 20).push(
        registry.host, name, "v2"
    )
    alone = asyncio.create_task(agent.images.pull(other))
    await asyncio.sleep(0.3)
    alone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await alone
    assert other not in [i.name for i in await agent.images.list()]
    assert await agent.containerd.leases.list() == []


async def test_an_ingest_locked_by_another_writer_is_waited_for(
    agent: Agent, registry: DockerRegistry, proxy: FaultyProxy
) -> None:
    image = unique_image(1 << 20)
    big = image.layers[-1]
    name = repo()
    await image.push(registry.host, name, "v1")
    half = big.size // 2
    loop = asyncio.get_running_loop()
    # Another writer (as another process would) holds the ingest the pull needs, then lets go.
    async with agent.containerd.content.writer(ingest_ref(big.descriptor()), big.size, big.digest) as other:
        await other.write(image.blobs()[big.digest][:half])
        started = loop.time()
        pull = asyncio.create_task(agent.images.pull(f"{proxy.host}/{name}:v1"))
        await asyncio.sleep(1.0)
        assert not pull.done()
    summary = await pull
    assert loop.time() - started >= 1.0
    assert summary.digest == image.digest
    # It resumed what the other writer left.
    assert summary.bytes_fetched == sum(la.size for la in image.layers) - half
    assert await agent.containerd.content.list_statuses() == []


async def test_an_ingest_locked_for_too_long_fails_as_ingest_locked(
    containerd: PrivateContainerd, registry: DockerRegistry, proxy: FaultyProxy, workdir: Path
) -> None:
    image = unique_image(256 << 10)
    big = image.layers[-1]
    name = repo()
    await image.push(registry.host, name, "v1")
    config = agent_config(
        containerd,
        [RegistryConfig(host=proxy.host, plain_http=True)],
        workdir,
        pull=PullConfig(read_timeout=10.0, ingest_lock_timeout=0.5),
    )
    ref = f"{proxy.host}/{name}:v1"
    async with running_agent(config) as agent:
        cd = agent.containerd
        async with cd.content.writer(ingest_ref(big.descriptor()), big.size, big.digest):
            with pytest.raises(IngestLocked, match=f"ingest of {big.digest} is still locked .* after 0.5 s") as err:
                await agent.images.pull(ref)
        assert (err.value.code, err.value.http_status) == ("ingest_locked", 503)
        await cd.content.abort(ingest_ref(big.descriptor()))
        assert ref not in [i.name for i in await cd.images.list()]
        assert await cd.leases.list() == []
        assert await cd.content.list_statuses() == []
