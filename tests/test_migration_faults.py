"""Failures during a live migration: every case ends with the workload running exactly once, intact.

Failpoints (agent/migration/failpoints.py) kill or break an agent at a named step; the mesh cuts
links. After each fault the source's copy must be running with its memory verified by the workload
itself, its counter still counting, and the target must hold nothing of it. These are pre-copy's
failure semantics, so each migration pins mode=precopy; post-copy's are in test_postcopy.py.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.harness.fleet import api, fleet, memhog_status, migrate, run_memhog, task_states, verify_memory
from tests.harness.mesh import Mesh, MeshHost


@pytest.fixture
async def mesh(base_dir: Path) -> AsyncIterator[Mesh]:
    async with fleet(base_dir, hosts=2, idle_timeout=4.0) as m:
        yield m


async def restart_with(host: MeshHost, failpoints: str | None) -> None:
    await host.stop_agent()
    host.agent_env = {"FERRYMAN_FAILPOINTS": failpoints} if failpoints else {}
    await host.start_agent()


async def assert_runs_once_on(owner: MeshHost, other: MeshHost, before_beats: int) -> None:
    """The workload runs on `owner` only, kept its memory, and its counter moved on."""
    assert task_states(owner) == {"hog": "RUNNING"}
    for _ in range(100):  # the other side cleans up after it has told the owner to resume
        if "hog" not in other.ctr("containers", "ls", "-q").stdout:
            break
        await asyncio.sleep(0.1)
    assert "hog" not in other.ctr("containers", "ls", "-q").stdout
    assert "hog" not in other.ctr("snapshots", "ls").stdout
    await asyncio.sleep(0.3)
    assert (await memhog_status(owner, "hog")).beats > before_beats
    assert await verify_memory(owner, "hog") == "ok"


async def start_workload(mesh: Mesh, mib: int = 16) -> int:
    await run_memhog(mesh["h1"], mesh, "hog", resident_mib=mib, rewrite_mbps=1)
    return (await memhog_status(mesh["h1"], "hog")).beats


async def wait_for_agent_exit(host: MeshHost, within: float = 60) -> None:
    for _ in range(int(within * 10)):
        if not host.agent_running:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the agent on {host.name} did not die at its failpoint")


@pytest.mark.parametrize("point", ["target.precopy", "target.stopcopy", "target.restore"])
async def test_target_killed(mesh: Mesh, point: str) -> None:
    h1, h2 = mesh["h1"], mesh["h2"]
    await restart_with(h2, f"{point}=exit")
    beats = await start_workload(mesh)
    record = await migrate(h1, "hog", "h2", max_iterations=3, mode="precopy")
    assert record["state"] == "ROLLBACK", record
    await wait_for_agent_exit(h2)
    await restart_with(h2, None)  # its recovery removes whatever it had built
    await assert_runs_once_on(h1, h2, beats)


async def test_target_killed_after_restoring_waits_for_the_source(mesh: Mesh) -> None:
    """The target dies with a restored, paused copy; on restart it asks the source and removes it."""
    h1, h2 = mesh["h1"], mesh["h2"]
    await restart_with(h2, "target.restored=exit")
    beats = await start_workload(mesh)
    record = await migrate(h1, "hog", "h2", mode="precopy")
    assert record["state"] == "ROLLBACK", record
    await wait_for_agent_exit(h2)
    assert "hog" in h2.ctr("containers", "ls", "-q").stdout  # the paused copy is still there...
    assert task_states(h2).get("hog") == "PAUSED"  # ...frozen, never resumed
    await restart_with(h2, None)
    for _ in range(100):
        if "hog" not in h2.ctr("containers", "ls", "-q").stdout:
            break
        await asyncio.sleep(0.1)
    await assert_runs_once_on(h1, h2, beats)
    [target_record] = (await api(h2, "GET", "/v1/migrations"))["migrations"]
    assert target_record["state"] == "ROLLBACK"


async def test_source_killed_during_precopy_then_restarted(mesh: Mesh) -> None:
    h1, h2 = mesh["h1"], mesh["h2"]
    await restart_with(h1, "source.precopy.round2=exit")
    beats = await start_workload(mesh)
    # A 1 ms downtime target: round one alone can never predict it, so a second round starts.
    body = {"container": "hog", "target": "h2", "downtime_target_ms": 1, "mode": "precopy"}
    async with h1.session() as http, http.post("/v1/migrations", json=body) as r:
        assert r.status == 202
    await wait_for_agent_exit(h1)
    await restart_with(h1, None)
    [record] = (await api(h1, "GET", "/v1/migrations"))["migrations"]
    assert record["state"] == "ROLLBACK" and "restarted" in record["error"]
    for _ in range(100):  # the target gives up on its own after the idle timeout
        migrations = (await api(h2, "GET", "/v1/migrations"))["migrations"]
        if migrations and migrations[0]["done"]:
            break
        await asyncio.sleep(0.1)
    assert migrations[0]["state"] == "ROLLBACK"
    await assert_runs_once_on(h1, h2, beats)


@pytest.mark.parametrize(
    ("point", "state"), [("source.frozen", "STOPCOPY"), ("source.restored", "RESTORE")], ids=["stopcopy", "restore"]
)
async def test_source_killed_with_its_copy_frozen_then_restarted(mesh: Mesh, point: str, state: str) -> None:
    """The source dies with its copy frozen, nothing decided: in STOPCOPY (before its dump) or in
    RESTORE (the target's copy restored and paused). The restarted source rolls back and thaws its
    copy; the target gives up (STOPCOPY) or hears "rollback" (RESTORE) and removes what it built."""
    h1, h2 = mesh["h1"], mesh["h2"]
    await restart_with(h1, f"{point}=exit")
    beats = await start_workload(mesh)
    body = {"container": "hog", "target": "h2", "mode": "precopy"}
    async with h1.session() as http, http.post("/v1/migrations", json=body) as r:
        assert r.status == 202
    await wait_for_agent_exit(h1)
    assert task_states(h1).get("hog") == "PAUSED"  # frozen for the stop-copy...
    if state == "RESTORE":
        assert task_states(h2).get("hog") == "PAUSED"  # ...and the restored copy waits: nothing runs at all
    await restart_with(h1, None)
    [record] = (await api(h1, "GET", "/v1/migrations"))["migrations"]
    assert record["state"] == "ROLLBACK" and f"restarted during {state}" in record["error"], record
    for _ in range(200):  # the target asks every 2 s and removes its copy on "rollback"
        migrations = (await api(h2, "GET", "/v1/migrations"))["migrations"]
        if migrations and migrations[0]["done"]:
            break
        await asyncio.sleep(0.1)
    assert migrations[0]["state"] == "ROLLBACK"
    await assert_runs_once_on(h1, h2, beats)


async def test_link_cut_mid_stream(mesh: Mesh) -> None:
    h1, h2 = mesh["h1"], mesh["h2"]
    beats = await start_workload(mesh, mib=256)
    task = asyncio.create_task(migrate(h1, "hog", "h2", max_iterations=4, mode="precopy"))
    for _ in range(300):  # cut as soon as the first round streams
        migrations = (await api(h1, "GET", "/v1/migrations"))["migrations"]
        if migrations and migrations[-1]["state"] == "PRECOPY":
            break
        await asyncio.sleep(0.02)
    await mesh.link_down(h2)
    try:
        record = await asyncio.wait_for(task, 60)
    finally:
        await mesh.link_up(h2)
    assert record["state"] == "ROLLBACK", record
    for _ in range(100):
        migrations = (await api(h2, "GET", "/v1/migrations"))["migrations"]
        if migrations and migrations[0]["done"]:
            break
        await asyncio.sleep(0.1)
    assert migrations[0]["state"] == "ROLLBACK"
    await assert_runs_once_on(h1, h2, beats)


async def test_target_disk_too_small(mesh: Mesh, tmp_path: Path) -> None:
    h1, h2 = mesh["h1"], mesh["h2"]
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(small)], check=True)
    try:
        await h2.stop_agent()
        h2.settings["migration"] = {"work_dir": str(small)}
        await h2.start_agent()
        beats = await start_workload(mesh, mib=32)
        record = await migrate(h1, "hog", "h2", mode="precopy")
        assert record["state"] == "ROLLBACK"
        assert "free" in record["error"] or "space" in record["error"]
        await assert_runs_once_on(h1, h2, beats)
    finally:
        await h2.stop_agent()
        subprocess.run(["umount", "-l", str(small)], check=False)


async def test_criu_restore_failure_on_target(mesh: Mesh) -> None:
    h1, h2 = mesh["h1"], mesh["h2"]
    await restart_with(h2, "target.corrupt_images=corrupt")
    beats = await start_workload(mesh)
    record = await migrate(h1, "hog", "h2", mode="precopy")
    assert record["state"] == "ROLLBACK", record
    assert "restore" in record["error"].lower() or "criu" in record["error"].lower()
    await assert_runs_once_on(h1, h2, beats)


async def test_corrupted_chunk_is_refused(mesh: Mesh) -> None:
    """One frame's ciphertext is altered after sealing: the target's AEAD check refuses it, nothing of
    it is used, and the migration rolls back."""
    h1, h2 = mesh["h1"], mesh["h2"]
    await restart_with(h1, "stream.corrupt_frame=10")
    beats = await start_workload(mesh)
    record = await migrate(h1, "hog", "h2", mode="precopy")
    assert record["state"] == "ROLLBACK", record
    await assert_runs_once_on(h1, h2, beats)
    [target_record] = (await api(h2, "GET", "/v1/migrations"))["migrations"]
    assert target_record["state"] == "ROLLBACK"
    # The target names the cause; the source only saw the target hang up (or its report of why).
    assert "authentic" in target_record["error"].lower(), target_record["error"]


async def test_source_killed_right_after_deciding(mesh: Mesh) -> None:
    """The source dies after its decision (SWITCH) but before telling the target. The target keeps its
    restored copy paused, learns the decision once the source is back, and owns the workload."""
    h1, h2 = mesh["h1"], mesh["h2"]
    await restart_with(h1, "source.decided=exit")
    beats = await start_workload(mesh)
    body = {"container": "hog", "target": "h2", "mode": "precopy"}
    async with h1.session() as http, http.post("/v1/migrations", json=body) as r:
        assert r.status == 202
    await wait_for_agent_exit(h1)
    assert task_states(h2).get("hog") == "PAUSED"  # not resumed without the decision...
    assert task_states(h1).get("hog") == "PAUSED"  # ...and the source copy stays frozen: nothing runs twice
    await restart_with(h1, None)
    for _ in range(200):
        if "hog" not in h1.ctr("containers", "ls", "-q").stdout and task_states(h2).get("hog") == "RUNNING":
            break
        await asyncio.sleep(0.1)
    await assert_runs_once_on(h2, h1, beats)
    [source_record] = (await api(h1, "GET", "/v1/migrations"))["migrations"]
    [target_record] = (await api(h2, "GET", "/v1/migrations"))["migrations"]
    assert (source_record["state"], target_record["state"]) == ("COMMIT", "COMMIT")
