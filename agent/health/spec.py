"""A container's health check: what is probed and how often, as the API takes it and a label keeps it.

The check is stored in the container's `io.ferryman.health` label as compact JSON, so it survives an
agent restart and travels with the container when it migrates (like the restart policy). The API
object names exactly one probe, with Docker's timing fields beside it:

    {"http": {"port": 8080, "path": "/healthz", "status": [200, 399]},
     "interval": 5, "timeout": 2, "retries": 3, "start_period": 10, "start_interval": 0.5}

Probe kinds: `http` (GET, healthy when the status is in the inclusive range), `tcp` (a connect),
`grpc` (grpc.health.v1.Health/Check answers SERVING) and `exec` (a command run inside the container
through containerd, healthy on exit 0). Network probes connect from inside the container's network
namespace, so `127.0.0.1` (the default host) is the container itself. See docs/health.md.
"""

from __future__ import annotations

import enum
import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from core.errors import InvalidRequest
from core.http.validate import check_keys, json_type, positive_field, str_field

LABEL_HEALTH = "io.ferryman.health"
"""The container's health check as compact JSON (the API's object, defaults filled in)."""

MAX_LABEL_BYTES = 3072
"""The encoded check's bound: containerd caps a label (key and value) at 4096 bytes."""
MAX_SECONDS = 86400.0
"""Intervals, timeouts and start periods longer than a day are typos."""
MIN_INTERVAL = 0.05
"""Seconds between probes at the least: faster only burns the host's CPU."""
MAX_RETRIES = 1000
MAX_OUTPUT = 4096
"""Bytes of a probe's output kept (Docker keeps 4096 too)."""


class Kind(enum.StrEnum):
    HTTP = "http"  # GET a path; healthy when the status is in range
    TCP = "tcp"  # a TCP connect succeeds
    GRPC = "grpc"  # grpc.health.v1.Health/Check answers SERVING
    EXEC = "exec"  # a command inside the container exits 0


@dataclass(frozen=True)
class HealthCheck:
    kind: Kind
    port: int = 0
    """http, tcp, grpc: the port inside the container's network namespace."""
    host: str = "127.0.0.1"
    """http, tcp, grpc: an IP address as seen from inside the container (its loopback by default)."""
    path: str = "/"
    """http: the request path."""
    status: tuple[int, int] = (200, 399)
    """http: the healthy status codes, inclusive."""
    service: str = ""
    """grpc: the service name asked about ("" is the server as a whole)."""
    command: tuple[str, ...] = ()
    """exec: argv, run with the container's environment, user and working directory."""
    interval: float = 30.0
    """Seconds from the end of one probe to the start of the next."""
    timeout: float = 30.0
    """Seconds a probe may take; a slower one failed."""
    retries: int = 3
    """Consecutive counted failures that make the container unhealthy."""
    start_period: float = 0.0
    """Seconds from the run's start in which failures do not count (until the first success)."""
    start_interval: float | None = None
    """Seconds between probes during the start period (None: `interval`)."""

    @property
    def target(self) -> str:
        """What is probed, for logs and ferryctl: `http://127.0.0.1:8080/healthz`, `exec cat /ok`."""
        if self.kind is Kind.EXEC:
            return "exec " + " ".join(self.command)
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.kind is Kind.HTTP:
            return f"http://{host}:{self.port}{self.path}"
        if self.kind is Kind.GRPC:
            return f"grpc://{host}:{self.port}" + (f"/{self.service}" if self.service else "")
        return f"tcp://{host}:{self.port}"

    def probe_json(self) -> dict[str, Any]:
        if self.kind is Kind.EXEC:
            return {"command": list(self.command)}
        out: dict[str, Any] = {"port": self.port, "host": self.host}
        if self.kind is Kind.HTTP:
            out.update(path=self.path, status=list(self.status))
        elif self.kind is Kind.GRPC:
            out["service"] = self.service
        return out

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            self.kind.value: self.probe_json(),
            "interval": self.interval,
            "timeout": self.timeout,
            "retries": self.retries,
            "start_period": self.start_period,
        }
        if self.start_interval is not None:
            out["start_interval"] = self.start_interval
        return out

    def label(self) -> str:
        return json.dumps(self.to_json(), separators=(",", ":"))


_PROBE_KEYS: Mapping[Kind, tuple[set[str], set[str]]] = {
    Kind.HTTP: ({"port", "host", "path", "status"}, {"port"}),
    Kind.TCP: ({"port", "host"}, {"port"}),
    Kind.GRPC: ({"port", "host", "service"}, {"port"}),
    Kind.EXEC: ({"command"}, {"command"}),
}
"""Each probe object's allowed and required fields."""
_TIMING = {"interval", "timeout", "retries", "start_period", "start_interval"}


def parse_health(value: Any, where: str) -> HealthCheck | None:
    """The API's `health` object (absent or null: no check), or InvalidRequest naming the field."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequest(f'{where}: expected an object such as {{"tcp": {{"port": 80}}}}, got {json_type(value)}')
    kinds = [k for k in Kind if k.value in value]
    check_keys(value, {k.value for k in Kind} | _TIMING, set(), where)
    if len(kinds) != 1:
        named = ", ".join(k.value for k in kinds) if kinds else "none"
        raise InvalidRequest(f"{where}: expected exactly one of http, tcp, grpc, exec, got {named}")
    kind = kinds[0]
    probe = value[kind.value]
    here = f"{where}.{kind.value}"
    if not isinstance(probe, dict):
        raise InvalidRequest(f"{here}: expected an object, got {json_type(probe)}")
    allowed, required = _PROBE_KEYS[kind]
    check_keys(probe, allowed, required, here)
    fields: dict[str, Any] = {}
    if kind is Kind.EXEC:
        command = probe["command"]
        if not isinstance(command, list) or not command or not all(isinstance(a, str) and a for a in command):
            raise InvalidRequest(f"{here}.command: expected a non-empty array of non-empty strings")
        fields["command"] = tuple(command)
    else:
        fields["port"] = positive_field(probe, "port", here, integer=True, maximum=65535)
        host = str_field(probe, "host", here, optional=True)
        if host is not None:
            try:
                fields["host"] = str(ipaddress.ip_address(host))
            except ValueError:
                raise InvalidRequest(f"{here}.host: expected an IP address, got {host!r}") from None
    if kind is Kind.HTTP:
        path = str_field(probe, "path", here, optional=True)
        if path is not None:
            if not path.startswith("/") or any(c.isspace() or not c.isprintable() for c in path):
                raise InvalidRequest(f"{here}.path: expected an absolute path without spaces, got {path!r}")
            fields["path"] = path
        if "status" in probe:
            fields["status"] = _status_range(probe["status"], f"{here}.status")
    if kind is Kind.GRPC and "service" in probe:
        service = probe["service"]
        if not isinstance(service, str):
            raise InvalidRequest(f"{here}.service: expected a string, got {json_type(service)}")
        fields["service"] = service
    for key in ("interval", "timeout", "start_interval"):
        seconds = positive_field(value, key, where, integer=False, maximum=MAX_SECONDS)
        if seconds is not None:
            if key != "timeout" and seconds < MIN_INTERVAL:
                raise InvalidRequest(f"{where}.{key}: must be at least {MIN_INTERVAL:g} s, got {seconds:g}")
            fields[key] = float(seconds)
    retries = positive_field(value, "retries", where, integer=True, maximum=MAX_RETRIES)
    if retries is not None:
        fields["retries"] = retries
    start_period = value.get("start_period")
    if start_period is not None:  # 0 is allowed: no start period
        if start_period != 0 or isinstance(start_period, bool):
            positive_field(value, "start_period", where, integer=False, maximum=MAX_SECONDS)
        fields["start_period"] = float(start_period)
    check = HealthCheck(kind=kind, **fields)
    if len(check.label().encode()) > MAX_LABEL_BYTES:
        raise InvalidRequest(f"{where}: the check takes more than {MAX_LABEL_BYTES} bytes as JSON")
    return check


def _status_range(value: Any, where: str) -> tuple[int, int]:
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and 100 <= v <= 599 for v in value)
        or value[0] > value[1]
    ):
        raise InvalidRequest(f"{where}: expected [lowest, highest] status codes within 100..599, got {value!r}")
    return value[0], value[1]


def health_of(labels: Mapping[str, str]) -> HealthCheck | None:
    """The container's check; None when it has none, or one this agent cannot read (a peer's newer
    spelling): such a container runs unchecked here rather than not at all."""
    text = labels.get(LABEL_HEALTH)
    if not text:
        return None
    try:
        return parse_health(json.loads(text), "health label")
    except (InvalidRequest, ValueError):
        return None
