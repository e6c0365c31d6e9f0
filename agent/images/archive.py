"""Image archives: an OCI image layout or a `docker save` tar, read as a blob source.

An archive is untrusted input, like a registry's answers: its documents go through agent/manifests.py,
and every blob is accepted only when it hashes to its descriptor's digest (containerd checks at commit).
The archive is read from a file (the API spools the request body first): a tar's members come in any
order (`docker save` writes manifest.json last), and layers are read by offset with `os.pread`, so
several layers can be stored at once.

  OCI image layout   `oci-layout`, `index.json`, `blobs/sha256/<hex>`; each index.json entry is an
                     image, named by its `io.containerd.image.name` annotation, or by
                     `org.opencontainers.image.ref.name` when that is a whole reference
  docker save        `manifest.json`: [{"Config", "RepoTags", "Layers"}]; the manifest is written
                     here (Docker schema 2, as `ctr images import` does), with each layer's digest
                     hashed from the archive
Docker 25 and later write both; the OCI layout wins then.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import tarfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import IO

from agent.errors import ContentTooLarge, InvalidArchive, InvalidManifest
from agent.manifests import decode_json, parse_descriptor
from agent.oci import (
    MEDIA_DOCKER_CONFIG,
    MEDIA_DOCKER_LAYER,
    MEDIA_DOCKER_LAYER_GZIP,
    MEDIA_DOCKER_MANIFEST,
    Descriptor,
    Digest,
    normalize_name,
    sha256_digest,
)
from core.errors import InvalidRequest

ANNOTATION_NAME = "io.containerd.image.name"
"""containerd's (and docker's) annotation with an image's whole name, on an index.json entry."""
ANNOTATION_REF = "org.opencontainers.image.ref.name"
"""The OCI layout's name of an entry: a tag, or a whole reference."""
READ_CHUNK = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"
_BLOB_PATH = re.compile(r"blobs/sha256/([a-f0-9]{64})")


@dataclass(frozen=True)
class ArchiveImage:
    """One image the archive holds: what its names point at."""

    target: Descriptor
    names: tuple[str, ...]


@dataclass
class ArchiveBlobs:
    """The archive's blobs by digest (its members, and documents written here), as a BlobSource."""

    fd: int
    members: dict[str, tuple[int, int]] = field(default_factory=dict)
    """digest -> (offset of the data in the archive, size)"""
    documents: dict[str, bytes] = field(default_factory=dict)
    """digest -> bytes of a document the archive does not hold as such (a docker-save manifest)"""

    @property
    def labels(self) -> Mapping[str, str]:
        return {}

    async def fetch_blob(self, desc: Descriptor, offset: int = 0) -> AsyncIterator[bytes]:
        document = self.documents.get(desc.digest)
        if document is not None:
            yield document[offset : desc.size]
            return
        member = self.members.get(desc.digest)
        if member is None:
            raise InvalidArchive(f"the archive has no blob {desc.digest}")
        start, size = member
        if size > desc.size:
            raise ContentTooLarge(f"blob {desc.digest} is {size} bytes in the archive, its descriptor says {desc.size}")
        position = offset
        while position < size:
            chunk = await asyncio.to_thread(os.pread, self.fd, min(READ_CHUNK, size - position), start + position)
            if not chunk:
                raise InvalidArchive(f"the archive ends inside blob {desc.digest}")
            position += len(chunk)
            yield chunk

    async def fetch_bytes(self, desc: Descriptor) -> bytes:
        data = b"".join([chunk async for chunk in self.fetch_blob(desc)])
        if len(data) != desc.size or sha256_digest(data) != desc.digest:
            raise InvalidArchive(f"blob {desc.digest} in the archive does not match its digest or size")
        return data


@dataclass(frozen=True)
class Archive:
    blobs: ArchiveBlobs
    images: tuple[ArchiveImage, ...]
    format: str
    """"oci" or "docker"."""


def read_archive(file: IO[bytes], max_document: int) -> Archive:
    """The images in a tar archive and its blobs (blocking: run it in a thread). InvalidArchive when
    the file is no tar, neither an OCI layout nor a `docker save`, or its documents are malformed."""
    try:
        return _read_archive(file, max_document)
    except (InvalidManifest, InvalidRequest) as exc:  # a document, or a name, of the archive's
        raise InvalidArchive(exc.message) from exc


def _read_archive(file: IO[bytes], max_document: int) -> Archive:
    file.seek(0)
    try:
        with tarfile.open(fileobj=file, mode="r:") as tar:
            files = {_member_name(m.name): m for m in tar.getmembers() if m.isfile()}
    except tarfile.TarError as exc:
        raise InvalidArchive(f"not a tar archive: {exc}") from exc
    blobs = ArchiveBlobs(file.fileno())

    def document(name: str) -> object:
        member = files[name]
        if member.size > max_document:
            raise InvalidArchive(f"{name} is {member.size} bytes, over the {max_document} bytes allowed")
        return decode_json(os.pread(blobs.fd, member.size, member.offset_data), f"{name} in the archive")

    if "index.json" in files and "oci-layout" in files:
        for name, member in files.items():
            digest = _blob_digest(name)
            if digest is not None:
                blobs.members[digest] = (member.offset_data, member.size)
        return Archive(blobs, _oci_images(document("index.json")), "oci")
    if "manifest.json" in files:
        images = _docker_images(document("manifest.json"), files, blobs, max_document)
        return Archive(blobs, images, "docker")
    raise InvalidArchive("the archive is neither an OCI image layout (index.json, oci-layout) nor a docker save")


def _member_name(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name


def _blob_digest(name: str) -> Digest | None:
    """The digest a layout's blob path names (blobs/sha256/<hex>), or None for any other path."""
    match = _BLOB_PATH.fullmatch(name)
    return Digest(f"sha256:{match.group(1)}") if match else None


def _oci_images(index: object) -> tuple[ArchiveImage, ...]:
    if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
        raise InvalidArchive("index.json in the archive is not an image index (no manifests array)")
    images = []
    for i, entry in enumerate(index["manifests"]):
        desc = parse_descriptor(entry, f"index.json manifests[{i}]")
        images.append(ArchiveImage(desc, _oci_names(desc)))
    return tuple(images)


def _oci_names(desc: Descriptor) -> tuple[str, ...]:
    name = desc.annotations.get(ANNOTATION_NAME) or ""
    ref = desc.annotations.get(ANNOTATION_REF) or ""
    if not name and "/" in ref:  # a whole reference, not just a tag
        name = ref
    return (normalize_name(name),) if name else ()


def _docker_images(
    manifest: object, files: Mapping[str, tarfile.TarInfo], blobs: ArchiveBlobs, max_document: int
) -> tuple[ArchiveImage, ...]:
    if not isinstance(manifest, list) or not manifest:
        raise InvalidArchive("manifest.json in the archive is not a non-empty array")
    images = []
    for i, entry in enumerate(manifest):
        where = f"manifest.json[{i}]"
        if not isinstance(entry, dict):
            raise InvalidArchive(f"{where} is not an object")
        config_name, layer_names = entry.get("Config"), entry.get("Layers")
        tags = entry.get("RepoTags") or []
        if not isinstance(config_name, str) or not isinstance(layer_names, list) or not isinstance(tags, list):
            raise InvalidArchive(f"{where} needs Config (a path), Layers (an array of paths) and RepoTags (an array)")
        paths = [config_name, *layer_names]
        for path in paths:
            if not isinstance(path, str) or _member_name(path) not in files:
                raise InvalidArchive(f"{where} names {path!r}, which the archive does not hold")
        config_member = files[_member_name(config_name)]
        if config_member.size > max_document:
            raise InvalidArchive(f"{config_name} is {config_member.size} bytes, over the {max_document} bytes allowed")
        config_bytes = os.pread(blobs.fd, config_member.size, config_member.offset_data)
        config = _add_member(blobs, config_member, MEDIA_DOCKER_CONFIG, sha256_digest(config_bytes))
        layers = [_add_member(blobs, files[_member_name(p)], None, None) for p in layer_names]
        body = {
            "schemaVersion": 2,
            "mediaType": MEDIA_DOCKER_MANIFEST,
            "config": config.to_json(),
            "layers": [layer.to_json() for layer in layers],
        }
        data = json.dumps(body, separators=(",", ":")).encode()
        target = Descriptor(MEDIA_DOCKER_MANIFEST, sha256_digest(data), len(data))
        blobs.documents[target.digest] = data
        names = []
        for tag in tags:
            if not isinstance(tag, str):
                raise InvalidArchive(f"{where}.RepoTags holds {tag!r}, not a name")
            names.append(normalize_name(tag))
        images.append(ArchiveImage(target, tuple(names)))
    return tuple(images)


def _add_member(blobs: ArchiveBlobs, member: tarfile.TarInfo, media_type: str | None, digest: str | None) -> Descriptor:
    """A docker-save file as a blob: its digest hashed from the archive (layers), its media type from its
    first bytes (gzip or a plain tar)."""
    if digest is None:
        hasher = hashlib.sha256()
        for position in range(0, member.size, READ_CHUNK):
            hasher.update(os.pread(blobs.fd, min(READ_CHUNK, member.size - position), member.offset_data + position))
        digest = f"sha256:{hasher.hexdigest()}"
    if media_type is None:
        head = os.pread(blobs.fd, 2, member.offset_data)
        media_type = MEDIA_DOCKER_LAYER_GZIP if head == _GZIP_MAGIC else MEDIA_DOCKER_LAYER
    blobs.members[digest] = (member.offset_data, member.size)
    return Descriptor(media_type, Digest(digest), member.size)
