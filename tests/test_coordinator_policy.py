"""Unit level: the orchestrator and the drain policy over the real SQLite store.

Agents are replaced by `ScriptedAgents` (a fake AgentClient: these tests are about the coordinator's
decisions, retries and limits, not about agents; the real agent API is exercised elsewhere), and the
drain model by `FixedRisk` (probabilities set by the test).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.app import Coordinator
from coordinator.auth import TokenHashes
from coordinator.config import CoordinatorConfig, MigrationLimits, ModelConfig, ReservationConfig
from coordinator.features import HostHistory
from coordinator.history_share import SHARED_BINS, HostShare
from coordinator.model import Capacity, ContainerUsage, Host, HostAdmin, MigrationState, Prediction, Reservation
from coordinator.placement import Need
from coordinator.policy import PRIORITY_LABEL, migration_order
from coordinator.predictions import predictions_to_write, sample_to_point
from coordinator.sqlite_store import SqliteStore
from coordinator.store import TelemetryUpdate

GiB = 1 << 30
WAIT = 10.0


class ScriptedAgents:
    """Answers like agents would; `outcomes[target]` is the final state of migrations to that target."""

    def __init__(self) -> None:
        self.outcomes: dict[str, list[str]] = {}
        self.held: dict[str, str] = {}  # reservation id -> host
        self.released: list[str] = []
        self.started: list[tuple[str, str, str]] = []  # (container, source, target)
        self.running = 0
        self.max_running = 0
        self.into: dict[str, int] = {}
        self.max_into: dict[str, int] = {}
        self._records: dict[str, dict[str, Any]] = {}
        self._started_with: dict[str, tuple[str, str]] = {}  # agent id -> (container, reservation)
        self.gate = asyncio.Event()
        self.gate.set()

    async def hold_reservation(self, host: Host, reservation: Reservation) -> bool:
        self.held[reservation.id] = host.name
        return True

    async def release_reservation(self, host: Host, reservation_id: str) -> None:
        self.released.append(reservation_id)

    async def start_migration(
        self, source: Host, container: str, target: str, reservation_id: str, options: dict[str, Any]
    ) -> dict[str, Any]:
        assert reservation_id in self.held and self.held[reservation_id] == target
        self.started.append((container, source.name, target))
        self._started_with[f"agent-{len(self.started)}"] = (container, reservation_id)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        self.into[target] = self.into.get(target, 0) + 1
        self.max_into[target] = max(self.max_into.get(target, 0), self.into[target])
        record = {"id": f"agent-{len(self.started)}", "state": "PREPARE", "target": target, "polls": 0}
        self._records[record["id"]] = record
        return dict(record)

    async def get_migration(self, source: Host, migration_id: str) -> dict[str, Any]:
        record = self._records[migration_id]
        record["polls"] += 1
        if record["polls"] >= 3 and record["state"] == "PREPARE" and self.gate.is_set():
            script = self.outcomes.get(record["target"], ["COMMIT"])
            record["state"] = script.pop(0) if len(script) > 1 else script[0]
            record["error"] = "restore failed" if record["state"] == "ROLLBACK" else None
            self.running -= 1
            self.into[record["target"]] -= 1
        return dict(record)

    async def list_containers(self, host: Host) -> list[dict[str, Any]]:
        return []

    async def list_migrations(self, source: Host) -> list[dict[str, Any]]:
        return [
            {"role": "source", "container": c, "options": {"reservation": r}, **self._records[i]}
            for i, (c, r) in self._started_with.items()
        ]

    async def close(self) -> None:
        pass


class FixedRisk:
    version = "fixed-1"
    threshold = 0.5

    def __init__(self) -> None:
        self.p: dict[str, float] = {}

    def score(self, histories: Mapping[str, Sequence[Any]], now: float) -> dict[str, float]:
        assert all(isinstance(h, HostHistory) for h in histories.values())
        return {host: self.p.get(host, 0.01) for host in histories}


def _config(confirm_ticks: int = 1, **limits: Any) -> CoordinatorConfig:
    return CoordinatorConfig(
        migrations=MigrationLimits(poll_period=0.01, **limits),
        model=ModelConfig(hysteresis=0.1, tick_period=0.05, confirm_ticks=confirm_ticks),
    )


@pytest.fixture
async def store(workdir: Path) -> AsyncIterator[SqliteStore]:
    s = await SqliteStore.open(workdir / "c.db")
    try:
        yield s
    finally:
        await s.close()


async def _coordinator(
    store: SqliteStore, agents: ScriptedAgents, model: FixedRisk | None = None, **limits: Any
) -> Coordinator:
    return Coordinator(_config(**limits), store, agents, TokenHashes(), model, time.time)


async def _fleet(store: SqliteStore, containers: Sequence[ContainerUsage] = ()) -> None:
    for name in ("h1", "h2", "h3", "h4"):
        await store.register_host(
            Host(name=name, capacity=Capacity(8000, 8 * GiB, 0), api_url=f"https://{name}.test:7444")
        )
    await _report(store, "h1", containers)


async def _report(store: SqliteStore, host: str, containers: Sequence[ContainerUsage]) -> None:
    now = time.time()
    used = Capacity(int(sum(c.cpu_millis for c in containers)), sum(c.memory_bytes for c in containers), 0)
    sample = {"ts": now, "cpu_util": 0.5, "cpus": 4, "load1": "2.0", "memory_total_bytes": str(8 * GiB)}
    await store.record_telemetry(TelemetryUpdate(host, [(now, sample)], now, used, tuple(containers), {}), 100, 3600)


def _transitions(coordinator: Coordinator) -> dict[str, float]:
    """ferryman_coordinator_migration_transitions_total by state, the states never entered left out."""
    counted = {
        s.labels["state"]: s.value
        for metric in coordinator.metrics.registry.collect()
        if metric.name == "ferryman_coordinator_migration_transitions"
        for s in metric.samples
        if s.name.endswith("_total")
    }
    return {state: n for state, n in counted.items() if n}


def _usage(cid: str, memory: int = GiB, priority: str | None = None) -> ContainerUsage:
    labels = {PRIORITY_LABEL: priority} if priority is not None else {}
    return ContainerUsage(id=cid, image="busybox", memory_bytes=memory, cpu_millis=100.0, labels=labels)


async def test_a_rolled_back_migration_is_retried_on_another_target(store: SqliteStore) -> None:
    agents = ScriptedAgents()
    await _fleet(store, [_usage("web")])
    coordinator = await _coordinator(store, agents)
    try:
        first = (await coordinator.placer.rank(Need(Capacity(100, GiB, 0)), exclude={"h1"}))[0].host
        agents.outcomes[first] = ["ROLLBACK"]
        migration = await coordinator.migrations.request("web", "auto", requested_by="alice")
        done = await coordinator.migrations.wait(migration.id, WAIT)
        assert done.state is MigrationState.COMMITTED, done
        assert done.attempt == 2 and done.tried_targets[0] == first and done.target != first
        # The request, then each attempt's intent (recorded before the agent is asked) and its course.
        states = ["pending", "pending", "running", "failed", "pending", "running", "committed"]
        assert [h[0] for h in done.history] == states
        assert "restore failed" in done.history[3][2]
        assert _transitions(coordinator) == {"pending": 3, "running": 2, "failed": 1, "committed": 1}
        no_model = coordinator.metrics.registry.get_sample_value("ferryman_coordinator_drain_threshold")
        assert no_model is not None and no_model > 1  # without a model: above any probability, never an alert
        # Our reservations are gone; the agent was asked to drop the rolled-back one only (it drops
        # the committed one itself).
        assert await store.list_reservations() == []
        assert len(agents.released) == 1 and agents.held[agents.released[0]] == first
        kinds = [d.kind for d in await store.list_decisions("h1")]
        assert kinds[:2] == ["retry", "migrate"]
    finally:
        await coordinator.close()


async def test_a_named_target_is_tried_once_and_bounds_hold(store: SqliteStore) -> None:
    agents = ScriptedAgents()
    agents.outcomes = {"h2": ["ROLLBACK"], "h3": ["ROLLBACK"], "h4": ["ROLLBACK"]}
    await _fleet(store, [_usage("web"), _usage("db")])
    coordinator = await _coordinator(store, agents, max_attempts=2)
    try:
        named = await coordinator.migrations.request("web", "h3")
        auto = await coordinator.migrations.request("db", "auto")
        named_done = await coordinator.migrations.wait(named.id, WAIT)
        auto_done = await coordinator.migrations.wait(auto.id, WAIT)
        assert named_done.state is MigrationState.ABANDONED and named_done.tried_targets == ("h3",)
        assert auto_done.state is MigrationState.ABANDONED and len(auto_done.tried_targets) == 2
        assert _transitions(coordinator) == {"pending": 5, "running": 3, "failed": 3, "abandoned": 2}
        assert len(set(auto_done.tried_targets)) == 2
        assert "give_up" in [d.kind for d in await store.list_decisions("h1")]
        assert await store.list_reservations() == []
    finally:
        await coordinator.close()


async def test_needs_operator_ends_the_migration_without_a_retry(store: SqliteStore) -> None:
    """The agents could not decide (post-copy lost, the source frozen): finished, failed, and never
    retried elsewhere, since another attempt would only move (or fail on) a frozen copy."""
    agents = ScriptedAgents()
    agents.outcomes = {h: ["NEEDS_OPERATOR"] for h in ("h2", "h3", "h4")}
    await _fleet(store, [_usage("web")])
    coordinator = await _coordinator(store, agents, max_attempts=3)
    try:
        migration = await coordinator.migrations.request("web", "auto")
        done = await coordinator.migrations.wait(migration.id, WAIT)
        assert done.state is MigrationState.ABANDONED and done.done, done
        assert done.attempt == 1 and len(agents.started) == 1
        assert done.error.startswith("needs the operator"), done.error
        kinds = [d.kind for d in await store.list_decisions("h1")]
        assert "needs_operator" in kinds and "retry" not in kinds
        assert await store.list_reservations() == []
    finally:
        await coordinator.close()


async def test_a_timed_out_attempt_is_never_retried(store: SqliteStore) -> None:
    """The agent has not finished when the attempt times out (it may be committing): the coordinator
    gives up on that migration instead of starting a second one that could move the workload twice."""
    agents = ScriptedAgents()
    agents.gate.clear()  # the agent's migration does not finish while the coordinator waits
    await _fleet(store, [_usage("web")])
    coordinator = await _coordinator(store, agents, max_attempts=3, timeout=0.3)
    try:
        migration = await coordinator.migrations.request("web", "auto")
        done = await coordinator.migrations.wait(migration.id, WAIT)
        assert done.state is MigrationState.ABANDONED and "not retried" in done.error, done
        assert done.attempt == 1 and len(agents.started) == 1
        kinds = [d.kind for d in await store.list_decisions("h1")]
        assert "give_up" in kinds and "retry" not in kinds
        assert agents.released == []  # the agent's reservation stays with the migration still running
        agents.gate.set()  # the agent finishes later: still only the one migration
        await asyncio.sleep(0.2)
        assert len(agents.started) == 1
    finally:
        await coordinator.close()


async def test_the_sweeper_releases_expired_reservations_here_and_on_the_agent(store: SqliteStore) -> None:
    agents = ScriptedAgents()
    await _fleet(store)
    config = _config()
    config = CoordinatorConfig(
        migrations=config.migrations, model=config.model, reservations=ReservationConfig(sweep_period=0.05)
    )
    coordinator = Coordinator(config, store, agents, TokenHashes(), None, time.time)
    await coordinator.start()
    try:
        short = await coordinator.reservations.reserve("h2", Capacity(100, GiB, 0), "test", ttl=0.3)
        long = await coordinator.reservations.reserve("h3", Capacity(100, GiB, 0), "test", ttl=600)
        assert {r.id for r in await store.list_reservations()} == {short.id, long.id}
        for _ in range(100):  # the sweeper runs every 0.05 s
            if short.id in agents.released:
                break
            await asyncio.sleep(0.05)
        assert agents.released == [short.id]
        assert [r.id for r in await store.list_reservations()] == [long.id]
    finally:
        await coordinator.close()


async def test_concurrency_limits_hold(store: SqliteStore) -> None:
    agents = ScriptedAgents()
    await _fleet(store, [_usage(f"c{i}", memory=GiB // 4) for i in range(6)])
    coordinator = await _coordinator(store, agents, max_per_host=2, max_per_fleet=2)
    try:
        requests = [await coordinator.migrations.request(f"c{i}", "auto") for i in range(6)]
        done = [await coordinator.migrations.wait(m.id, WAIT) for m in requests]
        assert all(m.state is MigrationState.COMMITTED for m in done)
        assert agents.max_running == 2
    finally:
        await coordinator.close()


async def test_targets_receive_at_most_max_per_host(store: SqliteStore) -> None:
    agents = ScriptedAgents()
    # h1 and h2 are nearly full and h4 is drained, so h3 is the only possible target for all six.
    big = 5 * GiB // 2
    await _fleet(store, [_usage(f"a{i}", memory=big) for i in range(3)])
    await _report(store, "h2", [_usage(f"b{i}", memory=big) for i in range(3)])
    await store.set_admin("h4", HostAdmin.DRAINED)
    coordinator = await _coordinator(store, agents, max_per_host=1, max_per_fleet=8)
    try:
        requests = [await coordinator.migrations.request(f"{p}{i}", "auto") for p in "ab" for i in range(3)]
        done = [await coordinator.migrations.wait(m.id, WAIT) for m in requests]
        assert all(m.state is MigrationState.COMMITTED for m in done), done
        assert {s[2] for s in agents.started} == {"h3"}
        assert agents.max_into == {"h3": 1}  # both sources wanted h3 at once: one waited
    finally:
        await coordinator.close()


def test_drain_order_is_priority_then_memory() -> None:
    containers = (
        _usage("small", GiB),
        _usage("big", 4 * GiB),
        _usage("vip", GiB // 2, priority="10"),
        _usage("bad-label", 8 * GiB, priority="high"),
    )
    assert [c.id for c in migration_order(containers)] == ["vip", "bad-label", "big", "small"]


async def test_policy_drains_on_risk_with_hysteresis_and_records_why(store: SqliteStore) -> None:
    agents = ScriptedAgents()
    agents.gate.clear()  # migrations stay in flight until the test lets them finish
    model = FixedRisk()
    await _fleet(store, [_usage("web", GiB), _usage("vip", GiB // 2, priority="5")])
    coordinator = await _coordinator(store, agents, model, max_per_host=1)
    try:
        for host in ("h2", "h3", "h4"):
            await _report(store, host, [])
        threshold = coordinator.metrics.registry.get_sample_value
        assert threshold("ferryman_coordinator_drain_threshold") == model.threshold  # what the alert compares to
        model.p = {"h1": 0.45}
        await coordinator.policy.tick()
        assert (await store.get_host("h1")).admin is HostAdmin.ACTIVE  # type: ignore[union-attr]

        model.p = {"h1": 0.8, "h2": 0.6}
        await coordinator.policy.tick()
        hosts = {h.name: h for h in await store.list_hosts()}
        # h2 runs nothing: drained in the same tick. h1's containers are planned, vip first.
        assert hosts["h1"].admin is HostAdmin.DRAINING and hosts["h2"].admin is HostAdmin.DRAINED
        decision = next(d for d in await store.list_decisions("h1") if d.kind == "drain")
        assert decision.probability == 0.8 and decision.model_version == "fixed-1"
        assert decision.detail == "predicted: model fixed-1: P=0.800"  # FixedRisk cannot explain itself
        model.p = {"h1": 0.45, "h2": 0.45}  # inside the hysteresis band: no flapping
        await coordinator.policy.tick()
        assert (await store.get_host("h2")).admin is HostAdmin.DRAINED  # type: ignore[union-attr]
        assert (await store.get_host("h1")).admin is HostAdmin.DRAINING  # type: ignore[union-attr]
        planned = await store.list_migrations()
        assert [m.container for m in planned] == ["vip", "web"]
        assert all(m.reason.startswith("drain:") and m.requested_by == "policy" for m in planned)
        for _ in range(200):  # max_per_host=1: the second waits for the first
            if agents.started:
                break
            await asyncio.sleep(0.01)
        assert [s[0] for s in agents.started] == ["vip"]
        assert all(s[2] not in ("h1", "h2") for s in agents.started)  # never onto a draining host

        agents.gate.set()
        for m in planned:
            assert (await coordinator.migrations.wait(m.id, WAIT)).state is MigrationState.COMMITTED
        await coordinator.policy.tick()  # telemetry still lists them, but both were committed away
        assert (await store.get_host("h1")).admin is HostAdmin.DRAINED  # type: ignore[union-attr]

        # A policy drain is undone only below threshold - hysteresis; a drained host stays drained.
        await coordinator.hosts.uncordon("h1", "test")
        await coordinator.hosts.drain("h1", "predicted", probability=0.7, model_version="fixed-1")
        await _report(store, "h1", [])
        model.p = {"h1": 0.39}
        await coordinator.policy.tick()
        assert (await store.get_host("h1")).admin is HostAdmin.ACTIVE  # type: ignore[union-attr]
        undo = [d for d in await store.list_decisions("h1") if d.kind == "uncordon"]
        assert undo[0].probability == 0.39
    finally:
        await coordinator.close()


async def test_migrations_resume_after_a_restart(store: SqliteStore) -> None:
    agents = ScriptedAgents()
    agents.gate.clear()
    await _fleet(store, [_usage("web")])
    first = await _coordinator(store, agents)
    migration = await first.migrations.request("web", "auto")
    for _ in range(200):
        if (await store.get_migration(migration.id)).state is MigrationState.RUNNING:  # type: ignore[union-attr]
            break
        await asyncio.sleep(0.01)
    await first.migrations.close()  # the coordinator stops mid-migration
    agents.gate.set()
    second = await _coordinator(store, agents)
    try:
        assert await second.migrations.resume() == 1
        done = await second.migrations.wait(migration.id, WAIT)
        assert done.state is MigrationState.COMMITTED and done.attempt == 1
        assert len(agents.started) == 1  # followed, not started again
    finally:
        await second.close()


def test_stored_samples_become_model_points() -> None:
    sample = {
        "ts": 10.0,
        "cpu_util": 0.5,
        "load1": 2.0,
        "cpus": 4,
        "memory_total_bytes": "1000",
        "memory_available_bytes": "250",
        "pressure": {"memory_some": 3.5},
        "disk_read_bps": 10.0,
        "net_tx_bps": 7.0,
        "events": [{"kind": "HW_ERROR", "ts": 9.0}, {"kind": "HW_ERROR"}, {"kind": "DRAIN_NOTICE"}],
    }
    point = sample_to_point(10.0, sample)
    assert point.load1 == 0.5 and point.mem_available_frac == 0.25 and point.psi_mem_some == 3.5
    assert point.psi_cpu_some is None and point.disk_bps == 10.0 and point.net_bps == 7.0
    assert point.hw_errors == 2 and point.drain_notice == 1 and point.oom_kills == 0
    empty = sample_to_point(11.0, {"ts": 11.0})
    assert empty.cpu_util is None and empty.load1 is None and empty.mem_available_frac is None


async def _report_notice(store: SqliteStore, host: str, deadline: float, source: str = "aws-spot") -> None:
    now = time.time()
    event = {"kind": "PREEMPTION", "ts": now, "deadline": deadline, "source": source, "detail": "terminate"}
    sample = {"ts": now, "cpu_util": 0.5, "cpus": 4, "memory_total_bytes": str(8 * GiB), "events": [event]}
    await store.record_telemetry(TelemetryUpdate(host, [(now, sample)], now, Capacity(), (), {}), 100, 3600)


async def test_a_notice_with_a_stated_time_drains_whatever_the_model_says(store: SqliteStore) -> None:
    model = FixedRisk()
    await _fleet(store)
    coordinator = await _coordinator(store, ScriptedAgents(), model, confirm_ticks=3)
    try:
        for host in ("h2", "h3", "h4"):
            await _report(store, host, [])
        await _report_notice(store, "h3", time.time() + 120)
        await _report_notice(store, "h4", time.time() + 7200)  # beyond the horizon: not yet
        model.p = {"h3": 0.01}
        await coordinator.policy.tick()
        assert (await store.get_host("h3")).admin is HostAdmin.DRAINED  # type: ignore[union-attr]
        assert (await store.get_host("h4")).admin is HostAdmin.ACTIVE  # type: ignore[union-attr]
        (decision,) = [d for d in await store.list_decisions("h3") if d.kind == "drain"]
        assert decision.probability == 1.0
        assert decision.detail.startswith("notice: notice aws-spot (deadline ") and "terminate" in decision.detail
        explanation = coordinator.predictions.explanations["h3"]
        assert explanation.model_probability == 0.01 and explanation.notice is not None
        assert explanation.to_dict()["source"] == "notice"
        # the model falling does not return a notice drain to service
        await coordinator.policy.tick()
        assert (await store.get_host("h3")).admin is HostAdmin.DRAINED  # type: ignore[union-attr]
    finally:
        await coordinator.close()


async def test_model_alarms_need_confirmation_and_respect_the_false_alarm_budget(store: SqliteStore) -> None:
    model = FixedRisk()
    agents = ScriptedAgents()
    agents.gate.clear()  # h2's migration stays in flight: the drain is still running when it is cancelled
    await _fleet(store)
    config = CoordinatorConfig(
        migrations=MigrationLimits(poll_period=0.01),
        model=ModelConfig(hysteresis=0.1, tick_period=0.05, confirm_ticks=2, false_alarm_budget=1),
    )
    coordinator = Coordinator(config, store, agents, TokenHashes(), model, time.time)
    try:
        await _report(store, "h2", [_usage("web", GiB)])
        for host in ("h3", "h4"):
            await _report(store, host, [])
        model.p = {"h2": 0.9}
        await coordinator.policy.tick()
        assert (await store.get_host("h2")).admin is HostAdmin.ACTIVE  # type: ignore[union-attr]
        model.p = {"h2": 0.2}  # one tick above: a blip, the streak restarts
        await coordinator.policy.tick()
        model.p = {"h2": 0.9}
        await coordinator.policy.tick()
        assert (await store.get_host("h2")).admin is HostAdmin.ACTIVE  # type: ignore[union-attr]
        await coordinator.policy.tick()
        assert (await store.get_host("h2")).admin is HostAdmin.DRAINING  # type: ignore[union-attr]
        # the host is returned to service before its drain finished: a false alarm, the budget (1) is spent
        await coordinator.hosts.uncordon("h2", "false alarm")
        agents.gate.set()
        await coordinator.policy.tick()
        await coordinator.policy.tick()
        assert (await store.get_host("h2")).admin is HostAdmin.ACTIVE  # type: ignore[union-attr]
        suppressed = [d for d in await store.list_decisions("h2") if d.kind == "suppressed"]
        assert len(suppressed) == 1 and suppressed[0].detail.startswith("false-alarm budget spent (1 in ")
        # a notice still drains it
        await _report_notice(store, "h2", time.time() + 60, source="systemd-shutdown")
        coordinator.predictions._histories.pop("h2")  # re-read from the store, as after a restart
        await coordinator.policy.tick()
        assert (await store.get_host("h2")).admin is not HostAdmin.ACTIVE  # type: ignore[union-attr]
        assert next(d for d in await store.list_decisions("h2") if d.kind == "drain").detail.startswith("notice:")
    finally:
        await coordinator.close()


def test_predictions_to_write_crossings_first_then_deadband_refresh_and_model() -> None:
    stored = {
        "calm": Prediction("calm", 100.0, 0.10, "v1"),
        "moved": Prediction("moved", 100.0, 0.10, "v1"),
        "rising": Prediction("rising", 100.0, 0.45, "v1"),
        "falling": Prediction("falling", 100.0, 0.70, "v1"),
        "old": Prediction("old", 0.0, 0.10, "v1"),
        "retrained": Prediction("retrained", 100.0, 0.10, "v0"),
    }
    scored = [
        Prediction("calm", 110.0, 0.14, "v1"),  # within the deadband
        Prediction("moved", 110.0, 0.16, "v1"),
        Prediction("rising", 110.0, 0.50, "v1"),  # at the threshold counts as above
        Prediction("falling", 110.0, 0.49, "v1"),
        Prediction("old", 110.0, 0.10, "v1"),
        Prediction("retrained", 110.0, 0.10, "v1"),
        Prediction("new", 110.0, 0.20, "v1"),
        Prediction("new-alarm", 110.0, 0.90, "v1"),
    ]
    before, after = predictions_to_write(stored, scored, threshold=0.5, deadband=0.05, refresh=100.0)
    assert [p.host for p in before] == ["rising", "falling", "new-alarm"]
    assert [p.host for p in after] == ["moved", "old", "retrained", "new"]


async def test_a_prediction_is_stored_when_it_matters_and_the_rest_after_the_decisions(store: SqliteStore) -> None:
    model = FixedRisk()
    await _fleet(store)
    for host in ("h2", "h3", "h4"):
        await _report(store, host, [])
    start = time.time()
    offset = [0.0]
    config = CoordinatorConfig(
        model=ModelConfig(tick_period=5.0, confirm_ticks=1, prediction_deadband=0.05, prediction_refresh=100.0)
    )
    coordinator = Coordinator(config, store, ScriptedAgents(), TokenHashes(), model, lambda: start + offset[0])

    async def stored() -> dict[str, tuple[float, float]]:
        return {h: (p.ts - start, p.probability) for h, p in (await store.latest_predictions()).items()}

    try:
        model.p = dict.fromkeys(("h1", "h2", "h3", "h4"), 0.01)
        await coordinator.policy.tick()
        await coordinator.predictions.flush()
        assert await stored() == dict.fromkeys(("h1", "h2", "h3", "h4"), (0.0, 0.01))

        offset[0] = 5.0
        model.p = {"h1": 0.03, "h2": 0.2, "h3": 0.6, "h4": 0.01}
        await coordinator.policy.tick()
        # h3 crossed the threshold: stored before its drain; h2's move follows the tick.
        assert (await stored())["h3"] == (5.0, 0.6)
        assert (await store.get_host("h3")).admin is HostAdmin.DRAINED  # type: ignore[union-attr]
        await coordinator.predictions.flush()
        assert await stored() == {"h1": (0.0, 0.01), "h2": (5.0, 0.2), "h3": (5.0, 0.6), "h4": (0.0, 0.01)}

        offset[0] = 100.0  # h1 and h4 were stored 100 s ago: refreshed; h2 and h3 not yet
        await coordinator.policy.tick()
        await coordinator.predictions.flush()
        assert await stored() == {"h1": (100.0, 0.03), "h2": (5.0, 0.2), "h3": (5.0, 0.6), "h4": (100.0, 0.01)}

        # Another leader stored h1 above the threshold meanwhile; leading again reads the store, so
        # h1 falling back is stored at once (by the memory of its own writes it had not moved).
        await store.record_predictions([Prediction("h1", start + 101.0, 0.9, "fixed-1")])
        await coordinator.predictions.lead()
        offset[0] = 102.0
        await coordinator.policy.tick()
        assert (await stored())["h1"] == (102.0, 0.03)
    finally:
        await coordinator.close()


async def test_a_tick_times_each_of_its_phases(store: SqliteStore) -> None:
    agents = ScriptedAgents()
    await _fleet(store)
    coordinator = await _coordinator(store, agents, FixedRisk())
    phases = ("list", "prepare", "score", "store", "decide")

    def observed(phase: str) -> float | None:
        return coordinator.metrics.registry.get_sample_value(
            "ferryman_coordinator_tick_phase_seconds_count", {"phase": phase}
        )

    try:
        assert [observed(p) for p in phases] == [None] * 5
        await coordinator.policy.tick()
        await coordinator.policy.tick()
        # Every phase once per tick: a slow tick's time can be found in one of them.
        assert [observed(p) for p in phases] == [2.0] * 5
        total = sum(
            coordinator.metrics.registry.get_sample_value("ferryman_coordinator_tick_phase_seconds_sum", {"phase": p})
            or 0.0
            for p in phases
        )
        assert total > 0.0
    finally:
        await coordinator.close()


class SeenRisk(FixedRisk):
    """Records the histories each tick scored."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, HostHistory] = {}

    def score(self, histories: Mapping[str, Sequence[Any]], now: float) -> dict[str, float]:
        self.seen = dict(histories)  # type: ignore[arg-type]
        return super().score(histories, now)


class FollowerShares:
    """The other replicas' shares as an etcd store's watch would have them (HistoryExchange)."""

    def __init__(self) -> None:
        self.shares: dict[str, tuple[int, dict[str, Any]]] = {}

    def peer_shares(self) -> dict[str, tuple[int, dict[str, Any]]]:
        return dict(self.shares)


async def test_followers_shares_are_taken_between_ticks_not_while_scoring(store: SqliteStore) -> None:
    model = SeenRisk()
    await _fleet(store)
    coordinator = await _coordinator(store, ScriptedAgents(), model)
    exchange = FollowerShares()
    coordinator.predictions.read_shares_from(exchange)
    now = time.time()
    part = HostHistory.from_points(sample_to_point(now - 5 * i, {"cpu_util": 0.3 + i / 100}) for i in range(24))
    share = HostShare(part.recent_bins(SHARED_BINS)).to_json()
    try:
        # A scoring thread reads the histories: nothing is taken, and the share gone before the
        # next tick was never scored.
        exchange.shares = {"h2": (7, {"https://c1:7543": share})}
        coordinator.predictions._scoring = True
        await coordinator.predictions.take_shares()
        coordinator.predictions._scoring = False
        exchange.shares = {}
        await coordinator.policy.tick()
        assert "h2" not in model.seen
        # Taken between ticks: the tick scores the follower's part though its key moved on since.
        exchange.shares = {"h2": (8, {"https://c1:7543": share})}
        await coordinator.predictions.take_shares()
        exchange.shares = {}
        await coordinator.policy.tick()
        assert np.array_equal(model.seen["h2"].window(now), part.window(now))
    finally:
        await coordinator.close()
