"""Restart decisions: is an exited container started again, and after what delay. Pure, no I/O.

The restart supervisor (agent/runtime/supervisor.py) reads a container's labels and task into an
`ExitView` (`exit_view`), asks `decide`, and acts on the `Decision`. What the decision depends on is
all in the view and the arguments: the policy, the exit status, the restarts so far, whether an
operator stopped the container, whether a migration owns it, and the previous backoff delay.

The rules, in the order `_HOLDS` checks them (the first that holds keeps the container down):
  migrating         a migration owns the container, or moved its workload away: its task ends
                    because of that, and restarting it here would run the workload twice
  operator-stopped  an operator stopped it through the API: no policy undoes that
  policy            the policy does not restart after this exit (`no`; `on-failure` after exit 0)
  retries-exhausted `on-failure:N` made its N restarts
and otherwise it restarts, after docker's backoff (`Backoff`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from agent.containerd.types import ProcessInfo, TaskStatus
from agent.model import (
    LABEL_EXIT_STATUS,
    LABEL_LAST_EXIT_AT,
    LABEL_LAST_EXIT_STATUS,
    LABEL_MANAGED,
    LABEL_MIGRATED_TO,
    LABEL_OPERATOR_STOP,
    LABEL_RESTART_COUNT,
    LABEL_RESTART_POLICY,
    LABEL_STARTED_AT,
    RestartName,
    RestartPolicy,
)
from core.errors import InvalidRequest


@dataclass(frozen=True)
class Backoff:
    """docker's restart delay: `initial`, doubling on each quick failure up to `maximum`; a run that
    lasted `reset_after` seconds starts over at `initial`."""

    initial: float = 0.1
    maximum: float = 10.0
    reset_after: float = 10.0

    def next_delay(self, previous: float | None, ran_for: float | None) -> float:
        """The delay before the next restart; `previous` is the one before the run that just ended
        (None: no restart since the agent started), `ran_for` that run's length (None: unknown)."""
        if previous is None or (ran_for is not None and ran_for >= self.reset_after):
            return min(self.initial, self.maximum)
        return min(previous * 2, self.maximum)


@dataclass(frozen=True)
class ExitView:
    """One ended run of a container, as its labels and task tell it."""

    container_id: str
    policy: RestartPolicy
    run: str
    """LABEL_STARTED_AT of the run that ended: a restart is made only if it still names the run."""
    restart_count: int
    operator_stopped: bool
    moved: bool
    """A migration source's copy whose workload was committed to another host (LABEL_MIGRATED_TO)."""
    exit_status: int | None
    """None: the task is gone without a status (a reboot emptied containerd, or a start failed)."""
    exited_at: dt.datetime | None
    ran_for: float | None
    """Seconds from the run's start to its exit, when both are known."""


class Verdict(enum.Enum):
    RESTART = "restart"  # start it again after Decision.delay
    MIGRATING = "migrating"  # a migration owns it (the source after its commit, a target's copy)
    OPERATOR_STOPPED = "operator-stopped"  # stopped through the API: never undone
    POLICY = "policy"  # the policy does not restart after this exit
    RETRIES_EXHAUSTED = "retries-exhausted"  # on-failure made its max_retries restarts


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    delay: float = 0.0
    """Seconds to wait before the restart (RESTART only)."""

    @property
    def restart(self) -> bool:
        return self.verdict is Verdict.RESTART


_RESTARTS_AFTER: Mapping[RestartName, Callable[[int | None], bool]] = {
    RestartName.NO: lambda status: False,
    RestartName.ON_FAILURE: lambda status: status != 0,  # a lost task (None) is a failure
    RestartName.ALWAYS: lambda status: True,
    RestartName.UNLESS_STOPPED: lambda status: True,
}
"""Which exit statuses each policy restarts after."""

_HOLDS: tuple[tuple[Verdict, Callable[[ExitView, bool], bool]], ...] = (
    (Verdict.MIGRATING, lambda view, migrating: migrating or view.moved),
    (Verdict.OPERATOR_STOPPED, lambda view, migrating: view.operator_stopped),
    (Verdict.POLICY, lambda view, migrating: not _RESTARTS_AFTER[view.policy.name](view.exit_status)),
    (
        Verdict.RETRIES_EXHAUSTED,
        lambda view, migrating: view.policy.max_retries is not None and view.restart_count >= view.policy.max_retries,
    ),
)
"""What keeps an exited container down, in order: the first that holds is the verdict."""


def decide(view: ExitView, *, migrating: bool, previous_delay: float | None, backoff: Backoff) -> Decision:
    """Whether the run `view` describes is followed by another, and after what delay."""
    for verdict, holds in _HOLDS:
        if holds(view, migrating):
            return Decision(verdict)
    return Decision(Verdict.RESTART, backoff.next_delay(previous_delay, view.ran_for))


def policy_of(labels: Mapping[str, str]) -> RestartPolicy:
    """The container's policy; `no` when it has none, or one this agent cannot read (a peer's)."""
    with contextlib.suppress(InvalidRequest):
        return RestartPolicy.from_spelling(labels.get(LABEL_RESTART_POLICY, RestartName.NO.value))
    return RestartPolicy()


def restart_count(labels: Mapping[str, str]) -> int:
    text = labels.get(LABEL_RESTART_COUNT, "")
    return int(text) if text.isdecimal() and text.isascii() else 0


def _time(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=dt.UTC)


def exit_view(container_id: str, labels: Mapping[str, str], task: ProcessInfo | None) -> ExitView | None:
    """The run that ended, or None when none did: not ours, still running (or paused, or created and
    not started yet), or never started. A task that is missing although the container was started
    and not stopped through the API was lost (a reboot): a run that ended without a status."""
    if labels.get(LABEL_MANAGED) != "true":
        return None
    if task is not None and task.status != TaskStatus.STOPPED:
        return None
    run = labels.get(LABEL_STARTED_AT, "")
    if task is None and not run:
        return None
    exited_at = task.exited_at if task is not None else None
    started_at = _time(run)
    ran_for = (exited_at - started_at).total_seconds() if exited_at and started_at else None
    return ExitView(
        container_id=container_id,
        policy=policy_of(labels),
        run=run,
        restart_count=restart_count(labels),
        # stop() labels the container before its signal; the exit status it keeps dates from before this code.
        operator_stopped=LABEL_OPERATOR_STOP in labels or (task is None and LABEL_EXIT_STATUS in labels),
        moved=LABEL_MIGRATED_TO in labels,
        exit_status=task.exit_status if task is not None else None,
        exited_at=exited_at,
        ran_for=ran_for,
    )


def restart_labels(view: ExitView, now: dt.datetime) -> dict[str, str]:
    """What a restart after `view` records: one more restart, and the exit it followed."""
    return {
        LABEL_RESTART_COUNT: str(view.restart_count + 1),
        LABEL_LAST_EXIT_STATUS: "" if view.exit_status is None else str(view.exit_status),
        LABEL_LAST_EXIT_AT: (view.exited_at or now).isoformat(),
    }


def restart_json(labels: Mapping[str, str]) -> dict[str, object]:
    """The `restart` object of inspect: the policy, the restarts made and the exit before the last one."""
    last = labels.get(LABEL_LAST_EXIT_STATUS)
    return {
        "policy": policy_of(labels).to_json(),
        "count": restart_count(labels),
        "last_exit_status": int(last) if last and last.lstrip("-").isdecimal() else None,
        "last_exit_at": labels.get(LABEL_LAST_EXIT_AT) or None,
        "started_at": labels.get(LABEL_STARTED_AT) or None,
        "operator_stopped_at": labels.get(LABEL_OPERATOR_STOP) or None,
    }
