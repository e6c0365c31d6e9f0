"""Argument types shared by ferryctl's subcommands."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from agent.network.addresses import parse_service_ip
from core.errors import InvalidRequest
from core.ids import check_container_id


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
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
