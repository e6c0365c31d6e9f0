"""The coordinator in a real 3-host mesh: agents register and push telemetry over mTLS, the coordinator
scores them with the shipped ONNX drain model, drains hosts and live-migrates memhog workloads with
CRIU through the agents. Predicted drains, ops drains and migrations through ferryctl, a coordinator
restart in the middle of a drain, and a target host that dies in the middle of a migration.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.fleet import (
    CoordinatedFleet,
    coordinated_fleet,
    memhog_status,
    run_memhog,
    task_states,
    verify_memory,
)
from tests.harness.mesh import MeshHost
from tests.harness.workloads import MemhogStatus

MODEL = Path(__file__).resolve().parent.parent / "models" / "drain" / "drain.onnx"
WITH_MODEL = {"model": {"path": str(MODEL)}}


@pytest.fixture
async def fleet3(base_dir: Path) -> AsyncIterator[CoordinatedFleet]:
    async with coordinated_fleet(base_dir, 3, coordinator=WITH_MODEL) as f:
        yield f


async def reported(f: CoordinatedFleet, host: str, containers: set[str]) -> dict[str, Any] | None:
    """The coordinator's view of `host` once its telemetry lists exactly `containers`."""
    view = await f.host(host)
    return view if {c["id"] for c in view["containers"]} == containers else None


def running_where(f: CoordinatedFleet, name: str) -> list[str]:
    """Hosts on which the container's task is RUNNING (paused copies do not count)."""
    return [h.name for h in f.mesh.hosts if task_states(h).get(name) == "RUNNING"]


async def assert_intact(f: CoordinatedFleet, name: str, before: MemhogStatus) -> MeshHost:
    """The workload runs exactly once, its counter kept counting and every page is as written."""
    where = running_where(f, name)
    assert len(where) == 1, f"{name} runs on {where}"
    host = f.mesh[where[0]]
    await asyncio.sleep(0.3)
    assert (await memhog_status(host, name)).beats > before.beats
    assert await verify_memory(host, name) == "ok"
    return host


async def test_predicted_drain_moves_the_workloads_before_the_deadline(fleet3: CoordinatedFleet) -> None:
    f = fleet3
    a = f.mesh["h1"]
    await run_memhog(a, f.mesh, "web", resident_mib=16)
    await run_memhog(a, f.mesh, "vip", resident_mib=8, labels={"ferryman.priority": "5"})
    before = {n: await memhog_status(a, n) for n in ("web", "vip")}
    await f.wait_for("h1 reports both containers", lambda: reported(f, "h1", {"web", "vip"}))

    async def scored() -> dict[str, Any] | None:
        data = await f.call("GET", "/v1/predictions")
        return data if {p["host"] for p in data["predictions"]} == {"h1", "h2", "h3"} else None

    quiet = await f.wait_for("every host scored", scored)
    threshold = quiet["threshold"]
    assert quiet["model_version"] == "drain-2" and 0 < threshold < 1
    assert all(p["probability"] < threshold for p in quiet["predictions"]), quiet  # a quiet fleet stays put

    # The provider's notice lands on h1 and states its time: the agent's sampler reports it with that
    # deadline, and the coordinator drains h1 on the fact, whatever the model says.
    deadline = time.monotonic() + 50.0
    f.notice_file(a).write_text(f"terminate\ndeadline={time.time() + 50:.0f}\n")
    await f.wait_for(
        "h1 drained", lambda: _state_is(f, "h1", "drained"), within=deadline - time.monotonic(), period=0.5
    )
    assert time.monotonic() < deadline

    drain = next(d for d in (await f.host("h1"))["decisions"] if d["kind"] == "drain")
    assert drain["detail"].startswith("notice: notice notice-file (deadline ") and "terminate" in drain["detail"]
    assert drain["probability"] == 1.0 and drain["model_version"] == "drain-2"
    migrations = (await f.call("GET", "/v1/migrations"))["migrations"]
    assert sorted(m["container"] for m in migrations) == ["vip", "web"]
    assert migrations[0]["container"] == "vip"  # priority label first
    assert all(m["state"] == "committed" and m["target"] in ("h2", "h3") for m in migrations), migrations
    assert all(m["requested_by"] == "policy" and m["reason"].startswith("drain:") for m in migrations)
    for name in ("web", "vip"):
        assert (await assert_intact(f, name, before[name])).name in ("h2", "h3")
    assert task_states(a) == {}
    hosts = {h["name"]: h for h in (await f.call("GET", "/v1/hosts"))["hosts"]}
    assert hosts["h1"]["drain_probability"] >= threshold and hosts["h1"]["reserved"]["memory_bytes"] == 0
    # Placement respected the reservations: nothing is still held anywhere once the moves committed.
    assert (await f.call("GET", "/v1/reservations"))["reservations"] == []


async def _state_is(f: CoordinatedFleet, host: str, state: str) -> bool:
    return bool((await f.host(host))["state"] == state)


async def test_ops_drain_and_migration_through_ferryctl(fleet3: CoordinatedFleet) -> None:
    f = fleet3
    h1, h2 = f.mesh["h1"], f.mesh["h2"]
    await run_memhog(h1, f.mesh, "api", resident_mib=8)
    await run_memhog(h2, f.mesh, "db", resident_mib=8)
    before_api, before_db = await memhog_status(h1, "api"), await memhog_status(h2, "db")
    await f.wait_for("containers reported", lambda: reported(f, "h1", {"api"}))
    await f.wait_for("containers reported", lambda: reported(f, "h2", {"db"}))

    listed = await f.ferryctl("hosts")
    assert listed.returncode == 0, listed.stderr
    assert all(name in listed.stdout for name in ("h1", "h2", "h3", "ready", "P(DRAIN)")), listed.stdout

    # A manual migration to a named host, with the bearer token this time.
    moved = await f.ferryctl("migrate", "db", "--to", "h3", auth="token")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert "committed" in moved.stdout and "db h2 -> h3" in moved.stdout
    await assert_intact(f, "db", before_db)
    assert running_where(f, "db") == ["h3"]

    # An ops drain, waited for: h1's container goes wherever the placement says (not to h1 itself).
    drained = await f.ferryctl("--json", "drain", "h1", "--wait", "60")
    assert drained.returncode == 0, drained.stdout + drained.stderr
    assert '"state": "drained"' in drained.stdout
    assert (await assert_intact(f, "api", before_api)).name in ("h2", "h3")

    history = await f.ferryctl("migrations")
    assert history.returncode == 0 and "committed" in history.stdout, history.stdout
    records = json.loads((await f.ferryctl("--json", "migrations")).stdout)["migrations"]
    assert [(m["container"], m["state"], m["requested_by"]) for m in records] == [
        ("db", "committed", "token0"),
        ("api", "committed", "policy"),
    ]
    decisions = [d["kind"] for d in (await f.host("h1"))["decisions"]]
    assert "drain" in decisions and "drained" in decisions
    told = await f.ferryctl("decisions", "--host", "h1")
    assert told.returncode == 0 and "drained" in told.stdout and "h2" not in told.stdout, told.stdout
    watched = await f.ferryctl("migrations", "watch", records[0]["id"])
    assert watched.returncode == 0 and "committed" in watched.stdout, watched.stdout + watched.stderr
    # Nothing is placed on a drained host: an auto reservation lands elsewhere.
    made = await f.ferryctl("--json", "reservations", "create", "--cpus", "0.1", "-m", "1M", "--purpose", "ops")
    assert made.returncode == 0, made.stdout + made.stderr
    placed = json.loads(made.stdout)
    assert placed["host"] != "h1" and placed["capacity"]["memory_bytes"] == 1 << 20
    listed = await f.ferryctl("reservations")
    assert listed.returncode == 0 and placed["id"] in listed.stdout, listed.stdout
    released = await f.ferryctl("reservations", "release", placed["id"])
    assert released.returncode == 0, released.stdout + released.stderr
    assert (await f.call("GET", "/v1/reservations"))["reservations"] == []
    model = await f.ferryctl("model")
    assert model.returncode == 0 and "active drain-2" in model.stdout, model.stdout

    back = await f.ferryctl("uncordon", "h1")
    assert back.returncode == 0 and "h1 ready" in back.stdout, back.stdout + back.stderr
    predictions = await f.ferryctl("predictions")
    assert predictions.returncode == 0 and "model drain-2" in predictions.stdout, predictions.stdout


async def test_a_coordinator_restart_in_the_middle_of_a_drain(base_dir: Path) -> None:
    # One migration out of a host at a time, so the restart lands with work running and work pending.
    async with coordinated_fleet(base_dir, 3, coordinator={"migrations": {"max_per_host": 1}}) as f:
        h1 = f.mesh["h1"]
        names = ("one", "two", "three")
        for name in names:
            await run_memhog(h1, f.mesh, name, resident_mib=12)
        before = {n: await memhog_status(h1, n) for n in names}
        await f.wait_for("containers reported", lambda: reported(f, "h1", set(names)))

        await f.call("POST", "/v1/hosts/h1/drain", expect=202)

        async def one_running() -> bool:
            return any(m["state"] == "running" for m in (await f.call("GET", "/v1/migrations"))["migrations"])

        await f.wait_for("a drain migration running", one_running, period=0.1)
        assert await f.coordinator.stop() == 0, f.coordinator.logs()
        await asyncio.sleep(1.0)  # the agents keep migrating and buffering telemetry meanwhile
        await f.coordinator.start()

        await f.wait_for("h1 drained after the restart", lambda: _state_is(f, "h1", "drained"), within=90)
        migrations = (await f.call("GET", "/v1/migrations"))["migrations"]
        committed = [m for m in migrations if m["state"] == "committed"]
        assert sorted(m["container"] for m in committed) == sorted(names), migrations
        # Followed, not started twice: one agent migration per container.
        assert all(m["attempt"] == 1 for m in committed), migrations
        assert "resumed migrations" in f.coordinator.log_path.read_text()
        for name in names:
            assert (await assert_intact(f, name, before[name])).name in ("h2", "h3")
        assert task_states(h1) == {}


async def test_a_target_host_dies_in_the_middle_of_a_migration(base_dir: Path) -> None:
    async with coordinated_fleet(base_dir, 3, idle_timeout=3.0) as f:
        h1, h2 = f.mesh["h1"], f.mesh["h2"]
        # h2's agent dies like a crashed host the moment it starts restoring the container.
        await h2.stop_agent()
        h2.agent_env = {"FERRYMAN_FAILPOINTS": "target.restore=exit"}
        await h2.start_agent()
        await run_memhog(h1, f.mesh, "job", resident_mib=12)
        before = await memhog_status(h1, "job")
        await f.wait_for("job reported", lambda: reported(f, "h1", {"job"}))
        await f.wait_for("h2 back", lambda: _state_is(f, "h2", "ready"))

        started = await f.call("POST", "/v1/migrations", {"container": "job", "to": "h2"}, expect=202)

        async def finished() -> dict[str, Any] | None:
            m = await f.call("GET", f"/v1/migrations/{started['id']}")
            return m if m["done"] else None

        outcome = await f.wait_for("the migration's outcome", finished, within=60)
        assert outcome["state"] == "abandoned" and outcome["attempt"] == 1, outcome  # a named target: one try
        assert outcome["error"], outcome
        assert not h2.agent_running
        # The source rolled back: the workload never stopped being h1's, and runs once.
        assert running_where(f, "job") == ["h1"]
        await assert_intact(f, "job", before)
        await f.wait_for("h2 marked down", lambda: _state_is(f, "h2", "down"), within=20)
        assert [r for r in (await f.call("GET", "/v1/reservations"))["reservations"] if r["host"] == "h2"] == []

        # Ops try again with "auto": a down host is never a candidate, so it lands on h3.
        again = await f.ferryctl("migrate", "job", "--to", "auto")
        assert again.returncode == 0, again.stdout + again.stderr
        assert running_where(f, "job") == ["h3"]
        await assert_intact(f, "job", before)
