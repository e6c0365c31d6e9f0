"""The container's rw layer as a diff: exported on the source, applied to a fresh snapshot on the target."""

from __future__ import annotations

import contextlib

from agent.containerd import Containerd
from agent.errors import ContainerdNotFound, DigestMismatch
from agent.images.ingest import put_blob
from agent.oci import Descriptor, parse_digest

DIFF_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar"
RW_LAYER_FILE = "rootfs-diff.tar"


async def export_rw_layer(
    cd: Containerd, snapshot_key: str, image_chain: str, lease_expiry: float
) -> tuple[str, bytes]:
    """The changes in the container's active snapshot against its image, as (digest, uncompressed tar)."""
    async with cd.leases.held("rwdiff", lease_expiry) as lease_id:
        leased = cd.leased(lease_id)
        view_key = f"rwdiff-view-{snapshot_key}-{lease_id}"
        lower = await leased.snapshots.view(view_key, image_chain)
        try:
            upper = await leased.snapshots.mounts(snapshot_key)
            _, digest, _ = await leased.diff.diff(lower, upper, DIFF_MEDIA_TYPE, f"rwdiff-{lease_id}")
            data = await leased.content.read_all(digest)
        finally:
            with contextlib.suppress(ContainerdNotFound):
                await leased.snapshots.remove(view_key)
    return digest, data


async def import_rw_layer(cd: Containerd, snapshot_key: str, image_chain: str, data: bytes, digest: str) -> None:
    """Prepare `snapshot_key` on the image and apply the source's rw-layer diff to it.

    `cd` must be a leased view: the caller's migration lease keeps the snapshot until a container owns it.
    """
    await put_blob(cd, Descriptor(DIFF_MEDIA_TYPE, parse_digest(digest), len(data)), data, {})
    mounts = await cd.snapshots.prepare(snapshot_key, image_chain)
    try:
        applied = await cd.diff.apply(DIFF_MEDIA_TYPE, digest, len(data), mounts)
        if applied != digest:
            raise DigestMismatch(f"rw layer applied as {applied}, expected {digest}")
    except BaseException:
        with contextlib.suppress(ContainerdNotFound):
            await cd.snapshots.remove(snapshot_key)
        raise
