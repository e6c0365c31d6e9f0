"""containerd's image store: names pointing at a target descriptor."""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf import field_mask_pb2

from agent.containerd.connection import CallContext
from agent.containerd.types import ImageRecord
from agent.errors import ContainerdAlreadyExists
from proto.containerd.api.services.images.v1 import images_pb2 as pb
from proto.containerd.api.services.images.v1.images_pb2_grpc import ImagesStub
from proto.containerd.api.types import descriptor_pb2


def _record(msg: pb.Image) -> ImageRecord:
    created = msg.created_at.ToDatetime() if msg.HasField("created_at") else None
    return ImageRecord(
        name=msg.name,
        media_type=msg.target.media_type,
        digest=msg.target.digest,
        size=msg.target.size,
        labels=dict(msg.labels),
        created_at=created,
    )


class ImageStore:
    def __init__(self, stub: ImagesStub, ctx: CallContext) -> None:
        self._stub = stub
        self._ctx = ctx

    async def get(self, name: str) -> ImageRecord:
        resp = await self._ctx.unary(self._stub.Get, pb.GetImageRequest(name=name), f"image {name}")
        return _record(resp.image)

    async def list(self, filters: list[str] | None = None) -> list[ImageRecord]:
        resp = await self._ctx.unary(self._stub.List, pb.ListImagesRequest(filters=filters or []), "list images")
        return [_record(i) for i in resp.images]

    async def put(self, record: ImageRecord) -> ImageRecord:
        """Create the image, or point an existing name at the new target. The record's labels are set,
        and labels it does not name are kept (an operator's pin survives a re-pull)."""
        image = pb.Image(
            name=record.name,
            labels=dict(record.labels),
            target=descriptor_pb2.Descriptor(media_type=record.media_type, digest=record.digest, size=record.size),
        )
        try:
            resp = await self._ctx.unary(
                self._stub.Create, pb.CreateImageRequest(image=image), f"create image {record.name}"
            )
            return _record(resp.image)
        except ContainerdAlreadyExists:
            mask = field_mask_pb2.FieldMask(paths=["target", *(f"labels.{k}" for k in record.labels)])
            upd = await self._ctx.unary(
                self._stub.Update,
                pb.UpdateImageRequest(image=image, update_mask=mask),
                f"update image {record.name}",
            )
            return _record(upd.image)

    async def update_labels(self, name: str, labels: Mapping[str, str]) -> ImageRecord:
        """Set the given labels of an image, keeping the others; an empty value removes a label."""
        image = pb.Image(name=name, labels=dict(labels))
        mask = field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels])
        resp = await self._ctx.unary(
            self._stub.Update, pb.UpdateImageRequest(image=image, update_mask=mask), f"update image {name}"
        )
        return _record(resp.image)

    async def delete(self, name: str, sync: bool = False) -> None:
        await self._ctx.unary(self._stub.Delete, pb.DeleteImageRequest(name=name, sync=sync), f"delete image {name}")
