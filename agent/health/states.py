"""The health state machine, as data. No I/O.

    starting --pass--> healthy <--pass-- unhealthy
        |                 |                  ^
        +--fail_limit-----+---fail_limit-----+          any --run_ended--> stopped
                                                        any --run_started--> starting

One table, `_TRANSITIONS` ((state, event) -> state), read by the driver (agent/health/monitor.py).
A probe's outcome becomes an event by `classify`, a pure function of the outcome, the state, whether
the run is still in its start period and the failing streak, with Docker's HEALTHCHECK rules:

  pass        the probe succeeded: healthy, and the streak starts over (and the start period ends)
  fail_grace  it failed while starting within the start period: not counted, the state stays
  fail        a counted failure, the streak still below `retries`: the state stays
  fail_limit  a counted failure that makes (or keeps) the streak at `retries` or more: unhealthy

An illegal event raises `IllegalTransition` and leaves the record unchanged (a probe's result for a
run that has ended, for instance): the driver never feeds one.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from core.errors import Conflict


class Status(enum.StrEnum):
    STARTING = "starting"  # the run began; no probe has passed yet
    HEALTHY = "healthy"  # the last probe passed, or failed fewer than `retries` times in a row
    UNHEALTHY = "unhealthy"  # `retries` counted failures in a row, and none passed since
    STOPPED = "stopped"  # the run ended: no probes until the container starts again


class Event(enum.StrEnum):
    PASS = "pass"
    FAIL_GRACE = "fail_grace"  # a failure in the start period, before any pass: not counted
    FAIL = "fail"  # a counted failure, the streak below retries
    FAIL_LIMIT = "fail_limit"  # a counted failure, the streak at retries or more
    RUN_STARTED = "run_started"
    RUN_ENDED = "run_ended"


_PROBED = (Status.STARTING, Status.HEALTHY, Status.UNHEALTHY)

_TRANSITIONS: Mapping[tuple[Status, Event], Status] = {
    (Status.STARTING, Event.PASS): Status.HEALTHY,
    (Status.STARTING, Event.FAIL_GRACE): Status.STARTING,
    (Status.STARTING, Event.FAIL): Status.STARTING,
    (Status.STARTING, Event.FAIL_LIMIT): Status.UNHEALTHY,
    (Status.HEALTHY, Event.PASS): Status.HEALTHY,
    (Status.HEALTHY, Event.FAIL): Status.HEALTHY,
    (Status.HEALTHY, Event.FAIL_LIMIT): Status.UNHEALTHY,
    (Status.UNHEALTHY, Event.PASS): Status.HEALTHY,
    (Status.UNHEALTHY, Event.FAIL_LIMIT): Status.UNHEALTHY,
    **{(s, Event.RUN_ENDED): Status.STOPPED for s in (*_PROBED, Status.STOPPED)},
    # A new run starts over, also when the end of the last one was missed (its exit event lost).
    **{(s, Event.RUN_STARTED): Status.STARTING for s in (*_PROBED, Status.STOPPED)},
}

_STREAK: Mapping[Event, Callable[[int], int]] = {
    Event.PASS: lambda streak: 0,
    Event.FAIL_GRACE: lambda streak: streak,
    Event.FAIL: lambda streak: streak + 1,
    Event.FAIL_LIMIT: lambda streak: streak + 1,
    Event.RUN_STARTED: lambda streak: 0,
    Event.RUN_ENDED: lambda streak: streak,
}
"""The failing streak after each event."""


class IllegalTransition(Conflict):
    code = "illegal_health_transition"


def next_status(status: Status, event: Event) -> Status:
    try:
        return _TRANSITIONS[(status, event)]
    except KeyError:
        raise IllegalTransition(f"health event {event.value} is not allowed in state {status.value}") from None


def classify(passed: bool, status: Status, in_start_period: bool, streak: int, retries: int) -> Event:
    """The event a probe's outcome is, by Docker's rules (see the module docstring)."""
    if passed:
        return Event.PASS
    if status is Status.STARTING and in_start_period:
        return Event.FAIL_GRACE
    return Event.FAIL_LIMIT if streak + 1 >= retries else Event.FAIL


@dataclass(frozen=True)
class ProbeResult:
    """One probe: whether it passed, what it said (exit status and output, HTTP status, error)."""

    passed: bool
    output: str
    at: dt.datetime
    duration: float
    """Seconds the probe took."""
    exit_code: int | None = None
    """exec: the command's exit status (None when it did not run to an end)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "result": "pass" if self.passed else "fail",
            "output": self.output,
            "at": self.at.isoformat(),
            "duration": round(self.duration, 6),
            "exit_code": self.exit_code,
        }


@dataclass(frozen=True)
class HealthRecord:
    """Where one container's health stands; a new record for each step."""

    status: Status
    since: dt.datetime
    """When `status` was entered (UTC)."""
    failing_streak: int = 0
    last: ProbeResult | None = None

    def advance(self, event: Event, at: dt.datetime, result: ProbeResult | None = None) -> HealthRecord:
        """The record after `event` (IllegalTransition, this record unchanged, if not allowed)."""
        status = next_status(self.status, event)
        return dataclasses.replace(
            self,
            status=status,
            since=self.since if status is self.status else at,
            failing_streak=_STREAK[event](self.failing_streak),
            last=result if result is not None else self.last,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status.value,
            "since": self.since.isoformat(),
            "failing_streak": self.failing_streak,
            "last": self.last.to_json() if self.last is not None else None,
        }


def starting(at: dt.datetime) -> HealthRecord:
    return HealthRecord(Status.STARTING, at)
