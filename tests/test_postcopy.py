"""Post-copy (lazy) and hybrid migration between two real hosts: CRIU lazy-pages over the stream."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.harness.fleet import (
    api,
    assert_masked,
    expected_cgroup,
    fleet,
    memhog_status,
    migrate,
    run_memhog,
    task_cgroups,
    task_pid,
    task_states,
    verify_memory,
)
from tests.harness.mesh import Mesh, MeshHost


@pytest.fixture
async def mesh(base_dir: Path) -> AsyncIterator[Mesh]:
    async with fleet(base_dir, hosts=2) as m:
        yield m


def postcopy_helpers(mesh: Mesh) -> list[tuple[int, str]]:
    """(pid, command line) of the criu lazy-pages daemons and pagers alive for this mesh's hosts
    (their command lines name the hosts' migration work dirs, under the mesh's tmpfs_dir)."""
    scope = f"{mesh.tmpfs_dir}/"
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        helper = "lazy-pages --page-server" in cmdline or "agent.migration.pager" in cmdline
        if helper and scope in cmdline:
            found.append((int(proc.name), cmdline))
    return found


def no_postcopy_helpers(mesh: Mesh) -> list[str]:
    return [cmdline for _, cmdline in postcopy_helpers(mesh)]


@pytest.mark.parametrize("mode", ["lazy", "hybrid"])
async def test_postcopy_there_and_back(mesh: Mesh, mode: str) -> None:
    h1, h2 = mesh["h1"], mesh["h2"]
    await run_memhog(h1, mesh, "hog", resident_mib=32, rewrite_mbps=2)
    before = await memhog_status(h1, "hog")
    assert_masked(h1, "hog")  # as runc made it: a read-only tmpfs over each

    record = await migrate(h1, "hog", "h2", mode=mode, max_iterations=2)
    assert record["state"] == "COMMIT", (record["error"], record["history"], record["stats"])
    assert record["options"]["mode"] == mode
    stats = record["stats"]
    assert stats["lazy_pages"] > 0 and stats["pages_remote"] == 0
    if mode == "hybrid":  # the pages pre-copy sent and nobody changed since come from the target's own copy
        assert stats["pages_local"] > stats["lazy_pages"] // 2, stats
    else:
        # The push ran. How much of the memory it moved depends on how much the workload's faults (and
        # their read-ahead) fetched first: each page crosses once, by one way or the other.
        assert stats["pages_pushed"] > 0, stats
        assert stats["pages_pushed"] + stats["pages_served"] >= stats["lazy_pages"], stats
        assert stats["pages_local"] == 0
    assert stats["downtime_ms"] > 0 and stats["released_ms"] >= stats["total_ms"] > 0
    states = [state for state, _ in record["history"]]
    assert "POSTCOPY" in states and states[-1] == "COMMIT"
    assert task_states(h2) == {"hog": "RUNNING"}
    assert "hog" not in task_states(h1)
    # runc, not CRIU, puts the restored tasks in their cgroups (CRIU runs with manage-cgroups=ignore)
    cgroups = task_cgroups(h2, "hog")
    assert cgroups["memory"] == cgroups["pids"] == expected_cgroup(h2, "hog"), cgroups
    assert_masked(h2, "hog")  # CRIU binds an empty read-only directory over each (not a tmpfs)
    await asyncio.sleep(0.5)
    after = await memhog_status(h2, "hog")
    assert after.beats > before.beats
    assert await verify_memory(h2, "hog") == "ok"  # every page arrived, none is a stray zero page
    target_record = await api(h2, "GET", f"/v1/migrations/{record['id']}")
    assert target_record["state"] == "COMMIT" and target_record["stats"]["pages_remote"] == 0
    assert no_postcopy_helpers(mesh) == []

    back = await migrate(h2, "hog", "h1", mode=mode, max_iterations=2)
    assert back["state"] == "COMMIT", back
    await asyncio.sleep(0.3)
    assert (await memhog_status(h1, "hog")).beats > after.beats
    assert await verify_memory(h1, "hog") == "ok"
    await api(h1, "POST", "/v1/containers/hog/stop?timeout=1")
    await api(h1, "DELETE", "/v1/containers/hog", expect=204)


@pytest.mark.parametrize("rate", [0, 20])
async def test_lazy_migration_moves_each_page_once(mesh: Mesh, rate: int) -> None:
    """Bytes on the wire stay within 5% of the dumped memory (memhog's pages do not compress): pages the
    workload's faults fetched are not pushed again, and no push is answered again on request."""
    h1, h2 = mesh["h1"], mesh["h2"]
    await run_memhog(h1, mesh, "hog", resident_mib=96, rewrite_mbps=rate)
    record = await migrate(h1, "hog", "h2", mode="lazy")
    assert record["state"] == "COMMIT", (record["error"], record["history"])
    stats = record["stats"]
    dumped = stats["lazy_pages"] * 4096
    assert dumped >= 96 << 20, stats
    counts = {k: stats[k] for k in ("bytes_wire", "lazy_pages", "pages_pushed", "pages_served", "pages_resent")}
    assert stats["bytes_wire"] <= 1.05 * dumped, (stats["bytes_wire"] / dumped, counts)
    assert stats["pages_resent"] <= stats["lazy_pages"] // 100, counts  # a race or two, not a pattern
    assert stats["pages_pushed"] + stats["pages_served"] - stats["pages_resent"] >= stats["lazy_pages"], counts
    assert await verify_memory(h2, "hog") == "ok"


@pytest.mark.parametrize("mode", ["lazy", "hybrid"])
async def test_postcopy_of_several_processes(mesh: Mesh, mode: str) -> None:
    """Three processes fault at once on the target: each one's pages reach it, none another's (CRIU's
    daemon stops at a reply for the wrong process, and the pager then kills the workload)."""
    h1, h2 = mesh["h1"], mesh["h2"]
    await run_memhog(h1, mesh, "hog", resident_mib=24, rewrite_mbps=8, processes=3)
    files = ("status", "status-2", "status-3")
    before = [await memhog_status(h1, "hog", status=f) for f in files]
    record = await migrate(h1, "hog", "h2", mode=mode, max_iterations=2)
    assert record["state"] == "COMMIT", (record["error"], record["history"])
    assert record["stats"]["lazy_pages"] > 3 * 24 * 256
    await asyncio.sleep(0.5)
    for f, earlier in zip(files, before, strict=True):
        assert (await memhog_status(h2, "hog", status=f)).beats > earlier.beats, f
        assert await verify_memory(h2, "hog", status_file=f) == "ok", f


@pytest.mark.parametrize("mode", ["lazy", "hybrid"])
async def test_postcopy_of_a_workload_that_forks(mesh: Mesh, mode: str) -> None:
    """memhog forks every 5 ms through two seconds of POSTCOPY, each child reading pages its parent
    has not got yet. A child has its own userfaultfd and the daemon asks for its pages under its
    parent's image, so whose a request is cannot be told: a reply out of order is dropped there
    without a word and both wait for ever (criu/uffd.c, uffd_io_complete)."""
    h1, h2 = mesh["h1"], mesh["h2"]
    await restart_with(h1, "source.push=sleep:2")  # no push for 2 s: the pages come by faults
    await run_memhog(h1, mesh, "hog", resident_mib=32, rewrite_mbps=4, fork_every_ms=5)
    before = await memhog_status(h1, "hog")
    record = await migrate(h1, "hog", "h2", mode=mode, max_iterations=2)
    assert record["state"] == "COMMIT", (record["error"], record["history"])
    stamps = {state: datetime.fromisoformat(stamp) for state, stamp in record["history"]}
    held = (stamps["COMMIT"] - stamps["POSTCOPY"]).total_seconds()
    assert held > 1.0, record["history"]  # the failpoint held the push back: POSTCOPY lasted
    await asyncio.sleep(0.5)
    after = await memhog_status(h2, "hog")
    assert after.forks > before.forks + 200, (before, after)  # it forked on through POSTCOPY
    assert after.fork_errors == 0 and after.children <= 2, after  # every child saw its pages, and ended
    assert await verify_memory(h2, "hog") == "ok"
    assert no_postcopy_helpers(mesh) == []


async def restart_with(host: MeshHost, failpoints: str | None = None, **migration: object) -> None:
    await host.stop_agent()
    host.agent_env = {"FERRYMAN_FAILPOINTS": failpoints} if failpoints else {}
    host.settings["migration"] = {**host.settings.get("migration", {}), **migration}
    await host.start_agent()


def hold(mesh: Mesh, point: str) -> tuple[str, Path]:
    """A failpoint spec that holds `point` open until the test calls `.touch()` on the returned path."""
    release = mesh.dir / f"release-{point}"
    release.unlink(missing_ok=True)
    return f"{point}=until:{release}", release


async def wait_state(host: MeshHost, state: str, within: float = 60.0) -> dict[str, Any]:
    for _ in range(int(within * 20)):
        migrations = (await api(host, "GET", "/v1/migrations"))["migrations"]
        if migrations and migrations[-1]["state"] == state:
            return migrations[-1]
        await asyncio.sleep(0.05)
    raise AssertionError(f"{host.name} never reached {state}")


async def wait_done(host: MeshHost, within: float = 90.0) -> dict[str, Any]:
    for _ in range(int(within * 10)):
        migrations = (await api(host, "GET", "/v1/migrations"))["migrations"]
        if migrations and migrations[-1]["done"]:
            return migrations[-1]
        await asyncio.sleep(0.1)
    raise AssertionError(f"the migration on {host.name} never ended")


async def migrate_through_a_cut(mesh: Mesh, point: str, state: str) -> dict[str, Any]:
    """A lazy migration of a memhog from h1 to h2 whose link is cut while failpoint `point` holds the
    source in `state`, and stays cut for twice the idle timeout (2 s): both sides give up on the first
    link. The source's record once the migration has ended."""
    h1, h2 = mesh["h1"], mesh["h2"]
    spec, release = hold(mesh, point)
    await restart_with(h1, spec)
    await run_memhog(h1, mesh, "hog", resident_mib=32, rewrite_mbps=2)
    task = asyncio.create_task(migrate(h1, "hog", "h2", mode="lazy"))
    await wait_state(h1, state)
    await mesh.link_down(h2)
    release.touch()
    await asyncio.sleep(4)
    await mesh.link_up(h2)
    return await asyncio.wait_for(task, 120)


async def test_link_cut_during_postcopy_resumes(base_dir: Path) -> None:
    """A cut longer than the idle timeout: both sides reconnect, the pager asks again, nothing lost."""
    async with fleet(base_dir, hosts=2, idle_timeout=2.0) as mesh:
        h1, h2 = mesh["h1"], mesh["h2"]
        spec, release = hold(mesh, "source.postcopy")  # POSTCOPY stays open until the link is cut
        await restart_with(h1, spec)
        await run_memhog(h1, mesh, "hog", resident_mib=64, rewrite_mbps=5)
        before = await memhog_status(h1, "hog")
        task = asyncio.create_task(migrate(h1, "hog", "h2", mode="lazy"))
        await wait_state(h2, "POSTCOPY")
        await mesh.link_down(h2)
        release.touch()
        await asyncio.sleep(4)  # twice the idle timeout: the first link is given up on both sides
        await mesh.link_up(h2)
        record = await asyncio.wait_for(task, 90)
        assert record["state"] == "COMMIT", (record["error"], record["history"])
        target = await wait_done(h2)
        assert target["state"] == "COMMIT" and target["stats"]["pages_remote"] == 0
        assert task_states(h2) == {"hog": "RUNNING"} and "hog" not in task_states(h1)
        await asyncio.sleep(0.5)
        assert (await memhog_status(h2, "hog")).beats > before.beats
        assert await verify_memory(h2, "hog") == "ok"
        assert "post-copy link lost" in h2.agent_log.read_text()  # it really went through a reconnect
        assert no_postcopy_helpers(mesh) == []


async def test_link_cut_at_the_decision(base_dir: Path) -> None:
    """The source decided, but `resume` never reached the target: the target asks the source, hears
    "commit", resumes and reconnects for its pages; the source waits for it."""
    async with fleet(base_dir, hosts=2, idle_timeout=2.0) as mesh:
        h1, h2 = mesh["h1"], mesh["h2"]
        record = await migrate_through_a_cut(mesh, "source.decided", "POSTCOPY")  # `resume` goes out after the cut
        assert record["state"] == "COMMIT", (record["error"], record["history"])
        assert (await wait_done(h2))["state"] == "COMMIT"
        assert task_states(h2) == {"hog": "RUNNING"} and "hog" not in task_states(h1)
        assert await verify_memory(h2, "hog") == "ok"
        assert "no decision from the source yet" in h2.agent_log.read_text()  # it did have to ask
        assert no_postcopy_helpers(mesh) == []


async def test_a_resume_that_does_not_get_through(base_dir: Path) -> None:
    """Sending `resume` fails (on a cut link it times out behind page replies): the source closes the
    link and waits; the target asks for the decision, hears "commit" and comes back for its pages."""
    async with fleet(base_dir, hosts=2, idle_timeout=2.0) as mesh:
        h1, h2 = mesh["h1"], mesh["h2"]
        await restart_with(h1, "source.resume=error")
        await run_memhog(h1, mesh, "hog", resident_mib=32, rewrite_mbps=2)
        record = await asyncio.wait_for(migrate(h1, "hog", "h2", mode="lazy"), 120)
        assert record["state"] == "COMMIT", (record["error"], record["history"])
        assert (await wait_done(h2))["state"] == "COMMIT"
        assert task_states(h2) == {"hog": "RUNNING"} and "hog" not in task_states(h1)
        assert await verify_memory(h2, "hog") == "ok"
        assert "resume not delivered" in h1.agent_log.read_text()
        assert "no decision from the source yet" in h2.agent_log.read_text()
        assert no_postcopy_helpers(mesh) == []


async def test_link_cut_after_the_last_page(base_dir: Path) -> None:
    """Every page reached the target, then the link broke before `commit` did: the target's copy is the
    workload (the source can no longer resume its own), so it commits; the source's repeated `resolve`
    hears `committed` once the link is back."""
    async with fleet(base_dir, hosts=2, idle_timeout=2.0) as mesh:
        h1, h2 = mesh["h1"], mesh["h2"]
        record = await migrate_through_a_cut(mesh, "source.commit", "SWITCH")  # every page served, then the cut
        assert record["state"] == "COMMIT", (record["error"], record["history"])
        target = await wait_done(h2)
        assert target["state"] == "COMMIT" and target["stats"]["pages_remote"] == 0, target
        assert task_states(h2) == {"hog": "RUNNING"} and "hog" not in task_states(h1)
        assert await verify_memory(h2, "hog") == "ok"
        assert "commit not heard from the source" in h2.agent_log.read_text()  # the link did break first
        assert no_postcopy_helpers(mesh) == []


async def test_target_agent_restart_during_postcopy(mesh: Mesh) -> None:
    """The pager and the lazy-pages daemon outlive the agent; the new agent resumes from its journal."""
    h1, h2 = mesh["h1"], mesh["h2"]
    spec, release = hold(mesh, "source.postcopy")  # POSTCOPY stays open through the target's restart
    await restart_with(h1, spec)
    await run_memhog(h1, mesh, "hog", resident_mib=64, rewrite_mbps=5)
    before = await memhog_status(h1, "hog")
    task = asyncio.create_task(migrate(h1, "hog", "h2", mode="lazy"))
    await wait_state(h2, "POSTCOPY")
    await h2.kill_agent()  # SIGKILL: no chance to clean up anything
    await h2.start_agent()
    release.touch()
    record = await asyncio.wait_for(task, 90)
    assert record["state"] == "COMMIT", record
    target = await wait_done(h2)
    assert target["state"] == "COMMIT", target
    assert task_states(h2) == {"hog": "RUNNING"} and "hog" not in task_states(h1)
    await asyncio.sleep(0.5)
    assert (await memhog_status(h2, "hog")).beats > before.beats
    assert await verify_memory(h2, "hog") == "ok"
    assert no_postcopy_helpers(mesh) == []


async def test_source_lost_during_postcopy_is_reported(mesh: Mesh) -> None:
    """The pages still on the source are gone: the target kills its copy (it would read zeros), both
    records say what happened, and the source's frozen copy is kept for the operator."""
    h1, h2 = mesh["h1"], mesh["h2"]
    spec, _ = hold(mesh, "source.postcopy")  # never released: the source's agent dies in POSTCOPY
    await restart_with(h1, spec)
    await restart_with(h2, postcopy_reconnect_timeout=3.0)
    await run_memhog(h1, mesh, "hog", resident_mib=64, rewrite_mbps=5)
    body = {"container": "hog", "target": "h2", "mode": "lazy"}
    async with h1.session() as http, http.post("/v1/migrations", json=body) as r:
        assert r.status == 202
    await wait_state(h2, "POSTCOPY")
    # The pager's guard names the restored task's init, the process it must kill.
    [pid_file] = (mesh.tmpfs_dir / "h2").glob("*/restored.pid")
    assert pid_file.read_text() == task_pid(h2, "hog"), pid_file.read_text()
    await h1.kill_agent()  # the source host's agent dies, and with it the page server's session
    target = await wait_done(h2)
    assert target["state"] == "ROLLBACK" and "POSTCOPY" in target["error"], target
    assert "hog" not in h2.ctr("containers", "ls", "-q").stdout  # killed, never left running on zeros
    await restart_with(h1)
    [source] = (await api(h1, "GET", "/v1/migrations"))["migrations"]
    assert source["state"] == "NEEDS_OPERATOR" and "POSTCOPY" in source["error"], source
    assert task_states(h1) == {"hog": "PAUSED"}  # frozen as of the switch, for the operator to decide
    assert no_postcopy_helpers(mesh) == []


async def test_lazy_pages_daemon_lost_rolls_back(mesh: Mesh) -> None:
    """The target's CRIU daemon dies in POSTCOPY: the pager kills the restored copy (it would read
    zeros), the target's record gives the pager's reason, and the source resumes its frozen copy."""
    h1, h2 = mesh["h1"], mesh["h2"]
    spec, release = hold(mesh, "source.push")  # no push (POSTCOPY cannot end) until the daemon is gone
    await restart_with(h1, spec)
    await run_memhog(h1, mesh, "hog", resident_mib=32, rewrite_mbps=2)
    task = asyncio.create_task(migrate(h1, "hog", "h2", mode="lazy"))
    await wait_state(h2, "POSTCOPY")
    [daemon] = [pid for pid, cmdline in postcopy_helpers(mesh) if "lazy-pages --page-server" in cmdline]
    assert os.sched_getscheduler(daemon) == os.SCHED_IDLE  # it polls without sleeping: spare CPU only
    os.kill(daemon, signal.SIGKILL)
    release.touch()
    record = await asyncio.wait_for(task, 60)
    assert record["state"] == "ROLLBACK", record
    target = await wait_done(h2)
    assert target["state"] == "ROLLBACK" and "lazy-pages daemon stopped" in target["error"], target
    assert "hog" not in h2.ctr("containers", "ls", "-q").stdout
    assert task_states(h1) == {"hog": "RUNNING"}  # resumed as of the switch
    before = await memhog_status(h1, "hog")
    await asyncio.sleep(0.3)
    assert (await memhog_status(h1, "hog")).beats > before.beats
    assert await verify_memory(h1, "hog") == "ok"
    assert no_postcopy_helpers(mesh) == []


async def test_the_freeze_waits_for_the_target_to_be_ready(mesh: Mesh) -> None:
    """What the target does before it can restore (here a 5 s stall where it finishes its image pull)
    happens before the source freezes: the workload's longest pause is far shorter than the stall."""
    h1, h2 = mesh["h1"], mesh["h2"]
    await restart_with(h2, "target.stopcopy=sleep:5")
    await run_memhog(h1, mesh, "hog", resident_mib=16, rewrite_mbps=1)
    record = await migrate(h1, "hog", "h2", mode="lazy")
    assert record["state"] == "COMMIT", record
    assert record["stats"]["total_ms"] > 5000
    await asyncio.sleep(0.3)
    gap_ms = (await memhog_status(h2, "hog")).max_gap_us / 1000
    # A freeze that included the stall would last over 5000 ms; the bound leaves room for a busy host.
    assert gap_ms < 4000, f"the workload stood still for {gap_ms:.0f} ms: the freeze included the target's stall"


async def test_postcopy_refused_by_label(mesh: Mesh) -> None:
    h1 = mesh["h1"]
    await run_memhog(h1, mesh, "hog", resident_mib=8, labels={"ferryman.postcopy": "never"})
    body = {"container": "hog", "target": "h2", "mode": "lazy"}
    error = await api(h1, "POST", "/v1/migrations", body, expect=400)
    assert "ferryman.postcopy=never" in error["error"]["message"]
    record = await migrate(h1, "hog", "h2", mode="auto")
    assert record["state"] == "COMMIT" and record["options"]["mode"] == "precopy"


async def test_target_enforces_reservations(mesh: Mesh) -> None:
    """A migration may not eat capacity reserved for someone else; one charged to its own
    reservation is admitted, and the reservation is released at commit."""
    h1, h2 = mesh["h1"], mesh["h2"]
    h2.settings["capacity"] = {"cpu_millis": 2000, "memory_bytes": 1 << 30, "disk_bytes": 10 << 30}
    await h2.restart_agent()
    expires = time.time() + 120
    other = {"id": "other", "capacity": {"memory_bytes": 1000 << 20}, "expires_at": expires, "purpose": "x"}
    await api(h2, "POST", "/v1/reservations", other, expect=201)
    await run_memhog(h1, mesh, "hog", resident_mib=64)

    refused = await migrate(h1, "hog", "h2", mode="lazy")
    assert refused["state"] == "ROLLBACK" and "cannot admit" in refused["error"], refused
    assert task_states(h1) == {"hog": "RUNNING"} and "hog" not in h2.ctr("containers", "ls", "-q").stdout

    await api(h2, "DELETE", "/v1/reservations/other", expect=204)
    ours = {"id": "res-1", "capacity": {"memory_bytes": 900 << 20}, "expires_at": expires, "purpose": "migration"}
    await api(h2, "POST", "/v1/reservations", ours, expect=201)
    record = await migrate(h1, "hog", "h2", mode="lazy", reservation="res-1")
    assert record["state"] == "COMMIT", record
    assert await verify_memory(h2, "hog") == "ok"
    await wait_done(h2)
    held = (await api(h2, "GET", "/v1/reservations"))["reservations"]
    assert [r["id"] for r in held] == []  # released at commit
