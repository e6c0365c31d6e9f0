"""Request validation for the agent's and the coordinator's JSON APIs.

Every rejection is an InvalidRequest naming the offending field by its path (`body.limits.memory`),
which the error middleware turns into a 400 with the JSON error shape.

Bodies are bounded before they are parsed: at most `MAX_BODY_BYTES` (413 beyond) and at most
`MAX_JSON_DEPTH` levels of nesting. `json.loads` recurses once per level and raises RecursionError
(a 500) near 1000 levels, and what parses still has to be walked by protobuf and by our own code;
no request of ours nests deeper than a handful of levels.

Numbers are finite: JSON has no NaN or Infinity, but Python's json module accepts both literals and
turns 1e999 into inf; protobuf's JSON accepts "NaN" and "Infinity" for doubles. A NaN compares
false with everything, so it slips past every range check after it (a reservation expiring at NaN
never expires): refused at parsing and again for every parsed protobuf double.

Integers that reach SQLite or a protobuf int64 are bounded by `INT64_MAX` (SQLite raises
OverflowError at 2**63), and by the tighter, domain limits each field has (`CAPACITY_MAX`).
"""

from __future__ import annotations

import enum
import functools
import json
import math
import re
from collections.abc import Mapping
from typing import Any

from aiohttp import web
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from core.errors import InvalidRequest

MAX_BODY_BYTES = 1 << 20
"""Bytes of a JSON request body; the largest real one (a container spec) is a few KiB."""
MAX_JSON_DEPTH = 32
"""Nesting levels of a JSON body; ours go 4 deep (telemetry: batch, sample, container, labels)."""
INT64_MAX = (1 << 63) - 1
"""The largest integer SQLite and a protobuf int64 hold."""
CAPACITY_MAX: Mapping[str, int] = {
    # Far beyond any one host, yet 8192 of them still sum below 2**63 (SQLite SUM overflows there).
    "cpu_millis": 10_000_000,  # 10,000 cores
    "memory_bytes": 1 << 50,  # 1 PiB
    "disk_bytes": 1 << 50,
}
"""The largest amount of each resource a host, a reservation or a container may name."""


class RequestTooLarge(InvalidRequest):
    code = "request_too_large"
    http_status = 413


async def read_object(request: web.Request, *, max_bytes: int = MAX_BODY_BYTES) -> dict[str, Any]:
    """The request body as a JSON object, or InvalidRequest."""
    body = parse_json(await read_body(request, max_bytes=max_bytes))
    if not isinstance(body, dict):
        raise InvalidRequest(f"request body must be a JSON object, got {json_type(body)}")
    return body


async def read_body(request: web.Request, *, max_bytes: int = MAX_BODY_BYTES) -> bytes:
    """The raw body, refused (413) past `max_bytes` whether the client declared its length or not."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise RequestTooLarge(f"request body larger than {max_bytes} bytes")
    # aiohttp's own limit (client_max_size) stops an undeclared (chunked) body while it is read.
    raw = await request.read()
    if len(raw) > max_bytes:
        raise RequestTooLarge(f"request body larger than {max_bytes} bytes")
    return raw


def parse_json(raw: bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """A JSON document from request bytes, or InvalidRequest: empty, not UTF-8, too deep, invalid,
    or with duplicate keys (two parsers could disagree on which one wins)."""
    if not raw.strip():
        raise InvalidRequest("request body must be a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON (not UTF-8): {exc}") from exc
    if json_too_deep(text, max_depth):
        raise InvalidRequest(f"request body is not valid JSON or nests deeper than {max_depth} levels")
    try:
        document = json.loads(
            text, object_pairs_hook=_unique_keys, parse_constant=_no_constant, parse_float=_finite_float
        )
    except RecursionError:  # unreachable after json_too_deep; kept so a miss is a 400, never a 500
        raise InvalidRequest(f"request body nests deeper than {max_depth} levels") from None
    except ValueError as exc:  # JSONDecodeError, and ints past Python's 4300-digit limit
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from exc
    if _SURROGATE_ESCAPE.search(text):  # rare: only then walk the document
        _check_strings(document)
    return document


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _check_strings(document: Any) -> None:
    """Refuse a string holding an unpaired UTF-16 surrogate (`"\\ud800"`).

    JSON lets one through as an escape, json.loads makes a str of it, and that str cannot be
    encoded as UTF-8: the first file, database or protobuf it reaches raised (a 500, found by the
    fuzz suite). Paired surrogates (`"\\ud83d\\ude00"`) are decoded into one code point and pass.
    """
    stack = [document]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRequest("request body: a string holds an unpaired UTF-16 surrogate") from None


def _no_constant(name: str) -> Any:
    raise InvalidRequest(f"request body: {name} is not a JSON number (numbers must be finite)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses to inf
        raise InvalidRequest(f"request body: {text[:40]} is out of range (numbers must be finite)")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise InvalidRequest(f"request body: duplicate key {key[:80]!r}")
            seen.add(key)
    return out


_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def json_too_deep(text: str, max_depth: int) -> bool:
    """Whether JSON `text` nests deeper than `max_depth`, decided before parsing it.

    Strings go first (their brackets are text) and everything but brackets next, both in C-speed
    regex passes; the Python loop then sees brackets only and stops at the first level too deep.
    Measured on a 7.6 MB telemetry body: about as long as json.loads itself. An unterminated string
    leaves its brackets counted: at worst a body json.loads would refuse anyway is called too deep.
    """
    depth = 0
    for char in _NOT_BRACKET.sub("", _STRING.sub("", text)):
        if char in "[{":
            depth += 1
            if depth > max_depth:
                return True
        else:
            depth -= 1
    return False


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def check_keys(obj: dict[str, Any], allowed: set[str], required: set[str], where: str) -> None:
    unknown = set(obj) - allowed
    if unknown:
        raise InvalidRequest(f"{where}: unknown fields {sorted(unknown)}")
    missing = required - set(obj)
    if missing:
        raise InvalidRequest(f"{where}: missing required fields {sorted(missing)}")


def str_field(obj: dict[str, Any], key: str, where: str, *, optional: bool = False) -> str | None:
    value = obj.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{where}.{key}: expected a non-empty string, got {json_type(value)}")
    return value


def str_map_field(obj: dict[str, Any], key: str, where: str) -> dict[str, str]:
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest(f"{where}.{key}: expected an object of strings, got {json_type(value)}")
    for k, v in value.items():
        if not k or not isinstance(v, str):
            raise InvalidRequest(f"{where}.{key}[{k!r}]: expected a non-empty key with a string value")
    return dict(value)


def positive_field(
    obj: dict[str, Any], key: str, where: str, *, integer: bool, maximum: float = INT64_MAX
) -> Any:
    """`obj[key]` if it is a number in (0, maximum], None if absent or null, else InvalidRequest."""
    value = obj.get(key)
    if value is None:
        return None
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type or not math.isfinite(value) or value <= 0:
        kind = "a positive integer" if integer else "a positive finite number"
        raise InvalidRequest(f"{where}.{key}: expected {kind}, got {_short(value)}")
    if value > maximum:
        raise InvalidRequest(f"{where}.{key}: must be at most {maximum:g}, got {_short(value)}")
    return value


def capacity_fields(obj: dict[str, Any], where: str) -> dict[str, int]:
    """cpu_millis, memory_bytes and disk_bytes of a capacity object: integers within 0..CAPACITY_MAX."""
    check_keys(obj, set(CAPACITY_MAX), set(), where)
    out = {}
    for key, maximum in CAPACITY_MAX.items():
        value = obj.get(key, 0)
        if value is None:
            value = 0
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
            raise InvalidRequest(f"{where}.{key}: expected an integer within 0..{maximum}, got {_short(value)}")
        out[key] = value
    return out


def check_message(message: Message, where: str) -> None:
    """Bound the numbers of a parsed protobuf message, or InvalidRequest naming the field.

    Doubles must be finite (protobuf's JSON takes "NaN" and "Infinity"). Its JSON parser accepts
    uint64s up to 2**64-1, which SQLite and int64 cannot hold; a `Capacity` must also stay within
    CAPACITY_MAX, wherever it is nested.

    Every telemetry push passes here: what to check of each field is worked out once per field
    (`_check_of`), and a field's path is spelt out only for a message nested in it or an error.
    """
    for field, value in message.ListFields():
        check = _check_of(field)
        if check is _Check.NONE:
            continue
        if check is _Check.MAP:
            # A map: check its values as if each were a field of that name (keys are strings here).
            value_field = field.message_type.fields_by_name["value"]
            for key, item in value.items():
                _check_value(value_field, item, f"{where}.{field.name}[{key!r}]")
        elif field.is_repeated:
            for i, item in enumerate(value):
                _check_one(check, item, where, field.name, i)
        else:
            _check_one(check, value, where, field.name, None)
    if message.DESCRIPTOR.name == "Capacity":
        for key, maximum in CAPACITY_MAX.items():
            value = getattr(message, key)
            if value > maximum:
                raise InvalidRequest(f"{where}.{key}: must be at most {maximum}, got {value}")


class _Check(enum.Enum):
    NONE = "none"
    FLOAT = "float"
    INT64 = "int64"
    MESSAGE = "message"
    MAP = "map"


@functools.cache
def _check_of(field: FieldDescriptor) -> _Check:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return _Check.MAP if field.message_type.GetOptions().map_entry else _Check.MESSAGE
    if field.type in _FLOAT_TYPES:
        return _Check.FLOAT
    if field.type in _INT64_TYPES:
        return _Check.INT64
    return _Check.NONE


def _check_one(check: _Check, value: Any, where: str, name: str, index: int | None) -> None:
    if check is _Check.MESSAGE:
        check_message(value, f"{where}.{name}" if index is None else f"{where}.{name}[{index}]")
    elif check is _Check.FLOAT:
        if not math.isfinite(value):
            path = f"{where}.{name}" if index is None else f"{where}.{name}[{index}]"
            raise InvalidRequest(f"{path}: must be a finite number, got {value}")
    elif check is _Check.INT64 and not 0 <= value <= INT64_MAX:
        path = f"{where}.{name}" if index is None else f"{where}.{name}[{index}]"
        raise InvalidRequest(f"{path}: must be within 0..{INT64_MAX}, got {value}")


def _check_value(field: FieldDescriptor, value: Any, path: str) -> None:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        check_message(value, path)
    elif field.type in _FLOAT_TYPES and not math.isfinite(value):
        raise InvalidRequest(f"{path}: must be a finite number, got {value}")
    elif field.type in _INT64_TYPES and not 0 <= value <= INT64_MAX:
        raise InvalidRequest(f"{path}: must be within 0..{INT64_MAX}, got {value}")


_FLOAT_TYPES = frozenset({FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT})
_INT64_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)


def _short(value: Any) -> str:
    """A caller's value for an error message: a 4000-digit integer is not worth echoing back."""
    if isinstance(value, int) and abs(value) >= 1 << 100:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


PROTOBUF = "application/x-protobuf"
"""The content type of a body in protobuf's binary encoding, where an API takes one (the
coordinator's agent endpoints: coordinator/wire.py)."""


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def query_flag(request: web.Request, name: str) -> bool:
    raw = request.query.get(name)
    if raw is None:
        return False
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise InvalidRequest(f"query parameter {name}: expected 1/0/true/false, got {raw!r}")


def query_number(request: web.Request, name: str, *, integer: bool, maximum: float = INT64_MAX) -> Any:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    try:
        value: float = int(raw) if integer else float(raw)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise InvalidRequest(f"query parameter {name}: expected {kind}, got {raw[:80]!r}") from None
    if value < 0 or value != value or value == float("inf"):
        raise InvalidRequest(f"query parameter {name}: must be a finite number >= 0, got {raw[:80]!r}")
    if value > maximum:
        raise InvalidRequest(f"query parameter {name}: must be at most {maximum:g}, got {raw[:80]!r}")
    return value
