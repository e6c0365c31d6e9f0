"""The health state table and the check's spelling, without I/O (agent/health/states.py, spec.py)."""

from __future__ import annotations

import datetime as dt
import json

import pytest
import yaml

from agent.api.server import OPENAPI_PATH
from agent.health.spec import _PROBE_KEYS, _TIMING, HealthCheck, Kind, health_of, parse_health
from agent.health.states import (
    _TRANSITIONS,
    Event,
    HealthRecord,
    IllegalTransition,
    ProbeResult,
    Status,
    classify,
    next_status,
    starting,
)

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def result(passed: bool) -> ProbeResult:
    return ProbeResult(passed, "ok" if passed else "refused", T0, 0.001)


def feed(outcomes: str, retries: int, grace: int = 0) -> list[tuple[Status, int]]:
    """Run probe outcomes ('p' pass, 'f' fail) through classify and the table; the first `grace`
    probes fall in the start period."""
    record = starting(T0)
    seen = []
    for n, outcome in enumerate(outcomes):
        event = classify(outcome == "p", record.status, n < grace, record.failing_streak, retries)
        record = record.advance(event, T0 + dt.timedelta(seconds=n + 1), result(outcome == "p"))
        seen.append((record.status, record.failing_streak))
    return seen


S, H, U = Status.STARTING, Status.HEALTHY, Status.UNHEALTHY


def test_docker_semantics_retries_consecutive_failures() -> None:
    assert feed("ffp", retries=3) == [(S, 1), (S, 2), (H, 0)]
    assert feed("fff", retries=3) == [(S, 1), (S, 2), (U, 3)]  # never healthy, still unhealthy
    assert feed("pffpfff", retries=3) == [(H, 0), (H, 1), (H, 2), (H, 0), (H, 1), (H, 2), (U, 3)]
    assert feed("pfffffp", retries=2) == [(H, 0), (H, 1), (U, 2), (U, 3), (U, 4), (U, 5), (H, 0)]
    assert feed("pf", retries=1) == [(H, 0), (U, 1)]


def test_failures_in_the_start_period_do_not_count_until_the_first_pass() -> None:
    assert feed("ffff", retries=1, grace=3) == [(S, 0), (S, 0), (S, 0), (U, 1)]
    # A pass ends the start period: a failure after it counts, though the period has time left.
    record = starting(T0).advance(Event.PASS, T0, result(True))
    assert classify(False, record.status, True, 0, 1) is Event.FAIL_LIMIT


def test_illegal_events_raise_and_change_nothing() -> None:
    record = HealthRecord(Status.STOPPED, T0)
    with pytest.raises(IllegalTransition, match="pass is not allowed in state stopped"):
        record.advance(Event.PASS, T0, result(True))
    assert record == HealthRecord(Status.STOPPED, T0)
    for status in (H, U):  # the start period is over once healthy: a grace failure is a driver bug
        with pytest.raises(IllegalTransition):
            next_status(status, Event.FAIL_GRACE)
    with pytest.raises(IllegalTransition):
        next_status(U, Event.FAIL)  # unhealthy means the streak is at retries already


def test_every_state_stops_with_its_run_and_starts_over_with_the_next() -> None:
    for status in Status:
        assert _TRANSITIONS[(status, Event.RUN_ENDED)] is Status.STOPPED
        assert _TRANSITIONS[(status, Event.RUN_STARTED)] is Status.STARTING
    record = HealthRecord(U, T0, failing_streak=5, last=result(False))
    stopped = record.advance(Event.RUN_ENDED, T0 + dt.timedelta(seconds=1))
    assert (stopped.status, stopped.failing_streak, stopped.last) == (Status.STOPPED, 5, record.last)
    again = stopped.advance(Event.RUN_STARTED, T0 + dt.timedelta(seconds=2))
    assert (again.status, again.failing_streak, again.since) == (S, 0, T0 + dt.timedelta(seconds=2))


def test_since_moves_only_with_the_status() -> None:
    record = starting(T0).advance(Event.PASS, T0 + dt.timedelta(seconds=1), result(True))
    later = record.advance(Event.FAIL, T0 + dt.timedelta(seconds=2), result(False))
    assert (later.since, later.failing_streak, later.last) == (T0 + dt.timedelta(seconds=1), 1, result(False))
    assert later.to_json()["last"]["result"] == "fail"


def test_checks_round_trip_through_their_label_with_defaults_filled_in() -> None:
    check = parse_health({"http": {"port": 8080}}, "health")
    assert check == HealthCheck(Kind.HTTP, port=8080)
    assert json.loads(check.label()) == {
        "http": {"port": 8080, "host": "127.0.0.1", "path": "/", "status": [200, 399]},
        "interval": 30.0,
        "timeout": 30.0,
        "retries": 3,
        "start_period": 0.0,
    }
    for spelled in (
        {"exec": {"command": ["pg_isready", "-q"]}, "interval": 1, "start_period": 5, "start_interval": 0.1},
        {"grpc": {"port": 50051, "host": "::1", "service": "db"}, "retries": 10, "timeout": 0.5},
        {"tcp": {"port": 5432}, "start_period": 0},
    ):
        parsed = parse_health(spelled, "health")
        assert parsed is not None
        assert health_of({"io.ferryman.health": parsed.label()}) == parsed
    assert parse_health({"grpc": {"port": 1, "host": "::1"}}, "h").target == "grpc://[::1]:1"  # type: ignore[union-attr]


def test_an_unreadable_label_is_no_check() -> None:
    assert health_of({}) is None
    assert health_of({"io.ferryman.health": "{not json"}) is None
    assert health_of({"io.ferryman.health": '{"smoke": {"signal": true}}'}) is None


def test_the_openapi_schema_names_the_fields_the_parser_takes() -> None:
    schemas = yaml.safe_load(OPENAPI_PATH.read_text())["components"]["schemas"]
    check = schemas["HealthCheck"]
    assert set(check["properties"]) == {k.value for k in Kind} | _TIMING
    for kind, (allowed, required) in _PROBE_KEYS.items():
        probe = check["properties"][kind.value]
        assert (set(probe["properties"]), set(probe["required"])) == (allowed, required)
        assert probe["additionalProperties"] is False
    assert schemas["CreateContainerRequest"]["properties"]["health"] == {"$ref": "#/components/schemas/HealthCheck"}
