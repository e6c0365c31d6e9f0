"""A scripted registry on loopback for what a real one never does: endless bodies, lying sizes, bad JSON.

Real pulls are tested against docker-registry (`tests.harness.registry`). This server answers the
distribution API with exactly the bytes a test puts in `manifests` and `blobs`, so a test can play a
hostile or broken registry (an image reference can name any host) and check what the agent does.
Plain HTTP: the agent needs `RegistryConfig(host=..., plain_http=True)` for it.
"""

from __future__ import annotations

import contextlib
import json
import platform
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from agent.app import Agent
from agent.config import AgentConfig, PullConfig, RegistryConfig
from agent.oci import MEDIA_OCI_CONFIG, MEDIA_OCI_LAYER_GZIP, MEDIA_OCI_MANIFEST, Descriptor, Digest, sha256_digest
from tests.harness.agent import agent_config
from tests.harness.containerd import PrivateContainerd
from tests.harness.registry import free_port

# Sent after a body marked endless until the client goes away (or this many bytes, so a test whose
# client never stops still ends).
_FILLER = b"\xa5" * (64 << 10)
ENDLESS_CAP = 512 << 20


@dataclass
class Served:
    """One scripted response."""

    body: bytes = b""
    content_type: str = "application/octet-stream"
    endless: bool = False
    """After `body`, keep sending filler (chunked, no Content-Length) until the client disconnects."""
    content_length: int | None = None
    """Announce this Content-Length instead of the real one (then close after `body`)."""


@dataclass
class HostileRegistry:
    manifests: dict[str, Served] = field(default_factory=dict)
    """By tag or digest, for any repository."""
    blobs: dict[str, Served] = field(default_factory=dict)
    """By digest, for any repository."""
    port: int = field(default_factory=free_port)
    requests: Counter[str] = field(default_factory=Counter)
    """"GET /v2/..." -> how often it was asked for."""
    sent: Counter[str] = field(default_factory=Counter)
    """Request path -> body bytes written to the socket."""
    _runner: web.AppRunner | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> HostileRegistry:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests[f"{request.method} {request.path}"] += 1
        if request.path == "/v2/":
            return web.json_response({})
        kind, _, name = request.path.rpartition("/")
        table = self.manifests if kind.endswith("/manifests") else self.blobs if kind.endswith("/blobs") else {}
        served = table.get(name)
        if served is None:
            return web.json_response({"errors": [{"code": "NOT_FOUND", "message": name}]}, status=404)
        if request.method == "HEAD":
            return web.Response(status=200, headers={"Content-Type": served.content_type})
        return await self._send(request, served)

    async def _send(self, request: web.Request, served: Served) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": served.content_type})
        if served.content_length is not None:
            resp.content_length = served.content_length
        elif not served.endless:
            resp.content_length = len(served.body)
        else:
            resp.enable_chunked_encoding()
        await resp.prepare(request)
        # The client hangs up mid-body on purpose: that is the behaviour under test, not an error here.
        with contextlib.suppress(ConnectionError, RuntimeError):
            await resp.write(served.body)
            self.sent[request.path] += len(served.body)
            while served.endless and self.sent[request.path] < ENDLESS_CAP:
                await resp.write(_FILLER)
                self.sent[request.path] += len(_FILLER)
            if served.content_length is None:
                await resp.write_eof()
        if served.content_length is not None and request.transport is not None:
            request.transport.close()  # the announced length is a lie: end the connection
        return resp


def host_platform() -> dict[str, str]:
    machine = platform.machine().lower()
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)
    return {"os": "linux", "architecture": arch}


@dataclass(frozen=True)
class ScriptedImage:
    """A one-layer image as documents and descriptors; the layer's bytes are whatever a test serves."""

    config: Descriptor
    config_bytes: bytes
    layer: Descriptor
    manifest_doc: dict[str, Any]

    @property
    def manifest_bytes(self) -> bytes:
        return json.dumps(self.manifest_doc).encode()

    @property
    def manifest(self) -> Descriptor:
        body = self.manifest_bytes
        return Descriptor(MEDIA_OCI_MANIFEST, sha256_digest(body), len(body))

    def serve(self, registry: HostileRegistry, tag: str, layer: Served | None = None) -> None:
        """Put the manifest (under `tag` and its digest) and the config in `registry`, and `layer` if given."""
        manifest = Served(self.manifest_bytes, MEDIA_OCI_MANIFEST)
        registry.manifests[tag] = manifest
        registry.manifests[self.manifest.digest] = manifest
        registry.blobs[self.config.digest] = Served(self.config_bytes, MEDIA_OCI_CONFIG)
        if layer is not None:
            registry.blobs[self.layer.digest] = layer


def scripted_image(layer_size: int, seed: str) -> ScriptedImage:
    """An image for this host's platform whose one layer is declared as `layer_size` bytes."""
    layer_digest = sha256_digest(f"layer {seed}".encode())
    config_doc = {**host_platform(), "rootfs": {"type": "layers", "diff_ids": [sha256_digest(seed.encode())]}}
    config_bytes = json.dumps(config_doc).encode()
    config = Descriptor(MEDIA_OCI_CONFIG, sha256_digest(config_bytes), len(config_bytes))
    layer = Descriptor(MEDIA_OCI_LAYER_GZIP, Digest(layer_digest), layer_size)
    manifest_doc = {
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_MANIFEST,
        "config": config.to_json(),
        "layers": [layer.to_json()],
    }
    return ScriptedImage(config, config_bytes, layer, manifest_doc)


def hostile_agent_config(ctrd: PrivateContainerd, registry: HostileRegistry, workdir: Path, **pull: Any) -> AgentConfig:
    """An agent config that reaches `registry` over plain HTTP, with short timeouts and one retry."""
    return agent_config(
        ctrd,
        [RegistryConfig(host=registry.host, plain_http=True)],
        workdir,
        pull=PullConfig(read_timeout=5.0, retries=1, **pull),
    )


def content_store_bytes(ctrd: PrivateContainerd) -> int:
    """Bytes in containerd's content store (blobs and ingests), as on disk."""
    root = ctrd.root / "io.containerd.content.v1.content"
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


async def assert_nothing_left(agent: Agent, ctrd: PrivateContainerd, ref: str) -> None:
    """A failed pull leaves no image, no lease and no ingest (also as ctr sees them)."""
    cd = agent.containerd
    assert ref not in [i.name for i in await cd.images.list()]
    assert await cd.leases.list() == []
    assert await cd.content.list_statuses() == []
    active = ctrd.ctr("content", "active", namespace=cd.namespace).stdout.splitlines()
    assert active[1:] == [], active  # the header line only
    assert ref not in ctrd.ctr("images", "ls", "-q", namespace=cd.namespace).stdout
