"""The agent's pull against a real registry and a real containerd, compared with what ctr sees."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.app import Agent
from agent.config import PullConfig, RegistryConfig
from agent.errors import (
    DigestMismatch,
    ImageNotFound,
    ManifestNotFound,
    PlatformNotFound,
    RegistryAuthError,
    RegistryUnavailable,
)
from agent.images import labels as L
from agent.images.ingest import ingest_ref
from agent.model import PullProgress
from tests.harness.agent import agent_config, running_agent
from tests.harness.containerd import PrivateContainerd
from tests.harness.images import (
    ImageBuilder,
    build_index,
    build_test_image,
    busybox_layer,
    random_layer,
    symlink_escape_layers,
    traversal_layer,
)
from tests.harness.proxy import FaultyProxy
from tests.harness.registry import DockerRegistry


def repo() -> str:
    return f"test/img-{secrets.token_hex(4)}"


@pytest.fixture
async def agent(containerd: PrivateContainerd, registry: DockerRegistry, workdir: Path) -> AsyncIterator[Agent]:
    async with running_agent(agent_config(containerd, [registry.registry_config()], workdir)) as a:
        yield a


@pytest.fixture
async def fresh(registry: DockerRegistry, workdir: Path) -> AsyncIterator[tuple[Agent, PrivateContainerd]]:
    """An agent on a containerd of its own: an empty content store, so byte counts are exact.

    (containerd shares content between namespaces: on the session daemon, layers other tests pulled
    are already there.)
    """
    ctrd = PrivateContainerd(workdir / "ctrd")
    await ctrd.start()
    try:
        async with running_agent(agent_config(ctrd, [registry.registry_config()], workdir)) as a:
            yield a, ctrd
    finally:
        await ctrd.stop()


async def assert_nothing_left(agent: Agent, ctrd: PrivateContainerd, ref: str) -> None:
    """A failed pull leaves no image, no lease and no ingest behind."""
    cd = agent.containerd
    assert ref not in [i.name for i in await cd.images.list()]
    assert await cd.leases.list() == []
    assert await cd.content.list_statuses() == []
    assert ref not in ctrd.ctr("images", "ls", "-q", namespace=cd.namespace).stdout


async def test_pull_then_ctr_runs_it(fresh: tuple[Agent, PrivateContainerd], registry: DockerRegistry) -> None:
    agent, containerd = fresh
    image = build_test_image().build()
    name = repo()
    await image.push(registry.host, name, "v1")
    ref = f"{registry.host}/{name}:v1"
    progress = PullProgress(ref=ref)

    summary = await agent.images.pull(ref, progress)

    assert summary.name == ref
    assert summary.digest == image.digest
    assert summary.layers_fetched == len(image.layers)
    assert summary.bytes_fetched == sum(layer.size for layer in image.layers) == progress.done == progress.total
    assert progress.status == "done"
    assert {layer.status for layer in progress.layers} == {"unpacked"}
    ns = agent.containerd.namespace
    listed = containerd.ctr("images", "ls", namespace=ns).stdout
    assert ref in listed and image.digest in listed
    # ctr runs what we assembled, on the same containerd: whiteouts applied, files intact.
    cid = f"c{secrets.token_hex(3)}"
    out = containerd.ctr(
        "run",
        "--rm",
        *containerd.run_flags(cid),
        ref,
        cid,
        "/bin/sh",
        "-c",
        "cat /data/keep /data/added; ls /data; test ! -e /data/gone && echo gone-ok",
        namespace=ns,
    ).stdout
    assert "keep me" in out and "added by layer 3" in out and "gone-ok" in out
    # The GC and unpack labels ctr's own pull would have set.
    cd = agent.containerd
    manifest = await cd.content.info(image.digest)
    assert manifest.labels[L.GC_CONFIG] == image.config_digest
    assert manifest.labels[L.gc_layer(0)] == image.layers[0].digest
    for layer in image.layers:
        info = await cd.content.info(layer.digest)
        assert info.labels[L.UNCOMPRESSED] == layer.diff_id
    config = await cd.content.info(image.config_digest)
    assert config.labels[L.gc_snapshot("overlayfs")] in containerd.ctr("snapshots", "ls", namespace=ns).stdout
    assert await cd.leases.list() == []


async def test_second_pull_transfers_no_layer_bytes(
    fresh: tuple[Agent, PrivateContainerd], registry: DockerRegistry
) -> None:
    agent, _ = fresh
    name = repo()
    await build_test_image().build().push(registry.host, name, "v1")
    ref = f"{registry.host}/{name}:v1"
    first = await agent.images.pull(ref)
    second = await agent.images.pull(ref)
    assert first.bytes_fetched > 0
    assert (second.bytes_fetched, second.layers_fetched) == (0, 0)
    assert agent.metrics.pull_bytes._value.get() == first.bytes_fetched


async def test_layer_shared_with_another_image_is_not_downloaded_again(agent: Agent, registry: DockerRegistry) -> None:
    base = build_test_image().build()
    bigger = build_test_image(extra_layers=[random_layer(256 << 10, seed=secrets.randbits(31))]).build()
    name = repo()
    await base.push(registry.host, name, "base")
    await bigger.push(registry.host, name, "bigger")
    await agent.images.pull(f"{registry.host}/{name}:base")
    second = await agent.images.pull(f"{registry.host}/{name}:bigger")
    assert second.layers_fetched == 1
    assert second.bytes_fetched == bigger.layers[-1].size
    # What the agent tells the coordinator it holds (placement counts the bytes a target would pull).
    held = set(await agent.images.layer_digests())
    assert {str(layer.digest) for layer in bigger.layers} <= held


async def test_index_picks_this_platform(agent: Agent, containerd: PrivateContainerd, registry: DockerRegistry) -> None:
    index = build_index([build_test_image(architecture="amd64"), build_test_image(architecture="arm64")])
    name = repo()
    await index.push(registry.host, name, "multi")
    ref = f"{registry.host}/{name}:multi"
    summary = await agent.images.pull(ref)
    assert summary.digest == index.digest  # the image points at the index, as with ctr
    assert summary.media_type == index.media_type
    amd64 = index.image_for("linux", "amd64")
    assert await agent.containerd.content.exists(amd64.digest) is not None
    assert await agent.containerd.content.exists(index.image_for("linux", "arm64").digest) is None


async def test_wrong_platform_fails_cleanly(
    agent: Agent, containerd: PrivateContainerd, registry: DockerRegistry
) -> None:
    index = build_index([build_test_image(architecture="arm64"), build_test_image(architecture="s390x")])
    name = repo()
    await index.push(registry.host, name, "foreign")
    ref = f"{registry.host}/{name}:foreign"
    with pytest.raises(PlatformNotFound, match="arm64"):
        await agent.images.pull(ref)
    await assert_nothing_left(agent, containerd, ref)


async def test_single_manifest_for_another_platform(
    agent: Agent, containerd: PrivateContainerd, registry: DockerRegistry
) -> None:
    name = repo()
    await build_test_image(architecture="arm64").build().push(registry.host, name, "arm")
    ref = f"{registry.host}/{name}:arm"
    with pytest.raises(PlatformNotFound, match="linux/arm64"):
        await agent.images.pull(ref)
    await assert_nothing_left(agent, containerd, ref)


async def test_missing_tag(agent: Agent, containerd: PrivateContainerd, registry: DockerRegistry) -> None:
    ref = f"{registry.host}/{repo()}:nope"
    with pytest.raises(ManifestNotFound, match="nope"):
        await agent.images.pull(ref)
    await assert_nothing_left(agent, containerd, ref)


async def test_registry_down(containerd: PrivateContainerd, workdir: Path) -> None:
    down = DockerRegistry(workdir / "down")
    await down.start()
    name = repo()
    await build_test_image().build().push(down.host, name, "v1")
    await down.stop()
    config = agent_config(containerd, [down.registry_config()], workdir, pull=PullConfig(retries=0, connect_timeout=2))
    async with running_agent(config) as agent:
        ref = f"{down.host}/{name}:v1"
        with pytest.raises(RegistryUnavailable, match=down.host):
            await agent.images.pull(ref)
        await assert_nothing_left(agent, containerd, ref)


async def test_corrupted_layer_fails_with_digest_mismatch(
    containerd: PrivateContainerd, registry: DockerRegistry, workdir: Path
) -> None:
    # A layer no other test has: it must really be downloaded (containerd shares content by digest).
    image = build_test_image(extra_layers=[random_layer(256 << 10, seed=secrets.randbits(31))]).build()
    name = repo()
    await image.push(registry.host, name, "v1")
    proxy = FaultyProxy(registry.url, corrupt={image.layers[-1].digest})
    await proxy.start()
    try:
        config = agent_config(containerd, [RegistryConfig(host=proxy.host, plain_http=True)], workdir)
        async with running_agent(config) as agent:
            ref = f"{proxy.host}/{name}:v1"
            with pytest.raises(DigestMismatch, match=image.layers[-1].digest):
                await agent.images.pull(ref)
            await assert_nothing_left(agent, containerd, ref)
            # With the fault gone the same pull succeeds: nothing half-done blocks it.
            proxy.corrupt.clear()
            assert (await agent.images.pull(ref)).digest == image.digest
    finally:
        await proxy.stop()


async def test_broken_download_resumes_with_range(
    containerd: PrivateContainerd, registry: DockerRegistry, workdir: Path
) -> None:
    image = build_test_image(extra_layers=[random_layer(3 << 20, seed=secrets.randbits(31))]).build()
    big = image.layers[-1]
    name = repo()
    await image.push(registry.host, name, "v1")
    cut = big.size // 2
    proxy = FaultyProxy(registry.url, cut_after={big.digest: cut})
    await proxy.start()
    try:
        config = agent_config(containerd, [RegistryConfig(host=proxy.host, plain_http=True)], workdir)
        async with running_agent(config) as agent:
            summary = await agent.images.pull(f"{proxy.host}/{name}:v1")
    finally:
        await proxy.stop()
    ranges = [r.range for r in proxy.requests if r.path.endswith(big.digest) and r.method == "GET"]
    assert ranges[0] is None
    resumed_at = int(ranges[1].removeprefix("bytes=").rstrip("-"))  # type: ignore[union-attr]
    assert 0 < resumed_at <= cut
    # At most what was in flight when the link broke is fetched twice, not the whole blob.
    assert summary.bytes_fetched - sum(la.size for la in image.layers) <= cut - resumed_at
    assert summary.digest == image.digest


async def test_partial_ingest_from_an_earlier_run_is_resumed(
    fresh: tuple[Agent, PrivateContainerd], registry: DockerRegistry
) -> None:
    agent, _ = fresh
    image = build_test_image(extra_layers=[random_layer(2 << 20, seed=secrets.randbits(31))]).build()
    big = image.layers[-1]
    name = repo()
    await image.push(registry.host, name, "v1")
    # An agent that died mid-download left this much in containerd's ingest.
    half = big.size // 2
    async with agent.containerd.content.writer(ingest_ref(big.descriptor()), big.size, big.digest) as w:
        await w.write(image.blobs()[big.digest][:half])
    summary = await agent.images.pull(f"{registry.host}/{name}:v1")
    assert summary.bytes_fetched == sum(la.size for la in image.layers) - half
    assert await agent.containerd.content.list_statuses() == []


async def test_basic_auth(containerd: PrivateContainerd, workdir: Path) -> None:
    reg = DockerRegistry(workdir / "auth", htpasswd={"ops": "s3cret"})
    await reg.start()
    try:
        name = repo()
        await build_test_image().build().push(reg.host, name, "v1", auth=("ops", "s3cret"))
        ref = f"{reg.host}/{name}:v1"
        good = agent_config(containerd, [reg.registry_config(username="ops", password="s3cret")], workdir)
        async with running_agent(good) as agent:
            assert (await agent.images.pull(ref)).name == ref
        bad = agent_config(containerd, [reg.registry_config(username="ops", password="wrong")], workdir)
        async with running_agent(bad) as agent:
            with pytest.raises(RegistryAuthError):
                await agent.images.pull(ref)
            await assert_nothing_left(agent, containerd, ref)
    finally:
        await reg.stop()


async def test_path_traversal_layer_cannot_write_outside(
    agent: Agent, containerd: PrivateContainerd, registry: DockerRegistry, tmp_path: Path
) -> None:
    evil = f"ferryman-evil-{secrets.token_hex(4)}"
    outside = tmp_path / "outside"
    outside.mkdir()
    layers = [busybox_layer(), traversal_layer(evil), *symlink_escape_layers(outside)]
    image = ImageBuilder(layers, cmd=("/bin/sh", "-c", "ls /")).build()
    name = repo()
    await image.push(registry.host, name, "evil")
    ref = f"{registry.host}/{name}:evil"
    try:
        await agent.images.pull(ref)
    except Exception as exc:  # refusing the image is as good as containing it
        assert "layer" in str(exc)
    # Nothing landed outside the snapshot root, wherever the unpacker put it.
    assert list(outside.iterdir()) == []
    for parent in (Path("/"), containerd.root, containerd.root.parent, Path("/tmp")):
        assert not (parent / evil).exists()
        assert not (parent / f"{evil}-2").exists()
        assert not (parent / f"{evil}-abs").exists()


async def test_removed_image_is_gone(agent: Agent, registry: DockerRegistry) -> None:
    name = repo()
    await build_test_image().build().push(registry.host, name, "v1")
    ref = f"{registry.host}/{name}:v1"
    await agent.images.pull(ref)
    assert [i.name for i in await agent.images.list()] == [ref]
    await agent.images.remove(ref)
    assert await agent.images.list() == []
    with pytest.raises(ImageNotFound):
        await agent.images.remove(ref)
