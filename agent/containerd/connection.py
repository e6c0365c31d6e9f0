"""The gRPC channel to containerd, call metadata and error translation.

Every call carries `containerd-namespace`; a leased view also carries `containerd-lease`, so the
content and snapshots it creates stay protected from GC until the lease is deleted.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import grpc
import grpc.aio

from agent.errors import (
    ContainerdAlreadyExists,
    ContainerdConflict,
    ContainerdError,
    ContainerdNotFound,
    ContainerdUnavailable,
)
from core.errors import InvalidRequest

T = TypeVar("T")
Metadata = tuple[tuple[str, str], ...]

# 16 MiB matches containerd's own server limit; our Write chunks stay well below it.
_MAX_MESSAGE = 16 << 20


def open_channel(socket_path: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(
        f"unix://{socket_path}",
        options=[
            ("grpc.max_receive_message_length", _MAX_MESSAGE),
            ("grpc.max_send_message_length", _MAX_MESSAGE),
            # containerd's default authority check rejects the unix path as :authority
            ("grpc.default_authority", "localhost"),
        ],
    )


def translate(exc: grpc.aio.AioRpcError, what: str) -> ContainerdError:
    """Map a gRPC status to our error tree, keeping containerd's own message."""
    code = exc.code()
    message = f"{what}: {exc.details() or code.name}"
    name = code.name if code is not None else "UNKNOWN"
    if code == grpc.StatusCode.NOT_FOUND:
        return ContainerdNotFound(message, name)
    if code == grpc.StatusCode.ALREADY_EXISTS:
        return ContainerdAlreadyExists(message, name)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return ContainerdConflict(message, name)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return ContainerdUnavailable(message, name)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        err = ContainerdError(message, name)
        err.code = InvalidRequest.code
        err.http_status = InvalidRequest.http_status
        return err
    return ContainerdError(message, name)


class CallContext:
    """Metadata for one namespace and, optionally, one lease."""

    def __init__(self, namespace: str, lease: str | None = None) -> None:
        self.namespace = namespace
        self.lease = lease
        meta: list[tuple[str, str]] = [("containerd-namespace", namespace)]
        if lease:
            meta.append(("containerd-lease", lease))
        self.metadata: Metadata = tuple(meta)

    async def unary(self, method: Callable[..., Awaitable[T]], request: Any, what: str) -> T:
        try:
            return await method(request, metadata=self.metadata)
        except grpc.aio.AioRpcError as exc:
            raise translate(exc, what) from exc

    async def stream(self, method: Callable[..., Any], request: Any, what: str) -> AsyncIterator[Any]:
        try:
            async for item in method(request, metadata=self.metadata):
                yield item
        except grpc.aio.AioRpcError as exc:
            raise translate(exc, what) from exc

    @asynccontextmanager
    async def translated(self, what: str) -> AsyncIterator[None]:
        try:
            yield
        except grpc.aio.AioRpcError as exc:
            raise translate(exc, what) from exc
