"""An image as an OCI image layout tar, streamed from containerd's content store.

The archive holds this host's platform of the image: `oci-layout`, `index.json` with one entry (the
image's manifest, named by the `io.containerd.image.name` and `org.opencontainers.image.ref.name`
annotations, as containerd and docker write them) and the manifest, config and layers under
`blobs/sha256/`. Blobs are written as stored, so the manifest digest survives an export and import;
an image whose name points at a multi-platform index is exported as its platform's manifest alone.

The tar is written member by member (tarfile's PAX headers, the data, padding to 512 bytes), never
whole in memory: layers stream from containerd straight into the response.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import AsyncIterator
from dataclasses import dataclass

from agent.containerd import Containerd
from agent.images.archive import ANNOTATION_NAME, ANNOTATION_REF
from agent.images.local import read_image
from agent.manifests import decode_json, parse_manifest
from agent.oci import MEDIA_OCI_INDEX, Descriptor, Digest, Platform, Reference

LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'
MTIME = 0
"""Member times: fixed, so one image always exports to the same bytes."""


@dataclass(frozen=True)
class Export:
    """What an export will write: the size is known before the first byte (Content-Length)."""

    name: str
    manifest: Descriptor
    blobs: tuple[Descriptor, ...]
    """Manifest, config and layers, in the order written."""
    index: bytes

    @property
    def members(self) -> list[tuple[str, int]]:
        """(name, size) of each member, in order."""
        blobs = [(_blob_path(d), d.size) for d in self.blobs]
        return [("oci-layout", len(LAYOUT)), ("index.json", len(self.index)), *blobs]

    @property
    def size(self) -> int:
        return sum(len(_header(n, size)) + _padded(size) for n, size in self.members) + 2 * tarfile.BLOCKSIZE


async def plan_export(cd: Containerd, name: str, platform: Platform) -> Export:
    """ImageNotFound for an image not here; the blobs' presence is checked as they are read."""
    image = await read_image(cd, name, platform)
    manifest_bytes = await cd.content.read_all(image.manifest_digest)
    where = f"manifest {image.manifest_digest} of {name}"
    manifest = parse_manifest(decode_json(manifest_bytes, where), image.manifest_media_type, where)
    ref = Reference.parse(name)
    desc = Descriptor(
        image.manifest_media_type,
        Digest(image.manifest_digest),
        len(manifest_bytes),
        annotations={ANNOTATION_NAME: name, ANNOTATION_REF: ref.tag or ref.digest or "latest"},
    )
    index = {"schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX, "manifests": [desc.to_json()]}
    return Export(
        name=name,
        manifest=desc,
        blobs=(desc, manifest.config, *manifest.layers),
        index=json.dumps(index, separators=(",", ":")).encode(),
    )


async def write_export(cd: Containerd, export: Export) -> AsyncIterator[bytes]:
    """The archive's bytes. A blob that is gone (collected meanwhile) or shorter than its descriptor
    ends the stream with an error: the archive is then incomplete, which a reader notices."""
    yield _header("oci-layout", len(LAYOUT)) + _pad(LAYOUT)
    yield _header("index.json", len(export.index)) + _pad(export.index)
    for desc in export.blobs:
        yield _header(_blob_path(desc), desc.size)
        written = 0
        async for chunk in cd.content.read(desc.digest):
            written += len(chunk)
            yield chunk
        if written != desc.size:
            raise OSError(f"blob {desc.digest} is {written} bytes in the content store, not {desc.size}")
        yield bytes(_padded(desc.size) - desc.size)
    yield bytes(2 * tarfile.BLOCKSIZE)


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = MTIME
    info.mode = 0o644
    return info.tobuf(tarfile.PAX_FORMAT)


def _blob_path(desc: Descriptor) -> str:
    return "blobs/sha256/" + desc.digest.removeprefix("sha256:")


def _padded(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _pad(data: bytes) -> bytes:
    return data + bytes(_padded(len(data)) - len(data))
