"""Which coordinator replica leads, as data. No I/O.

Several replicas share one etcd store; exactly one of them runs the ticks, drains, retraining and
migrations. The leader is the replica whose etcd lease holds the leader key. The driver
(coordinator/etcd/election.py) feeds this table what it observes and acts on the role it returns;
an illegal event raises IllegalLeadershipEvent and leaves the role unchanged.

Stopping at once: a leader acts only until `acting_deadline`: the moment its lease could have
expired on the etcd side, counted from when the last keep-alive was *sent* (not answered), minus a
margin for clock-rate differences. Past it the leader steps down by itself, even if it cannot reach
etcd to learn that it lost. Its writes are also fenced: each carries the leader key's revision as a
guard, so a write from a replica that was replaced is refused by etcd itself.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from core.errors import Conflict, FerrymanError


class Role(enum.StrEnum):
    FOLLOWER = "follower"  # another replica leads, or nobody yet; campaigns when the key is free
    LEADER = "leader"  # our lease holds the leader key: acts, every write fenced by the key's revision


class Event(enum.StrEnum):
    WON = "won"  # our campaign put the leader key (with our lease)
    OTHER_LEADS = "other_leads"  # the key is held by another replica
    RENEWED = "renewed"  # a keep-alive kept our lease
    LOST = "lost"  # the lease is gone, the key names someone else, or the acting deadline passed


class IllegalLeadershipEvent(Conflict):
    code = "illegal_leadership_event"


class NotLeader(FerrymanError):
    """This replica does not lead (or no longer does): the write was not made; ask the leader."""

    code = "not_leader"
    http_status = 503

    def __init__(self, message: str, leader: str = "") -> None:
        super().__init__(message)
        self.leader = leader


class PushElsewhere(FerrymanError):
    """This replica leads and leaves the agents' telemetry to the live followers: nothing was
    stored; the agent sends the same batch to its next coordinator URL (core/replicas.py)."""

    code = "push_elsewhere"
    http_status = 503


def takes_pushes(setting: str, role: Role | None, others_live: int) -> bool:
    """Whether a replica serves telemetry pushes and sessions (`[telemetry] leader_takes_pushes`):
    a follower, a lone coordinator (`role` None: SQLite) and a leader with "always" do; a leader
    with "when_alone" only while no other replica is live, so that its core serves the tick."""
    return role is not Role.LEADER or setting == "always" or others_live == 0


_TRANSITIONS: dict[tuple[Role, Event], Role] = {
    (Role.FOLLOWER, Event.WON): Role.LEADER,
    (Role.FOLLOWER, Event.OTHER_LEADS): Role.FOLLOWER,
    (Role.FOLLOWER, Event.LOST): Role.FOLLOWER,  # a campaign that failed to reach etcd
    (Role.LEADER, Event.RENEWED): Role.LEADER,
    (Role.LEADER, Event.LOST): Role.FOLLOWER,
    (Role.LEADER, Event.OTHER_LEADS): Role.FOLLOWER,  # someone else holds the key: we were replaced
}


def next_role(role: Role, event: Event) -> Role:
    try:
        return _TRANSITIONS[(role, event)]
    except KeyError:
        raise IllegalLeadershipEvent(f"{event.value!r} cannot happen to a {role.value}") from None


@dataclass(frozen=True)
class Term:
    """One leadership: the leader key's revision when we took it (the fencing token) and our lease."""

    revision: int
    lease: int


MARGIN = 0.2
"""The share of the lease TTL a leader gives up, for clocks that run at slightly different rates and
for the time a step in progress takes to notice (docs/coordinator.md, "Running on etcd")."""


def acting_deadline(sent_at: float, ttl: float) -> float:
    """Until when (monotonic) a leader may act after a keep-alive sent at `sent_at` was answered with
    `ttl` seconds left: etcd expires the lease no earlier than sent_at + ttl."""
    return sent_at + ttl * (1.0 - MARGIN)


def renew_every(ttl: float) -> float:
    """Keep-alives three times per TTL: two can be lost before the deadline passes."""
    return ttl / 3.0
