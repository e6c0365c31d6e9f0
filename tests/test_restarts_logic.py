"""The restart decisions (agent/runtime/restarts.py), the policy's two spellings, and the supervisor over
fakes of its own interfaces: no containerd here (tests/test_restarts.py has it)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import AsyncGenerator, Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.config import RestartConfig
from agent.containerd import ProcessInfo, TaskExit, TaskStatus
from agent.errors import ContainerdError, ContainerdUnavailable
from agent.model import (
    LABEL_EXIT_STATUS,
    LABEL_MANAGED,
    LABEL_MIGRATED_TO,
    LABEL_OPERATOR_STOP,
    LABEL_RESTART_COUNT,
    LABEL_RESTART_POLICY,
    LABEL_STARTED_AT,
    MAX_RESTART_RETRIES,
    ContainerState,
    ContainerSummary,
    RestartName,
    RestartPolicy,
    parse_restart_policy,
    spelling_json,
)
from agent.runtime.restarts import Backoff, ExitView, Verdict, decide, exit_view, restart_json, restart_labels
from agent.runtime.supervisor import RestartSupervisor
from core.errors import FerrymanError, InvalidRequest

BACKOFF = Backoff(initial=0.1, maximum=10.0, reset_after=10.0)
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

policies = st.builds(
    RestartPolicy,
    st.sampled_from(RestartName),
    st.none(),
) | st.builds(RestartPolicy, st.just(RestartName.ON_FAILURE), st.integers(1, MAX_RESTART_RETRIES))
views = st.builds(
    ExitView,
    container_id=st.just("c"),
    policy=policies,
    run=st.just(T0.isoformat()),
    restart_count=st.integers(0, 50),
    operator_stopped=st.booleans(),
    moved=st.booleans(),
    exit_status=st.none() | st.integers(0, 255),
    exited_at=st.none(),
    ran_for=st.none() | st.floats(0, 1e6),
)
delays = st.none() | st.floats(0.1, 10.0)


def view(policy: RestartPolicy, status: int | None = 1, count: int = 0, **kw: object) -> ExitView:
    fields: dict[str, object] = dict(
        container_id="c", policy=policy, run="r", restart_count=count, operator_stopped=False, moved=False,
        exit_status=status, exited_at=None, ran_for=0.05,
    )
    fields.update(kw)
    return ExitView(**fields)  # type: ignore[arg-type]


def verdict(v: ExitView, migrating: bool = False) -> Verdict:
    return decide(v, migrating=migrating, previous_delay=None, backoff=BACKOFF).verdict


# ------------------------------------------------------------------ the table, case by case


@pytest.mark.parametrize(
    ("policy", "status", "expected"),
    [
        (RestartPolicy(), 1, Verdict.POLICY),
        (RestartPolicy(), None, Verdict.POLICY),
        (RestartPolicy(RestartName.ON_FAILURE), 0, Verdict.POLICY),
        (RestartPolicy(RestartName.ON_FAILURE), 1, Verdict.RESTART),
        (RestartPolicy(RestartName.ON_FAILURE), 137, Verdict.RESTART),
        (RestartPolicy(RestartName.ON_FAILURE), None, Verdict.RESTART),  # a lost task failed
        (RestartPolicy(RestartName.ALWAYS), 0, Verdict.RESTART),
        (RestartPolicy(RestartName.UNLESS_STOPPED), 0, Verdict.RESTART),
        (RestartPolicy(RestartName.UNLESS_STOPPED), None, Verdict.RESTART),
    ],
)
def test_which_exits_each_policy_restarts_after(policy: RestartPolicy, status: int | None, expected: Verdict) -> None:
    assert verdict(view(policy, status)) is expected


def test_on_failure_counts_its_retries() -> None:
    on_failure_2 = RestartPolicy(RestartName.ON_FAILURE, 2)
    assert [verdict(view(on_failure_2, 1, count)) for count in range(4)] == [
        Verdict.RESTART, Verdict.RESTART, Verdict.RETRIES_EXHAUSTED, Verdict.RETRIES_EXHAUSTED
    ]


def test_what_keeps_a_container_down_comes_in_order() -> None:
    always = RestartPolicy(RestartName.ALWAYS)
    assert verdict(view(always, operator_stopped=True), migrating=True) is Verdict.MIGRATING
    assert verdict(view(always, moved=True)) is Verdict.MIGRATING
    assert verdict(view(RestartPolicy(), operator_stopped=True)) is Verdict.OPERATOR_STOPPED
    exhausted = view(RestartPolicy(RestartName.ON_FAILURE, 1), 0, count=1)
    assert verdict(exhausted) is Verdict.POLICY  # a success is not a failure, retries or not


# ------------------------------------------------------------------ properties


@given(views, st.booleans(), delays)
def test_an_operator_stop_or_a_migration_is_never_undone(v: ExitView, migrating: bool, previous: float | None) -> None:
    decision = decide(v, migrating=migrating, previous_delay=previous, backoff=BACKOFF)
    if v.operator_stopped or v.moved or migrating:
        assert not decision.restart


@given(views, delays)
def test_a_restart_happens_exactly_when_the_policy_allows_it(v: ExitView, previous: float | None) -> None:
    decision = decide(v, migrating=False, previous_delay=previous, backoff=BACKOFF)
    name, retries = v.policy.name, v.policy.max_retries
    allowed = {
        RestartName.NO: False,
        RestartName.ON_FAILURE: v.exit_status != 0 and (retries is None or v.restart_count < retries),
        RestartName.ALWAYS: True,
        RestartName.UNLESS_STOPPED: True,
    }[name]
    assert decision.restart == (allowed and not v.operator_stopped and not v.moved)
    assert decision.delay == 0.0 or decision.restart


@given(views, delays)
def test_the_delay_doubles_within_its_bounds_and_starts_over_after_a_long_run(
    v: ExitView, previous: float | None
) -> None:
    decision = decide(v, migrating=False, previous_delay=previous, backoff=BACKOFF)
    if not decision.restart:
        return
    assert BACKOFF.initial <= decision.delay <= BACKOFF.maximum
    long_run = v.ran_for is not None and v.ran_for >= BACKOFF.reset_after
    if previous is None or long_run:
        assert decision.delay == BACKOFF.initial
    else:
        assert decision.delay == min(previous * 2, BACKOFF.maximum)


def test_backoff_sequence() -> None:
    previous, seen = None, []
    for _ in range(10):
        previous = BACKOFF.next_delay(previous, ran_for=0.01)
        seen.append(previous)
    assert seen == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0, 10.0]
    assert BACKOFF.next_delay(10.0, ran_for=10.0) == 0.1


# ------------------------------------------------------------------ the two spellings


@given(policies)
def test_the_label_spelling_and_the_api_object_round_trip(policy: RestartPolicy) -> None:
    assert RestartPolicy.from_spelling(policy.spelling) == policy
    assert parse_restart_policy(policy.to_json(), "body.restart_policy") == policy
    assert parse_restart_policy(spelling_json(policy.spelling), "x") == policy


@given(st.text(max_size=30))
def test_any_spelling_is_either_a_policy_or_a_clear_refusal(text: str) -> None:
    try:
        policy = RestartPolicy.from_spelling(text)
    except InvalidRequest as exc:
        assert exc.message.startswith("restart policy")
    else:
        assert RestartPolicy.from_spelling(policy.spelling) == policy  # "on-failure:03" reads as on-failure:3


# ------------------------------------------------------------------ reading a container


def labels(**extra: str) -> dict[str, str]:
    return {LABEL_MANAGED: "true", LABEL_STARTED_AT: T0.isoformat(), **extra}


def stopped(status: int, after: float) -> ProcessInfo:
    return ProcessInfo("c", 0, TaskStatus.STOPPED, status, exited_at=T0 + dt.timedelta(seconds=after))


def test_exit_view_of_a_stopped_task() -> None:
    v = exit_view("c", labels(**{LABEL_RESTART_POLICY: "on-failure:2", LABEL_RESTART_COUNT: "1"}), stopped(3, 12.5))
    assert v is not None
    assert v.policy == RestartPolicy(RestartName.ON_FAILURE, 2)
    assert (v.restart_count, v.exit_status, v.ran_for) == (1, 3, 12.5)
    assert (v.run, v.operator_stopped, v.moved) == (T0.isoformat(), False, False)


def test_exit_view_is_none_when_no_run_ended() -> None:
    running = ProcessInfo("c", 42, TaskStatus.RUNNING, 0)
    paused = ProcessInfo("c", 42, TaskStatus.PAUSED, 0)
    created = ProcessInfo("c", 42, TaskStatus.CREATED, 0)  # a target's restored task, not started yet
    assert exit_view("c", labels(), running) is None
    assert exit_view("c", labels(), paused) is None
    assert exit_view("c", labels(), created) is None
    assert exit_view("c", {LABEL_MANAGED: "true"}, None) is None  # created, never started
    assert exit_view("c", {LABEL_STARTED_AT: T0.isoformat()}, stopped(1, 1)) is None  # not ours


def test_exit_view_of_a_lost_task_and_of_marked_containers() -> None:
    lost = exit_view("c", labels(), None)
    assert lost is not None and (lost.exit_status, lost.ran_for, lost.operator_stopped) == (None, None, False)
    by_operator = exit_view("c", labels(**{LABEL_OPERATOR_STOP: T0.isoformat()}), stopped(143, 1))
    assert by_operator is not None and by_operator.operator_stopped
    stopped_before = exit_view("c", labels(**{LABEL_EXIT_STATUS: "0"}), None)  # stop() from before the label
    assert stopped_before is not None and stopped_before.operator_stopped
    moved = exit_view("c", labels(**{LABEL_MIGRATED_TO: "h2"}), stopped(137, 1))
    assert moved is not None and moved.moved
    garbled = exit_view("c", labels(**{LABEL_RESTART_POLICY: "sometimes", LABEL_RESTART_COUNT: "x"}), stopped(1, 1))
    assert garbled is not None and (garbled.policy, garbled.restart_count) == (RestartPolicy(), 0)


def test_a_restart_records_the_exit_it_followed() -> None:
    v = exit_view("c", labels(**{LABEL_RESTART_POLICY: "always", LABEL_RESTART_COUNT: "4"}), stopped(2, 3))
    assert v is not None
    after = restart_labels(v, T0)
    shown = restart_json({**labels(**{LABEL_RESTART_POLICY: "always"}), **after})
    assert shown["count"] == 5 and shown["last_exit_status"] == 2
    assert shown["last_exit_at"] == (T0 + dt.timedelta(seconds=3)).isoformat()
    lost = exit_view("c", labels(), None)
    assert lost is not None
    assert restart_json({**labels(), **restart_labels(lost, T0)})["last_exit_status"] is None


# ------------------------------------------------------------------ the supervisor, over fakes of its interfaces


class FakeExits:
    """TaskExits: each subscription takes the next script (an error ends it; None waits forever)."""

    def __init__(self, *scripts: FerrymanError | None) -> None:
        self.scripts = list(scripts)
        self.subscriptions = 0

    async def task_exits(self) -> AsyncGenerator[TaskExit, None]:
        self.subscriptions += 1
        script = self.scripts.pop(0) if self.scripts else None
        if script is not None:
            raise script
        await asyncio.Event().wait()
        yield TaskExit("never", 0, None)  # pragma: no cover


class FakeContainers:
    """SupervisedContainers: one exited container (`always` unless told) whose restarts fail
    `failures` times; with `exits_at_once`, each new run has exited before its event could come."""

    def __init__(
        self, failures: int = 0, policy: RestartPolicy | None = None, exits_at_once: bool = False
    ) -> None:
        self.view: ExitView | None = view(policy or RestartPolicy(RestartName.ALWAYS), 1)
        self.failures = failures
        self.exits_at_once = exits_at_once
        self.restarts: list[ExitView] = []

    async def exit_view(self, container_id: str) -> ExitView | None:
        return self.view

    async def exit_views(self) -> dict[str, ExitView | None]:
        return {"c": self.view}

    async def restart_exited(self, seen: ExitView) -> ContainerSummary | None:
        self.restarts.append(seen)
        if self.failures:
            self.failures -= 1
            raise ContainerdError("start task c: boom", "UNKNOWN")
        count = seen.restart_count + 1
        self.view = dataclasses.replace(seen, run=f"run-{count}", restart_count=count) if self.exits_at_once else None
        return ContainerSummary("c", "i", ContainerState.RUNNING, 7, None, {}, "", seen.policy, count)


FAST = RestartConfig(initial_delay=0.01, max_delay=0.05, reset_after=10.0, resync_interval=3600.0)


async def until(check: Callable[[], bool], within: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        if check():
            return
        assert loop.time() < deadline, "never happened"
        await asyncio.sleep(0.01)


async def test_a_lost_event_stream_is_subscribed_again_and_the_containers_are_read_again() -> None:
    exits, containers = FakeExits(ContainerdUnavailable("subscribe to events: gone", "UNAVAILABLE")), FakeContainers()
    supervisor = RestartSupervisor(exits, containers, lambda cid: False, FAST)
    supervisor.start()
    try:
        await until(lambda: exits.subscriptions == 2 and len(containers.restarts) == 1)
    finally:
        await supervisor.close()


async def test_a_failed_restart_is_tried_again_after_a_longer_delay() -> None:
    containers = FakeContainers(failures=2)
    supervisor = RestartSupervisor(FakeExits(), containers, lambda cid: False, FAST)
    supervisor.start()
    try:
        await until(lambda: containers.view is None)
    finally:
        await supervisor.close()
    assert len(containers.restarts) == 3


async def test_a_run_that_exits_while_its_restart_is_still_pending_is_not_missed() -> None:
    """The event of a run that exits at once can come before the restart that started it has
    returned; the supervisor reads the container again after each restart."""
    containers = FakeContainers(policy=RestartPolicy(RestartName.ON_FAILURE, 3), exits_at_once=True)
    supervisor = RestartSupervisor(FakeExits(), containers, lambda cid: False, FAST)
    supervisor.start()
    try:
        await until(lambda: len(containers.restarts) == 3)
        await asyncio.sleep(0.2)
    finally:
        await supervisor.close()
    assert [v.restart_count for v in containers.restarts] == [0, 1, 2]


async def test_a_migrating_container_and_a_closing_agent_start_nothing() -> None:
    containers = FakeContainers()
    supervisor = RestartSupervisor(FakeExits(), containers, lambda cid: True, FAST)
    supervisor.start()
    await asyncio.sleep(0.1)
    assert containers.restarts == []
    await supervisor.close()

    slow = RestartSupervisor(FakeExits(), containers, lambda cid: False, dataclasses.replace(FAST, initial_delay=0.05))
    slow.start()
    await asyncio.sleep(0.02)  # the restart waits out its delay
    await slow.close()  # and is dropped with it
    await asyncio.sleep(0.1)
    assert containers.restarts == []
