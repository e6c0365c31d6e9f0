"""Components that share a volume migrate together with it, on a real 3-host coordinated fleet.

The pipeline of tests/test_deployments.py: detect writes a frame into a shared volume, render (on
the same host) reads it and serves it over HTTP, transcode fetches that. Draining the host of
detect and render moves both, and the volume's contents, to one other host: the deployment stays
HEALTHY, what was written into the volume before the drain is there after (read inside the moved
container), the records follow, and the undeploy leaves nothing on any host. With the target's
restores failing (a failpoint), a migration of the group rolls back whole: both run on the source
again with their volume, and nothing of them is left on the target.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.alerts import AlertReceiver
from tests.harness.fleet import CoordinatedFleet, api, coordinated_fleet
from tests.harness.mesh import Mesh, MeshHost
from tests.test_deployments import (
    DETECT_TO_VOLUME,
    FRAMES,
    PORT,
    RENDER_FROM_VOLUME,
    alerts,  # noqa: F401 - the fixture fleet3 uses
    assert_nothing_left,
    deployed_containers,
    entry,
    ferryctl_json,
    fetch_then_serve,
    fleet3,  # noqa: F401 - a fixture
    push,
)


async def deploy_pipeline(f: CoordinatedFleet) -> dict[str, Any]:
    mesh = f.mesh
    detect = await push(mesh, "detect", DETECT_TO_VOLUME)
    render = await push(mesh, "render", RENDER_FROM_VOLUME)
    transcode = await push(mesh, "transcode", fetch_then_serve("RENDER", "transcoded"))
    for document in (
        entry("detect", detect),
        entry("render", render, {"detect": "shared_volume"}),
        entry("transcode", transcode, {"render": "http"}),
    ):
        await f.call("POST", "/v1/catalog", document, expect=201)
    record: dict[str, Any] = await ferryctl_json(f, "deploy", "transcode", "--wait", "120")
    assert record["state"] == "HEALTHY", record
    parts = {c["name"]: c for c in record["components"]}
    assert parts["detect"]["host"] == parts["render"]["host"]

    async def reported() -> bool:
        host = await f.call("GET", f"/v1/hosts/{parts['detect']['host']}")
        ids = {c["id"] for c in host.get("containers", [])}
        return parts["detect"]["container"] in ids and parts["render"]["container"] in ids

    await f.wait_for("the volume group in its host's telemetry", reported, within=30)
    return record


def volume_dir(host: MeshHost, record: dict[str, Any]) -> Path:
    return host.agent_state_dir / "volumes" / f"{record['id']}-detect-1"


async def read_in_container(host: MeshHost, container: str, path: str) -> str:
    """A file as the container sees it (a process exec'd into it on its host)."""
    res = await host.actr(
        "task", "exec", "--exec-id", f"read-{secrets.token_hex(3)}", container, "/bin/busybox", "cat", path
    )
    assert res.returncode == 0, (res.stdout, res.stderr)
    return res.stdout


async def what_happened(f: CoordinatedFleet) -> str:
    """The migrations and what the agents logged of them: for a failure's message."""
    migrations = (await f.call("GET", "/v1/migrations"))["migrations"]
    lines = [f"{m['id']} {m['container']} {m['state']} -> {m['target']}: {m['error']}" for m in migrations]
    for host in f.mesh.hosts:
        logged = host.agent_log.read_text(errors="replace").splitlines() if host.agent_log.exists() else []
        lines += [f"{host.name}: {line[:400]}" for line in logged if "migrat" in line or "volume" in line][-40:]
    told = [line[:600] for line in f.coordinator.logs().splitlines() if "component" in line or "migration" in line]
    return "\n".join(lines + told[-40:])


async def test_a_drain_moves_components_sharing_a_volume_together_with_the_volume(
    fleet3: CoordinatedFleet,  # noqa: F811 - the fixture imported above
) -> None:
    f, mesh = fleet3, fleet3.mesh
    record = await deploy_pipeline(f)
    parts = {c["name"]: c for c in record["components"]}
    source = mesh[parts["detect"]["host"]]
    frame = (volume_dir(source, record) / "frame").read_text()
    assert frame.startswith(f"detected:{record['id']}:")
    (volume_dir(source, record) / "before-drain").write_text("written before the drain\n")

    await f.call("POST", f"/v1/hosts/{source.name}/drain", expect=202)

    async def drained() -> dict[str, Any] | None:
        now = await f.call("GET", f"/v1/deployments/{record['id']}")
        # Throughout: the group's freeze is not a failure.
        assert now["state"] == "HEALTHY", (now["components"], await what_happened(f))
        host = await f.call("GET", f"/v1/hosts/{source.name}")
        here = {c["name"]: c["host"] for c in now["components"]}
        return now if host["state"] == "drained" and source.name not in here.values() else None

    try:
        after = await f.wait_for("the drain and the records following it", drained, within=180)
    except AssertionError as exc:
        raise AssertionError(await what_happened(f)) from exc
    moved = {c["name"]: c for c in after["components"]}
    target = mesh[moved["detect"]["host"]]
    assert moved["render"]["host"] == target.name != source.name, moved
    assert [c["state"] for c in after["components"]] == ["healthy", "healthy", "healthy"], after
    # One migration per member, committed together, to the one target.
    migrations = (await f.call("GET", "/v1/migrations"))["migrations"]
    group = {
        m["container"]: m
        for m in migrations
        if m["container"] in (parts["detect"]["container"], parts["render"]["container"])
    }
    assert {m["state"] for m in group.values()} == {"committed"} and {m["target"] for m in group.values()} == {
        target.name
    }
    # The volume went with them: on the target, at the same path in the containers, with what was written before.
    assert not volume_dir(source, record).exists()
    assert (volume_dir(target, record) / "frame").read_text() == frame
    assert not list((target.agent_state_dir / "volumes").glob(".incoming-*"))
    for name in ("detect", "render"):
        seen = await read_in_container(target, moved[name]["container"], f"{FRAMES}/before-drain")
        assert seen == "written before the drain\n"
        assert await read_in_container(target, moved[name]["container"], f"{FRAMES}/frame") == frame
    where = await deployed_containers(f)
    assert where[source.name] == [], where
    assert mesh.client is not None
    got = await mesh.aexec_in(
        mesh.client, ["busybox", "wget", "-qO-", f"http://{parts['transcode']['address']}:{PORT}/frame"], check=True
    )
    assert got.stdout.strip() == f"transcoded:rendered:{frame.strip()}"

    removed = await ferryctl_json(f, "undeploy", record["id"], "--wait", "60")
    assert removed["state"] == "REMOVED", removed
    await assert_nothing_left(f, record)


@pytest.fixture
async def failing_restores(base_dir: Path) -> AsyncIterator[CoordinatedFleet]:
    receiver: dict[str, AlertReceiver] = {}

    def tables(mesh: Mesh) -> dict[str, dict[str, Any]]:
        for host in mesh.hosts:  # every restore fails: the agents start after this
            host.agent_env["FERRYMAN_FAILPOINTS"] = "target.restore=error"
        receiver["it"] = AlertReceiver(mesh.fabric.netns, mesh.gateway)
        pool = f"{mesh.subnet.network_address + 192}/28"
        return {
            "deployments": {"address_pool": pool, "health_timeout": 30.0},
            "alerts": {"webhook_url": receiver["it"].url},
        }

    async with coordinated_fleet(base_dir, 3, coordinator_for=tables, with_client=True) as f:
        await receiver["it"].start()
        try:
            yield f
        finally:
            await receiver["it"].close()


async def test_a_member_that_fails_rolls_the_whole_group_back_leaving_nothing_on_the_target(
    failing_restores: CoordinatedFleet,
) -> None:
    f, mesh = failing_restores, failing_restores.mesh
    record = await deploy_pipeline(f)
    parts = {c["name"]: c for c in record["components"]}
    source = mesh[parts["detect"]["host"]]
    target = next(h for h in mesh.hosts if h.name != source.name)
    frame = (volume_dir(source, record) / "frame").read_text()
    # An agent asked for one member alone names the group when the mode cannot move it.
    body = {"container": parts["render"]["container"], "target": target.name, "mode": "lazy"}
    refused = await api(source, "POST", "/v1/migrations", body, expect=400)
    assert "volume group" in refused["error"]["message"] and parts["detect"]["container"] in refused["error"]["message"]

    # Asked for render alone, the coordinator moves the group: detect too.
    started = await f.call(
        "POST", "/v1/migrations", {"container": parts["render"]["container"], "to": target.name}, expect=202
    )

    async def finished() -> dict[str, Any] | None:
        m = await f.call("GET", f"/v1/migrations/{started['id']}")
        return m if m["done"] else None

    try:
        outcome = await f.wait_for("the group's migration", finished, within=120)
    except AssertionError as exc:
        raise AssertionError(await what_happened(f)) from exc
    assert outcome["state"] == "abandoned" and "failpoint" in outcome["error"], outcome
    migrations = (await f.call("GET", "/v1/migrations"))["migrations"]
    detect_moves = [m for m in migrations if m["container"] == parts["detect"]["container"]]
    assert [(m["state"], m["target"]) for m in detect_moves] == [("abandoned", target.name)], detect_moves
    # Everything is back on the source, volume included; nothing of it is on the target.
    where = await deployed_containers(f)
    assert parts["detect"]["container"] in where[source.name] and parts["render"]["container"] in where[source.name]
    assert where[target.name] in ([], [parts["transcode"]["container"]]), where
    assert (volume_dir(source, record) / "frame").read_text() == frame
    volumes = target.agent_state_dir / "volumes"
    assert not volume_dir(target, record).exists() and not list(volumes.glob(".incoming-*"))
    snapshots = (await target.actr("snapshots", "ls")).stdout
    assert parts["detect"]["container"] not in snapshots and parts["render"]["container"] not in snapshots
    assert await read_in_container(source, parts["render"]["container"], f"{FRAMES}/frame") == frame

    async def healthy() -> dict[str, Any] | None:
        now = await f.call("GET", f"/v1/deployments/{record['id']}")
        return now if now["state"] == "HEALTHY" else None

    await f.wait_for("the deployment healthy on the source", healthy, within=30)
    removed = await ferryctl_json(f, "undeploy", record["id"], "--wait", "60")
    assert removed["state"] == "REMOVED", removed
    await assert_nothing_left(f, record)
