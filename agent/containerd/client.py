"""One connection to containerd and the per-service adapters bound to a namespace (and lease)."""

from __future__ import annotations

import asyncio
import contextlib

import grpc.aio
from google.protobuf import empty_pb2

from agent.containerd.connection import CallContext, open_channel
from agent.containerd.containers import ContainerStore
from agent.containerd.content import ContentStore
from agent.containerd.events import EventStream
from agent.containerd.images import ImageStore
from agent.containerd.leases import LeaseManager
from agent.containerd.snapshots import DiffService, SnapshotStore
from agent.containerd.tasks import TaskService
from agent.errors import ContainerdAlreadyExists, ContainerdUnavailable
from proto.containerd.api.services.containers.v1.containers_pb2_grpc import ContainersStub
from proto.containerd.api.services.content.v1.content_pb2_grpc import ContentStub
from proto.containerd.api.services.diff.v1.diff_pb2_grpc import DiffStub
from proto.containerd.api.services.events.v1.events_pb2_grpc import EventsStub
from proto.containerd.api.services.images.v1.images_pb2_grpc import ImagesStub
from proto.containerd.api.services.leases.v1.leases_pb2_grpc import LeasesStub
from proto.containerd.api.services.namespaces.v1 import namespace_pb2
from proto.containerd.api.services.namespaces.v1.namespace_pb2_grpc import NamespacesStub
from proto.containerd.api.services.snapshots.v1.snapshots_pb2_grpc import SnapshotsStub
from proto.containerd.api.services.tasks.v1.tasks_pb2_grpc import TasksStub
from proto.containerd.api.services.version.v1.version_pb2_grpc import VersionStub


class Containerd:
    """Adapters for one namespace; `leased()` gives a view whose calls also carry a lease."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        namespace: str,
        snapshotter: str,
        lease: str | None = None,
        owns_channel: bool = True,
    ) -> None:
        self._channel = channel
        self._owns_channel = owns_channel
        self.namespace = namespace
        self.snapshotter_name = snapshotter
        ctx = CallContext(namespace, lease)
        self.lease = lease
        self.content = ContentStore(ContentStub(channel), ctx)
        self.images = ImageStore(ImagesStub(channel), ctx)
        self.snapshots = SnapshotStore(SnapshotsStub(channel), ctx, snapshotter)
        self.diff = DiffService(DiffStub(channel), ctx)
        self.leases = LeaseManager(LeasesStub(channel), ctx)
        self.containers = ContainerStore(ContainersStub(channel), ctx)
        self.tasks = TaskService(TasksStub(channel), ctx)
        self.events = EventStream(EventsStub(channel), ctx)
        self._ctx = ctx

    @classmethod
    async def connect(
        cls, socket_path: str, namespace: str, snapshotter: str = "overlayfs", connect_timeout: float = 10.0
    ) -> Containerd:
        channel = open_channel(socket_path)
        client = cls(channel, namespace, snapshotter)
        try:
            await asyncio.wait_for(channel.channel_ready(), connect_timeout)
            await client.ensure_namespace()
        except (TimeoutError, ContainerdUnavailable) as exc:
            await channel.close()
            raise ContainerdUnavailable(f"containerd at {socket_path} did not answer: {exc}", "UNAVAILABLE") from exc
        return client

    def leased(self, lease_id: str) -> Containerd:
        return Containerd(self._channel, self.namespace, self.snapshotter_name, lease=lease_id, owns_channel=False)

    async def version(self) -> str:
        resp = await self._ctx.unary(VersionStub(self._channel).Version, empty_pb2.Empty(), "version")
        return str(resp.version)

    async def ensure_namespace(self, labels: dict[str, str] | None = None) -> None:
        ns = namespace_pb2.Namespace(name=self.namespace, labels=labels or {})
        with contextlib.suppress(ContainerdAlreadyExists):
            await self._ctx.unary(
                NamespacesStub(self._channel).Create,
                namespace_pb2.CreateNamespaceRequest(namespace=ns),
                "create namespace",
            )

    async def close(self) -> None:
        if self._owns_channel:
            await self._channel.close()
