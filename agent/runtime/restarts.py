"""Restart policies as a container's labels hold them. Pure, no I/O."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

from agent.model import LABEL_RESTART_POLICY, RestartName, RestartPolicy
from core.errors import InvalidRequest


def policy_of(labels: Mapping[str, str]) -> RestartPolicy:
    """The container's policy; `no` when it has none, or one this agent cannot read (a peer's)."""
    with contextlib.suppress(InvalidRequest):
        return RestartPolicy.from_spelling(labels.get(LABEL_RESTART_POLICY, RestartName.NO.value))
    return RestartPolicy()
