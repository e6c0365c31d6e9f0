"""Which coordinator replica a client talks to (core/replicas.py): the rules, without I/O."""

from __future__ import annotations

import json

import pytest

from core.replicas import Replicas, not_leader, parse_urls, push_elsewhere, spread


def test_a_client_moves_on_when_a_replica_is_unreachable_and_follows_a_named_leader() -> None:
    r = Replicas(["https://a:1", "https://b:1/", "https://c:1"])
    assert r.current == "https://a:1" and r.budget() == 4
    assert r.unreachable() == "https://b:1"
    assert r.redirected("https://c:1") == "https://c:1"
    assert r.current == "https://c:1"  # kept until it fails
    assert r.unreachable() == "https://a:1"  # wraps around
    # A follower that knows no leader (none elected yet), or names itself: try the next one.
    assert r.redirected("") == "https://b:1"
    assert r.redirected("https://b:1") == "https://c:1"
    # A leader that is not in the list (its advertise_url) is followed; when it fails, the list resumes.
    assert r.redirected("https://leader.example:7543/") == "https://leader.example:7543"
    assert r.unreachable() == "https://a:1"
    with pytest.raises(ValueError):
        Replicas([])


def test_agents_spread_over_the_replicas_by_name() -> None:
    starts = [spread(f"host-{i}", 3) for i in range(3000)]
    assert starts == [spread(f"host-{i}", 3) for i in range(3000)]  # the same every time
    assert all(900 < starts.count(r) < 1100 for r in range(3)), [starts.count(r) for r in range(3)]
    assert Replicas(["https://a:1", "https://b:1"], start=3).current == "https://b:1"
    assert spread("h1", 1) == 0


def test_urls_are_checked() -> None:
    assert parse_urls(["https://a:1/", "https://[::1]:7543"], "x") == ("https://a:1", "https://[::1]:7543")
    for bad, message in {
        "http://a:1": "expected https://host:port",
        "https://a": "expected https://host:port",
        "https://a:1/v1": "expected https://host:port",
        "https://a:99999": "x 'https://a:99999'",
    }.items():
        with pytest.raises(ValueError, match=message):
            parse_urls([bad], "x")
    with pytest.raises(ValueError, match="listed twice"):
        parse_urls(["https://a:1", "https://a:1/"], "x")
    with pytest.raises(ValueError, match="at least one"):
        parse_urls([], "x")


def test_the_leader_named_in_a_not_leader_answer() -> None:
    def body(**error: object) -> str:
        return json.dumps({"error": error})

    assert not_leader(body(code="not_leader", message="m", leader="https://c:1")) == "https://c:1"
    assert not_leader(body(code="not_leader", message="m", leader="")) == ""
    assert not_leader(body(code="not_leader", message="m")) == ""
    assert not_leader(body(code="store_unavailable", message="m")) is None
    assert not_leader("<html>bad gateway</html>") is None
    assert not_leader(json.dumps({"error": "x"})) is None


def test_a_leader_leaving_telemetry_to_the_others_is_recognised() -> None:
    assert push_elsewhere(json.dumps({"error": {"code": "push_elsewhere", "message": "m"}}))
    assert not push_elsewhere(json.dumps({"error": {"code": "not_leader", "message": "m", "leader": ""}}))
    assert not push_elsewhere("<html>service unavailable</html>")
    assert not push_elsewhere(json.dumps({"error": "push_elsewhere"}))
