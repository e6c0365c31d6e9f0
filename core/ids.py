"""Identifiers that name files, cgroups and journal entries: one validator for each, used at every edge.

An id from a request or a peer becomes part of a path, so its alphabet is closed: letters, digits,
'.', '_' and '-', starting with a letter or digit. `fullmatch`, because `$` alone lets a trailing
newline through.
"""

from __future__ import annotations

import re

from core.errors import InvalidRequest

CONTAINER_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_container_id(container_id: str) -> str:
    """`container_id` if it is a valid container id, else InvalidRequest."""
    if not CONTAINER_ID_RE.fullmatch(container_id):
        raise InvalidRequest(
            f"invalid container id {container_id!r}: 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return container_id


MIGRATION_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
"""A migration id names its journal file and work directory on both hosts: from the API's URLs and
from peer messages alike."""


def check_migration_id(migration_id: str) -> str:
    """`migration_id` if it is a valid migration id, else InvalidRequest."""
    if not MIGRATION_ID_RE.fullmatch(migration_id):
        raise InvalidRequest(
            f"invalid migration id {migration_id!r}: 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return migration_id
