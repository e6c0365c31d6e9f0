"""Pushing samples to the coordinator over mutual TLS, buffering them while it is away.

Every sample goes into a bounded buffer first (oldest dropped beyond `buffer_max_samples` or
`buffer_max_age`, and counted); each flush registers if needed, then sends the buffer oldest first in
batches of `batch_max`, removing what the coordinator acknowledged. A failed request leaves the buffer
as it was, so a coordinator restart costs nothing but the samples that aged out meanwhile.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from google.protobuf import json_format
from google.protobuf.message import Message

from agent.config import CoordinatorConfig, TelemetryConfig
from agent.metrics import AgentMetrics
from core.http.validate import PROTOBUF
from core.replicas import LEADER_HEADER, Replicas, not_leader, spread
from proto.ferryman.v1 import fleet_pb2 as pb

REGISTRATION_REFRESH = 60.0
"""Seconds between registrations: the layers a host holds change as it pulls (placement counts them)."""

log = logging.getLogger(__name__)

RegistrationSource = Callable[[], Awaitable[pb.Registration]]


class PushFailed(Exception):
    """One request to the coordinator did not succeed (the reason is the message; `status` is the
    HTTP status of a replica's answer, None when there was none)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


BINARY_RETRY = 600.0
"""Seconds a pusher sends JSON after a coordinator refused a binary push, before it tries again."""


def to_json(message: Message) -> dict[str, Any]:
    # Field names as in the .proto: what an operator greps for in a capture.
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


class CoordinatorLink:
    """POSTs to the coordinator's replicas, following the leader (the rules: core/replicas.py).

    A follower that serves a request but names the leader (LEADER_HEADER) sends the next ones there.
    Followers serve an agent's registration and telemetry without naming the leader: `spread_by`
    (the host name) picks the replica an agent starts at, so the fleet's pushes spread.

    A replica that cannot be connected to is skipped for the next one at once (nothing was sent); one
    that fails otherwise (a timeout, a reset) fails the request, and the next request starts at the
    next replica: a request that may have reached a replica is not sent twice."""

    def __init__(self, coordinator: CoordinatorConfig, spread_by: str = "") -> None:
        urls = coordinator.endpoints
        self._replicas = Replicas(urls, spread(spread_by, len(urls)) if spread_by else 0)
        self._server_name = coordinator.server_name

    @property
    def url(self) -> str:
        """The replica in use."""
        return self._replicas.current

    def _server_hostname(self, url: str) -> str:
        return self._server_name or urlsplit(url).hostname or ""

    async def post(self, session: aiohttp.ClientSession, path: str, message: Message, *, binary: bool = False) -> str:
        """POST `message` as JSON, or in protobuf's binary encoding (`binary`: the telemetry pushes,
        which the coordinator parses for a fraction of the JSON's cost); the body of a 200, else
        PushFailed (with the last replica's answer)."""
        failure = PushFailed(f"POST {path}: no coordinator replica answered")
        unreachable = 0
        body = message.SerializeToString() if binary else json.dumps(to_json(message)).encode()
        headers = {"Content-Type": PROTOBUF if binary else "application/json"}
        for _ in range(self._replicas.budget()):
            url = self._replicas.current
            try:
                async with session.post(
                    url + path, data=body, headers=headers, server_hostname=self._server_hostname(url)
                ) as resp:
                    text = await resp.text()
                    hint = resp.headers.get(LEADER_HEADER, "")
            except aiohttp.ClientConnectorError as exc:
                failure = PushFailed(f"POST {url}{path}: {type(exc).__name__}: {exc}")
                self._replicas.unreachable()
                unreachable += 1
                if unreachable >= len(self._replicas.urls):
                    raise failure from exc
                continue
            except (aiohttp.ClientError, TimeoutError, OSError, UnicodeDecodeError) as exc:
                self._replicas.unreachable()
                raise PushFailed(f"POST {url}{path}: {type(exc).__name__}: {exc}") from exc
            if resp.status == 200:
                if hint and hint.rstrip("/") != url:  # a follower served it: the next ones go to the leader
                    self._replicas.redirected(hint)
                return text
            failure = PushFailed(f"POST {url}{path}: HTTP {resp.status}: {text[:200]}", resp.status)
            leader = not_leader(text) if resp.status == 503 else None
            if leader is None:
                raise failure
            moved = self._replicas.redirected(leader)
            log.info("coordinator replica does not lead; following", extra={"replica": url, "next": moved})
        raise failure


class TelemetryPusher:
    def __init__(
        self,
        host: str,
        coordinator: CoordinatorConfig,
        telemetry: TelemetryConfig,
        ssl_context: ssl.SSLContext,
        registration: RegistrationSource,
        metrics: AgentMetrics | None = None,
    ) -> None:
        self.host = host
        self._link = CoordinatorLink(coordinator, spread_by=host)
        self._timeout = aiohttp.ClientTimeout(total=coordinator.request_timeout)
        self._config = telemetry
        self._ssl = ssl_context
        self._registration = registration
        self._metrics = metrics
        self._buffer: collections.deque[pb.TelemetrySample] = collections.deque()
        self.dropped = 0
        """Samples lost to the buffer bounds since the last accepted push."""
        self.registered = False
        self._registered_at = 0.0
        self._reachable = True  # to log only the transitions; the metric follows every flush
        self._wake = asyncio.Event()
        self._json_until = 0.0  # pushes go as JSON until then (a coordinator that refused binary)
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None

    # ---- buffer

    def offer(self, sample: pb.TelemetrySample) -> None:
        """Queue a sample and wake the sender."""
        self._buffer.append(sample)
        self._trim(time.time())
        self._wake.set()

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def _trim(self, now: float) -> None:
        lost = 0
        while len(self._buffer) > self._config.buffer_max_samples:
            self._buffer.popleft()
            lost += 1
        oldest_kept = now - self._config.buffer_max_age
        while self._buffer and self._buffer[0].ts < oldest_kept:
            self._buffer.popleft()
            lost += 1
        if lost:
            self.dropped += lost
            if self._metrics is not None:
                self._metrics.telemetry_dropped.inc(lost)
        if self._metrics is not None:
            self._metrics.telemetry_buffered.set(len(self._buffer))

    # ---- sending

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self._ssl, limit=1), timeout=self._timeout
        )
        self._task = asyncio.create_task(self._run(), name="telemetry-push")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.flush()

    async def flush(self) -> bool:
        """Register if needed, then send the whole buffer; False (buffer kept) if the coordinator failed."""
        try:
            if self.registered and time.monotonic() - self._registered_at > REGISTRATION_REFRESH:
                self.registered = False
            if not self.registered:
                await self._register()
            # Bounded: every round removes at least one sample or ends the flush.
            for _ in range(len(self._buffer) + 1):
                self._trim(time.time())
                if not self._buffer:
                    break
                if not await self._push_batch():
                    break
        except PushFailed as exc:
            if self._reachable:
                log.warning("coordinator unreachable; buffering telemetry", extra={"error": str(exc)})
            self._set_reachable(False)
            self._count("failed")
            return False
        if not self._reachable:
            log.info("coordinator reachable again", extra={"dropped": self.dropped})
        self._set_reachable(True)
        return True

    def _set_reachable(self, reachable: bool) -> None:
        self._reachable = reachable
        if self._metrics is not None:
            self._metrics.telemetry_coordinator_up.labels(coordinator=self._link.url).set(int(reachable))

    async def _register(self) -> None:
        registration = await self._registration()
        await self._post("/v1/register", registration)
        self.registered = True
        self._registered_at = time.monotonic()
        log.info("registered with the coordinator", extra={"coordinator": self._link.url})

    async def _push_batch(self) -> bool:
        """Send the oldest batch; True when it left the buffer."""
        batch = [self._buffer[i] for i in range(min(self._config.batch_max, len(self._buffer)))]
        message = pb.TelemetryBatch(host=self.host, samples=batch, dropped=self.dropped)
        body = await self._post_telemetry(message)
        ack = pb.TelemetryAck()
        try:
            json_format.Parse(body, ack, ignore_unknown_fields=True)
        except json_format.ParseError as exc:
            raise PushFailed(f"coordinator answered a push with an unreadable ack: {exc}") from exc
        if ack.accepted or not ack.reregister:
            self.dropped = 0  # the coordinator has been told (a host it did not know was told nothing)
        # What it did not accept without asking for a registration it refused for good (too old, a
        # duplicate): resending would not change its mind.
        done = min(ack.accepted, len(batch)) if ack.reregister else len(batch)
        for _ in range(done):
            self._buffer.popleft()
        self._count("ok")
        if self._metrics is not None:
            self._metrics.telemetry_buffered.set(len(self._buffer))
        if ack.reregister:
            log.info("coordinator asked this host to register again")
            self.registered = False
            await self._register()
        return done > 0 or ack.reregister

    async def _post_telemetry(self, message: pb.TelemetryBatch) -> str:
        """POST a batch in protobuf's binary encoding, or as JSON to a coordinator that refuses it.

        A coordinator from before binary pushes answers 400 to one (its JSON parser fails), e.g.
        after a rollback of the coordinator alone: its hosts must not look silent then. Such a
        refusal sends the same batch again as JSON, and JSON it stays for BINARY_RETRY seconds."""
        now = time.monotonic()
        if now < self._json_until:
            return await self._post("/v1/telemetry", message)
        try:
            return await self._post("/v1/telemetry", message, binary=True)
        except PushFailed as exc:
            if exc.status not in (400, 415):
                raise
            body = await self._post("/v1/telemetry", message)
        # JSON was taken where binary was not: an older coordinator, not a bad batch.
        self._json_until = now + BINARY_RETRY
        log.warning(
            "coordinator refuses binary telemetry; pushing JSON",
            extra={"coordinator": self._link.url, "retry_binary_in_s": BINARY_RETRY},
        )
        return body

    async def _post(self, path: str, message: Message, *, binary: bool = False) -> str:
        """POST a message; the response body, or PushFailed for anything but 200."""
        if self._session is None:
            raise PushFailed("the pusher is not started")
        return await self._link.post(self._session, path, message, binary=binary)

    def _count(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.telemetry_pushes.labels(result=result).inc()
