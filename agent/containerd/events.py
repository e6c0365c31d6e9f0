"""containerd's event stream."""

from __future__ import annotations

from collections.abc import AsyncIterator

from agent.containerd.connection import CallContext
from agent.containerd.types import Event
from proto.containerd.api.services.events.v1 import events_pb2 as pb
from proto.containerd.api.services.events.v1.events_pb2_grpc import EventsStub


class EventStream:
    def __init__(self, stub: EventsStub, ctx: CallContext) -> None:
        self._stub = stub
        self._ctx = ctx

    async def subscribe(self, filters: list[str] | None = None) -> AsyncIterator[Event]:
        """Events as they happen, e.g. filters=['topic~="/tasks/"'] (containerd filter syntax)."""
        req = pb.SubscribeRequest(filters=filters or [])
        async for env in self._ctx.stream(self._stub.Subscribe, req, "subscribe to events"):
            yield Event(namespace=env.namespace, topic=env.topic, type_url=env.event.type_url, payload=env.event.value)
