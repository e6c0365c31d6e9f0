"""Malformed manifests, indexes and configs from a registry: a 502 invalid_manifest, never a 500.

The probe found an index whose `platform` is a string and a layer size of 2**64 ending as
internal errors. A scripted registry (`tests.harness.hostile`) serves such documents; each pull
must fail with InvalidManifest naming the field, and leave nothing behind.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from agent.api import build_app
from agent.errors import InvalidManifest
from agent.oci import MEDIA_OCI_CONFIG, MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST, sha256_digest
from tests.harness.agent import running_agent
from tests.harness.containerd import PrivateContainerd
from tests.harness.hostile import (
    HostileRegistry,
    ScriptedImage,
    Served,
    assert_nothing_left,
    content_store_bytes,
    host_platform,
    hostile_agent_config,
    scripted_image,
)


@pytest.fixture
async def hostile() -> AsyncIterator[HostileRegistry]:
    async with HostileRegistry() as reg:
        yield reg


def _json(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def _index(image: ScriptedImage, platform: Any) -> Served:
    entry = {**image.manifest.to_json(), "platform": platform}
    return Served(_json({"schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX, "manifests": [entry]}), MEDIA_OCI_INDEX)


def _manifest(image: ScriptedImage, change: Callable[[dict[str, Any]], None]) -> Served:
    doc = json.loads(image.manifest_bytes)
    change(doc)
    return Served(_json(doc), MEDIA_OCI_MANIFEST)


def _config(image: ScriptedImage, hostile: HostileRegistry, doc: Any) -> Served:
    """The manifest, pointing at `doc` as its config (served under its real digest)."""
    body = _json(doc)
    digest = sha256_digest(body)
    hostile.blobs[digest] = Served(body, MEDIA_OCI_CONFIG)

    def point(manifest: dict[str, Any]) -> None:
        manifest["config"] = {"mediaType": MEDIA_OCI_CONFIG, "digest": digest, "size": len(body)}

    return _manifest(image, point)


def _set_layer(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        doc["layers"][0][key] = value

    return change


def _del_layer(key: str) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        del doc["layers"][0][key]

    return change


# name -> (what the registry serves under the tag, the message the error must carry)
CASES: dict[str, tuple[Callable[[ScriptedImage, HostileRegistry], Served], str]] = {
    "index platform is a string": (
        lambda image, _: _index(image, "linux/amd64"),
        r"manifests\[0\]\.platform must be an object, got a string",
    ),
    "index platform os is a number": (
        lambda image, _: _index(image, {**host_platform(), "os": 1}),
        r"manifests\[0\]\.platform\.os must be a string",
    ),
    "layer size 2**64": (
        lambda image, _: _manifest(image, _set_layer("size", 2**64)),
        r"layers\[0\]\.size must be from 0 to 2\*\*63-1, got 18446744073709551616",
    ),
    "layer size negative": (lambda image, _: _manifest(image, _set_layer("size", -5)), r"layers\[0\]\.size"),
    "layer size a string": (
        lambda image, _: _manifest(image, _set_layer("size", "1024")),
        r"layers\[0\]\.size must be an integer, got a string",
    ),
    "layer digest not a digest": (
        lambda image, _: _manifest(image, _set_layer("digest", "md5:abc")),
        r"layers\[0\]\.digest must be a sha256 digest",
    ),
    "layer mediaType missing": (
        lambda image, _: _manifest(image, _del_layer("mediaType")),
        r"layers\[0\]\.mediaType is missing",
    ),
    "layers not a list": (
        lambda image, _: _manifest(image, lambda doc: doc.update(layers={"a": 1})),
        r"\.layers must be an array, got an object",
    ),
    "manifest not an object": (lambda *_: Served(b"[1, 2]", MEDIA_OCI_MANIFEST), r"must be an object, got an array"),
    "manifest not JSON": (lambda *_: Served(b"{not json", MEDIA_OCI_MANIFEST), r"is not valid JSON"),
    "config rootfs a list": (
        lambda image, reg: _config(image, reg, {**host_platform(), "rootfs": []}),
        r"rootfs must be an object",
    ),
    "config diff_ids of the wrong count": (
        lambda image, reg: _config(image, reg, {**host_platform(), "rootfs": {"type": "layers", "diff_ids": []}}),
        r"lists 0 diff IDs for 1 layers",
    ),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
async def test_malformed_document_is_invalid_manifest(
    case: str, containerd: PrivateContainerd, hostile: HostileRegistry, workdir: Path
) -> None:
    serve, message = CASES[case]
    image = scripted_image(4096, secrets.token_hex(8))
    image.serve(hostile, "unused", Served(secrets.token_bytes(4096)))
    hostile.manifests["v1"] = serve(image, hostile)
    ref = f"{hostile.host}/malformed/doc:v1"
    before = content_store_bytes(containerd)
    async with running_agent(hostile_agent_config(containerd, hostile, workdir)) as agent:
        with pytest.raises(InvalidManifest, match=message) as err:
            await agent.images.pull(ref)
        assert err.value.code == "invalid_manifest"
        await assert_nothing_left(agent, containerd, ref)
    assert content_store_bytes(containerd) - before <= image.layer.size


async def test_malformed_index_is_a_502_with_the_json_error_shape(
    containerd: PrivateContainerd, hostile: HostileRegistry, workdir: Path
) -> None:
    image = scripted_image(4096, secrets.token_hex(8))
    image.serve(hostile, "unused")
    hostile.manifests["multi"] = _index(image, "linux/amd64")
    hostile.manifests["huge"] = _manifest(image, _set_layer("size", 2**64))
    async with (
        running_agent(hostile_agent_config(containerd, hostile, workdir)) as agent,
        TestClient(TestServer(build_app(agent))) as client,
    ):
        for tag, field in (("multi", "platform"), ("huge", "size")):
            resp = await client.post("/v1/images/pull", json={"ref": f"{hostile.host}/malformed/api:{tag}"})
            assert resp.status == 502
            error = (await resp.json())["error"]
            assert error["code"] == "invalid_manifest" and field in error["message"]
