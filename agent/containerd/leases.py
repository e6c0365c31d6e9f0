"""containerd leases: they keep content and snapshots alive while a pull or migration works."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

from agent.containerd.connection import CallContext
from agent.errors import ContainerdNotFound
from proto.containerd.api.services.leases.v1 import leases_pb2 as pb
from proto.containerd.api.services.leases.v1.leases_pb2_grpc import LeasesStub

# containerd's GC drops a lease after this RFC 3339 time, which bounds what a crashed agent leaks.
EXPIRE_LABEL = "containerd.io/gc.expire"


class LeaseManager:
    def __init__(self, stub: LeasesStub, ctx: CallContext) -> None:
        self._stub = stub
        self._ctx = ctx

    async def create(self, purpose: str, expire_after: float, labels: dict[str, str] | None = None) -> str:
        lease_id = f"ferryman-{purpose}-{uuid.uuid4().hex[:12]}"
        expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=expire_after)
        all_labels = {EXPIRE_LABEL: expires.strftime("%Y-%m-%dT%H:%M:%SZ"), **(labels or {})}
        await self._ctx.unary(self._stub.Create, pb.CreateRequest(id=lease_id, labels=all_labels), "create lease")
        return lease_id

    async def delete(self, lease_id: str, sync: bool = False) -> None:
        with suppress(ContainerdNotFound):
            await self._ctx.unary(
                self._stub.Delete, pb.DeleteRequest(id=lease_id, sync=sync), f"delete lease {lease_id}"
            )

    async def list(self) -> list[str]:
        resp = await self._ctx.unary(self._stub.List, pb.ListRequest(), "list leases")
        return [lease.id for lease in resp.leases]

    async def resources(self, lease_id: str) -> tuple[tuple[str, str], ...]:
        """What a lease holds, as (type, id): ("content", digest), ("snapshots/overlayfs", key), ..."""
        with suppress(ContainerdNotFound):
            resp = await self._ctx.unary(
                self._stub.ListResources, pb.ListResourcesRequest(id=lease_id), f"resources of lease {lease_id}"
            )
            return tuple((r.type, r.id) for r in resp.resources)
        return ()

    async def add_snapshot(self, lease_id: str, snapshotter: str, key: str) -> None:
        """Protect an existing snapshot from GC for the life of the lease."""
        req = pb.AddResourceRequest(id=lease_id, resource=pb.Resource(id=key, type=f"snapshots/{snapshotter}"))
        await self._ctx.unary(self._stub.AddResource, req, f"lease snapshot {key}")

    async def add_content(self, lease_id: str, digest: str) -> None:
        """Protect content from GC for the life of the lease, also content that is not there yet: it
        is protected from the moment anyone commits it."""
        req = pb.AddResourceRequest(id=lease_id, resource=pb.Resource(id=digest, type="content"))
        await self._ctx.unary(self._stub.AddResource, req, f"lease content {digest}")

    @asynccontextmanager
    async def held(self, purpose: str, expire_after: float) -> AsyncIterator[str]:
        """A lease for the duration of the block, deleted afterwards whatever happens.

        After a failure the delete waits for containerd's GC, so what the failed work created is
        gone before the error reaches the caller (and cannot vanish under the caller's retry).
        """
        lease_id = await self.create(purpose, expire_after)
        try:
            yield lease_id
        except BaseException:
            await self.delete(lease_id, sync=True)
            raise
        await self.delete(lease_id)
