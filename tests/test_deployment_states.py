"""The deployment state table, the record, address allocation and the alert payload: pure, no I/O."""

from __future__ import annotations

import dataclasses

import pytest

from coordinator.alerts import Alert, payload
from coordinator.catalog.model import HealthCheck, HealthCheckKind
from coordinator.deployments.addresses import AddressesExhausted, allocate
from coordinator.deployments.service import agent_health, container_id
from coordinator.deployments.states import (
    ComponentRecord,
    ComponentState,
    DeploymentRecord,
    Event,
    IllegalTransition,
    Recovery,
    State,
    Whereabouts,
    can_undeploy,
    component_health,
    dependents,
    next_state,
    recovery,
    started_in_reverse,
    whereabouts,
)


def _record(state: State = State.PLANNED) -> DeploymentRecord:
    parts = (
        ComponentRecord("detect", "detect@1", "r/detect:1", 0, "10.0.0.2", host="h1", reservation="rsv-1"),
        ComponentRecord("render", "render@1", "r/render:1", 1, "10.0.0.3", host="h2", reservation="rsv-2"),
        ComponentRecord("transcode", "transcode@1", "r/t:1", 2, "10.0.0.4"),
    )
    return DeploymentRecord("transcode-1", "transcode@1", state, parts, created_at=1.0, updated_at=1.0)


def test_a_deployment_that_starts_level_by_level_becomes_healthy_then_removed() -> None:
    r = _record()
    r = r.advance(Event.START, 2.0, level=0)
    r = r.advance(Event.LEVEL_HEALTHY, 3.0, level=1)
    r = r.advance(Event.LEVEL_HEALTHY, 4.0, level=2)
    r = r.advance(Event.ALL_HEALTHY, 5.0)
    assert r.state is State.HEALTHY and r.level == 2
    r = r.advance(Event.UNDEPLOY, 6.0).advance(Event.STOPPED, 7.0)
    assert r.state is State.REMOVED
    assert [s for s, _ in r.history] == ["STARTING", "STARTING", "STARTING", "HEALTHY", "STOPPING", "REMOVED"]


def test_a_failure_rolls_back_to_failed_and_only_healthy_or_failed_undeploys() -> None:
    r = _record().advance(Event.START, 2.0).advance(Event.FAILED, 3.0, failed_component="render", error="boom")
    assert r.state is State.ROLLING_BACK and r.failed_component == "render"
    assert not can_undeploy(r.state)
    r = r.advance(Event.ROLLED_BACK, 4.0)
    assert r.state is State.FAILED and can_undeploy(State.FAILED) and can_undeploy(State.HEALTHY)
    assert not can_undeploy(State.STARTING) and not can_undeploy(State.REMOVED)


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (State.PLANNED, Event.ALL_HEALTHY),  # never healthy without starting
        (State.ROLLING_BACK, Event.ALL_HEALTHY),  # a level that answers late cannot undo a rollback
        (State.HEALTHY, Event.FAILED),  # a later death is not a deployment failure
        (State.REMOVED, Event.UNDEPLOY),
        (State.FAILED, Event.START),
    ],
)
def test_illegal_events_raise_and_leave_the_record_unchanged(state: State, event: Event) -> None:
    r = _record(state)
    with pytest.raises(IllegalTransition):
        r.advance(event, 9.0)
    assert r.state is state and r.updated_at == 1.0
    with pytest.raises(IllegalTransition):
        next_state(state, event)


def test_the_record_survives_storage() -> None:
    r = _record().advance(Event.START, 2.0)
    assert DeploymentRecord.from_storage(r.for_storage()) == r


def test_teardown_takes_what_holds_anything_highest_level_first() -> None:
    r = _record()
    render = r.component("render")
    removed = ComponentRecord(**{**render.__dict__, "state": ComponentState.REMOVED})
    assert [[c.name for c in g] for g in started_in_reverse(r.components)] == [["render"], ["detect"]]
    assert [[c.name for c in g] for g in started_in_reverse((r.component("detect"), removed))] == [["detect"]]


def test_addresses_come_from_the_pool_skipping_those_taken() -> None:
    assert allocate("10.9.0.0/29", {"10.9.0.1", "10.9.0.3"}, 3) == ["10.9.0.2", "10.9.0.4", "10.9.0.5"]
    with pytest.raises(AddressesExhausted, match="has 1 free"):
        allocate("10.9.0.0/30", {"10.9.0.1"}, 2)
    with pytest.raises(AddressesExhausted, match="no \\[deployments\\] address_pool"):
        allocate("", set(), 1)
    # Released addresses come last, the longest released first: a peer's ARP entry for a just
    # released one may still point at its old host.
    released = {"10.9.0.1": 20.0, "10.9.0.2": 10.0, "10.9.0.4": 30.0}
    assert allocate("10.9.0.0/29", set(), 3, released) == ["10.9.0.3", "10.9.0.5", "10.9.0.6"]
    assert allocate("10.9.0.0/29", {"10.9.0.6"}, 5, released) == [
        "10.9.0.3",
        "10.9.0.5",
        "10.9.0.2",
        "10.9.0.1",
        "10.9.0.4",
    ]
    with pytest.raises(AddressesExhausted, match="has 5 free"):
        allocate("10.9.0.0/29", {"10.9.0.6"}, 6, released)
    assert allocate("fd00:77::/64", set(), 2, {"fd00:77::1": 1.0}) == ["fd00:77::2", "fd00:77::3"]


def test_the_catalog_check_becomes_the_agents_on_the_service_address() -> None:
    http = HealthCheck(HealthCheckKind.HTTP, port=8080, path="/healthz", interval=0.5, timeout=0.5, retries=2)
    assert agent_health(http, "10.9.0.2") == {
        "http": {"port": 8080, "host": "10.9.0.2", "path": "/healthz"},
        "interval": 0.5,
        "timeout": 0.5,
        "retries": 2,
        "start_period": 0.0,
    }
    run = HealthCheck(HealthCheckKind.EXEC, command=("cat", "/ok"))
    assert agent_health(run, "10.9.0.2")["exec"] == {"command": ["cat", "/ok"]}


def test_container_ids_stay_within_64_characters_and_distinct() -> None:
    dep = "a" * 63 + "-0011aabb"
    one, two = container_id(dep[:20], "b" * 63), container_id(dep[:20], "b" * 62 + "c")
    assert len(one) <= 64 and len(two) <= 64 and one != two
    assert container_id("render-12345678", "detect") == "render-12345678-detect"


def test_the_alert_is_an_alertmanager_v4_payload() -> None:
    alert = Alert(
        "FerrymanDeploymentFailed", {"deployment": "t-1", "component": "render"}, "failed", "render: boom", 0.0
    )
    body = payload(alert)
    assert body["version"] == "4" and body["status"] == "firing" and len(body["alerts"]) == 1
    one = body["alerts"][0]
    assert one["labels"] == {
        "alertname": "FerrymanDeploymentFailed",
        "severity": "critical",
        "deployment": "t-1",
        "component": "render",
    }
    assert one["startsAt"] == "1970-01-01T00:00:00Z" and one["endsAt"] == "0001-01-01T00:00:00Z"
    assert one["annotations"]["description"] == "render: boom"


def test_a_restarted_coordinator_rolls_back_what_was_starting_and_finishes_what_was_ending() -> None:
    assert {s: recovery(s) for s in State} == {
        State.PLANNED: Recovery.ROLL_BACK,
        State.STARTING: Recovery.ROLL_BACK,
        State.ROLLING_BACK: Recovery.FINISH_ROLLBACK,
        State.STOPPING: Recovery.FINISH_STOP,
        State.HEALTHY: Recovery.NOTHING,
        State.DEGRADED: Recovery.NOTHING,
        State.FAILED: Recovery.NOTHING,
        State.REMOVED: Recovery.NOTHING,
    }


def _running() -> DeploymentRecord:
    """detect <- render <- transcode, every component healthy, the deployment HEALTHY."""
    r = _record(State.HEALTHY)
    requires = {"detect": (), "render": ("detect",), "transcode": ("render",)}
    parts = tuple(dataclasses.replace(c, state=ComponentState.HEALTHY, requires=requires[c.name]) for c in r.components)
    return dataclasses.replace(r, components=parts)


def test_a_component_that_degrades_tells_its_dependents_and_recovers() -> None:
    r = _running()
    assert dependents(r, "detect") == ["render"] and dependents(r, "transcode") == []
    assert component_health(r, "detect", True, "", 2.0) is r  # nothing new
    r = component_health(r, "detect", False, "detect on h1 became stopped", 2.0)
    assert r.state is State.DEGRADED and [s for s, _ in r.history] == ["DEGRADED"]
    parts = {c.name: c for c in r.components}
    assert parts["detect"].state is ComponentState.DEGRADED and parts["detect"].degraded_since == 2.0
    assert parts["detect"].error == "detect on h1 became stopped"
    assert [(c.name, c.waiting_on) for c in r.components] == [
        ("detect", ()),
        ("render", ("detect",)),
        ("transcode", ()),
    ]
    # A second component degrading keeps the deployment DEGRADED; it is HEALTHY once both are back.
    r = component_health(r, "render", False, "render on h2 became unhealthy", 3.0)
    assert r.state is State.DEGRADED and len(r.history) == 1
    assert component_health(r, "render", False, "render on h2 became starting", 3.5) is r
    r = component_health(r, "detect", True, "", 4.0)
    assert r.state is State.DEGRADED and r.component("render").waiting_on == ()
    assert r.component("transcode").waiting_on == ("render",)
    r = component_health(r, "render", True, "", 5.0)
    assert r.state is State.HEALTHY and all(c.waiting_on == () and c.error == "" for c in r.components)
    assert [s for s, _ in r.history] == ["DEGRADED", "HEALTHY"]
    assert DeploymentRecord.from_storage(r.for_storage()) == r
    # Undeploying a degraded deployment is allowed: its teardown is the same.
    assert can_undeploy(State.DEGRADED)


def test_a_resolved_alert_ends() -> None:
    alert = Alert("FerrymanDeploymentComponentDegraded", {"component": "detect"}, "back", "ok", 10.0, ends_at=12.5)
    body = payload(alert)
    assert body["status"] == "resolved" and body["alerts"][0]["status"] == "resolved"
    assert body["alerts"][0]["startsAt"] == "1970-01-01T00:00:10Z"
    assert body["alerts"][0]["endsAt"] == "1970-01-01T00:00:12.500000Z"


def test_a_container_gone_from_its_recorded_host_is_followed_where_it_went() -> None:
    # A migration under way: wait, whatever the telemetry says meanwhile.
    assert whereabouts("h1", ["h1", "h2"], True, None) == (Whereabouts.MOVING, "h1")
    # The target's telemetry reports it (an operator's migration on the agents), or the coordinator's
    # committed migration names the target before that telemetry arrives.
    assert whereabouts("h1", ["h2"], False, None) == (Whereabouts.MOVED, "h2")
    assert whereabouts("h1", [], False, "h3") == (Whereabouts.MOVED, "h3")
    # Telemetry wins over an older committed migration; two hosts reporting it decide nothing.
    assert whereabouts("h1", ["h2"], False, "h3") == (Whereabouts.MOVED, "h2")
    assert whereabouts("h1", ["h2", "h3"], False, None) == (Whereabouts.LOST, "")
    # Nowhere else, and no migration moved it: lost (the component degrades).
    assert whereabouts("h1", ["h1"], False, None) == (Whereabouts.LOST, "")
    assert whereabouts("h1", [], False, "h1") == (Whereabouts.LOST, "")
