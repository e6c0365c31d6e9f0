"""Build OCI / Docker schema 2 images in memory and push them to a registry, without docker.

Layers are deterministic (fixed mtimes, gzip mtime 0), so the same entries always give the same digests.
Malicious layers are built from `RawEntry`, which writes its tar header verbatim (no path cleaning).
"""

from __future__ import annotations

import base64
import copy
import functools
import gzip
import io
import json
import random
import re
import secrets
import ssl
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal
from urllib.parse import urljoin

import aiohttp

from agent.oci import (
    MEDIA_DOCKER_CONFIG,
    MEDIA_DOCKER_LAYER_GZIP,
    MEDIA_DOCKER_MANIFEST,
    MEDIA_DOCKER_MANIFEST_LIST,
    MEDIA_OCI_CONFIG,
    MEDIA_OCI_INDEX,
    MEDIA_OCI_LAYER,
    MEDIA_OCI_LAYER_GZIP,
    MEDIA_OCI_MANIFEST,
    Descriptor,
    Digest,
    sha256_digest,
)

MEDIA_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MTIME = 1_700_000_000  # fixed so digests are reproducible
WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"

Compression = Literal["gzip", "none"]


# ----- layer entries ---------------------------------------------------------------------------------


def _clean(path: str) -> str:
    """Normalise a well-behaved entry path: relative, no `..` (use RawEntry to be malicious)."""
    p = PurePosixPath("/" + path.lstrip("/"))
    parts = [x for x in p.parts[1:] if x not in ("", ".")]
    if not parts or ".." in parts:
        raise ValueError(f"bad layer path {path!r}: use RawEntry for unsafe names")
    return "/".join(parts)


@dataclass(frozen=True)
class File:
    path: str
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class Dir:
    path: str
    mode: int = 0o755
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class Symlink:
    path: str
    target: str
    """Written as is: relative or absolute."""


@dataclass(frozen=True)
class Hardlink:
    path: str
    target: str
    """Another path in the same layer (or a lower one)."""


@dataclass(frozen=True)
class Whiteout:
    """Deletes `path` from lower layers: a `.wh.<name>` entry beside it."""

    path: str


@dataclass(frozen=True)
class OpaqueWhiteout:
    """Hides everything lower layers put in directory `path` (entries in this layer stay)."""

    path: str


@dataclass(frozen=True)
class RawEntry:
    """A tar header written verbatim: `../evil`, `/abs`, links pointing anywhere."""

    name: str
    type: bytes = tarfile.REGTYPE
    data: bytes = b""
    linkname: str = ""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0


Entry = File | Dir | Symlink | Hardlink | Whiteout | OpaqueWhiteout | RawEntry


def _tarinfo(name: str, type_: bytes, mode: int, uid: int = 0, gid: int = 0, size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = type_
    info.mode = mode
    info.uid, info.gid = uid, gid
    info.uname = info.gname = ""
    info.mtime = MTIME
    info.size = size
    return info


def _write(tar: tarfile.TarFile, entry: Entry) -> None:
    match entry:
        case File():
            info = _tarinfo(_clean(entry.path), tarfile.REGTYPE, entry.mode, entry.uid, entry.gid, len(entry.data))
            tar.addfile(info, io.BytesIO(entry.data))
        case Dir():
            tar.addfile(_tarinfo(_clean(entry.path) + "/", tarfile.DIRTYPE, entry.mode, entry.uid, entry.gid))
        case Symlink():
            info = _tarinfo(_clean(entry.path), tarfile.SYMTYPE, 0o777)
            info.linkname = entry.target
            tar.addfile(info)
        case Hardlink():
            info = _tarinfo(_clean(entry.path), tarfile.LNKTYPE, 0o644)
            info.linkname = _clean(entry.target)
            tar.addfile(info)
        case Whiteout():
            p = PurePosixPath(_clean(entry.path))
            name = str(p.parent / (WHITEOUT_PREFIX + p.name)) if str(p.parent) != "." else WHITEOUT_PREFIX + p.name
            tar.addfile(_tarinfo(name, tarfile.REGTYPE, 0o644))
        case OpaqueWhiteout():
            tar.addfile(_tarinfo(_clean(entry.path) + "/" + OPAQUE_WHITEOUT, tarfile.REGTYPE, 0o644))
        case RawEntry():
            info = _tarinfo(entry.name, entry.type, entry.mode, entry.uid, entry.gid)
            info.linkname = entry.linkname
            if entry.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
                info.size = len(entry.data)
                tar.addfile(info, io.BytesIO(entry.data))
            else:
                tar.addfile(info)


class Layer:
    """One layer blob: an uncompressed tar (for the diff_id) and the blob as pushed (for the digest)."""

    def __init__(
        self,
        entries: Iterable[Entry],
        compression: Compression = "gzip",
        compresslevel: int = 6,
        comment: str = "",
    ) -> None:
        self.entries: tuple[Entry, ...] = tuple(entries)
        self.compression = compression
        self.comment = comment
        buf = io.BytesIO()
        # PAX: long names and big files without GNU extensions; headers only appear when needed.
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for entry in self.entries:
                _write(tar, entry)
        self.tar: bytes = buf.getvalue()
        if compression == "gzip":
            self.blob: bytes = gzip.compress(self.tar, compresslevel=compresslevel, mtime=0)
        elif compression == "none":
            self.blob = self.tar
        else:
            raise ValueError(f"unknown compression {compression!r}")
        self.diff_id: Digest = sha256_digest(self.tar)
        self.digest: Digest = sha256_digest(self.blob)

    @property
    def size(self) -> int:
        return len(self.blob)

    def media_type(self, docker: bool = False) -> str:
        if docker:
            return MEDIA_DOCKER_LAYER_GZIP if self.compression == "gzip" else MEDIA_DOCKER_LAYER
        return MEDIA_OCI_LAYER_GZIP if self.compression == "gzip" else MEDIA_OCI_LAYER

    def descriptor(self, docker: bool = False) -> Descriptor:
        return Descriptor(self.media_type(docker), self.digest, self.size)

    def names(self) -> list[str]:
        """Member names as they are in the tar, for assertions."""
        with tarfile.open(fileobj=io.BytesIO(self.tar), mode="r:") as tar:
            return tar.getnames()


# ----- images, indexes, push -------------------------------------------------------------------------


def _canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=False).encode()


@dataclass
class Image:
    """A built single-platform image: config + manifest + layers, ready to push."""

    config: bytes
    manifest: bytes
    layers: list[Layer]
    docker: bool
    platform: dict[str, str]

    @property
    def media_type(self) -> str:
        return MEDIA_DOCKER_MANIFEST if self.docker else MEDIA_OCI_MANIFEST

    @property
    def digest(self) -> Digest:
        return sha256_digest(self.manifest)

    @property
    def config_digest(self) -> Digest:
        return sha256_digest(self.config)

    @property
    def config_json(self) -> dict[str, Any]:
        return dict(json.loads(self.config))

    def descriptor(self, with_platform: bool = False) -> Descriptor:
        return Descriptor(
            self.media_type, self.digest, len(self.manifest), platform=self.platform if with_platform else None
        )

    def blobs(self) -> dict[Digest, bytes]:
        out = {layer.digest: layer.blob for layer in self.layers}
        out[self.config_digest] = self.config
        return out

    async def push(self, registry: str, repository: str, tag: str, **kw: Any) -> Digest:
        async with RegistryPusher(registry, **kw) as pusher:
            return await pusher.push_image(repository, self, tag)


@dataclass
class ImageIndex:
    """An OCI index (or Docker manifest list) over several single-platform images."""

    images: list[Image]
    docker: bool = False
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def media_type(self) -> str:
        return MEDIA_DOCKER_MANIFEST_LIST if self.docker else MEDIA_OCI_INDEX

    @property
    def manifest(self) -> bytes:
        obj: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": self.media_type,
            "manifests": [img.descriptor(with_platform=True).to_json() for img in self.images],
        }
        if self.annotations:
            obj["annotations"] = self.annotations
        return _canonical(obj)

    @property
    def digest(self) -> Digest:
        return sha256_digest(self.manifest)

    def image_for(self, os_: str, architecture: str) -> Image:
        for img in self.images:
            if img.platform["os"] == os_ and img.platform["architecture"] == architecture:
                return img
        raise KeyError(f"{os_}/{architecture}")

    async def push(self, registry: str, repository: str, tag: str, **kw: Any) -> Digest:
        async with RegistryPusher(registry, **kw) as pusher:
            return await pusher.push_index(repository, self, tag)


class ImageBuilder:
    """Assemble an image config and manifest from layers; `build()` freezes it into an `Image`."""

    def __init__(
        self,
        layers: Sequence[Layer] = (),
        *,
        architecture: str = "amd64",
        os: str = "linux",
        variant: str | None = None,
        entrypoint: Sequence[str] | None = None,
        cmd: Sequence[str] | None = None,
        env: Sequence[str] | None = None,
        working_dir: str | None = None,
        user: str | None = None,
        labels: dict[str, str] | None = None,
        docker: bool = False,
        created: str = "2024-01-01T00:00:00Z",
    ) -> None:
        self.layers: list[Layer] = []
        self.history: list[dict[str, Any]] = []
        self.architecture = architecture
        self.os = os
        self.variant = variant
        self.entrypoint = list(entrypoint) if entrypoint is not None else None
        self.cmd = list(cmd) if cmd is not None else None
        self.env = list(env) if env is not None else [f"PATH={DEFAULT_PATH}"]
        self.working_dir = working_dir
        self.user = user
        self.labels = dict(labels or {})
        self.docker = docker
        self.created = created
        for layer in layers:
            self.add_layer(layer)

    def add_layer(self, layer: Layer, created_by: str | None = None) -> ImageBuilder:
        self.layers.append(layer)
        self.history.append({"created": self.created, "created_by": created_by or layer.comment or "ferryman test"})
        return self

    def add_empty_history(self, created_by: str) -> ImageBuilder:
        """A history entry with no layer (like ENV or CMD in a Dockerfile)."""
        self.history.append({"created": self.created, "created_by": created_by, "empty_layer": True})
        return self

    @property
    def platform(self) -> dict[str, str]:
        out = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            out["variant"] = self.variant
        return out

    def config_json(self) -> dict[str, Any]:
        config: dict[str, Any] = {"Env": list(self.env)}
        if self.entrypoint is not None:
            config["Entrypoint"] = list(self.entrypoint)
        if self.cmd is not None:
            config["Cmd"] = list(self.cmd)
        if self.working_dir is not None:
            config["WorkingDir"] = self.working_dir
        if self.user is not None:
            config["User"] = self.user
        if self.labels:
            config["Labels"] = dict(self.labels)
        obj: dict[str, Any] = {
            "created": self.created,
            "architecture": self.architecture,
            "os": self.os,
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in self.layers]},
            "history": copy.deepcopy(self.history),
        }
        if self.variant:
            obj["variant"] = self.variant
        return obj

    def build(self) -> Image:
        config = _canonical(self.config_json())
        manifest: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": MEDIA_DOCKER_MANIFEST if self.docker else MEDIA_OCI_MANIFEST,
            "config": Descriptor(
                MEDIA_DOCKER_CONFIG if self.docker else MEDIA_OCI_CONFIG, sha256_digest(config), len(config)
            ).to_json(),
            "layers": [layer.descriptor(self.docker).to_json() for layer in self.layers],
        }
        return Image(config, _canonical(manifest), list(self.layers), self.docker, self.platform)

    async def push(self, registry: str, repository: str, tag: str, **kw: Any) -> Digest:
        """Push blobs and the manifest under `tag`; returns the manifest digest."""
        return await self.build().push(registry, repository, tag, **kw)


def registry_base_url(registry: str) -> str:
    """Accept `host:port` (plain HTTP, as in tests) or a full `http(s)://host:port` URL."""
    if registry.startswith(("http://", "https://")):
        return registry.rstrip("/")
    return f"http://{registry}"


_CHALLENGE_RE = re.compile(r'(\w+)="([^"]*)"')


class RegistryPusher:
    """Minimal distribution-API client for pushing: monolithic blob uploads and manifest PUTs.

    Answers a 401 challenge itself: Basic with `auth`, or Bearer by fetching a token from the realm
    (with `auth` as the token server's basic credentials), so it also pushes to locked-down registries.
    """

    def __init__(
        self,
        registry: str,
        *,
        auth: tuple[str, str] | aiohttp.BasicAuth | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.base = registry_base_url(registry)
        # (user, password); aiohttp.BasicAuth still accepted but deprecated in aiohttp 3.14.
        self.basic: str | None = None
        if isinstance(auth, aiohttp.BasicAuth):
            self.basic = auth.encode()
        elif auth is not None:
            self.basic = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        self.ssl_context = ssl_context
        self._session: aiohttp.ClientSession | None = None
        self._authorization: str | None = None

    async def __aenter__(self) -> RegistryPusher:
        self._session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("use RegistryPusher as an async context manager")
        return self._session

    @property
    def _ssl(self) -> ssl.SSLContext | bool:
        return self.ssl_context if self.ssl_context is not None else True

    async def _request(
        self, method: str, url: str, *, data: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        for attempt in range(2):
            hdrs = dict(headers or {})
            if self._authorization:
                hdrs["Authorization"] = self._authorization
            async with self.session.request(method, url, data=data, headers=hdrs, ssl=self._ssl) as resp:
                body = await resp.read()
                if resp.status != 401:
                    return resp.status, dict(resp.headers), body
                # First 401: (re)authenticate, e.g. a bearer token for another repository's scope.
                if attempt == 0:
                    await self._answer_challenge(resp.headers.get("WWW-Authenticate", ""))
        raise RuntimeError(f"{method} {url}: still unauthorized after authenticating: {body[:300]!r}")

    async def _answer_challenge(self, challenge: str) -> None:
        scheme, _, rest = challenge.partition(" ")
        if self.basic is None:
            raise RuntimeError(f"registry wants credentials ({challenge!r}) and none were given")
        if scheme.lower() == "basic":
            self._authorization = self.basic
            return
        if scheme.lower() != "bearer":
            raise RuntimeError(f"unsupported auth challenge {challenge!r}")
        params = dict(_CHALLENGE_RE.findall(rest))
        query = {k: params[k] for k in ("service", "scope") if k in params}
        headers = {"Authorization": self.basic}
        async with self.session.get(params["realm"], params=query, headers=headers, ssl=self._ssl) as resp:
            if resp.status != 200:
                raise RuntimeError(f"token server {params['realm']}: {resp.status} {await resp.text()}")
            payload = await resp.json(content_type=None)
        self._authorization = "Bearer " + (payload.get("token") or payload["access_token"])

    async def blob_exists(self, repository: str, digest: str) -> bool:
        status, _, _ = await self._request("HEAD", f"{self.base}/v2/{repository}/blobs/{digest}")
        return status == 200

    async def push_blob(self, repository: str, digest: str, data: bytes) -> bool:
        """Upload one blob unless the registry has it; True when it was uploaded."""
        if await self.blob_exists(repository, digest):
            return False
        status, headers, body = await self._request("POST", f"{self.base}/v2/{repository}/blobs/uploads/")
        if status != 202:
            raise RuntimeError(f"blob upload start: {status} {body[:500]!r}")
        # Location may be relative and may already carry query parameters (the upload state).
        url = urljoin(self.base + "/", headers["Location"])
        url += ("&" if "?" in url else "?") + f"digest={digest}"
        status, _, body = await self._request(
            "PUT", url, data=data, headers={"Content-Type": "application/octet-stream"}
        )
        if status != 201:
            raise RuntimeError(f"blob upload {digest}: {status} {body[:500]!r}")
        return True

    async def push_manifest(self, repository: str, reference: str, media_type: str, body: bytes) -> Digest:
        url = f"{self.base}/v2/{repository}/manifests/{reference}"
        status, headers, answer = await self._request("PUT", url, data=body, headers={"Content-Type": media_type})
        if status != 201:
            raise RuntimeError(f"manifest {repository}:{reference}: {status} {answer[:500]!r}")
        expected = sha256_digest(body)
        stored = headers.get("Docker-Content-Digest")
        if stored is not None and stored != expected:
            raise RuntimeError(f"registry stored manifest as {stored}, expected {expected}")
        return expected

    async def push_image(self, repository: str, image: Image, tag: str | None) -> Digest:
        for digest, data in image.blobs().items():
            await self.push_blob(repository, digest, data)
        return await self.push_manifest(repository, tag or image.digest, image.media_type, image.manifest)

    async def push_index(self, repository: str, index: ImageIndex, tag: str) -> Digest:
        for image in index.images:
            await self.push_image(repository, image, None)  # children by digest only
        return await self.push_manifest(repository, tag, index.media_type, index.manifest)


# ----- ready-made layers and images ------------------------------------------------------------------

BUSYBOX = "/bin/busybox"
BUSYBOX_APPLETS = (
    "sh", "ash", "echo", "cat", "sleep", "ls", "mkdir", "rm", "rmdir", "touch", "test", "[", "true", "false",
    "env", "id", "ps", "sync", "wc", "head", "tail", "grep", "sha256sum", "md5sum", "stat", "readlink", "dd",
    "cp", "mv", "ln", "hostname", "kill", "date", "pwd", "uname", "chmod", "chown", "whoami", "mount", "df",
    "find", "od", "seq", "yes", "printf", "tr", "cut", "sort", "uniq", "sed", "awk", "xargs", "nc", "wget",
    "httpd", "top", "free", "du", "tee", "timeout", "usleep", "mkfifo", "nproc", "which", "groups", "realpath",
)  # fmt: skip


@functools.cache  # 2 MB to gzip on every call otherwise; a Layer is never mutated after it is built
def busybox_layer(busybox: str = BUSYBOX, compression: Compression = "gzip") -> Layer:
    """The static busybox as /bin/busybox with applet symlinks, plus the usual empty top-level dirs."""
    data = Path(busybox).read_bytes()
    entries: list[Entry] = [Dir(d) for d in ("bin", "dev", "etc", "proc", "sys", "run", "root", "var")]
    entries.append(Dir("tmp", 0o1777))
    entries.append(File("bin/busybox", data, 0o755))
    entries += [Symlink(f"bin/{name}", "busybox") for name in BUSYBOX_APPLETS]
    return Layer(entries, compression, comment="busybox")


PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"
)
GROUP = "root:x:0:\napp:x:1000:\nstaff:x:50:app\nnogroup:x:65534:\n"


def etc_layer() -> Layer:
    """/etc/passwd and /etc/group with root, app (1000, also in staff 50) and nobody (65534)."""
    return Layer(
        [
            Dir("etc"),
            File("etc/passwd", PASSWD.encode()),
            File("etc/group", GROUP.encode()),
            Dir("home"),
            Dir("home/app", 0o755, 1000, 1000),
        ],
        comment="etc",
    )


def random_layer(
    size: int,
    seed: int = 0,
    file_size: int = 1 << 20,
    directory: str = "data/random",
    compression: Compression = "gzip",
) -> Layer:
    """`size` bytes of incompressible data split into files of `file_size` (seeded: reproducible digests)."""
    rng = random.Random(seed)
    entries: list[Entry] = [Dir(p) for p in _parents(directory)]
    remaining, n = size, 0
    while remaining > 0:
        chunk = min(file_size, remaining)
        entries.append(File(f"{directory}/f{n:05d}", rng.randbytes(chunk)))
        remaining -= chunk
        n += 1
    return Layer(entries, compression, compresslevel=1, comment=f"random {size} seed {seed}")


def _parents(path: str) -> list[str]:
    parts = _clean(path).split("/")
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


# What build_test_image puts in the image, for assertions.
TEST_KEEP = b"keep me\n"
TEST_GONE = "/data/gone"
TEST_FILES = {
    "/data/keep": TEST_KEEP,
    "/data/added": b"added by layer 3\n",
    "/data/dir/new": b"new after opaque\n",
    "/data/hardlink": TEST_KEEP,
}
TEST_ABSENT = ("/data/gone", "/data/dir/old")


def build_test_image(
    extra_layers: Sequence[Layer] = (),
    *,
    docker: bool = False,
    compression: Compression = "gzip",
    architecture: str = "amd64",
    cmd: Sequence[str] | None = ("/bin/sh", "-c", "cat /data/keep"),
) -> ImageBuilder:
    """busybox + etc, a data layer, then a layer that whites out /data/gone and opaques /data/dir."""
    data = Layer(
        [
            Dir("data"),
            File("data/keep", TEST_KEEP),
            File("data/gone", b"deleted by an upper layer\n"),
            Dir("data/dir"),
            File("data/dir/old", b"hidden by an opaque whiteout\n"),
            Hardlink("data/hardlink", "data/keep"),
        ],
        compression,
        comment="data",
    )
    upper = Layer(
        [
            Whiteout("data/gone"),
            File("data/added", TEST_FILES["/data/added"]),
            Dir("data/dir"),
            OpaqueWhiteout("data/dir"),
            File("data/dir/new", TEST_FILES["/data/dir/new"]),
        ],
        compression,
        comment="whiteouts",
    )
    builder = ImageBuilder(
        [busybox_layer(compression=compression), etc_layer(), data, upper, *extra_layers],
        architecture=architecture,
        cmd=cmd,
        env=[f"PATH={DEFAULT_PATH}", "FERRYMAN_TEST=1"],
        working_dir="/data",
        docker=docker,
        labels={"io.ferryman.test": "true"},
    )
    return builder


def build_index(builders: Sequence[ImageBuilder], docker: bool = False) -> ImageIndex:
    """An index over the given per-platform builders (each must have a distinct platform)."""
    return ImageIndex([b.build() for b in builders], docker=docker)


# ----- malicious layers ------------------------------------------------------------------------------


def traversal_layer(name: str = "", data: bytes = b"escaped\n") -> Layer:
    """Entries whose names climb out of the rootfs: `../<name>`, `a/../../<name>` and `/<name>`."""
    name = name or f"ferryman-evil-{secrets.token_hex(4)}"
    return Layer(
        [
            RawEntry(f"../{name}", data=data),
            RawEntry("a/", tarfile.DIRTYPE, mode=0o755),
            RawEntry(f"a/../../{name}-2", data=data),
            RawEntry(f"/{name}-abs", data=data),
        ],
        comment="path traversal",
    )


def symlink_escape_layers(outside_dir: str | Path, filename: str = "pwned", data: bytes = b"escaped\n") -> list[Layer]:
    """An absolute symlink `escape -> <outside_dir>`, then in a later layer a file written through it.

    A safe unpacker resolves `escape` inside the rootfs, so `<outside_dir>/<filename>` on the host must
    stay absent (the file may legitimately appear at `<rootfs>/<outside_dir>/<filename>`).
    """
    outside = str(outside_dir)
    return [
        Layer(
            [
                Symlink("escape", outside),
                RawEntry("dotdot", tarfile.SYMTYPE, linkname="../../../../../../" + outside.lstrip("/"), mode=0o777),
            ],
            comment="symlink",
        ),
        Layer(
            [RawEntry(f"escape/{filename}", data=data), RawEntry(f"dotdot/{filename}-2", data=data)],
            comment="write through symlink",
        ),
    ]


def hardlink_escape_layer(target: str = "/etc/hostname") -> Layer:
    """A hard link whose target is outside the rootfs (absolute and `..`)."""
    return Layer(
        [
            RawEntry("link-abs", tarfile.LNKTYPE, linkname=target),
            RawEntry("link-rel", tarfile.LNKTYPE, linkname="../../../../../.." + target),
        ],
        comment="hardlink escape",
    )


# ----- image archives --------------------------------------------------------------------------------


def _tar(members: Iterable[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            tar.addfile(_tarinfo(name, tarfile.REGTYPE, 0o644, size=len(data)), io.BytesIO(data))
    return buf.getvalue()


def oci_archive(
    image: Image, name: str | None = None, tag: str = "v1", blobs: dict[Digest, bytes] | None = None
) -> bytes:
    """An OCI image layout tar of `image`, as `ctr images export` or `docker save` (25+) write it; `name`
    goes in the `io.containerd.image.name` annotation, `tag` in `org.opencontainers.image.ref.name`.
    `blobs` replaces the content stored under a digest (a corrupt archive)."""
    annotations = {"org.opencontainers.image.ref.name": tag}
    if name:
        annotations["io.containerd.image.name"] = name
    entry = {**image.descriptor().to_json(), "annotations": annotations}
    index = {"schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX, "manifests": [entry]}
    content = {image.digest: image.manifest, **image.blobs(), **(blobs or {})}
    members = [("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'), ("index.json", _canonical(index))]
    members += [(f"blobs/sha256/{digest.removeprefix('sha256:')}", data) for digest, data in content.items()]
    return _tar(members)


def docker_archive(image: Image, tags: Sequence[str]) -> bytes:
    """A `docker save` tar (the format before Docker 25): manifest.json, the config as <hex>.json and
    each layer as <n>/layer.tar, uncompressed."""
    config_name = image.config_digest.removeprefix("sha256:") + ".json"
    layer_names = [f"{i:04d}/layer.tar" for i in range(len(image.layers))]
    manifest = [{"Config": config_name, "RepoTags": list(tags), "Layers": layer_names}]
    members = [(config_name, image.config)]
    members += [(name, layer.tar) for name, layer in zip(layer_names, image.layers, strict=True)]
    members.append(("manifest.json", json.dumps(manifest).encode()))  # docker writes it last
    return _tar(members)
