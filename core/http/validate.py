"""Request validation for the agent's and the coordinator's JSON APIs.

Every rejection is an InvalidRequest naming the offending field by its path (`body.limits.memory`),
which the error middleware turns into a 400 with the JSON error shape.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from core.errors import InvalidRequest


async def read_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or InvalidRequest."""
    raw = await request.read()
    if not raw.strip():
        raise InvalidRequest("request body must be a JSON object")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise InvalidRequest(f"request body must be a JSON object, got {json_type(body)}")
    return body


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


def positive_field(obj: dict[str, Any], key: str, where: str, *, integer: bool) -> Any:
    value = obj.get(key)
    if value is None:
        return None
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type or value <= 0:
        kind = "a positive integer" if integer else "a positive number"
        raise InvalidRequest(f"{where}.{key}: expected {kind}, got {value!r}")
    return value


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


def query_number(request: web.Request, name: str, *, integer: bool) -> Any:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    try:
        value: float = int(raw) if integer else float(raw)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise InvalidRequest(f"query parameter {name}: expected {kind}, got {raw!r}") from None
    if value < 0 or value != value or value == float("inf"):
        raise InvalidRequest(f"query parameter {name}: must be a finite number >= 0, got {raw!r}")
    return value
