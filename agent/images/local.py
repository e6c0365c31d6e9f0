"""Read a pulled image back out of containerd: its manifest, config and top snapshot."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from agent.containerd import Containerd, ImageRecord
from agent.errors import ContainerdNotFound, ImageNotFound
from agent.oci import INDEX_TYPES, MANIFEST_TYPES, MEDIA_OCI_MANIFEST, Platform, chain_ids, parse_digest
from core.errors import InvalidRequest


@dataclass(frozen=True)
class LocalImage:
    record: ImageRecord
    manifest_digest: str
    config: dict[str, Any]
    """The OCI image config JSON."""
    chain_id: str
    """The committed snapshot holding the image's rootfs."""
    size: int
    """Manifest, config and layer bytes."""
    layers: tuple[str, ...] = ()
    """The manifest's layer digests (compressed blobs, as registries serve them)."""
    manifest_media_type: str = MEDIA_OCI_MANIFEST
    config_digest: str = ""


async def read_image(cd: Containerd, name: str, platform: Platform) -> LocalImage:
    try:
        record = await cd.images.get(name)
    except ContainerdNotFound as exc:
        raise ImageNotFound(f"image {name} is not pulled on this host") from exc
    digest, media_type = record.digest, record.media_type
    if media_type in INDEX_TYPES:
        index = json.loads(await cd.content.read_all(digest))
        present = [m for m in index.get("manifests", []) if platform.matches(m.get("platform") or {})]
        if not present:
            raise ImageNotFound(f"image {name} has no manifest for {platform}")
        digest, media_type = present[0]["digest"], present[0]["mediaType"]
    if media_type not in MANIFEST_TYPES:
        raise InvalidRequest(f"image {name} points at unsupported media type {media_type}")
    manifest_bytes = await cd.content.read_all(digest)
    manifest = json.loads(manifest_bytes)
    config = json.loads(await cd.content.read_all(manifest["config"]["digest"]))
    diff_ids = [parse_digest(d) for d in config["rootfs"]["diff_ids"]]
    size = len(manifest_bytes) + int(manifest["config"]["size"]) + sum(int(la["size"]) for la in manifest["layers"])
    layers = tuple(str(la["digest"]) for la in manifest["layers"])
    return LocalImage(
        record=record,
        manifest_digest=digest,
        config=config,
        chain_id=chain_ids(diff_ids)[-1],
        size=size,
        layers=layers,
        manifest_media_type=media_type,
        config_digest=str(manifest["config"]["digest"]),
    )
