"""Argument types shared by ferryctl's subcommands."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable

from agent.network.addresses import parse_service_ip
from core.errors import InvalidRequest
from core.ids import check_container_id

_MEMORY_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)", re.IGNORECASE)
_MEMORY_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def memory_size(text: str) -> int:
    """Bytes from '512', '64M', '1.5G', '64MiB' (binary units, like docker)."""
    m = _MEMORY_RE.fullmatch(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"invalid memory size {text!r} (use e.g. 64M, 1G or bytes)")
    value = int(float(m.group(1)) * _MEMORY_UNITS[m.group(2).lower()])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"memory size must be positive, got {text!r}")
    return value


def cpus(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid cpu count {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"cpu count must be positive, got {text!r}")
    return value


def _api_check(check: Callable[[str], str]) -> Callable[[str], str]:
    """An argparse type from one of the API's validators: the same rule and the same words."""

    def parse(text: str) -> str:
        try:
            return check(text)
        except InvalidRequest as exc:
            raise argparse.ArgumentTypeError(exc.message) from None

    parse.__name__ = check.__name__  # argparse names the type in its messages
    return parse


container_id = _api_check(check_container_id)
"""A container id, checked like the API checks it (core.ids)."""
service_ip = _api_check(parse_service_ip)
"""A service address, checked and made canonical like the API does (agent.network.addresses)."""
