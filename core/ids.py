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


CATALOG_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
"""A catalog entry's name (coordinator/catalog/): a DNS label, so that it can name a component's
container and, upper-cased with '-' as '_', its environment variables. The entry schema's
`$defs/name` says the same (tests keep them equal)."""
CATALOG_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
"""A catalog entry's version: any label; the schema's `$defs/version`."""


def check_catalog_name(name: str) -> str:
    """`name` if it can name a catalog entry, else InvalidRequest."""
    if not CATALOG_NAME_RE.fullmatch(name):
        raise InvalidRequest(
            f"invalid catalog entry name {name[:80]!r}: 1-63 lower-case letters, digits or '-', "
            "starting and ending with a letter or digit"
        )
    return name


def check_catalog_version(version: str) -> str:
    """`version` if it can be a catalog entry's version, else InvalidRequest."""
    if not CATALOG_VERSION_RE.fullmatch(version):
        raise InvalidRequest(
            f"invalid catalog entry version {version[:80]!r}: 1-64 letters, digits, '.', '_', '+' or '-', "
            "starting with a letter or digit"
        )
    return version


def parse_catalog_ref(text: str) -> tuple[str, str | None]:
    """`NAME` or `NAME@VERSION` -> (name, version or None), each checked; else InvalidRequest."""
    name, at, version = text.partition("@")
    return check_catalog_name(name), check_catalog_version(version) if at else None
