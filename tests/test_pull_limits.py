"""What a registry can make a pull do: byte limits on every read, and the registry allow-list.

A hostile registry (`tests.harness.hostile`) sends endless or oversized bodies; the agent must stop
at the declared size or the manifest cap, fail with `content_too_large`, and leave nothing behind:
no ingest, no lease, no image, and no more bytes on disk than were declared.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from agent.api import build_app
from agent.config import PullConfig, RegistryConfig, parse_config
from agent.errors import ContentTooLarge
from agent.oci import MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST, Descriptor
from core.errors import ConfigError, InvalidRequest
from tests.harness.agent import agent_config, running_agent
from tests.harness.containerd import PrivateContainerd
from tests.harness.hostile import (
    HostileRegistry,
    Served,
    assert_nothing_left,
    content_store_bytes,
    host_platform,
    hostile_agent_config,
    scripted_image,
)
from tests.harness.images import build_test_image
from tests.harness.registry import DockerRegistry

MiB = 1 << 20


def json_bytes(doc: Any) -> bytes:
    return json.dumps(doc).encode()


@pytest.fixture
async def hostile() -> AsyncIterator[HostileRegistry]:
    async with HostileRegistry() as reg:
        yield reg


async def test_endless_layer_body_stops_at_the_declared_size(
    containerd: PrivateContainerd, hostile: HostileRegistry, workdir: Path
) -> None:
    image = scripted_image(1 * MiB, secrets.token_hex(8))
    image.serve(hostile, "v1", Served(secrets.token_bytes(1 * MiB), endless=True))
    ref = f"{hostile.host}/hostile/endless:v1"
    before = content_store_bytes(containerd)
    async with running_agent(hostile_agent_config(containerd, hostile, workdir)) as agent:
        with pytest.raises(ContentTooLarge, match=f"{image.layer.digest}.*larger than the {MiB} bytes") as err:
            await agent.images.pull(ref)
        assert err.value.code == "content_too_large"
        await assert_nothing_left(agent, containerd, ref)
    assert content_store_bytes(containerd) - before <= image.layer.size
    # Not retried: a body longer than declared is not a broken download.
    assert hostile.requests[f"GET /v2/hostile/endless/blobs/{image.layer.digest}"] == 1


async def test_announced_length_over_the_declared_size_is_refused_before_reading(
    containerd: PrivateContainerd, hostile: HostileRegistry, workdir: Path
) -> None:
    image = scripted_image(64 << 10, secrets.token_hex(8))
    image.serve(hostile, "v1", Served(secrets.token_bytes(256 << 10), content_length=100 * MiB))
    ref = f"{hostile.host}/hostile/announced:v1"
    before = content_store_bytes(containerd)
    async with running_agent(hostile_agent_config(containerd, hostile, workdir)) as agent:
        with pytest.raises(ContentTooLarge, match=f"announced {100 * MiB} bytes for blob {image.layer.digest}"):
            await agent.images.pull(ref)
        await assert_nothing_left(agent, containerd, ref)
    assert content_store_bytes(containerd) - before <= image.layer.size


async def test_endless_manifest_stops_at_the_cap(
    containerd: PrivateContainerd, hostile: HostileRegistry, workdir: Path
) -> None:
    hostile.manifests["v1"] = Served(b'{"schemaVersion": 2, "layers": [', MEDIA_OCI_MANIFEST, endless=True)
    ref = f"{hostile.host}/hostile/manifest:v1"
    config = hostile_agent_config(containerd, hostile, workdir, max_manifest_bytes=256 << 10)
    async with running_agent(config) as agent:
        with pytest.raises(ContentTooLarge, match=f"manifest {hostile.host}/hostile/manifest:v1 .* {256 << 10} bytes"):
            await agent.images.pull(ref)
        await assert_nothing_left(agent, containerd, ref)
    # The endless body was cut off, not read to the harness's own cap.
    assert hostile.sent["/v2/hostile/manifest/manifests/v1"] < 64 * MiB


async def test_manifest_longer_than_its_index_declares(
    containerd: PrivateContainerd, hostile: HostileRegistry, workdir: Path
) -> None:
    image = scripted_image(1000, secrets.token_hex(8))
    image.serve(hostile, "unused")
    # The index promises a small manifest; the registry sends the real one, then endless filler.
    hostile.manifests[image.manifest.digest] = Served(image.manifest_bytes, MEDIA_OCI_MANIFEST, endless=True)
    index = {
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_INDEX,
        "manifests": [{**image.manifest.to_json(), "platform": host_platform()}],
    }
    hostile.manifests["multi"] = Served(json_bytes(index), MEDIA_OCI_INDEX)
    ref = f"{hostile.host}/hostile/index:multi"
    async with running_agent(hostile_agent_config(containerd, hostile, workdir)) as agent:
        with pytest.raises(ContentTooLarge, match=f"larger than {image.manifest.size} bytes"):
            await agent.images.pull(ref)
        await assert_nothing_left(agent, containerd, ref)


async def test_config_declared_over_the_cap_is_not_fetched(
    containerd: PrivateContainerd, hostile: HostileRegistry, workdir: Path
) -> None:
    image = scripted_image(1000, secrets.token_hex(8))
    big_config = Descriptor(image.config.media_type, image.config.digest, 64 * MiB)
    doc = {**image.manifest_doc, "config": big_config.to_json()}
    hostile.manifests["v1"] = Served(json_bytes(doc), MEDIA_OCI_MANIFEST)
    ref = f"{hostile.host}/hostile/bigconfig:v1"
    async with running_agent(hostile_agent_config(containerd, hostile, workdir)) as agent:
        with pytest.raises(ContentTooLarge, match="max_manifest_bytes"):
            await agent.images.pull(ref)
        await assert_nothing_left(agent, containerd, ref)
    assert not [r for r in hostile.requests if "/blobs/" in r]


async def test_too_large_is_a_502_with_the_json_error_shape(
    containerd: PrivateContainerd, hostile: HostileRegistry, workdir: Path
) -> None:
    image = scripted_image(64 << 10, secrets.token_hex(8))
    image.serve(hostile, "v1", Served(b"", endless=True))
    async with (
        running_agent(hostile_agent_config(containerd, hostile, workdir)) as agent,
        TestClient(TestServer(build_app(agent))) as client,
    ):
        resp = await client.post("/v1/images/pull", json={"ref": f"{hostile.host}/hostile/api:v1"})
        assert resp.status == 502
        body = await resp.json()
        assert body["error"]["code"] == "content_too_large"
        assert image.layer.digest in body["error"]["message"]


# ---- the allow-list -------------------------------------------------------------------------


async def test_registry_outside_the_allow_list_is_refused_before_any_traffic(
    containerd: PrivateContainerd, hostile: HostileRegistry, registry: DockerRegistry, workdir: Path
) -> None:
    name = f"test/allowed-{secrets.token_hex(4)}"
    await build_test_image().build().push(registry.host, name, "v1")
    config = agent_config(
        containerd,
        [registry.registry_config(), RegistryConfig(host=hostile.host, plain_http=True)],
        workdir,
        pull=PullConfig(allowed_registries=(registry.host.upper(),)),
    )
    async with running_agent(config) as agent:
        ref = f"{hostile.host}/hostile/elsewhere:v1"
        with pytest.raises(InvalidRequest, match=f"registry {hostile.host} is not allowed") as err:
            await agent.images.pull(ref)
        assert err.value.http_status == 400
        await assert_nothing_left(agent, containerd, ref)
        assert not hostile.requests  # not even /v2/
        # A listed host pulls as before (host names compare case-insensitively).
        assert (await agent.images.pull(f"{registry.host}/{name}:v1")).name == f"{registry.host}/{name}:v1"


def test_allow_list_and_manifest_cap_config() -> None:
    pull = parse_config({"pull": {"allowed_registries": ["ghcr.io", "10.0.0.5:5000", "[::1]:5000"]}}).pull
    assert pull.allowed_registries == ("ghcr.io", "10.0.0.5:5000", "[::1]:5000")
    assert pull.allows_registry("GHCR.io") and pull.allows_registry("[::1]:5000")
    assert not pull.allows_registry("ghcr.io:443") and not pull.allows_registry("docker.io")
    assert parse_config({}).pull.allows_registry("anything.example:1")  # empty: any host
    assert parse_config({}).pull.max_manifest_bytes == 4 * MiB
    for bad in (["https://ghcr.io"], ["ghcr.io/library"], [""], "ghcr.io", [5000]):
        with pytest.raises(ConfigError, match="allowed_registries"):
            parse_config({"pull": {"allowed_registries": bad}})
    for bad_cap in (0, 9 * MiB):
        with pytest.raises(ConfigError, match="max_manifest_bytes"):
            parse_config({"pull": {"max_manifest_bytes": bad_cap}})
