"""An OCI distribution-spec client: resolve image references, fetch and push blobs and manifests.

One `aiohttp.ClientSession` per client, shared by every registry it talks to; TLS trust and
credentials come from `AgentConfig.registry(host)`. Every failure leaves this module as one of the
`agent.errors` registry types, raised `from` the aiohttp error.
"""

from __future__ import annotations

import contextlib
import json
import logging
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from types import TracebackType

import aiohttp
from yarl import URL

from agent.config import AgentConfig, RegistryConfig
from agent.errors import (
    ContentTooLarge,
    DigestMismatch,
    InvalidManifest,
    ManifestNotFound,
    RegistryAuthError,
    RegistryError,
    RegistryUnavailable,
)
from agent.manifests import ImageIndex, ImageManifest, choose_manifest, decode_json, parse_document
from agent.oci import (
    MEDIA_DOCKER_MANIFEST,
    MEDIA_DOCKER_MANIFEST_LIST,
    MEDIA_OCI_INDEX,
    MEDIA_OCI_MANIFEST,
    Descriptor,
    Digest,
    Platform,
    Reference,
    sha256_digest,
)
from agent.registry.auth import Authenticator, parse_www_authenticate
from core.errors import InvalidRequest

log = logging.getLogger(__name__)

# Index types first: we want the multi-platform view and pick the platform ourselves.
MANIFEST_ACCEPT = ", ".join((MEDIA_OCI_INDEX, MEDIA_DOCKER_MANIFEST_LIST, MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST))
USER_AGENT = "ferryman/0.1"
_ERROR_BODY_BYTES = 4096


@dataclass(frozen=True)
class ResolvedImage:
    """What an image reference resolves to for one platform, with the verified raw bytes."""

    target: Descriptor
    """What the name points at: the index when the reference resolved to one, else the manifest."""
    target_bytes: bytes
    manifest: Descriptor
    manifest_bytes: bytes
    config: Descriptor
    layers: list[Descriptor]

    @classmethod
    def of(
        cls, target: Descriptor, target_bytes: bytes, manifest: Descriptor, manifest_bytes: bytes, doc: ImageManifest
    ) -> ResolvedImage:
        """The image a target resolved to: `manifest` (the target itself, or the index's chosen entry)
        parsed as `doc`."""
        return cls(target, target_bytes, manifest, manifest_bytes, doc.config, list(doc.layers))


def _ssl_context(reg: RegistryConfig) -> ssl.SSLContext:
    # System trust plus ca_file (as containerd does): a registry may redirect blob downloads to
    # a storage host with a public certificate while the registry itself uses a private CA.
    ctx = ssl.create_default_context()
    if reg.ca_file:
        try:
            ctx.load_verify_locations(cafile=reg.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise RegistryError(f"cannot load ca_file {reg.ca_file} for registry {reg.host}: {exc}") from exc
    return ctx


def _scope_pull(ref: Reference) -> str:
    return f"repository:{ref.repository}:pull"


def _scope_push(ref: Reference) -> str:
    return f"repository:{ref.repository}:pull,push"


class RegistryClient:
    """Talks the distribution API to any number of registries over one shared HTTP session."""

    def __init__(self, config: AgentConfig) -> None:
        self._config = config
        self._session: aiohttp.ClientSession | None = None
        self._ssl: dict[str, ssl.SSLContext] = {}
        self._auth = Authenticator(config, self._ssl_for_url)

    # -- lifecycle -------------------------------------------------------------------------

    def _get_session(self) -> aiohttp.ClientSession:
        # Created lazily: a ClientSession must be built inside the running event loop.
        if self._session is None or self._session.closed:
            pull = self._config.pull
            timeout = aiohttp.ClientTimeout(
                total=None,
                connect=pull.connect_timeout,
                sock_connect=pull.connect_timeout,
                sock_read=pull.read_timeout,
            )
            self._session = aiohttp.ClientSession(
                timeout=timeout,
                # Blob bytes must be exactly what the digest covers; never let aiohttp inflate them.
                auto_decompress=False,
                headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- plumbing --------------------------------------------------------------------------

    def _ssl_for(self, host: str) -> ssl.SSLContext | bool:
        reg = self._config.registry(host)
        if reg.plain_http:
            # True, not False: unused for http://, but a redirect to https storage must still verify.
            return True
        ctx = self._ssl.get(host)
        if ctx is None:
            ctx = self._ssl[host] = _ssl_context(reg)
        return ctx

    def _ssl_for_url(self, url: str) -> ssl.SSLContext | bool:
        """For token realms: system trust plus every configured registry CA (realms often share one)."""
        if URL(url).scheme != "https":
            return True  # plain http realm: aiohttp ignores ssl; never False (that disables checks)
        key = "\0realm"
        ctx = self._ssl.get(key)
        if ctx is None:
            ctx = ssl.create_default_context()
            for reg in self._config.registries:
                if reg.ca_file:
                    # A bad ca_file is reported when its own registry is contacted.
                    with contextlib.suppress(OSError, ssl.SSLError):
                        ctx.load_verify_locations(cafile=reg.ca_file)
            self._ssl[key] = ctx
        return ctx

    def _url(self, host: str, path: str) -> URL:
        scheme = "http" if self._config.registry(host).plain_http else "https"
        # encoded=True: digests and repository names are already URL-safe; keep ':' verbatim.
        return URL(f"{scheme}://{host}{path}", encoded=True)

    async def _send(
        self,
        method: str,
        url: URL,
        host: str,
        headers: Mapping[str, str],
        data: bytes | None,
        allow_redirects: bool,
    ) -> aiohttp.ClientResponse:
        session = self._get_session()
        try:
            return await session.request(
                method,
                url,
                headers=dict(headers),
                data=data,
                ssl=self._ssl_for(host),
                allow_redirects=allow_redirects,
            )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise _translate(host, exc) from exc

    @contextlib.asynccontextmanager
    async def _open(
        self,
        method: str,
        host: str,
        path_or_url: str | URL,
        *,
        scope: str = "",
        headers: Mapping[str, str] | None = None,
        data: bytes | None = None,
        allow_redirects: bool = True,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Send a request with auth handled: cached header up front, else answer one 401 and retry."""
        url = path_or_url if isinstance(path_or_url, URL) else self._url(host, path_or_url)
        base_headers = dict(headers or {})
        sent_auth = self._auth.cached_header(host, scope)
        req_headers = {**base_headers, "Authorization": sent_auth} if sent_auth else base_headers
        resp = await self._send(method, url, host, req_headers, data, allow_redirects)
        try:
            if resp.status == 401:
                challenge = ", ".join(resp.headers.getall("WWW-Authenticate", []))
                resp.release()
                if sent_auth:
                    self._auth.invalidate(host, scope)
                if not challenge:
                    raise RegistryAuthError(f"registry {host} answered 401 without a challenge for {url.path}")
                session = self._get_session()
                auth = await self._auth.authorize(session, host, challenge, scope)
                resp = await self._send(
                    method, url, host, {**base_headers, "Authorization": auth}, data, allow_redirects
                )
                if resp.status == 401:
                    detail = await _error_detail(resp)
                    # Bearer challenges say why (invalid_token, insufficient_scope) in a parameter.
                    reason = next(
                        (
                            c.params["error"]
                            for c in parse_www_authenticate(", ".join(resp.headers.getall("WWW-Authenticate", [])))
                            if "error" in c.params
                        ),
                        None,
                    )
                    if reason:
                        detail = f"{reason}; {detail}"
                    self._auth.invalidate(host, scope)
                    whom = "our credentials" if self._auth.has_credentials(host) else "anonymous access"
                    raise RegistryAuthError(f"registry {host} refused {whom} for {method} {url.path}: {detail}")
            yield resp
        finally:
            resp.release()

    async def _raise_for_status(self, resp: aiohttp.ClientResponse, host: str, what: str) -> None:
        """Translate a non-success status; callers handle the statuses they expect first."""
        status = resp.status
        if status < 400:
            return
        detail = await _error_detail(resp)
        extra = {"registry": host, "status": status, "what": what}
        # Debug only: the caller gets the error and decides whether it is worth a warning.
        log.debug("registry request failed", extra=extra)
        if status in (401, 403):
            raise RegistryAuthError(f"registry {host} denied access to {what}: {detail}")
        if status == 429:
            raise RegistryUnavailable(f"registry {host} is rate limiting requests for {what}: {detail}")
        # 502/503/504 come from proxies and overloaded registries: worth retrying later.
        if status in (502, 503, 504):
            raise RegistryUnavailable(f"registry {host} is unavailable (HTTP {status}) for {what}: {detail}")
        raise RegistryError(f"registry {host} answered HTTP {status} for {what}: {detail}")

    # -- public API ------------------------------------------------------------------------

    async def ping(self, host: str) -> None:
        """Check the registry speaks distribution v2 and that our credentials (if any) work."""
        async with self._open("GET", host, "/v2/") as resp:
            if resp.status == 404:
                raise RegistryError(f"{host} does not implement the registry v2 API (/v2/ is 404)")
            await self._raise_for_status(resp, host, "/v2/")
        log.debug("registry ping ok", extra={"registry": host})

    async def fetch_manifest(
        self, ref: Reference, reference: str | None = None, declared_size: int | None = None
    ) -> tuple[Descriptor, bytes, ImageManifest | ImageIndex]:
        """GET one manifest or index by tag or digest: its verified descriptor, raw bytes and validated
        document (a malformed one is InvalidManifest).

        At most `[pull] max_manifest_bytes` are read, and no more than `declared_size` when an index
        declared it: a registry cannot make us buffer an endless body.
        """
        obj = reference or ref.object
        path = f"/v2/{ref.repository}/manifests/{obj}"
        what = f"{ref.host}/{ref.repository}:{obj}" if not obj.startswith("sha256:") else str(ref)
        limit = self._config.pull.max_manifest_bytes
        if declared_size is not None:
            if declared_size > limit:
                raise ContentTooLarge(
                    f"manifest {what} is {declared_size} bytes by its index, over the {limit} bytes allowed"
                    " ([pull] max_manifest_bytes)"
                )
            limit = declared_size
        async with self._open(
            "GET", ref.host, path, scope=_scope_pull(ref), headers={"Accept": MANIFEST_ACCEPT}
        ) as resp:
            if resp.status == 404:
                detail = await _error_detail(resp)
                raise ManifestNotFound(f"manifest {what} not found: {detail}")
            await self._raise_for_status(resp, ref.host, f"manifest {what}")
            body = await _read_limited(resp, limit, f"manifest {what}", ref.host)
            content_type = resp.headers.get("Content-Type")
            header_digest = resp.headers.get("Docker-Content-Digest")
        digest = sha256_digest(body)
        if obj.startswith("sha256:") and digest != obj:
            raise DigestMismatch(f"manifest {ref.host}/{ref.repository}@{obj} has digest {digest}")
        if header_digest and header_digest.startswith("sha256:") and header_digest != digest:
            raise DigestMismatch(f"manifest {what}: registry says {header_digest} but the body hashes to {digest}")
        document = parse_document(decode_json(body, f"manifest {what}"), content_type, f"manifest {what}")
        media_type = document.media_type
        log.debug(
            "manifest fetched",
            extra={"registry": ref.host, "repository": ref.repository, "digest": digest, "media_type": media_type},
        )
        return Descriptor(media_type=media_type, digest=digest, size=len(body)), body, document

    async def resolve(self, ref: Reference, platform: Platform) -> ResolvedImage:
        """Resolve a reference to one platform's manifest, config and layers, all digests verified."""
        target, target_bytes, document = await self.fetch_manifest(ref)
        manifest, manifest_bytes = target, target_bytes
        if isinstance(document, ImageIndex):
            chosen = choose_manifest(document, platform, str(ref))
            manifest, manifest_bytes, document = await self.fetch_manifest(
                ref, chosen.digest, declared_size=chosen.size
            )
            if manifest.size != chosen.size:
                raise DigestMismatch(
                    f"manifest {chosen.digest} in {ref} is {manifest.size} bytes, the index says {chosen.size}"
                )
            if not isinstance(document, ImageManifest):
                raise InvalidManifest(f"{ref} for {platform} points at {manifest.media_type}, not an image manifest")
            # Keep the platform the index advertised: the pull engine records it on the image.
            manifest = Descriptor(
                media_type=manifest.media_type,
                digest=manifest.digest,
                size=manifest.size,
                annotations=chosen.annotations,
                platform=chosen.platform,
            )
        log.info(
            "image resolved",
            extra={
                "registry": ref.host,
                "repository": ref.repository,
                "reference": ref.object,
                "target": target.digest,
                "manifest": manifest.digest,
                "platform": str(platform),
                "layers": len(document.layers),
            },
        )
        return ResolvedImage.of(target, target_bytes, manifest, manifest_bytes, document)

    async def fetch_bytes(self, ref: Reference, desc: Descriptor) -> bytes:
        """A whole small blob (an image config) into memory, checked against the descriptor's size and
        digest; descriptors over `[pull] max_manifest_bytes` are refused before any request."""
        limit = self._config.pull.max_manifest_bytes
        if desc.size > limit:
            raise ContentTooLarge(
                f"blob {desc.digest} in {ref.host}/{ref.repository} is {desc.size} bytes by its descriptor,"
                f" over the {limit} bytes allowed for a config ([pull] max_manifest_bytes)"
            )
        data = b"".join([chunk async for chunk in self.fetch_blob(ref, desc)])
        if len(data) != desc.size:
            raise DigestMismatch(
                f"blob {desc.digest} in {ref.host}/{ref.repository} is {len(data)} bytes, expected {desc.size}"
            )
        actual = sha256_digest(data)
        if actual != desc.digest:
            raise DigestMismatch(f"blob {desc.digest} in {ref.host}/{ref.repository} hashes to {actual}")
        return data

    async def fetch_blob(self, ref: Reference, desc: Descriptor, offset: int = 0) -> AsyncIterator[bytes]:
        """Stream a blob from `offset`; unhashed (the caller hashes while it writes).

        Never yields more than `desc.size` bytes in all: a longer body (announced or sent) raises
        ContentTooLarge, since an image reference can name any host and every byte yielded lands on
        disk. A broken download raises RegistryUnavailable so the caller can resume at the bytes it has.
        """
        if offset < 0 or offset > desc.size:
            raise InvalidRequest(f"offset {offset} outside blob {desc.digest} of {desc.size} bytes")
        if offset == desc.size and desc.size > 0:
            return
        path = f"/v2/{ref.repository}/blobs/{desc.digest}"
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        where = f"{ref.host}/{ref.repository}"
        extra = {"registry": ref.host, "repository": ref.repository, "digest": desc.digest, "offset": offset}
        async with self._open("GET", ref.host, path, scope=_scope_pull(ref), headers=headers) as resp:
            if resp.status == 404:
                detail = await _error_detail(resp)
                raise RegistryError(f"blob {desc.digest} not found in {where}: {detail}")
            if resp.status == 416:
                raise RegistryError(f"registry {ref.host} rejected range {offset}- of blob {desc.digest}")
            await self._raise_for_status(resp, ref.host, f"blob {desc.digest} in {where}")
            skip = 0
            if offset:
                if resp.status == 206:
                    start = _content_range_start(resp.headers.get("Content-Range"))
                    if start != offset:
                        raise RegistryError(
                            f"registry {ref.host} answered range {offset}- of {desc.digest} from byte {start}"
                        )
                else:
                    # Server ignored Range and sent the whole blob: drop what the caller has.
                    log.warning("registry ignored Range; skipping bytes", extra=extra)
                    skip = offset
            body_left = desc.size - offset + skip
            if resp.content_length is not None and resp.content_length > body_left:
                raise ContentTooLarge(
                    f"registry {ref.host} announced {resp.content_length} bytes for blob {desc.digest} in {where},"
                    f" more than the {body_left} left of its declared {desc.size}"
                )
            received = offset
            chunk_size = self._config.pull.chunk_size
            try:
                while body_left:
                    chunk = await resp.content.read(min(chunk_size, body_left))
                    if not chunk:
                        break  # short: the caller sees fewer bytes than declared and fails or resumes
                    body_left -= len(chunk)
                    if skip:
                        if len(chunk) <= skip:
                            skip -= len(chunk)
                            continue
                        chunk = chunk[skip:]
                        skip = 0
                    received += len(chunk)
                    yield chunk
                # One byte past the declared size tells a longer body from a complete one.
                overflow = b"" if body_left else await resp.content.read(1)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.warning("blob download broken", extra={**extra, "received": received})
                raise RegistryUnavailable(
                    f"download of blob {desc.digest} from {where} broke at byte {received}: "
                    f"{str(exc) or type(exc).__name__}"
                ) from exc
            if overflow:
                log.warning("blob longer than declared", extra=extra)
                raise ContentTooLarge(
                    f"blob {desc.digest} from {where} is larger than the {desc.size} bytes its descriptor declares"
                )
            if skip:
                raise RegistryError(f"blob {desc.digest} from {where} ended before offset {offset}")

    async def blob_exists(self, ref: Reference, digest: Digest) -> bool:
        """HEAD a blob: lets pushes (and later layer caches) skip uploads the registry already has."""
        path = f"/v2/{ref.repository}/blobs/{digest}"
        async with self._open("HEAD", ref.host, path, scope=_scope_pull(ref)) as resp:
            if resp.status == 404:
                return False
            await self._raise_for_status(resp, ref.host, f"blob {digest}")
            return True

    async def push_blob(self, ref: Reference, data: bytes, media_type: str = "application/octet-stream") -> Descriptor:
        """Upload a blob (POST to open an upload, PUT ?digest= with the body); skipped if present."""
        digest = sha256_digest(data)
        desc = Descriptor(media_type=media_type, digest=digest, size=len(data))
        if await self.blob_exists(ref, digest):
            return desc
        where = f"{ref.host}/{ref.repository}"
        async with self._open("POST", ref.host, f"/v2/{ref.repository}/blobs/uploads/", scope=_scope_push(ref)) as resp:
            await self._raise_for_status(resp, ref.host, f"upload to {where}")
            if resp.status != 202 or "Location" not in resp.headers:
                raise RegistryError(f"registry {ref.host} did not open an upload for {where} (HTTP {resp.status})")
            location = URL(resp.headers["Location"])
        upload = location if location.is_absolute() else self._url(ref.host, "/").join(location)
        upload = upload.update_query(digest=digest)
        async with self._open(
            "PUT",
            ref.host,
            upload,
            scope=_scope_push(ref),
            headers={"Content-Type": "application/octet-stream"},
            data=data,
        ) as resp:
            await self._raise_for_status(resp, ref.host, f"upload of {digest} to {where}")
            if resp.status != 201:
                raise RegistryError(f"upload of {digest} to {where} answered HTTP {resp.status}, expected 201")
        log.debug("blob pushed", extra={"registry": ref.host, "repository": ref.repository, "digest": digest})
        return desc

    async def push_manifest(self, ref: Reference, media_type: str, body: bytes) -> Digest:
        """PUT a manifest or index under ref.tag (or its digest when the ref has no tag)."""
        digest = sha256_digest(body)
        obj = ref.tag or digest
        where = f"{ref.host}/{ref.repository}:{obj}"
        async with self._open(
            "PUT",
            ref.host,
            f"/v2/{ref.repository}/manifests/{obj}",
            scope=_scope_push(ref),
            headers={"Content-Type": media_type},
            data=body,
        ) as resp:
            await self._raise_for_status(resp, ref.host, f"manifest {where}")
            returned = resp.headers.get("Docker-Content-Digest")
        if returned and returned != digest:
            raise DigestMismatch(f"registry stored manifest {where} as {returned}, we sent {digest}")
        log.info(
            "manifest pushed",
            extra={"registry": ref.host, "repository": ref.repository, "tag": ref.tag, "digest": digest},
        )
        return digest


def _translate(host: str, exc: BaseException) -> RegistryError:
    """Map an aiohttp/OS failure to the agent's error tree with a message naming the host."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return RegistryError(
            f"TLS certificate of registry {host} is not trusted: {exc.certificate_error}"
            " (set ca_file for this registry)"
        )
    if isinstance(exc, aiohttp.ClientSSLError):
        return RegistryError(
            f"TLS handshake with registry {host} failed: {exc} (if it serves plain HTTP, set plain_http)"
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        return RegistryUnavailable(f"registry {host} is unreachable: {exc.os_error}")
    if isinstance(exc, aiohttp.ClientResponseError) and exc.status == 0:
        return RegistryUnavailable(f"registry {host} sent a malformed response: {exc.message}")
    if isinstance(exc, aiohttp.ClientError | OSError | TimeoutError):
        detail = str(exc) or type(exc).__name__
        return RegistryUnavailable(f"registry {host} is unreachable: {detail}")
    return RegistryError(f"registry {host} request failed: {exc}")


def _content_range_start(value: str | None) -> int | None:
    """First byte of `Content-Range: bytes START-END/TOTAL`, or None if absent or malformed."""
    if not value:
        return None
    unit, _, rest = value.strip().partition(" ")
    if unit.lower() != "bytes":
        return None
    start, _, _ = rest.partition("-")
    try:
        return int(start)
    except ValueError:
        return None


async def _error_detail(resp: aiohttp.ClientResponse) -> str:
    """A short text from a distribution error body ({"errors": [{code, message}]}) or the raw body."""
    try:
        raw = await resp.content.read(_ERROR_BODY_BYTES)
    except (aiohttp.ClientError, OSError, TimeoutError):
        return f"HTTP {resp.status}"
    try:
        parsed = json.loads(raw)
        errors = parsed.get("errors") if isinstance(parsed, dict) else None
        if isinstance(errors, list) and errors:
            return "; ".join(
                f"{e.get('code', '?')}: {e.get('message', '')}".strip() for e in errors if isinstance(e, dict)
            )
    except ValueError:
        pass
    text = raw.decode("utf-8", "replace").strip()
    return f"HTTP {resp.status}" + (f" {text[:200]}" if text else "")


async def _read_limited(resp: aiohttp.ClientResponse, limit: int, what: str, host: str) -> bytes:
    """Read a whole response body, refusing more than `limit` bytes (ContentTooLarge, having read at most
    one byte past it); network errors -> RegistryUnavailable."""
    too_large = ContentTooLarge(f"{what} from {host} is larger than {limit} bytes")
    if resp.content_length is not None and resp.content_length > limit:
        raise too_large
    chunks: list[bytes] = []
    left = limit + 1
    try:
        while left and (chunk := await resp.content.read(min(64 << 10, left))):
            chunks.append(chunk)
            left -= len(chunk)
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise _translate(host, exc) from exc
    if not left:
        raise too_large
    return b"".join(chunks)
