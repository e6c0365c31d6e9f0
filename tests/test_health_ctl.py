"""`ferryctl run --health-*`: the options become the API's `health` object, checked before sending."""

from __future__ import annotations

from typing import Any

import pytest

from agent.ctl.main import ArgumentError, UsageError, build_parser, container_spec


def spec(*argv: str) -> dict[str, Any]:
    return container_spec(build_parser().parse_args(["run", "--name", "c", *argv, "app:1"]))


@pytest.mark.parametrize(
    ("argv", "health"),
    [
        (["--health-cmd", "pg_isready -q"], {"exec": {"command": ["/bin/sh", "-c", "pg_isready -q"]}}),
        (["--health-http", "8080/healthz"], {"http": {"port": 8080, "path": "/healthz"}}),
        (
            ["--health-http", "[::1]:80", "--health-http-status", "200-299"],
            {"http": {"port": 80, "host": "::1", "status": [200, 299]}},
        ),
        (["--health-tcp", "10.0.0.1:5432"], {"tcp": {"port": 5432, "host": "10.0.0.1"}}),
        (["--health-grpc", "50051/db.v1.Store"], {"grpc": {"port": 50051, "service": "db.v1.Store"}}),
        (
            [
                "--health-tcp",
                "80",
                "--health-interval",
                "500ms",
                "--health-timeout",
                "2s",
                "--health-retries",
                "5",
                "--health-start-period",
                "1m",
                "--health-start-interval",
                "0.1",
            ],
            {
                "tcp": {"port": 80},
                "interval": 0.5,
                "timeout": 2.0,
                "retries": 5,
                "start_period": 60.0,
                "start_interval": 0.1,
            },
        ),
    ],
)
def test_options_make_the_health_object(argv: list[str], health: dict[str, Any]) -> None:
    assert spec(*argv)["health"] == health


def test_no_options_no_check() -> None:
    assert "health" not in spec()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--health-interval", "5s"], "need one of --health-cmd, --health-http, --health-tcp, --health-grpc"),
        (["--health-tcp", "80/x"], "--health-tcp takes [HOST:]PORT"),
        (["--health-tcp", "80", "--health-http-status", "200"], "--health-http-status is for --health-http"),
        (["--health-tcp", "0"], "body.health.tcp.port: expected a positive integer"),
        (["--health-tcp", "80", "--health-retries", "0"], "body.health.retries: expected a positive integer"),
        (["--health-http", "80", "--health-interval", "1ms"], "body.health.interval: must be at least 0.05 s"),
    ],
)
def test_bad_options_are_refused_in_the_apis_words(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace(".", r"\.")):
        spec(*argv)


def test_one_probe_kind_at_a_time() -> None:
    with pytest.raises(ArgumentError, match="--health-cmd: not allowed with argument --health-tcp"):
        build_parser().parse_args(["run", "--health-tcp", "80", "--health-cmd", "true", "app:1"])
