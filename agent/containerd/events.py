"""containerd's event stream."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncGenerator, AsyncIterator

from agent.containerd.connection import CallContext
from agent.containerd.types import Event, TaskExit, TaskStart
from proto.containerd.api.events import task_pb2
from proto.containerd.api.services.events.v1 import events_pb2 as pb
from proto.containerd.api.services.events.v1.events_pb2_grpc import EventsStub

TASK_EXIT_TOPIC = "/tasks/exit"
TASK_START_TOPIC = "/tasks/start"


class EventStream:
    def __init__(self, stub: EventsStub, ctx: CallContext) -> None:
        self._stub = stub
        self._ctx = ctx

    async def subscribe(self, filters: list[str] | None = None) -> AsyncIterator[Event]:
        """Events as they happen, e.g. filters=['topic~="/tasks/"'] (containerd filter syntax)."""
        req = pb.SubscribeRequest(filters=filters or [])
        async for env in self._ctx.stream(self._stub.Subscribe, req, "subscribe to events"):
            yield Event(namespace=env.namespace, topic=env.topic, type_url=env.event.type_url, payload=env.event.value)

    async def task_exits(self) -> AsyncGenerator[TaskExit, None]:
        """Exits of containers' main processes in this namespace (not of processes exec'd into them).
        Ends with ContainerdUnavailable when containerd goes away; events missed until a new
        subscription are lost, so a subscriber re-reads the tasks after subscribing again."""
        wanted = f'topic=="{TASK_EXIT_TOPIC}",namespace=="{self._ctx.namespace}"'
        async for event in self.subscribe([wanted]):
            msg = task_pb2.TaskExit.FromString(event.payload)
            if msg.id and msg.id != msg.container_id:
                continue  # an exec'd process
            exited = msg.exited_at.ToDatetime(tzinfo=dt.UTC) if msg.HasField("exited_at") else None
            yield TaskExit(container_id=msg.container_id, exit_status=msg.exit_status, exited_at=exited)

    async def task_lifecycle(self) -> AsyncGenerator[TaskStart | TaskExit, None]:
        """Starts and exits of containers' main processes in this namespace, in order; like
        `task_exits`, events missed between subscriptions are lost."""
        wanted = [
            f'topic=="{topic}",namespace=="{self._ctx.namespace}"' for topic in (TASK_START_TOPIC, TASK_EXIT_TOPIC)
        ]
        async for event in self.subscribe(wanted):
            if event.topic == TASK_START_TOPIC:
                start = task_pb2.TaskStart.FromString(event.payload)
                yield TaskStart(container_id=start.container_id, pid=start.pid)
                continue
            msg = task_pb2.TaskExit.FromString(event.payload)
            if msg.id and msg.id != msg.container_id:
                continue  # an exec'd process (a health check's among them)
            exited = msg.exited_at.ToDatetime(tzinfo=dt.UTC) if msg.HasField("exited_at") else None
            yield TaskExit(container_id=msg.container_id, exit_status=msg.exit_status, exited_at=exited)
