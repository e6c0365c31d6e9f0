"""When to stop pre-copy: a pure decision from what the rounds so far measured.

Stop when the predicted stop-copy downtime is within the target, when the dirty set stops
shrinking (p.haul's rules: at most 64 pages, or more than 10 % growth), or at the round limit.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

PAGE = 4096
SMALL_DIRTY_PAGES = 64
GROWTH_LIMIT = 1.10


class Verdict(enum.StrEnum):
    CONTINUE = "continue"
    DOWNTIME_REACHED = "downtime_reached"
    DIRTY_SET_SMALL = "dirty_set_small"
    DIRTY_SET_GROWING = "dirty_set_growing"
    MAX_ITERATIONS = "max_iterations"


@dataclass(frozen=True)
class Round:
    dirty_pages: int
    """Pages that changed since the previous round (and had to be sent)."""
    bytes_sent: int
    seconds: float
    """Transfer time of this round's delta."""


@dataclass(frozen=True)
class Overheads:
    freeze_s: float
    """Measured time to freeze and dump (non-memory part included)."""
    restore_s: float
    """Expected restore time on the target."""


def throughput(rounds: list[Round]) -> float:
    """Bytes per second over the rounds so far (at least 1 to avoid dividing by zero)."""
    sent = sum(r.bytes_sent for r in rounds)
    seconds = sum(r.seconds for r in rounds)
    return max(sent / seconds, 1.0) if seconds > 0 else 1.0


def predicted_downtime(rounds: list[Round], overheads: Overheads) -> float:
    last = rounds[-1]
    return last.dirty_pages * PAGE / throughput(rounds) + overheads.freeze_s + overheads.restore_s


def decide(rounds: list[Round], overheads: Overheads, downtime_target_s: float, max_iterations: int) -> Verdict:
    if not rounds:
        return Verdict.CONTINUE
    if predicted_downtime(rounds, overheads) <= downtime_target_s:
        return Verdict.DOWNTIME_REACHED
    if len(rounds) >= 2:
        last, before = rounds[-1].dirty_pages, rounds[-2].dirty_pages
        if last <= SMALL_DIRTY_PAGES:
            return Verdict.DIRTY_SET_SMALL
        if last > before * GROWTH_LIMIT:
            return Verdict.DIRTY_SET_GROWING
    if len(rounds) >= max_iterations:
        return Verdict.MAX_ITERATIONS
    return Verdict.CONTINUE
