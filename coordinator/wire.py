"""The agent <-> coordinator wire contract (proto/ferryman/v1/fleet.proto) as checked domain values.

Bodies are protobuf's canonical JSON (`json_format.Parse` rejects unknown fields and wrong types),
or protobuf's binary encoding when sent as `application/x-protobuf` (PROTOBUF): agents push their
telemetry that way, as its parse is compiled (upb) where the JSON one is Python, about 0.2 ms a push.
What protobuf accepts but makes no sense (NaN, negative rates, a clock far in the future) is
refused here, before anything is stored: one bad sample refuses the whole batch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

from coordinator.model import Capacity, ContainerUsage, Host
from core.errors import FerrymanError, InvalidRequest
from core.http.validate import PROTOBUF, check_message, parse_json
from core.security.pki import validate_name
from proto.ferryman.v1 import fleet_pb2

M = TypeVar("M", bound=Message)

MAX_BODY_BYTES = 8 << 20
MAX_DIGESTS = 20_000
"""Digests in one registration, announcement or holders request."""
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_PRESSURE_FIELDS = ("cpu_some", "memory_some", "memory_full", "io_some", "io_full")
_NONNEGATIVE = (
    "cpu_util",
    "load1",
    "load5",
    "load15",
    "disk_read_bps",
    "disk_write_bps",
    "net_rx_bps",
    "net_tx_bps",
)


def parse_message(raw: bytes, message: type[M], content_type: str = "application/json") -> M:
    """A protobuf message from canonical JSON bytes, or from binary protobuf when `content_type` is
    PROTOBUF; InvalidRequest with the parser's reason otherwise.

    The JSON goes through the API's one bounded parser (core.http.validate.parse_json: depth,
    duplicate keys) before protobuf sees it. The binary encoding has neither duplicate keys nor
    depth beyond the schema's; fields it does not know (a newer sender's) are dropped, as protobuf
    readers do. Either way every number of the result is bounded after.
    """
    name = message.DESCRIPTOR.name
    if content_type == PROTOBUF:
        return _parse_binary(raw, message)
    if not raw.strip():
        raise InvalidRequest(f"request body must be a {name} JSON object")
    try:
        document = parse_json(raw)
    except InvalidRequest as exc:
        raise InvalidRequest(f"invalid {name}: {exc.message}") from exc
    if not isinstance(document, dict):
        raise InvalidRequest(f"invalid {name}: expected a JSON object")
    out = message()
    try:
        json_format.ParseDict(document, out, ignore_unknown_fields=False)
    except json_format.ParseError as exc:
        raise InvalidRequest(f"invalid {name}: {exc}") from exc
    check_message(out, name)
    return out


def _parse_binary(raw: bytes, message: type[M]) -> M:
    name = message.DESCRIPTOR.name
    out = message()
    try:
        out.ParseFromString(raw)
    except DecodeError as exc:
        raise InvalidRequest(f"invalid {name}: not a binary {name}: {exc}") from exc
    out.DiscardUnknownFields()
    check_message(out, name)
    return out


def to_json(message: Message, *, defaults: bool = False) -> dict[str, Any]:
    """`defaults`: print fields at their default value too ("complete": false), for readers of the JSON."""
    result: dict[str, Any] = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=defaults
    )
    return result


def capacity_from(msg: fleet_pb2.Capacity) -> Capacity:
    return Capacity(msg.cpu_millis, msg.memory_bytes, msg.disk_bytes)


def capacity_to(capacity: Capacity) -> fleet_pb2.Capacity:
    return fleet_pb2.Capacity(
        cpu_millis=capacity.cpu_millis, memory_bytes=capacity.memory_bytes, disk_bytes=capacity.disk_bytes
    )


def _finite(value: float, where: str, *, nonnegative: bool = True) -> float:
    if not math.isfinite(value):
        raise InvalidRequest(f"{where}: must be a finite number, got {value}")
    if nonnegative and value < 0:
        raise InvalidRequest(f"{where}: must not be negative, got {value}")
    return value


def registration_to_host(reg: fleet_pb2.Registration, now: float) -> Host:
    try:
        validate_name(reg.host)
    except FerrymanError as exc:
        raise InvalidRequest(f"Registration.host: {exc.message}") from exc
    if reg.api_url:
        parts = urlsplit(reg.api_url)
        if parts.scheme != "https" or not parts.hostname:
            raise InvalidRequest(f"Registration.api_url {reg.api_url!r}: expected https://host:port")
    if reg.capacity.cpu_millis == 0 or reg.capacity.memory_bytes == 0:
        raise InvalidRequest("Registration.capacity: cpu_millis and memory_bytes must be greater than 0")
    _finite(reg.telemetry_period_s, "Registration.telemetry_period_s")
    return Host(
        name=reg.host,
        capacity=capacity_from(reg.capacity),
        peer_address=reg.peer_address,
        api_url=reg.api_url.rstrip("/"),
        labels=dict(reg.labels),
        agent_version=reg.agent_version,
        layer_digests=tuple(dict.fromkeys(check_digests(reg.layer_digests, "Registration.layer_digests"))),
        blob_address=check_address(reg.blob_address, "Registration.blob_address"),
        criu_features=dict(reg.criu_features),
        telemetry_period=reg.telemetry_period_s,
        registered_at=now,
        last_heartbeat=now,
    )


@dataclass(frozen=True)
class CheckedBatch:
    host: str
    samples: list[tuple[float, dict[str, Any]]]
    """(ts, sample JSON), sorted by ts."""
    dropped: int
    used: Capacity
    containers: tuple[ContainerUsage, ...]
    pressure: dict[str, float]


def check_batch(batch: fleet_pb2.TelemetryBatch, now: float, *, max_future_skew: float, max_batch: int) -> CheckedBatch:
    if not batch.host:
        raise InvalidRequest("TelemetryBatch.host: must not be empty")
    if len(batch.samples) > max_batch:
        raise InvalidRequest(f"TelemetryBatch.samples: at most {max_batch} samples per push, got {len(batch.samples)}")
    checked: list[tuple[float, dict[str, Any]]] = []
    for i, sample in enumerate(batch.samples):
        where = f"TelemetryBatch.samples[{i}]"
        _check_sample(sample, where, now, max_future_skew)
        checked.append((sample.ts, to_json(sample)))
    checked.sort(key=lambda item: item[0])
    if not batch.samples:
        return CheckedBatch(batch.host, [], batch.dropped, Capacity(), (), {})
    newest = max(batch.samples, key=lambda s: s.ts)
    containers = tuple(
        ContainerUsage(
            id=c.id,
            image=c.image,
            memory_bytes=c.memory_bytes,
            cpu_millis=c.cpu_millis,
            labels=dict(c.labels),
            packets_in_per_s=c.packets_in_per_s if c.HasField("packets_in_per_s") else None,
        )
        for c in newest.containers
    )
    used = Capacity(
        cpu_millis=int(sum(c.cpu_millis for c in containers)),
        memory_bytes=sum(c.memory_bytes for c in containers),
    )
    pressure = {name: getattr(newest.pressure, name) for name in _PRESSURE_FIELDS if newest.pressure.HasField(name)}
    return CheckedBatch(batch.host, checked, batch.dropped, used, containers, pressure)


def _check_ts(ts: float, where: str, now: float, max_future_skew: float) -> None:
    """A unix time in seconds, finite, positive and not further ahead of ours than the allowed skew."""
    _finite(ts, where)
    if ts <= 0:
        raise InvalidRequest(f"{where}: must be a unix time in seconds, got {ts}")
    if ts > now + max_future_skew:
        raise InvalidRequest(f"{where}: {ts:.3f} is {ts - now:.1f} s in the future (max skew {max_future_skew} s)")


def _check_sample(sample: fleet_pb2.TelemetrySample, where: str, now: float, max_future_skew: float) -> None:
    _check_ts(sample.ts, f"{where}.ts", now, max_future_skew)
    for name in _NONNEGATIVE:
        if sample.HasField(name):
            _finite(getattr(sample, name), f"{where}.{name}")
    if sample.HasField("cpu_util") and sample.cpu_util > 1.0:
        raise InvalidRequest(f"{where}.cpu_util: must be within 0..1, got {sample.cpu_util}")
    for name in _PRESSURE_FIELDS:
        if sample.pressure.HasField(name):
            value = _finite(getattr(sample.pressure, name), f"{where}.pressure.{name}")
            if value > 100.0:
                raise InvalidRequest(f"{where}.pressure.{name}: a percentage, got {value}")
    if (
        sample.HasField("memory_total_bytes")
        and sample.HasField("memory_available_bytes")
        and sample.memory_available_bytes > sample.memory_total_bytes
    ):
        raise InvalidRequest(f"{where}.memory_available_bytes: larger than memory_total_bytes")
    for j, container in enumerate(sample.containers):
        if not container.id:
            raise InvalidRequest(f"{where}.containers[{j}].id: must not be empty")
        _finite(container.cpu_millis, f"{where}.containers[{j}].cpu_millis")
        if container.HasField("packets_in_per_s"):
            _finite(container.packets_in_per_s, f"{where}.containers[{j}].packets_in_per_s")
    for j, event in enumerate(sample.events):
        _check_ts(event.ts, f"{where}.events[{j}].ts", now, max_future_skew)
        _finite(event.deadline, f"{where}.events[{j}].deadline")  # unix seconds, 0 = none stated
    for name in ("registry_bytes_per_second", "peer_bytes_per_second", "apply_seconds_per_byte"):
        _finite(getattr(sample.layer_costs, name), f"{where}.layer_costs.{name}")


def check_digests(digests: Sequence[str], where: str) -> Sequence[str]:
    """sha256 digests only (the one algorithm containerd and our registries use), at most MAX_DIGESTS."""
    if len(digests) > MAX_DIGESTS:
        raise InvalidRequest(f"{where}: {len(digests)} digests, at most {MAX_DIGESTS} allowed")
    for digest in digests:
        if not _DIGEST_RE.fullmatch(digest):
            raise InvalidRequest(f"{where}: not a sha256 digest: {digest[:80]!r}")
    return digests


def check_address(address: str, where: str) -> str:
    """host:port (a name, an IPv4 address or a bracketed IPv6 one), or empty."""
    if not address:
        return ""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidRequest(f"{where} {address[:80]!r}: expected host:port")
    return address
