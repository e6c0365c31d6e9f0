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
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

from agent.config import CoordinatorConfig, TelemetryConfig
from agent.metrics import AgentMetrics
from core.http.validate import PROTOBUF
from core.replicas import LEADER_HEADER, Replicas, not_leader, push_elsewhere, spread
from proto.ferryman.v1 import fleet_pb2 as pb

REGISTRATION_REFRESH = 60.0
"""Seconds between registrations: the layers a host holds change as it pulls (placement counts them)."""

log = logging.getLogger(__name__)

RegistrationSource = Callable[[], Awaitable[pb.Registration]]


class PushFailed(Exception):
    """One request to the coordinator did not succeed (the reason is the message; `status` is the
    HTTP status of a replica's answer, None when there was none; `retry_after` the seconds its
    Retry-After asked for, None without one)."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


def retry_delay(retry_after: float) -> float:
    """How long to wait after an answer with `Retry-After: retry_after`: that long at least, plus up
    to as much again at random, so a fleet refused at once (thousands of agents starting together)
    comes back spread out."""
    return retry_after * random.uniform(1.0, 2.0)


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds (its HTTP-date form is not used by the coordinator)."""
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


BINARY_RETRY = 600.0
"""Seconds a pusher sends JSON after a coordinator refused a binary push, before it tries again."""
STREAM_PATH = "/v1/telemetry/stream"
STREAM_RETRY = 600.0
"""Seconds a pusher POSTs after a coordinator answered that it has no telemetry stream (404, 405:
one from before it), before it asks again."""


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

    def server_hostname(self, url: str) -> str:
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
                    url + path, data=body, headers=headers, server_hostname=self.server_hostname(url)
                ) as resp:
                    text = await resp.text()
                    hint = resp.headers.get(LEADER_HEADER, "")
                    retry_after = _retry_after(resp.headers.get("Retry-After"))
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
            failure = PushFailed(f"POST {url}{path}: HTTP {resp.status}: {text[:200]}", resp.status, retry_after)
            if resp.status == 503 and push_elsewhere(text):  # the leader leaves telemetry to the others
                moved = self._replicas.unreachable()
                log.info("coordinator leader leaves telemetry to others; moving", extra={"replica": url, "next": moved})
                continue
            leader = not_leader(text) if resp.status == 503 else None
            if leader is None:
                raise failure
            moved = self._replicas.redirected(leader)
            log.info("coordinator replica does not lead; following", extra={"replica": url, "next": moved})
        raise failure


class StreamUnavailable(Exception):
    """The replica did not take a telemetry session, or the session ended; nothing was acknowledged,
    so the batch goes by POST instead. `offered` is False when the replica has no stream at all."""

    def __init__(self, message: str, *, offered: bool = True) -> None:
        super().__init__(message)
        self.offered = offered


class TelemetryStream:
    """The telemetry session with one replica (`GET /v1/telemetry/stream`, a WebSocket over the same
    mTLS connection as the POSTs): one binary TelemetryBatch a message, answered in order by a
    binary TelemetryAck or a text error (docs/coordinator.md). It spares the coordinator an HTTP
    request a push, most of a push's cost there."""

    def __init__(self, url: str, ws: aiohttp.ClientWebSocketResponse, answer_within: float) -> None:
        self.url = url
        self._ws = ws
        self._answer_within = answer_within

    @classmethod
    async def open(
        cls, session: aiohttp.ClientSession, url: str, server_hostname: str, answer_within: float
    ) -> TelemetryStream:
        try:
            ws = await session.ws_connect(
                url + STREAM_PATH,
                server_hostname=server_hostname,
                autoping=True,
                compress=0,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=answer_within),
            )
        except aiohttp.WSServerHandshakeError as exc:
            offered = exc.status not in (404, 405)
            raise StreamUnavailable(f"GET {url}{STREAM_PATH}: HTTP {exc.status}", offered=offered) from exc
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise StreamUnavailable(f"GET {url}{STREAM_PATH}: {type(exc).__name__}: {exc}") from exc
        return cls(url, ws, answer_within)

    async def push(self, batch: pb.TelemetryBatch) -> pb.TelemetryAck:
        """The coordinator's ack; PushFailed when it refused the batch or did not answer in time
        (it may have stored it: the batch stays buffered and is sent again, and the coordinator
        takes no sample twice), StreamUnavailable when the session had ended before an answer."""
        try:
            await self._ws.send_bytes(batch.SerializeToString())
            msg = await self._ws.receive(timeout=self._answer_within)
        except TimeoutError as exc:
            await self.close()
            raise PushFailed(f"{self.url}{STREAM_PATH}: no answer within {self._answer_within} s") from exc
        except (aiohttp.ClientError, OSError) as exc:
            await self.close()
            raise StreamUnavailable(f"{self.url}{STREAM_PATH}: {type(exc).__name__}: {exc}") from exc
        if msg.type is aiohttp.WSMsgType.BINARY:
            ack = pb.TelemetryAck()
            try:
                ack.ParseFromString(msg.data)
            except DecodeError as exc:
                await self.close()
                raise PushFailed(f"coordinator answered a push with an unreadable ack: {exc}") from exc
            return ack
        if msg.type is aiohttp.WSMsgType.TEXT:  # the push was refused; the session goes on
            raise PushFailed(f"{self.url}{STREAM_PATH}: {msg.data[:200]}", 400)
        await self.close()  # closed (a replica stopping, the heartbeat), or an error
        raise StreamUnavailable(f"{self.url}{STREAM_PATH}: the session ended ({msg.type.name})")

    async def close(self) -> None:
        await self._ws.close()


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
        self._retry_at = 0.0
        """No request to the coordinator before this (monotonic): it answered busy, with Retry-After."""
        self._json_until = 0.0  # pushes go as JSON until then (a coordinator that refused binary)
        self._post_until = 0.0  # pushes go by POST until then (a coordinator without the stream)
        self._stream: TelemetryStream | None = None
        self._flushing = asyncio.Lock()
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
        # Two connections: the telemetry session holds one, registrations take the other.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self._ssl, limit=2), timeout=self._timeout
        )
        self._task = asyncio.create_task(self._run(), name="telemetry-push")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._end_stream()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(max(0.0, self._retry_at - time.monotonic()))
            self._wake.clear()
            if not await self.flush() and self._retry_at > time.monotonic():
                self._wake.set()  # again when the coordinator said, not at the next sample

    async def flush(self) -> bool:
        """Register if needed, then send the whole buffer; False (buffer kept) if the coordinator failed.
        One flush at a time: the telemetry session carries one push and its answer at a time."""
        async with self._flushing:
            return await self._flush()

    async def _flush(self) -> bool:
        if time.monotonic() < self._retry_at:
            return False  # the coordinator asked for a pause (Retry-After): the buffer waits
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
            if exc.retry_after is not None:
                delay = retry_delay(exc.retry_after)
                self._retry_at = time.monotonic() + delay
                log.info(
                    "coordinator busy; trying again later", extra={"error": str(exc), "retry_in_s": round(delay, 1)}
                )
                self._count("deferred")
                return False
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
        ack = await self._send_telemetry(message)
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

    @property
    def coordinator(self) -> str:
        """The coordinator replica the pushes go to now."""
        return self._link.url

    @property
    def streaming(self) -> bool:
        """Whether pushes go over a telemetry session now."""
        return self._stream is not None

    async def _send_telemetry(self, message: pb.TelemetryBatch) -> pb.TelemetryAck:
        """Over the replica's telemetry session when it offers one, else by POST.

        A replica without the stream (404: a coordinator from before it) is asked again after
        STREAM_RETRY; a session that cannot be opened or has ended sends the batch by POST, which
        follows the replicas as before, and the next push opens a session where that one went."""
        if time.monotonic() >= self._post_until:
            try:
                return await self._stream_push(message)
            except StreamUnavailable as exc:
                if not exc.offered:
                    self._post_until = time.monotonic() + STREAM_RETRY
                    log.info(
                        "coordinator offers no telemetry stream; pushing by POST",
                        extra={"coordinator": self._link.url, "retry_stream_in_s": STREAM_RETRY},
                    )
                else:
                    log.info("telemetry stream unavailable; pushing by POST", extra={"error": str(exc)})
        body = await self._post_telemetry(message)
        ack = pb.TelemetryAck()
        try:
            json_format.Parse(body, ack, ignore_unknown_fields=True)
        except json_format.ParseError as exc:
            raise PushFailed(f"coordinator answered a push with an unreadable ack: {exc}") from exc
        return ack

    async def _stream_push(self, message: pb.TelemetryBatch) -> pb.TelemetryAck:
        if self._session is None:
            raise PushFailed("the pusher is not started")
        url = self._link.url
        if self._stream is not None and self._stream.url != url:  # the pushes moved to another replica
            await self._end_stream()
        if self._stream is None:
            self._stream = await TelemetryStream.open(
                self._session, url, self._link.server_hostname(url), self._timeout.total or 10.0
            )
        try:
            return await self._stream.push(message)
        except (StreamUnavailable, PushFailed) as exc:
            if not isinstance(exc, PushFailed) or exc.status is None:
                await self._end_stream()
            raise

    async def _end_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.close()

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
