"""`ferryctl run|create --health-*`: a container's health check, as the API's `health` object.

One of `--health-cmd` (a shell command, `/bin/sh -c`, as Docker's), `--health-http`, `--health-tcp`,
`--health-grpc`, with Docker's timing options beside it. The agent's validator checks the result
(main.container_spec), so a bad value fails in the API's words before anything is sent.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)?")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_ENDPOINT_RE = re.compile(r"(?:(?P<host>\[[0-9A-Fa-f:.]+\]|[0-9.]+):)?(?P<port>\d+)(?P<rest>/.*)?")
_STATUS_RE = re.compile(r"(\d{3})(?:-(\d{3}))?")


def duration(text: str) -> float:
    """Seconds from `5`, `1.5s`, `500ms`, `2m`, `1h` (Docker's --health-interval spelling)."""
    m = _DURATION_RE.fullmatch(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (use e.g. 500ms, 5s, 2m)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def endpoint(text: str) -> dict[str, Any]:
    """`[HOST:]PORT[/REST]`, HOST an IP address (IPv6 in brackets); REST kept as `rest`."""
    m = _ENDPOINT_RE.fullmatch(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"expected [HOST:]PORT[/...], got {text!r}")
    out: dict[str, Any] = {"port": int(m.group("port"))}
    if m.group("host"):
        out["host"] = m.group("host").strip("[]")
    if m.group("rest"):
        out["rest"] = m.group("rest")
    return out


def status_range(text: str) -> list[int]:
    m = _STATUS_RE.fullmatch(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"expected a status or a range such as 200-299, got {text!r}")
    low = int(m.group(1))
    return [low, int(m.group(2) or low)]


def add_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("health check (docs/health.md)")
    kind = g.add_mutually_exclusive_group()
    kind.add_argument(
        "--health-cmd", metavar="CMD", help="exec: healthy when `/bin/sh -c CMD` exits 0 in the container"
    )
    kind.add_argument(
        "--health-http", type=endpoint, metavar="[HOST:]PORT[/PATH]", help="http: GET, healthy on 200-399"
    )
    kind.add_argument("--health-tcp", type=endpoint, metavar="[HOST:]PORT", help="tcp: healthy when a connect succeeds")
    kind.add_argument(
        "--health-grpc",
        type=endpoint,
        metavar="[HOST:]PORT[/SERVICE]",
        help="grpc: grpc.health.v1.Health/Check answers SERVING",
    )
    g.add_argument("--health-http-status", type=status_range, metavar="LOW-HIGH", help="healthy HTTP statuses")
    g.add_argument("--health-interval", type=duration, metavar="DURATION", help="between probes (default 30s)")
    g.add_argument("--health-timeout", type=duration, metavar="DURATION", help="a probe's limit (default 30s)")
    g.add_argument("--health-retries", type=int, metavar="N", help="failures in a row that are unhealthy (default 3)")
    g.add_argument(
        "--health-start-period", type=duration, metavar="DURATION", help="failures do not count this long (default 0)"
    )
    g.add_argument(
        "--health-start-interval", type=duration, metavar="DURATION", help="between probes in the start period"
    )


_TIMING = ("interval", "timeout", "retries", "start_period", "start_interval")


def health_spec(args: argparse.Namespace) -> dict[str, Any] | None:
    """The API's `health` object from the options, or None without any; ValueError when timing or
    status options come without a probe."""
    spec: dict[str, Any] = {}
    if args.health_cmd is not None:
        spec["exec"] = {"command": ["/bin/sh", "-c", args.health_cmd]}
    elif args.health_http is not None:
        probe = dict(args.health_http)
        path = probe.pop("rest", None)
        if path is not None:
            probe["path"] = path
        if args.health_http_status is not None:
            probe["status"] = args.health_http_status
        spec["http"] = probe
    elif args.health_tcp is not None:
        if "rest" in args.health_tcp:
            raise ValueError(f"--health-tcp takes [HOST:]PORT, not a path ({args.health_tcp['rest']})")
        spec["tcp"] = dict(args.health_tcp)
    elif args.health_grpc is not None:
        probe = dict(args.health_grpc)
        service = probe.pop("rest", None)
        if service is not None:
            probe["service"] = service[1:]
        spec["grpc"] = probe
    timing = {key: getattr(args, f"health_{key}") for key in _TIMING if getattr(args, f"health_{key}") is not None}
    if not spec:
        if timing or args.health_http_status is not None:
            raise ValueError("--health-* options need one of --health-cmd, --health-http, --health-tcp, --health-grpc")
        return None
    if args.health_http_status is not None and "http" not in spec:
        raise ValueError("--health-http-status is for --health-http")
    return {**spec, **timing}
