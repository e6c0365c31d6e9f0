"""Apply layers onto committed snapshots named by chain ID, the way containerd's unpacker does."""

from __future__ import annotations

import logging
import secrets
import time

from agent.containerd import Containerd
from agent.errors import ContainerdAlreadyExists, ContainerdError, DigestMismatch, UnsafeLayer
from agent.oci import Descriptor

log = logging.getLogger(__name__)

# containerd's applier refuses entries that would land outside the rootfs with these words.
_ESCAPE_HINTS = ("outside", "breakout", "escape", "invalid path", "path traversal")


async def unpack_layer(cd: Containerd, layer: Descriptor, diff_id: str, chain_id: str, parent: str) -> bool:
    """Make snapshot `chain_id` exist; returns False when it already did (nothing applied)."""
    if await cd.snapshots.exists(chain_id):
        if cd.lease:  # keep it from a GC that may already be collecting it
            await cd.leases.add_snapshot(cd.lease, cd.snapshotter_name, chain_id)
        return False
    key = f"extract-{time.time_ns()}-{secrets.token_hex(4)} {chain_id}"
    mounts = await cd.snapshots.prepare(key, parent)
    try:
        try:
            applied = await cd.diff.apply(layer.media_type, layer.digest, layer.size, mounts)
        except ContainerdError as exc:
            if any(hint in exc.message.lower() for hint in _ESCAPE_HINTS):
                raise UnsafeLayer(f"layer {layer.digest} was refused: {exc.message}") from exc
            raise
        if applied != diff_id:
            raise DigestMismatch(f"layer {layer.digest} unpacked to {applied}, but the image config says {diff_id}")
        try:
            await cd.snapshots.commit(chain_id, key)
        except ContainerdAlreadyExists:
            await cd.snapshots.remove(key)  # another pull committed the same chain first
        return True
    except BaseException:
        await _remove_quietly(cd, key)
        raise


async def _remove_quietly(cd: Containerd, key: str) -> None:
    try:
        await cd.snapshots.remove(key)
    except ContainerdError as exc:
        log.warning("could not remove failed snapshot", extra={"key": key, "error": exc.message})
