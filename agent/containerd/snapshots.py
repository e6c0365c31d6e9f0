"""containerd's snapshotters and its diff service (applying layers to snapshots)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from agent.containerd.connection import CallContext
from agent.containerd.types import Mount, SnapshotInfo, SnapshotKind
from agent.errors import ContainerdNotFound
from proto.containerd.api.services.diff.v1 import diff_pb2
from proto.containerd.api.services.diff.v1.diff_pb2_grpc import DiffStub
from proto.containerd.api.services.snapshots.v1 import snapshots_pb2 as pb
from proto.containerd.api.services.snapshots.v1.snapshots_pb2_grpc import SnapshotsStub
from proto.containerd.api.types import descriptor_pb2, mount_pb2


def _mounts(msgs: Iterable[mount_pb2.Mount]) -> list[Mount]:
    return [Mount(type=m.type, source=m.source, options=tuple(m.options), target=m.target) for m in msgs]


def _mount_msgs(mounts: Iterable[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options), target=m.target) for m in mounts]


def _info(msg: pb.Info) -> SnapshotInfo:
    return SnapshotInfo(name=msg.name, parent=msg.parent, kind=SnapshotKind(msg.kind), labels=dict(msg.labels))


class SnapshotStore:
    """One snapshotter (overlayfs by default)."""

    def __init__(self, stub: SnapshotsStub, ctx: CallContext, snapshotter: str) -> None:
        self._stub = stub
        self._ctx = ctx
        self.snapshotter = snapshotter

    async def stat(self, key: str) -> SnapshotInfo:
        req = pb.StatSnapshotRequest(snapshotter=self.snapshotter, key=key)
        return _info((await self._ctx.unary(self._stub.Stat, req, f"snapshot {key}")).info)

    async def exists(self, key: str) -> bool:
        try:
            await self.stat(key)
        except ContainerdNotFound:
            return False
        return True

    async def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        req = pb.PrepareSnapshotRequest(snapshotter=self.snapshotter, key=key, parent=parent, labels=dict(labels or {}))
        return _mounts((await self._ctx.unary(self._stub.Prepare, req, f"prepare snapshot {key}")).mounts)

    async def view(self, key: str, parent: str, labels: Mapping[str, str] | None = None) -> list[Mount]:
        req = pb.ViewSnapshotRequest(snapshotter=self.snapshotter, key=key, parent=parent, labels=dict(labels or {}))
        return _mounts((await self._ctx.unary(self._stub.View, req, f"view snapshot {key}")).mounts)

    async def mounts(self, key: str) -> list[Mount]:
        req = pb.MountsRequest(snapshotter=self.snapshotter, key=key)
        return _mounts((await self._ctx.unary(self._stub.Mounts, req, f"mounts of {key}")).mounts)

    async def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        req = pb.CommitSnapshotRequest(snapshotter=self.snapshotter, name=name, key=key, labels=dict(labels or {}))
        await self._ctx.unary(self._stub.Commit, req, f"commit snapshot {key} as {name}")

    async def remove(self, key: str) -> None:
        req = pb.RemoveSnapshotRequest(snapshotter=self.snapshotter, key=key)
        await self._ctx.unary(self._stub.Remove, req, f"remove snapshot {key}")

    async def list(self, filters: list[str] | None = None) -> list[SnapshotInfo]:
        req = pb.ListSnapshotsRequest(snapshotter=self.snapshotter, filters=filters or [])
        return [_info(i) async for resp in self._ctx.stream(self._stub.List, req, "list snapshots") for i in resp.info]

    async def usage(self, key: str) -> tuple[int, int]:
        resp = await self._ctx.unary(
            self._stub.Usage, pb.UsageRequest(snapshotter=self.snapshotter, key=key), f"usage {key}"
        )
        return resp.size, resp.inodes


class DiffService:
    def __init__(self, stub: DiffStub, ctx: CallContext) -> None:
        self._stub = stub
        self._ctx = ctx

    async def apply(self, media_type: str, digest: str, size: int, mounts: list[Mount]) -> str:
        """Unpack one layer blob from the content store onto mounts; returns the applied diff ID."""
        req = diff_pb2.ApplyRequest(
            diff=descriptor_pb2.Descriptor(media_type=media_type, digest=digest, size=size),
            mounts=_mount_msgs(mounts),
        )
        resp = await self._ctx.unary(self._stub.Apply, req, f"apply layer {digest}")
        return resp.applied.digest

    async def diff(
        self, left: list[Mount], right: list[Mount], media_type: str, ref: str, labels: Mapping[str, str] | None = None
    ) -> tuple[str, str, int]:
        """Write the difference right-left to the content store; returns (media type, digest, size)."""
        req = diff_pb2.DiffRequest(
            left=_mount_msgs(left), right=_mount_msgs(right), media_type=media_type, ref=ref, labels=dict(labels or {})
        )
        d = (await self._ctx.unary(self._stub.Diff, req, f"diff {ref}")).diff
        return d.media_type, d.digest, d.size
