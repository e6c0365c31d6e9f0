"""Notices are facts, not features: a host event that states when the host goes away.

An agent reports a notice with a `deadline` when its source states a time (AWS spot
`instance-action`, Azure Scheduled Events `NotBefore`, GCE `TERMINATE_ON_HOST_MAINTENANCE`,
systemd's scheduled shutdown, a notice file with `deadline=`). From the moment it is seen until
`GRACE_S` after its deadline, a notice whose deadline lies within the model's horizon sets the
host's drain probability to `NOTICE_PROBABILITY`, whatever the model says; the prediction and the
decision record name the notice. Pure functions, no I/O: serving, training and the bench use them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

NOTICE_PROBABILITY = 1.0
GRACE_S = 900.0
"""How long after its deadline a notice still holds: the host may take a while to actually go."""
MAX_KEPT = 16
"""Notices kept per host (the newest)."""


@dataclass(frozen=True, slots=True)
class Notice:
    seen_at: float
    """Unix seconds of the sample that carried it."""
    deadline: float
    kind: str
    source: str
    detail: str

    def describe(self) -> str:
        return f"notice {self.source or self.kind} (deadline {self.deadline:.0f}): {self.detail}"[:400]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def notices_in_sample(ts: float, sample: Mapping[str, Any]) -> list[Notice]:
    """The events of a stored sample (protobuf JSON) that state a deadline."""
    out = []
    for event in sample.get("events") or ():
        try:
            deadline = float(event.get("deadline") or 0.0)
        except (TypeError, ValueError):
            continue
        if deadline > 0:
            out.append(
                Notice(
                    seen_at=float(event.get("ts") or ts),
                    deadline=deadline,
                    kind=str(event.get("kind", "")),
                    source=str(event.get("source", "")),
                    detail=str(event.get("detail", "")),
                )
            )
    return out


def holds(notice: Notice, now: float, horizon: float) -> bool:
    """Whether the notice makes the host's drain a fact at `now`."""
    return notice.seen_at <= now and notice.deadline - horizon <= now <= notice.deadline + GRACE_S


def active_notice(notices: Iterable[Notice], now: float, horizon: float) -> Notice | None:
    """The notice with the earliest deadline that holds at `now`, if any."""
    live = [n for n in notices if holds(n, now, horizon)]
    return min(live, key=lambda n: n.deadline) if live else None


def prune(notices: Sequence[Notice], now: float) -> list[Notice]:
    """Drop notices past their grace period; keep the newest MAX_KEPT."""
    return sorted((n for n in notices if n.deadline + GRACE_S >= now), key=lambda n: n.seen_at)[-MAX_KEPT:]


def fact_mask(
    seen_at: npt.NDArray[np.float64], deadlines: npt.NDArray[np.float64], times: npt.NDArray[np.float64], horizon: float
) -> npt.NDArray[np.bool_]:
    """Vectorised `holds` for a recorded trace: True where any notice holds at each of `times`."""
    times = np.asarray(times, np.float64)
    out = np.zeros(times.size, bool)
    for seen, deadline in zip(seen_at, deadlines, strict=True):
        out |= (times >= seen) & (times >= deadline - horizon) & (times <= deadline + GRACE_S)
    return out
