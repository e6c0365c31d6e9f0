"""containerd's container metadata store."""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf import any_pb2, field_mask_pb2

from agent.containerd.connection import CallContext
from agent.containerd.types import ContainerRecord
from proto.containerd.api.services.containers.v1 import containers_pb2 as pb
from proto.containerd.api.services.containers.v1.containers_pb2_grpc import ContainersStub

SPEC_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"


def _record(msg: pb.Container) -> ContainerRecord:
    created = msg.created_at.ToDatetime() if msg.HasField("created_at") else None
    return ContainerRecord(
        id=msg.id,
        image=msg.image,
        labels=dict(msg.labels),
        runtime=msg.runtime.name,
        spec=msg.spec.value,
        snapshotter=msg.snapshotter,
        snapshot_key=msg.snapshot_key,
        created_at=created,
    )


class ContainerStore:
    def __init__(self, stub: ContainersStub, ctx: CallContext) -> None:
        self._stub = stub
        self._ctx = ctx

    async def get(self, container_id: str) -> ContainerRecord:
        resp = await self._ctx.unary(
            self._stub.Get, pb.GetContainerRequest(id=container_id), f"container {container_id}"
        )
        return _record(resp.container)

    async def list(self, filters: list[str] | None = None) -> list[ContainerRecord]:
        resp = await self._ctx.unary(
            self._stub.List, pb.ListContainersRequest(filters=filters or []), "list containers"
        )
        return [_record(c) for c in resp.containers]

    async def create(self, record: ContainerRecord) -> ContainerRecord:
        msg = pb.Container(
            id=record.id,
            image=record.image,
            labels=dict(record.labels),
            runtime=pb.Container.Runtime(name=record.runtime),
            spec=any_pb2.Any(type_url=SPEC_TYPE_URL, value=record.spec),
            snapshotter=record.snapshotter,
            snapshot_key=record.snapshot_key,
        )
        resp = await self._ctx.unary(
            self._stub.Create, pb.CreateContainerRequest(container=msg), f"create container {record.id}"
        )
        return _record(resp.container)

    async def update_labels(self, container_id: str, labels: Mapping[str, str]) -> ContainerRecord:
        msg = pb.Container(id=container_id, labels=dict(labels))
        mask = field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels])
        resp = await self._ctx.unary(
            self._stub.Update,
            pb.UpdateContainerRequest(container=msg, update_mask=mask),
            f"update container {container_id}",
        )
        return _record(resp.container)

    async def delete(self, container_id: str) -> None:
        await self._ctx.unary(
            self._stub.Delete, pb.DeleteContainerRequest(id=container_id), f"delete container {container_id}"
        )
