"""containerd's content store: info, read, resumable write, ingest status and abort."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from types import TracebackType

import grpc.aio
from google.protobuf import field_mask_pb2

from agent.containerd.connection import CallContext, translate
from agent.containerd.types import ContentInfo, IngestStatus
from agent.errors import (
    ContainerdConflict,
    ContainerdError,
    ContainerdNotFound,
    ContainerdUnavailable,
    DigestMismatch,
    IngestLocked,
)
from proto.containerd.api.services.content.v1 import content_pb2 as pb
from proto.containerd.api.services.content.v1.content_pb2_grpc import ContentStub


def _info(msg: pb.Info) -> ContentInfo:
    return ContentInfo(digest=msg.digest, size=msg.size, labels=dict(msg.labels))


class ContentStore:
    def __init__(self, stub: ContentStub, ctx: CallContext) -> None:
        self._stub = stub
        self._ctx = ctx

    async def info(self, digest: str) -> ContentInfo:
        resp = await self._ctx.unary(self._stub.Info, pb.InfoRequest(digest=digest), f"content {digest}")
        return _info(resp.info)

    async def exists(self, digest: str) -> ContentInfo | None:
        try:
            return await self.info(digest)
        except ContainerdNotFound:
            return None

    async def infos(self) -> list[ContentInfo]:
        """Every committed blob of the content store (sizes and labels; the cache measures with it)."""
        found: list[ContentInfo] = []
        async for resp in self._ctx.stream(self._stub.List, pb.ListContentRequest(), "list content"):
            found += [_info(info) for info in resp.info]
        return found

    async def update_labels(self, digest: str, labels: Mapping[str, str]) -> ContentInfo:
        """Set (not replace) the given labels; an empty value removes a label."""
        req = pb.UpdateRequest(
            info=pb.Info(digest=digest, labels=dict(labels)),
            update_mask=field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels]),
        )
        resp = await self._ctx.unary(self._stub.Update, req, f"update labels of {digest}")
        return _info(resp.info)

    async def delete(self, digest: str) -> None:
        await self._ctx.unary(self._stub.Delete, pb.DeleteContentRequest(digest=digest), f"delete {digest}")

    async def read(self, digest: str, offset: int = 0, size: int = 0) -> AsyncIterator[bytes]:
        req = pb.ReadContentRequest(digest=digest, offset=offset, size=size)
        async for resp in self._ctx.stream(self._stub.Read, req, f"read {digest}"):
            yield resp.data

    async def read_all(self, digest: str) -> bytes:
        return b"".join([chunk async for chunk in self.read(digest)])

    async def status(self, ref: str) -> IngestStatus | None:
        try:
            resp = await self._ctx.unary(self._stub.Status, pb.StatusRequest(ref=ref), f"ingest {ref}")
        except ContainerdNotFound:
            return None
        s = resp.status
        return IngestStatus(ref=s.ref, offset=s.offset, total=s.total, expected=s.expected)

    async def list_statuses(self, filters: list[str] | None = None) -> list[IngestStatus]:
        req = pb.ListStatusesRequest(filters=filters or [])
        resp = await self._ctx.unary(self._stub.ListStatuses, req, "list ingests")
        return [IngestStatus(s.ref, s.offset, s.total, s.expected) for s in resp.statuses]

    async def abort(self, ref: str) -> None:
        # A writer that just closed may still be finishing its files in the ingest dir, and the
        # removal then fails with "directory not empty" for a moment: retry a few times.
        for attempt in range(10):
            try:
                await self._ctx.unary(self._stub.Abort, pb.AbortRequest(ref=ref), f"abort ingest {ref}")
                return
            except ContainerdNotFound:
                return
            except ContainerdError as exc:
                if "not empty" not in exc.message or attempt == 9:
                    raise
                await asyncio.sleep(0.05)

    def writer(self, ref: str, total: int, expected: str) -> ContentWriter:
        return ContentWriter(self._stub, self._ctx, ref, total, expected)


class ContentWriter:
    """One ingest through Content.Write: STAT, WRITE..., COMMIT.

    Use as `async with store.writer(ref, total, digest) as w:`; `w.offset` says where a previous,
    interrupted ingest of the same ref stopped, so the caller resumes from there. Leaving the block
    without `commit()` keeps the partial data for a later resume (the lease bounds its life).
    containerd hashes what it receives and refuses a commit whose digest differs.
    """

    def __init__(self, stub: ContentStub, ctx: CallContext, ref: str, total: int, expected: str) -> None:
        self._stub = stub
        self._ctx = ctx
        self.ref = ref
        self.total = total
        self.expected = expected
        self.offset = 0
        self._call: grpc.aio.StreamStreamCall | None = None

    async def __aenter__(self) -> ContentWriter:
        """Open the ingest. IngestLocked when another writer holds the ref; the stream is closed then,
        so the caller may simply try again."""
        try:
            self._call = self._stub.Write(metadata=self._ctx.metadata)
            resp = await self._exchange(self._stat())
            self.offset = resp.offset
            if resp.total and resp.total != self.total:
                # A stale ingest for a different size: start over.
                await self.aclose()
                await ContentStore(self._stub, self._ctx).abort(self.ref)
                self._call = self._stub.Write(metadata=self._ctx.metadata)
                resp = await self._exchange(self._stat())
                self.offset = resp.offset
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._call is not None:
            call, self._call = self._call, None
            with contextlib.suppress(grpc.aio.AioRpcError):
                await call.done_writing()
            call.cancel()

    def _stat(self) -> pb.WriteContentRequest:
        # With total and expected, containerd refuses at once (AlreadyExists) content it already has.
        return pb.WriteContentRequest(action=pb.STAT, ref=self.ref, total=self.total, expected=self.expected)

    async def _exchange(self, req: pb.WriteContentRequest) -> pb.WriteContentResponse:
        assert self._call is not None, "writer used outside its context"
        try:
            await self._call.write(req)
            resp = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            err = translate(exc, f"write {self.ref}")
            if isinstance(err, ContainerdConflict) and "digest" in err.message:
                raise DigestMismatch(f"{self.expected}: {err.message}") from exc
            # containerd's content store: "ref <ref> locked for <duration> (since <time>): unavailable".
            if isinstance(err, ContainerdUnavailable) and " locked " in err.message:
                raise IngestLocked(err.message, err.grpc_code) from exc
            raise err from exc
        if resp is grpc.aio.EOF:
            raise ContainerdConflict(f"write {self.ref}: stream closed by containerd")
        return resp

    async def write(self, data: bytes) -> None:
        req = pb.WriteContentRequest(
            action=pb.WRITE,
            ref=self.ref,
            offset=self.offset,
            data=data,
            total=self.total,
            expected=self.expected,
        )
        resp = await self._exchange(req)
        self.offset = resp.offset

    async def commit(self, labels: Mapping[str, str] | None = None) -> None:
        req = pb.WriteContentRequest(
            action=pb.COMMIT,
            ref=self.ref,
            offset=self.offset,
            total=self.total,
            expected=self.expected,
            labels=dict(labels or {}),
        )
        resp = await self._exchange(req)
        if resp.digest and resp.digest != self.expected:
            raise DigestMismatch(f"committed {resp.digest}, expected {self.expected}")


def ingest_data_file(content_root: str | os.PathLike[str], ref: str) -> Path | None:
    """The file containerd's local content store appends an ingest's bytes to, or None.

    containerd's API reads committed blobs only; a blob still being pulled is read from here (the
    blob sharing serves it to peers while it downloads). The local store names each ingest's
    directory after the digest of the metadata store's key for it (`namespace/sequence/ref`), so the
    directory is found by the `ref` file it keeps beside `data`."""
    ingest = Path(content_root) / "ingest"
    try:
        entries = list(os.scandir(ingest))
    except OSError:
        return None
    for entry in entries:
        try:
            stored = (Path(entry.path) / "ref").read_text()
        except OSError:
            continue
        if stored == ref or stored.endswith("/" + ref):
            return Path(entry.path) / "data"
    return None


def blob_file(content_root: str | os.PathLike[str], digest: str) -> Path:
    """Where containerd's local content store keeps a committed blob (`blobs/<algorithm>/<hex>`):
    read directly, a blob streams to a peer several times faster than through the Read RPC."""
    algorithm, _, encoded = digest.partition(":")
    return Path(content_root) / "blobs" / algorithm / encoded
