"""RegistryClient against real docker-registry processes: plain, basic auth, token auth and TLS.

Behaviour a well-behaved docker-registry never shows (ignoring Range, redirecting blobs, corrupting
bodies) comes from `QuirkyFront`, a reverse proxy with the real registry behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from agent.config import AgentConfig, PullConfig, RegistryConfig
from agent.errors import (
    ContentTooLarge,
    DigestMismatch,
    ManifestNotFound,
    PlatformNotFound,
    RegistryAuthError,
    RegistryError,
    RegistryUnavailable,
)
from agent.oci import (
    MEDIA_DOCKER_CONFIG,
    MEDIA_DOCKER_LAYER_GZIP,
    MEDIA_DOCKER_MANIFEST,
    MEDIA_DOCKER_MANIFEST_LIST,
    MEDIA_OCI_CONFIG,
    MEDIA_OCI_INDEX,
    MEDIA_OCI_LAYER_GZIP,
    MEDIA_OCI_MANIFEST,
    Descriptor,
    Digest,
    Platform,
    Reference,
    sha256_digest,
)
from agent.registry import RegistryClient, normalize_scope, parse_www_authenticate
from tests.harness.registry import DockerRegistry, free_port
from tests.harness.tls import CertAuthority
from tests.harness.tokenserver import TokenServer

log = logging.getLogger(__name__)

AMD64 = Platform("linux", "amd64")
ARM64 = Platform("linux", "arm64", "v8")
S390X = Platform("linux", "s390x")


# ---- helpers --------------------------------------------------------------------------------


def blob_bytes(seed: str, size: int) -> bytes:
    """Deterministic, incompressible-looking content: a different seed gives different digests."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def make_config(*registries: RegistryConfig) -> AgentConfig:
    # Small chunks so a 300 KiB layer spans several reads; short timeouts keep failure tests quick.
    pull = PullConfig(connect_timeout=3.0, read_timeout=10.0, chunk_size=64 << 10)
    return AgentConfig(registries=tuple(registries), pull=pull)


@dataclass
class PushedImage:
    manifest: Descriptor
    manifest_bytes: bytes
    config: Descriptor
    config_bytes: bytes
    layers: list[Descriptor]
    layer_bytes: list[bytes]


async def push_image(
    client: RegistryClient,
    ref: Reference,
    platform: Platform,
    *,
    docker: bool = False,
    tag: bool = True,
    layer_sizes: tuple[int, int] = (300 * 1024, 5000),
) -> PushedImage:
    """Push config + 2 layers + manifest; tagged with ref.tag when `tag`, else by digest only."""
    seed = f"{ref.repository}/{platform}/{docker}"
    layer_type = MEDIA_DOCKER_LAYER_GZIP if docker else MEDIA_OCI_LAYER_GZIP
    layer_bytes = [blob_bytes(f"{seed}/layer{i}", size) for i, size in enumerate(layer_sizes)]
    layers = [await client.push_blob(ref, data, layer_type) for data in layer_bytes]
    config_doc = {
        "architecture": platform.architecture,
        "os": platform.os,
        **({"variant": platform.variant} if platform.variant else {}),
        "rootfs": {"type": "layers", "diff_ids": [sha256_digest(d) for d in layer_bytes]},
    }
    config_bytes = json.dumps(config_doc, sort_keys=True).encode()
    config = await client.push_blob(ref, config_bytes, MEDIA_DOCKER_CONFIG if docker else MEDIA_OCI_CONFIG)
    media_type = MEDIA_DOCKER_MANIFEST if docker else MEDIA_OCI_MANIFEST
    manifest_doc = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": config.to_json(),
        "layers": [d.to_json() for d in layers],
    }
    manifest_bytes = json.dumps(manifest_doc, indent=2).encode()
    # A tagless reference makes push_manifest store the manifest by digest only.
    target = ref if tag else Reference(ref.host, ref.repository, tag=None, digest=None)
    digest = await client.push_manifest(target, media_type, manifest_bytes)
    return PushedImage(
        manifest=Descriptor(media_type, digest, len(manifest_bytes)),
        manifest_bytes=manifest_bytes,
        config=config,
        config_bytes=config_bytes,
        layers=layers,
        layer_bytes=layer_bytes,
    )


def platform_json(p: Platform) -> dict[str, str]:
    out = {"architecture": p.architecture, "os": p.os}
    if p.variant:
        out["variant"] = p.variant
    return out


async def push_multiarch(
    client: RegistryClient, ref: Reference, *, docker: bool
) -> tuple[Digest, bytes, dict[Platform, PushedImage]]:
    """Push amd64 + arm64/v8 images by digest and an index (or manifest list) tagged ref.tag."""
    images = {p: await push_image(client, ref, p, docker=docker, tag=False) for p in (AMD64, ARM64)}
    index_type = MEDIA_DOCKER_MANIFEST_LIST if docker else MEDIA_OCI_INDEX
    index_doc = {
        "schemaVersion": 2,
        "mediaType": index_type,
        "manifests": [{**img.manifest.to_json(), "platform": platform_json(p)} for p, img in images.items()],
    }
    index_bytes = json.dumps(index_doc).encode()
    digest = await client.push_manifest(ref, index_type, index_bytes)
    return digest, index_bytes, images


async def collect(it: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in it])


# ---- a misbehaving front for a real registry ------------------------------------------------


@dataclass
class QuirkyFront:
    """Reverse proxy to a real registry that can ignore Range, redirect blobs and corrupt bodies."""

    upstream: str
    ignore_range: bool = False
    redirect_blobs: bool = False
    corrupt: set[str] = field(default_factory=set)
    """Digests (as they appear in the path) whose response body gets a byte flipped."""
    content_type: str | None = None
    """Override the Content-Type of manifest responses."""
    port: int = field(default_factory=free_port)
    seen: list[tuple[str, str | None]] = field(default_factory=list)
    """(path, Range header) of every blob GET that reached the front."""
    statuses: list[int] = field(default_factory=list)
    """Status of every proxied response, to count 401 round trips."""
    break_after: int | None = None
    """Send only this many bytes of the next blob body, then `break_mode` (once)."""
    break_mode: str = "close"
    """"close" drops the connection; "stall" stops sending until the front stops."""
    _released: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None
    _session: aiohttp.ClientSession | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        self._released.set()  # let stalled handlers finish so cleanup does not wait on them
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        path = request.path
        if request.method == "GET" and "/blobs/sha256:" in path:
            self.seen.append((path, request.headers.get("Range")))
        if self.redirect_blobs and "/blobs/sha256:" in path and not path.startswith("/_moved"):
            # Like a registry sending blob downloads to object storage.
            raise web.HTTPTemporaryRedirect(location=f"/_moved{path}")
        path = path.removeprefix("/_moved")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        if self.ignore_range:
            headers.pop("Range", None)
        body = await request.read()
        async with self._session.request(
            request.method,
            self.upstream + path,
            params=request.query,
            headers=headers,
            data=body or None,
            allow_redirects=False,
        ) as up:
            data = await up.read()
            out_headers = {
                k: v
                for k, v in up.headers.items()
                if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding")
            }
        if data and any(d in path for d in self.corrupt):
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        if self.content_type and "/manifests/" in path:
            out_headers["Content-Type"] = self.content_type
        self.statuses.append(up.status)
        if self.break_after is not None and "/blobs/sha256:" in path and up.status in (200, 206):
            cut, self.break_after = self.break_after, None
            return await self._broken(request, up.status, out_headers, data, cut)
        return web.Response(status=up.status, body=data, headers=out_headers)

    async def _broken(
        self, request: web.Request, status: int, headers: dict[str, str], data: bytes, cut: int
    ) -> web.StreamResponse:
        """Promise the whole body (Content-Length), deliver `cut` bytes, then fail."""
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = len(data)
        await resp.prepare(request)
        await resp.write(data[:cut])
        if self.break_mode == "stall":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._released.wait(), 10)
        assert request.transport is not None
        request.transport.close()
        return resp


# ---- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertAuthority:
    return CertAuthority(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
async def plain(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[DockerRegistry]:
    async with DockerRegistry(tmp_path_factory.mktemp("plain-registry")) as reg:
        yield reg


@pytest.fixture(scope="module")
async def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[DockerRegistry]:
    reg = DockerRegistry(tmp_path_factory.mktemp("basic-registry"), htpasswd={"alice": "s3cret", "bob": "hunter2"})
    async with reg:
        yield reg


@pytest.fixture(scope="module")
async def token_server(ca: CertAuthority) -> AsyncIterator[TokenServer]:
    ts = TokenServer(ca.issue_signing(), users={"carol": "tok-pass", "dave": "ro-pass"}, readonly=frozenset({"dave"}))
    await ts.start()
    yield ts
    await ts.stop()


@pytest.fixture(scope="module")
async def token_registry(
    tmp_path_factory: pytest.TempPathFactory, token_server: TokenServer
) -> AsyncIterator[DockerRegistry]:
    async with DockerRegistry(tmp_path_factory.mktemp("token-registry"), token=token_server) as reg:
        yield reg


@pytest.fixture(scope="module")
async def tls_registry(tmp_path_factory: pytest.TempPathFactory, ca: CertAuthority) -> AsyncIterator[DockerRegistry]:
    async with DockerRegistry(tmp_path_factory.mktemp("tls-registry"), tls=ca.issue_server()) as reg:
        yield reg


ClientFactory = Callable[..., RegistryClient]


@pytest.fixture
async def make_client() -> AsyncIterator[ClientFactory]:
    """Clients built from registry configs; all closed at teardown."""
    clients: list[RegistryClient] = []

    def factory(*registries: RegistryConfig) -> RegistryClient:
        client = RegistryClient(make_config(*registries))
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.close()


@pytest.fixture
async def make_front() -> AsyncIterator[Callable[[DockerRegistry], Awaitable[QuirkyFront]]]:
    fronts: list[QuirkyFront] = []

    async def factory(reg: DockerRegistry) -> QuirkyFront:
        proxy = QuirkyFront(upstream=reg.url)
        fronts.append(proxy)
        await proxy.start()
        return proxy

    yield factory
    for proxy in fronts:
        await proxy.stop()


@pytest.fixture
async def front(plain: DockerRegistry, make_front: Callable[[DockerRegistry], Awaitable[QuirkyFront]]) -> QuirkyFront:
    return await make_front(plain)


# ---- challenge parsing ----------------------------------------------------------------------


def test_parse_bearer_challenge_with_commas_in_quotes() -> None:
    header = (
        'Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:team/app:pull,push",error="insufficient_scope"'
    )
    [ch] = parse_www_authenticate(header)
    assert ch.scheme == "Bearer"
    assert ch.params == {
        "realm": "https://auth.example/token",
        "service": "registry.example",
        "scope": "repository:team/app:pull,push",
        "error": "insufficient_scope",
    }


def test_parse_multiple_challenges_and_escapes() -> None:
    header = 'Basic realm="a, \\"quoted\\" b", Bearer realm=https://x/t , scope="repository:a:pull repository:b:push"'
    basic, bearer = parse_www_authenticate(header)
    assert (basic.scheme, basic.params) == ("Basic", {"realm": 'a, "quoted" b'})
    assert bearer.scheme == "Bearer"
    assert bearer.params == {"realm": "https://x/t", "scope": "repository:a:pull repository:b:push"}
    assert [c.scheme for c in parse_www_authenticate("Negotiate abc==, Basic realm=x")] == ["Negotiate", "Basic"]
    assert parse_www_authenticate("") == []


def test_normalize_scope_ignores_action_order() -> None:
    assert normalize_scope("repository:b:push,pull repository:a:pull") == "repository:a:pull repository:b:pull,push"
    assert normalize_scope("repository:a:pull,push") == normalize_scope("repository:a:push,pull")


# ---- plain registry -------------------------------------------------------------------------


async def test_ping(plain: DockerRegistry, make_client: ClientFactory) -> None:
    client = make_client(plain.registry_config())
    await client.ping(plain.host)


async def test_push_then_resolve_by_tag_and_digest(plain: DockerRegistry, make_client: ClientFactory) -> None:
    client = make_client(plain.registry_config())
    ref = Reference.parse(f"{plain.host}/ferryman/single:v1")
    pushed = await push_image(client, ref, AMD64)

    by_tag = await client.resolve(ref, AMD64)
    assert by_tag.manifest.digest == pushed.manifest.digest == sha256_digest(pushed.manifest_bytes)
    assert by_tag.manifest.media_type == MEDIA_OCI_MANIFEST
    assert by_tag.manifest.size == len(pushed.manifest_bytes)
    assert by_tag.manifest_bytes == pushed.manifest_bytes
    assert by_tag.target == by_tag.manifest
    assert by_tag.target_bytes == pushed.manifest_bytes
    assert by_tag.config == Descriptor(MEDIA_OCI_CONFIG, pushed.config.digest, len(pushed.config_bytes))
    assert [d.digest for d in by_tag.layers] == [sha256_digest(b) for b in pushed.layer_bytes]
    assert [d.size for d in by_tag.layers] == [300 * 1024, 5000]
    assert by_tag.layers[1].digest == pushed.layers[1].digest

    by_digest = await client.resolve(Reference.parse(f"{plain.host}/ferryman/single@{pushed.manifest.digest}"), AMD64)
    assert by_digest.manifest.digest == pushed.manifest.digest
    assert by_digest.layers == by_tag.layers

    assert await client.fetch_bytes(ref, by_tag.config) == pushed.config_bytes
    assert await collect(client.fetch_blob(ref, by_tag.layers[0])) == pushed.layer_bytes[0]


async def test_push_blob_is_idempotent_and_blob_exists(plain: DockerRegistry, make_client: ClientFactory) -> None:
    client = make_client(plain.registry_config())
    ref = Reference.parse(f"{plain.host}/ferryman/blobs:x")
    data = blob_bytes("idempotent", 1234)
    assert not await client.blob_exists(ref, sha256_digest(data))
    first = await client.push_blob(ref, data)
    again = await client.push_blob(ref, data)
    assert first == again == Descriptor("application/octet-stream", sha256_digest(data), 1234)
    assert await client.blob_exists(ref, first.digest)


async def test_oci_index_picks_platform(plain: DockerRegistry, make_client: ClientFactory) -> None:
    client = make_client(plain.registry_config())
    ref = Reference.parse(f"{plain.host}/ferryman/multi:oci")
    index_digest, index_bytes, images = await push_multiarch(client, ref, docker=False)

    arm = await client.resolve(ref, ARM64)
    assert arm.target.digest == index_digest
    assert arm.target.media_type == MEDIA_OCI_INDEX
    assert arm.target_bytes == index_bytes
    assert arm.manifest.digest == images[ARM64].manifest.digest
    assert arm.manifest.platform == {"architecture": "arm64", "os": "linux", "variant": "v8"}
    assert arm.config.digest == images[ARM64].config.digest
    assert json.loads(await client.fetch_bytes(ref, arm.config))["architecture"] == "arm64"

    amd = await client.resolve(ref, AMD64)
    assert amd.manifest.digest == images[AMD64].manifest.digest
    assert amd.manifest.digest != arm.manifest.digest

    # No variant asked for: any arm64 variant will do.
    assert (await client.resolve(ref, Platform("linux", "arm64"))).manifest.digest == arm.manifest.digest

    # Resolving the index by digest gives the same answer.
    pinned = Reference.parse(f"{plain.host}/ferryman/multi@{index_digest}")
    assert (await client.resolve(pinned, AMD64)).manifest.digest == amd.manifest.digest

    with pytest.raises(PlatformNotFound) as err:
        await client.resolve(ref, S390X)
    assert "linux/s390x" in err.value.message
    assert "linux/amd64" in err.value.message
    assert "linux/arm64/v8" in err.value.message


async def test_docker_manifest_list_picks_platform(plain: DockerRegistry, make_client: ClientFactory) -> None:
    client = make_client(plain.registry_config())
    ref = Reference.parse(f"{plain.host}/ferryman/multi:docker")
    list_digest, _, images = await push_multiarch(client, ref, docker=True)

    amd = await client.resolve(ref, AMD64)
    assert amd.target.media_type == MEDIA_DOCKER_MANIFEST_LIST
    assert amd.target.digest == list_digest
    assert amd.manifest.media_type == MEDIA_DOCKER_MANIFEST
    assert amd.manifest.digest == images[AMD64].manifest.digest
    assert [d.media_type for d in amd.layers] == [MEDIA_DOCKER_LAYER_GZIP, MEDIA_DOCKER_LAYER_GZIP]
    assert amd.config.media_type == MEDIA_DOCKER_CONFIG

    arm = await client.resolve(ref, ARM64)
    assert arm.manifest.digest == images[ARM64].manifest.digest

    with pytest.raises(PlatformNotFound, match="linux/s390x"):
        await client.resolve(ref, S390X)


async def test_missing_tag_is_manifest_not_found(plain: DockerRegistry, make_client: ClientFactory) -> None:
    client = make_client(plain.registry_config())
    ref = Reference.parse(f"{plain.host}/ferryman/single:does-not-exist")
    with pytest.raises(ManifestNotFound) as err:
        await client.resolve(ref, AMD64)
    assert f"{plain.host}/ferryman/single:does-not-exist" in err.value.message

    with pytest.raises(ManifestNotFound):
        await client.resolve(Reference.parse(f"{plain.host}/ferryman/never-pushed:latest"), AMD64)


async def test_fetch_blob_from_offset_returns_exact_tail(plain: DockerRegistry, make_client: ClientFactory) -> None:
    client = make_client(plain.registry_config())
    ref = Reference.parse(f"{plain.host}/ferryman/ranges:v1")
    data = blob_bytes("ranges", 200_001)
    desc = await client.push_blob(ref, data)
    for offset in (1, 65_536, 123_457, 200_000):
        assert await collect(client.fetch_blob(ref, desc, offset=offset)) == data[offset:]
    assert await collect(client.fetch_blob(ref, desc, offset=desc.size)) == b""


async def test_fetch_bytes_checks_digest_and_size(plain: DockerRegistry, make_client: ClientFactory) -> None:
    client = make_client(plain.registry_config())
    ref = Reference.parse(f"{plain.host}/ferryman/verify:v1")
    data = b'{"architecture":"amd64","os":"linux"}'
    desc = await client.push_blob(ref, data)
    assert await client.fetch_bytes(ref, desc) == data

    # The registry has the blob, but the descriptor promises a different size.
    with pytest.raises(DigestMismatch, match=f"is {len(data)} bytes, expected {len(data) + 10}"):
        await client.fetch_bytes(ref, Descriptor(desc.media_type, desc.digest, len(data) + 10))
    # More bytes than declared are never taken in: a registry-side fault with its own code.
    with pytest.raises(ContentTooLarge, match=f"announced {len(data)} bytes for blob {desc.digest}"):
        await client.fetch_bytes(ref, Descriptor(desc.media_type, desc.digest, len(data) - 1))
    # A digest the registry does not have is a registry-side failure naming the blob.
    missing = sha256_digest(b"never pushed")
    with pytest.raises(RegistryError, match=missing):
        await client.fetch_bytes(ref, Descriptor(desc.media_type, missing, 12))


async def test_registry_down_then_back(tmp_path: Path, make_client: ClientFactory) -> None:
    reg = DockerRegistry(tmp_path / "flaky-registry")
    await reg.start()
    try:
        client = make_client(reg.registry_config())
        ref = Reference.parse(f"{reg.host}/ferryman/flaky:v1")
        pushed = await push_image(client, ref, AMD64, layer_sizes=(1000, 1000))
        await reg.stop()
        assert not reg.running

        with pytest.raises(RegistryUnavailable) as err:
            await client.ping(reg.host)
        assert err.value.message.startswith(f"registry {reg.host} is unreachable: ")
        with pytest.raises(RegistryUnavailable):
            await client.resolve(ref, AMD64)
        with pytest.raises(RegistryUnavailable):
            await collect(client.fetch_blob(ref, pushed.layers[0]))

        # Same port, same storage: the same client recovers.
        await reg.start()
        assert (await client.resolve(ref, AMD64)).manifest.digest == pushed.manifest.digest
    finally:
        await reg.stop()


async def test_plain_http_registry_with_https_config_gives_tls_error(
    plain: DockerRegistry, make_client: ClientFactory
) -> None:
    client = make_client(RegistryConfig(host=plain.host))  # HTTPS, the default
    with pytest.raises(RegistryError, match=r"TLS handshake with registry .* failed") as err:
        await client.ping(plain.host)
    assert "plain_http" in err.value.message


# ---- a misbehaving front ------------------------------------------------------------------


async def test_range_ignored_and_redirected_blob(
    plain: DockerRegistry, front: QuirkyFront, make_client: ClientFactory
) -> None:
    upstream = make_client(plain.registry_config())
    data = blob_bytes("quirky", 150_000)
    desc = await upstream.push_blob(Reference.parse(f"{plain.host}/ferryman/quirky:v1"), data)

    front.ignore_range = True
    front.redirect_blobs = True
    client = make_client(RegistryConfig(host=front.host, plain_http=True))
    ref = Reference.parse(f"{front.host}/ferryman/quirky:v1")
    assert await collect(client.fetch_blob(ref, desc, offset=70_000)) == data[70_000:]
    # The client asked for a range and followed the redirect, keeping the Range header.
    blob_path = f"/v2/ferryman/quirky/blobs/{desc.digest}"
    assert front.seen == [(blob_path, "bytes=70000-"), (f"/_moved{blob_path}", "bytes=70000-")]
    assert await collect(client.fetch_blob(ref, desc)) == data


async def test_broken_download_is_unavailable_and_resumes(
    plain: DockerRegistry, front: QuirkyFront, make_client: ClientFactory
) -> None:
    upstream = make_client(plain.registry_config())
    data = blob_bytes("broken", 250_000)
    desc = await upstream.push_blob(Reference.parse(f"{plain.host}/ferryman/broken:v1"), data)

    client = make_client(RegistryConfig(host=front.host, plain_http=True))
    ref = Reference.parse(f"{front.host}/ferryman/broken:v1")
    front.break_after = 100_000
    got = bytearray()
    with pytest.raises(RegistryUnavailable, match=f"download of blob {desc.digest} from {front.host}/ferryman/broken"):
        async for chunk in client.fetch_blob(ref, desc):
            got += chunk
    assert len(got) == 100_000
    assert bytes(got) == data[:100_000]
    # What the pull engine does next: resume from the bytes it has.
    got += await collect(client.fetch_blob(ref, desc, offset=len(got)))
    assert bytes(got) == data
    assert front.seen[-1][1] == "bytes=100000-"


async def test_stalled_download_times_out(plain: DockerRegistry, front: QuirkyFront) -> None:
    upstream = RegistryClient(make_config(plain.registry_config()))
    async with upstream:
        data = blob_bytes("stalled", 50_000)
        desc = await upstream.push_blob(Reference.parse(f"{plain.host}/ferryman/stalled:v1"), data)

    config = AgentConfig(
        registries=(RegistryConfig(host=front.host, plain_http=True),),
        pull=PullConfig(connect_timeout=2.0, read_timeout=0.5),
    )
    front.break_after, front.break_mode = 1000, "stall"
    loop = asyncio.get_running_loop()
    async with RegistryClient(config) as client:
        started = loop.time()
        with pytest.raises(RegistryUnavailable, match="broke at byte 1000"):
            await collect(client.fetch_blob(Reference.parse(f"{front.host}/ferryman/stalled:v1"), desc))
        assert loop.time() - started < 5  # the 0.5 s read timeout fired, not the front's 10 s stall


async def test_corrupted_content_raises_digest_mismatch(
    plain: DockerRegistry, front: QuirkyFront, make_client: ClientFactory
) -> None:
    upstream = make_client(plain.registry_config())
    ref_up = Reference.parse(f"{plain.host}/ferryman/corrupt:v1")
    pushed = await push_image(upstream, ref_up, AMD64, layer_sizes=(2000, 3000))

    client = make_client(RegistryConfig(host=front.host, plain_http=True))
    ref = Reference.parse(f"{front.host}/ferryman/corrupt:v1")
    front.corrupt = {pushed.config.digest}
    with pytest.raises(DigestMismatch, match=f"hashes to (?!{pushed.config.digest})"):
        await client.fetch_bytes(ref, pushed.config)

    # The tag's manifest body no longer matches Docker-Content-Digest.
    front.corrupt = {"/manifests/v1"}
    with pytest.raises(DigestMismatch, match=f"registry says {pushed.manifest.digest}"):
        await client.resolve(ref, AMD64)
    # By digest, the body must hash to the digest asked for.
    front.corrupt = {pushed.manifest.digest}
    with pytest.raises(DigestMismatch, match="has digest"):
        await client.resolve(Reference.parse(f"{front.host}/ferryman/corrupt@{pushed.manifest.digest}"), AMD64)


async def test_unknown_manifest_media_type_is_rejected(
    plain: DockerRegistry, front: QuirkyFront, make_client: ClientFactory
) -> None:
    upstream = make_client(plain.registry_config())
    ref_up = Reference.parse(f"{plain.host}/ferryman/oddtype:v1")
    config = await upstream.push_blob(ref_up, b"{}", MEDIA_OCI_CONFIG)
    # OCI makes mediaType optional, so the Content-Type header is all the client has to go on.
    body = json.dumps({"schemaVersion": 2, "config": config.to_json(), "layers": []}).encode()
    await upstream.push_manifest(ref_up, MEDIA_OCI_MANIFEST, body)

    client = make_client(RegistryConfig(host=front.host, plain_http=True))
    ref = Reference.parse(f"{front.host}/ferryman/oddtype:v1")
    assert (await client.resolve(ref, AMD64)).manifest.media_type == MEDIA_OCI_MANIFEST
    front.content_type = "application/vnd.docker.distribution.manifest.v1+prettyjws"
    with pytest.raises(RegistryError, match=r"unsupported media type .*manifest\.v1\+prettyjws"):
        await client.resolve(ref, AMD64)


# ---- basic auth -----------------------------------------------------------------------------


async def test_basic_auth_with_right_credentials(basic_registry: DockerRegistry, make_client: ClientFactory) -> None:
    client = make_client(basic_registry.registry_config(username="alice", password="s3cret"))
    await client.ping(basic_registry.host)
    ref = Reference.parse(f"{basic_registry.host}/ferryman/private:v1")
    pushed = await push_image(client, ref, AMD64, layer_sizes=(4000, 100))
    resolved = await client.resolve(ref, AMD64)
    assert resolved.manifest.digest == pushed.manifest.digest
    assert await collect(client.fetch_blob(ref, resolved.layers[0], offset=3000)) == pushed.layer_bytes[0][3000:]


async def test_basic_auth_password_file(
    basic_registry: DockerRegistry, make_client: ClientFactory, tmp_path: Path
) -> None:
    secret = tmp_path / "password"
    secret.write_text("hunter2\n")
    client = make_client(
        RegistryConfig(host=basic_registry.host, plain_http=True, username="bob", password_file=str(secret))
    )
    await client.ping(basic_registry.host)


async def test_basic_auth_wrong_or_missing_credentials(
    basic_registry: DockerRegistry, make_client: ClientFactory
) -> None:
    wrong = make_client(basic_registry.registry_config(username="alice", password="wrong"))
    with pytest.raises(RegistryAuthError, match=f"registry {basic_registry.host} refused our credentials"):
        await wrong.ping(basic_registry.host)
    ref = Reference.parse(f"{basic_registry.host}/ferryman/private:v1")
    with pytest.raises(RegistryAuthError):
        await wrong.resolve(ref, AMD64)

    anonymous = make_client(basic_registry.registry_config())
    with pytest.raises(RegistryAuthError, match="no username/password is configured"):
        await anonymous.ping(basic_registry.host)


# ---- token auth ---------------------------------------------------------------------------


async def test_bearer_token_auth(
    token_registry: DockerRegistry, token_server: TokenServer, make_client: ClientFactory
) -> None:
    client = make_client(token_registry.registry_config(username="carol", password="tok-pass"))
    await client.ping(token_registry.host)
    ref = Reference.parse(f"{token_registry.host}/ferryman/tokened:v1")
    pushed = await push_image(client, ref, ARM64, layer_sizes=(2048, 512))

    before = len(token_server.requests)
    resolved = await client.resolve(ref, ARM64)
    assert resolved.manifest.digest == pushed.manifest.digest
    assert await client.fetch_bytes(ref, resolved.config) == pushed.config_bytes
    # The pull-scoped token from the push's HEADs is reused: no new token request.
    assert len(token_server.requests) == before
    granted = {(r.account, s) for r in token_server.requests for s in r.scopes}
    assert ("carol", "repository:ferryman/tokened:pull") in granted
    assert any(acct == "carol" and normalize_scope(s) == "repository:ferryman/tokened:pull,push" for acct, s in granted)


async def test_credentials_sent_up_front_after_first_challenge(
    token_registry: DockerRegistry,
    token_server: TokenServer,
    basic_registry: DockerRegistry,
    make_client: ClientFactory,
    make_front: Callable[[DockerRegistry], Awaitable[QuirkyFront]],
) -> None:
    for reg, user, password in ((token_registry, "carol", "tok-pass"), (basic_registry, "alice", "s3cret")):
        writer = make_client(reg.registry_config(username=user, password=password))
        pushed = await push_image(writer, Reference.parse(f"{reg.host}/ferryman/upfront:v1"), AMD64)

        proxy = await make_front(reg)
        client = make_client(RegistryConfig(host=proxy.host, plain_http=True, username=user, password=password))
        ref = Reference.parse(f"{proxy.host}/ferryman/upfront:v1")
        assert (await client.resolve(ref, AMD64)).manifest.digest == pushed.manifest.digest
        assert proxy.statuses.count(401) == 1  # one challenge, answered once

        proxy.statuses.clear()
        tokens_before = len(token_server.requests)
        again = await client.resolve(ref, AMD64)
        assert await client.fetch_bytes(ref, again.config) == pushed.config_bytes
        assert proxy.statuses == [200, 200]  # manifest + config blob, no 401 round trip
        assert len(token_server.requests) == tokens_before


async def test_bearer_token_refreshed_after_expiry(
    token_registry: DockerRegistry, token_server: TokenServer, make_client: ClientFactory
) -> None:
    writer = make_client(token_registry.registry_config(username="carol", password="tok-pass"))
    ref = Reference.parse(f"{token_registry.host}/ferryman/expiring:v1")
    await push_image(writer, ref, AMD64, layer_sizes=(10, 10))

    token_server.ttl = 1
    try:
        client = make_client(token_registry.registry_config(username="carol", password="tok-pass"))
        before = len(token_server.requests)
        await client.resolve(ref, AMD64)
        assert len(token_server.requests) == before + 1
        await client.resolve(ref, AMD64)
        assert len(token_server.requests) == before + 1  # still cached
        await asyncio.sleep(1.1)
        await client.resolve(ref, AMD64)
        assert len(token_server.requests) == before + 2
    finally:
        token_server.ttl = 300


async def test_bearer_token_auth_failures(
    token_registry: DockerRegistry, token_server: TokenServer, make_client: ClientFactory
) -> None:
    writer = make_client(token_registry.registry_config(username="carol", password="tok-pass"))
    ref = Reference.parse(f"{token_registry.host}/ferryman/locked:v1")
    await push_image(writer, ref, AMD64, layer_sizes=(10, 10))

    # Anonymous: the token server hands out a token with no access, the registry refuses it.
    anonymous = make_client(token_registry.registry_config())
    await anonymous.ping(token_registry.host)  # /v2/ needs no access
    with pytest.raises(
        RegistryAuthError,
        match=f"registry {token_registry.host} refused anonymous access for GET .*: insufficient_scope",
    ):
        await anonymous.resolve(ref, AMD64)
    assert token_server.requests[-1].account is None

    wrong = make_client(token_registry.registry_config(username="carol", password="nope"))
    with pytest.raises(RegistryAuthError, match=f"token server {token_server.realm} refused carol"):
        await wrong.resolve(ref, AMD64)
    assert token_server.requests[-1].status == 401

    # A read-only user pulls but cannot push.
    reader = make_client(token_registry.registry_config(username="dave", password="ro-pass"))
    assert (await reader.resolve(ref, AMD64)).layers[0].size == 10
    with pytest.raises(RegistryAuthError):
        await reader.push_blob(ref, b"not allowed")


async def test_token_server_down_is_unavailable(tmp_path: Path, ca: CertAuthority, make_client: ClientFactory) -> None:
    ts = TokenServer(ca.issue_signing("signer-down"), users={"x": "y"})
    async with DockerRegistry(tmp_path / "orphan-registry", token=ts) as reg:  # token server never started
        client = make_client(reg.registry_config(username="x", password="y"))
        with pytest.raises(RegistryUnavailable, match=f"token server {ts.realm} .* is unreachable"):
            await client.ping(reg.host)


# ---- TLS ----------------------------------------------------------------------------------


async def test_tls_with_custom_ca(tls_registry: DockerRegistry, make_client: ClientFactory) -> None:
    assert tls_registry.url.startswith("https://")
    client = make_client(tls_registry.registry_config())
    await client.ping(tls_registry.host)
    ref = Reference.parse(f"{tls_registry.host}/ferryman/secure:v1")
    pushed = await push_image(client, ref, AMD64, layer_sizes=(70_000, 10))
    resolved = await client.resolve(ref, AMD64)
    assert resolved.manifest.digest == pushed.manifest.digest
    assert await collect(client.fetch_blob(ref, resolved.layers[0], offset=69_999)) == pushed.layer_bytes[0][-1:]


async def test_tls_without_ca_fails_with_clear_message(
    tls_registry: DockerRegistry, make_client: ClientFactory
) -> None:
    client = make_client(tls_registry.registry_config(trust_ca=False))
    with pytest.raises(RegistryError) as err:
        await client.ping(tls_registry.host)
    assert not isinstance(err.value, RegistryUnavailable)  # retrying will not help
    assert err.value.message.startswith(f"TLS certificate of registry {tls_registry.host} is not trusted")
    assert "set ca_file" in err.value.message

    plain_client = make_client(RegistryConfig(host=tls_registry.host, plain_http=True))
    with pytest.raises(RegistryError, match="HTTP 400"):
        await plain_client.ping(tls_registry.host)


async def test_bad_ca_file_is_reported(
    tls_registry: DockerRegistry, make_client: ClientFactory, tmp_path: Path
) -> None:
    client = make_client(RegistryConfig(host=tls_registry.host, ca_file=str(tmp_path / "missing.pem")))
    with pytest.raises(RegistryError, match="cannot load ca_file"):
        await client.ping(tls_registry.host)


async def test_client_context_manager_closes_session(plain: DockerRegistry) -> None:
    async with RegistryClient(make_config(plain.registry_config())) as client:
        await client.ping(plain.host)
        session = client._session
        assert session is not None and not session.closed
    assert session.closed
