"""The HTTP state contract's one decision the coordinator makes itself: is an exported state fit to
load into the next stage? Pure (docs/chains.md, "The HTTP state contract").

TRANSFER checks it before anything reaches the next stage, so a stage that exports garbage, or a
state without what the next stage consumes, fails its handover there (and rolls back) rather than
poisoning the next stage with it.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import msgpack

from core.errors import InvalidRequest


class StateUnfit(InvalidRequest):
    code = "chain_state_unfit"


def check_state(state: bytes, consumes: Collection[str]) -> dict[str, Any]:
    """The exported state as a MessagePack map holding every field `consumes` names; StateUnfit
    saying what is wrong if it is not."""
    try:
        decoded = msgpack.unpackb(state, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise StateUnfit(f"the exported state is not MessagePack: {exc}") from exc
    if not isinstance(decoded, dict):
        raise StateUnfit(f"the exported state is a MessagePack {type(decoded).__name__}, not a map")
    missing = [name for name in consumes if name not in decoded]
    if missing:
        raise StateUnfit(f"the exported state has no {', '.join(missing)} (consumed by the next stage)")
    return decoded


def snapshot_version(decoded: dict[str, Any]) -> int:
    """The `version` of a live handover's snapshot (the number the delta at the switch is taken
    since); StateUnfit if it has none."""
    version = decoded.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise StateUnfit("a live handover's snapshot has no version (an unsigned integer field `version`)")
    return version


def check_delta(delta: bytes, since: int) -> int:
    """A live handover's delta, exported at the switch, as a MessagePack map taken since the
    snapshot of version `since`; its own version, or StateUnfit saying what is wrong."""
    try:
        decoded = msgpack.unpackb(delta, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise StateUnfit(f"the delta is not MessagePack: {exc}") from exc
    if not isinstance(decoded, dict):
        raise StateUnfit(f"the delta is a MessagePack {type(decoded).__name__}, not a map")
    if decoded.get("since") != since:
        raise StateUnfit(f"the delta is taken since version {decoded.get('since')!r}, not the snapshot's {since}")
    version = snapshot_version(decoded)
    if version < since:
        raise StateUnfit(f"the delta's version {version} is older than the snapshot's {since}")
    return version
