"""ferryctl's migration commands against a real API server on a unix socket, over the fake service.

The fake migration service (tests/test_api_migrations.py) walks records through the states on a
timer; `web*` commit, `doomed*` roll back. ferryctl's `main()` calls asyncio.run, so it runs in a
worker thread while the server and the fake run on the test's loop.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.api import ApiServer, build_app, serve
from agent.ctl.main import main
from agent.ctl.render import MigrationView, human_ms, migration_details, migration_result
from agent.migration.record import MigrationOptions
from tests.test_api_migrations import FakeAgent, FakeMigrations, _broken_watch


@pytest.fixture
def agent() -> FakeAgent:
    return FakeAgent()


@pytest.fixture
async def server(agent: FakeAgent, short_dir: Path) -> AsyncIterator[ApiServer]:
    srv = await serve(build_app(agent), f"unix://{short_dir}/agent.sock")  # type: ignore[arg-type]
    yield srv
    agent.migrations.release.set()
    await agent.migrations.wait_idle()
    await srv.close()


async def ctl(server: ApiServer, *argv: str) -> int:
    return await asyncio.to_thread(main, ["--agent", server.url, *argv])


async def test_migrate_committed(server: ApiServer, agent: FakeAgent, capsys: pytest.CaptureFixture[str]) -> None:
    assert await ctl(server, "migrate", "web", "--to", "host-b", "--downtime-target", "150",
                     "--max-iterations", "4") == 0
    captured = capsys.readouterr()
    out = captured.out
    assert out.startswith("migration mig-0001 committed: web -> host-b\n")
    assert "state        COMMIT" in out
    assert "downtime     182.4 ms (target 150 ms)" in out
    assert "total time   4.21 s" in out
    assert "iterations   3 (pages per round: 25600, 1200, 300), read by proc-mem" in out
    assert "sent         105.9 MiB raw, 26.5 MiB on the wire (compression 4.00x)" in out
    assert "criu         freeze+dump 120.3 ms, restore 90.1 ms" in out
    assert "stop reason  dirty_set_small" in out
    assert "error" not in out and "error" not in captured.err
    assert agent.migrations.calls == [("web", "host-b", MigrationOptions(150, 4))]


async def test_a_missed_downtime_target_is_flagged_but_not_a_failure(
    server: ApiServer, capsys: pytest.CaptureFixture[str]
) -> None:
    # Exit 0: the workload moved (not a failure to retry); the missed budget is said on stderr.
    assert await ctl(server, "migrate", "late", "--to", "host-b", "--downtime-target", "150") == 0
    captured = capsys.readouterr()
    assert "downtime     182.4 ms (target 150 ms, missed)" in captured.out
    assert captured.err.endswith(
        "warning: downtime_target_missed: the workload was frozen 182.4 ms, over its target of 150 ms\n"
    )


async def test_migrate_rolled_back(server: ApiServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert await ctl(server, "migrate", "doomed", "--to", "host-b") == 4  # not migrated
    captured = capsys.readouterr()
    assert "rolled back: doomed -> host-b" in captured.out
    assert "error        target restore failed: CRIU said no" in captured.out
    assert captured.err.endswith("error: rolled_back: target restore failed: CRIU said no\n")


async def test_migrate_json(server: ApiServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert await ctl(server, "--json", "migrate", "web", "--to", "host-b") == 0
    record = json.loads(capsys.readouterr().out)
    assert record["state"] == "COMMIT" and record["done"] is True and record["stats"]["iterations"] == 3
    assert await ctl(server, "--json", "migrate", "doomed", "--to", "host-b") == 4
    assert json.loads(capsys.readouterr().out)["state"] == "ROLLBACK"


async def test_migrate_refused(server: ApiServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert await ctl(server, "migrate", "ghost", "--to", "host-b") == 1
    assert capsys.readouterr().err.endswith("error: container_not_found: no container ghost\n")
    assert await ctl(server, "migrate", "web", "--to", "nowhere") == 1
    assert "error: unknown_peer: " in capsys.readouterr().err


async def test_migrate_stream_error(
    server: ApiServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(FakeMigrations, "watch", _broken_watch)
    assert await ctl(server, "migrate", "web", "--to", "host-b") == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.endswith("error: conflict: the journal is unreadable\n")


def test_migrate_usage(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["migrate", "web"], ["migrate", "web", "--to", "h", "--downtime-target", "0"],
                 ["migrate", "web", "--to", "h", "--max-iterations", "many"]):
        assert main(argv) == 2
    assert "--to" in capsys.readouterr().err


async def test_migrations_list_and_show(
    server: ApiServer, agent: FakeAgent, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await ctl(server, "--json", "migrations") == 0
    assert json.loads(capsys.readouterr().out) == {"migrations": []}
    assert await ctl(server, "--json", "migrate", "web", "--to", "host-b") == 0
    assert await ctl(server, "--json", "migrate", "doomed", "--to", "host-b") == 4
    capsys.readouterr()

    assert await ctl(server, "--json", "migrations") == 0
    listed = json.loads(capsys.readouterr().out)["migrations"]
    assert [(m["id"], m["container"], m["state"]) for m in listed] == [
        ("mig-0001", "web", "COMMIT"),
        ("mig-0002", "doomed", "ROLLBACK"),
    ]

    assert await ctl(server, "migrations") == 0
    out = capsys.readouterr().out
    for text in ("ID", "ROLE", "CONTAINER", "PEER", "STATE", "DOWNTIME", "TOTAL", "STARTED", "mig-0001", "host-b",
                 "COMMIT", "ROLLBACK", "182.4 ms", "4.21 s"):
        assert text in out, text

    assert await ctl(server, "migrations", "show", "mig-0002") == 0
    out = capsys.readouterr().out
    assert out.startswith("migration mig-0002 rolled back: doomed -> host-b\n")
    assert "role         source" in out and "error        target restore failed" in out
    assert "history" in out and "ROLLBACK" in out.split("history", 1)[1]

    assert await ctl(server, "--json", "migrations", "show", "mig-0001") == 0
    assert json.loads(capsys.readouterr().out)["state"] == "COMMIT"

    assert await ctl(server, "migrations", "show", "mig-9999") == 1
    assert capsys.readouterr().err == "error: migration_not_found: no migration mig-9999 on this host\n"


def test_render_helpers() -> None:
    assert [human_ms(v) for v in (None, 0, 12.34, 4210, 125_000)] == ["-", "-", "12.3 ms", "4.21 s", "2m05s"]
    record = {"id": "m", "role": "target", "container": "web", "peer": "host-a", "state": "PRECOPY",
              "stats": {"iterations": 2, "dirty_pages": [10, 4], "bytes_raw": 2048, "bytes_wire": 1024,
                        "rate_mbps": 3.25}}
    assert migration_details(record)[0] == "migration m in progress: web <- host-a"
    line = MigrationView.describe(record)
    assert line == "round 2  dirty 4 pages  sent 2.0 KiB raw / 1.0 KiB wire  3.2 MB/s"


def test_postcopy_details() -> None:
    record = {"id": "m", "role": "source", "container": "web", "peer": "host-b", "state": "COMMIT",
              "options": {"mode": "lazy"},
              "stats": {"lazy_pages": 262144, "pages_remote": 0, "pages_pushed": 262000, "pages_local": 0,
                        "postcopy_ms": 4300.0, "released_ms": 5100.0}}
    text = "\n".join(migration_details(record))
    assert "mode         lazy" in text
    assert "post-copy    262144 pages on demand, 0 still remote, 262000 pushed, 0 from the target's own copy" in text


def test_needs_operator_renders_as_finished_and_failed() -> None:
    record = {
        "id": "mig-9",
        "role": "source",
        "container": "hog",
        "peer": "h2",
        "state": "NEEDS_OPERATOR",
        "error": "post-copy lost; ours stays frozen as of the switch",
    }
    assert migration_result(record) == "needs the operator"
    assert migration_details(record)[0] == "migration mig-9 needs the operator: hog -> h2"
