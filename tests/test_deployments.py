"""Deployments on a real 3-host coordinated fleet: a pipeline deployed, used, undeployed; failures.

The pipeline is three busybox programs that really pass data over the declared protocols, each
reading where its dependency is from the wiring environment: detect writes a frame into a shared
volume, render (on the same host, by the plan) reads it from there and serves it rendered over
HTTP, transcode fetches that from render's service address. Each is healthy (an HTTP check on
its service address) only once it has what it serves, and a client outside reads the result from
transcode's service address. Failures (an image that is not in the registry, a health check that
never passes, a crash loop, a host lost mid-deploy, a shared volume that cannot be mounted) must
leave nothing behind on any host or in the coordinator (containers, snapshots, reservations,
service addresses, volumes), and raise one alert each at a real aiohttp webhook receiver in the
fabric namespace.
"""

from __future__ import annotations

import ipaddress
import json
import re
import secrets
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from agent.ctl.exits import Exit
from tests.harness.alerts import AlertReceiver
from tests.harness.fleet import CoordinatedFleet, api, coordinated_fleet
from tests.harness.images import DEFAULT_PATH, File, ImageBuilder, Layer, busybox_layer
from tests.harness.mesh import Mesh, MeshHost

PORT = 8080
HEALTHZ = "/www/healthz"
SERVE = f"echo ok > /www/healthz && exec httpd -f -p {PORT} -h /www"
DETECT = f'mkdir -p /www && echo "detected:$FERRYMAN_DEPLOYMENT:$FERRYMAN_SERVICE_HOST" > /www/frame && {SERVE}'
FRAMES = "/shared/frames"
DETECT_TO_VOLUME = (
    f'mkdir -p /www && echo "detected:$FERRYMAN_DEPLOYMENT:$FERRYMAN_SERVICE_HOST" > {FRAMES}/next && '
    f"mv {FRAMES}/next {FRAMES}/frame && {SERVE}"
)
RENDER_FROM_VOLUME = (
    'mkdir -p /www && until [ -s "$FERRYMAN_DEP_DETECT_VOLUME/frame" ]; do sleep 0.1; done && '
    f'sed "s/^/rendered:/" "$FERRYMAN_DEP_DETECT_VOLUME/frame" > /www/frame && {SERVE}'
)


def fetch_then_serve(dependency: str, stage: str) -> str:
    """Fetch the dependency's frame over HTTP (its URL from the wiring), prefix it, serve it."""
    url = f'"${{FERRYMAN_DEP_{dependency}_URL}}frame"'
    return (
        f"mkdir -p /www && until wget -q -O /www/in {url}; do sleep 0.1; done && "
        f'sed "s/^/{stage}:/" /www/in > /www/frame && {SERVE}'
    )


def entry(name: str, image: str, requires: Mapping[str, str] = {}, check: Mapping[str, Any] | None = None) -> Any:
    """A catalog entry; `requires` maps each dependency to its protocol (http, or shared_volume at FRAMES)."""
    transfers = {
        dep: {"protocol": proto, "path": FRAMES} if proto == "shared_volume" else {"protocol": proto, "port": PORT}
        for dep, proto in requires.items()
    }
    return {
        "name": name,
        "version": "1.0.0",
        "image": image,
        "manifest": {
            "required_images": list(requires),
            "data_transfer_protocols": transfers,
            "dependency_health_check": check
            or {
                "kind": "http",
                "port": PORT,
                "path": "/healthz",
                "interval": 0.2,
                "timeout": 0.2,
                "retries": 3,
                "start_period": 10,  # fetching from a dependency may take a moment: not a failure
            },
        },
    }


async def push(mesh: Mesh, name: str, script: str, *layers: Layer) -> str:
    repo = f"test/{name}-{secrets.token_hex(3)}"
    image = ImageBuilder([busybox_layer(), *layers], cmd=("/bin/sh", "-c", script), env=[f"PATH={DEFAULT_PATH}"])
    await image.push(mesh.push_host, repo, "v1")
    return mesh.image_ref(repo, "v1")


@pytest.fixture
async def alerts() -> AsyncIterator[dict[str, AlertReceiver]]:
    holder: dict[str, AlertReceiver] = {}
    yield holder
    if "receiver" in holder:
        await holder["receiver"].close()


@pytest.fixture
async def fleet3(base_dir: Path, alerts: dict[str, AlertReceiver]) -> AsyncIterator[CoordinatedFleet]:
    def tables(mesh: Mesh) -> dict[str, dict[str, Any]]:
        alerts["receiver"] = AlertReceiver(mesh.fabric.netns, mesh.gateway)
        pool = f"{mesh.subnet.network_address + 192}/28"
        return {
            "deployments": {"address_pool": pool, "health_timeout": 30.0},
            "alerts": {"webhook_url": alerts["receiver"].url},
        }

    async with coordinated_fleet(base_dir, 3, coordinator_for=tables, with_client=True) as f:
        await alerts["receiver"].start()
        yield f


async def deployed_containers(f: CoordinatedFleet, hosts: list[MeshHost] | None = None) -> dict[str, list[str]]:
    """host -> the deployments' containers there (labelled by the coordinator), as the agents list them."""
    out = {}
    for host in f.mesh.hosts if hosts is None else hosts:
        listed = (await api(host, "GET", "/v1/containers"))["containers"]
        out[host.name] = sorted(c["id"] for c in listed if "ferryman.deployment" in (c.get("labels") or {}))
    return out


async def leftovers(host: MeshHost, deployment: str) -> list[str]:
    """What of the deployment is on the host below the agent: containerd snapshots, volume directories."""
    snapshots = [line.split()[0] for line in (await host.actr("snapshots", "ls")).stdout.splitlines()[1:]]
    volumes = host.agent_state_dir / "volumes"
    dirs = [p.name for p in volumes.iterdir()] if volumes.is_dir() else []
    return [f"snapshot {s}" for s in snapshots if deployment in s] + [f"volume {d}" for d in dirs if deployment in d]


async def assert_nothing_left(f: CoordinatedFleet, record: dict[str, Any]) -> None:
    assert await deployed_containers(f) == {h.name: [] for h in f.mesh.hosts}
    assert {h.name: await leftovers(h, record["id"]) for h in f.mesh.hosts} == {h.name: [] for h in f.mesh.hosts}
    reservations = (await f.call("GET", "/v1/reservations"))["reservations"]
    assert [r for r in reservations if record["id"] in r["purpose"]] == []
    assert f.mesh.client is not None
    for component in record["components"]:
        assert not await f.mesh.can_connect(f.mesh.client, component["address"], PORT), component
        for host in f.mesh.hosts:  # the service address is unpublished everywhere
            routes = await f.mesh.aexec_in(host, ["ip", "-4", "route", "show", component["address"]], check=True)
            assert routes.stdout.strip() == "", (host.name, routes.stdout)


async def ferryctl_json(f: CoordinatedFleet, *args: str, code: int = Exit.OK) -> Any:
    res = await f.ferryctl("--json", *args)
    why = json.loads(res.stdout).get("error") if res.stdout.startswith("{") else res.stderr
    assert res.returncode == code, (res.returncode, why, res.stdout, res.stderr, f.coordinator.logs()[-3000:])
    return json.loads(res.stdout)


async def test_a_pipeline_deploys_health_gated_across_hosts_serves_and_undeploys(fleet3: CoordinatedFleet) -> None:
    f, mesh = fleet3, fleet3.mesh
    detect = await push(mesh, "detect", DETECT_TO_VOLUME)
    render = await push(mesh, "render", RENDER_FROM_VOLUME)
    transcode = await push(mesh, "transcode", fetch_then_serve("RENDER", "transcoded"))
    for document in (
        entry("detect", detect),
        entry("render", render, {"detect": "shared_volume"}),
        entry("transcode", transcode, {"render": "http"}),
    ):
        await f.call("POST", "/v1/catalog", document, expect=201)

    record = await ferryctl_json(f, "deploy", "transcode", "--wait", "120")
    assert record["state"] == "HEALTHY", record
    parts = {c["name"]: c for c in record["components"]}
    assert [(c["name"], c["level"], c["state"]) for c in record["components"]] == [
        ("detect", 0, "healthy"),
        ("render", 1, "healthy"),
        ("transcode", 2, "healthy"),
    ]
    assert [s["state"] for s in record["history"]] == ["PLANNED", "STARTING", "STARTING", "STARTING", "HEALTHY"]
    # Each level started only once the one before was healthy, and the data went through all three.
    assert mesh.client is not None
    got = await mesh.aexec_in(
        mesh.client, ["busybox", "wget", "-qO-", f"http://{parts['transcode']['address']}:{PORT}/frame"], check=True
    )
    assert got.stdout.strip() == f"transcoded:rendered:detected:{record['id']}:{parts['detect']['address']}"
    running = await deployed_containers(f)
    assert sorted(c for cs in running.values() for c in cs) == sorted(c["container"] for c in record["components"])
    # Each component runs within the limits it reserved, and its placement reservation is gone (here
    # and on its agent): the container holds the capacity now, not a reservation waiting for its TTL.
    reservations = (await f.call("GET", "/v1/reservations"))["reservations"]
    assert [r for r in reservations if record["id"] in r["purpose"]] == []
    assert [c["reservation"] for c in record["components"]] == ["", "", ""]
    for c in record["components"]:
        host = mesh[c["host"]]
        limits = (await api(host, "GET", f"/v1/containers/{c['container']}"))["spec"]["linux"]["resources"]
        assert limits["memory"]["limit"] == 64 << 20 and limits["cpu"]["quota"] == 10_000, limits
        held = (await api(host, "GET", "/v1/reservations"))["reservations"]
        assert [r for r in held if record["id"] in str(r.get("purpose"))] == [], held
    for c in record["components"]:
        assert c["container"] in running[c["host"]]
    # detect hands its frames to render through a volume on their one host, made by the agent there.
    assert parts["detect"]["host"] == parts["render"]["host"]
    assert parts["detect"]["volumes"] == parts["render"]["volumes"] == ["detect-1"]
    volume = mesh[parts["detect"]["host"]].agent_state_dir / "volumes" / f"{record['id']}-detect-1"
    assert (volume / "frame").read_text().startswith(f"detected:{record['id']}:")
    # A container with a volume moves only with its volume group, in pre-copy mode: a post-copy mode is
    # refused before anything moves (the group's moves: tests/test_volume_groups.py).
    other = next(h.name for h in mesh.hosts if h.name != parts["detect"]["host"])
    body = {"container": parts["detect"]["container"], "target": other, "mode": "lazy"}
    refused = await api(mesh[parts["detect"]["host"]], "POST", "/v1/migrations", body, expect=400)
    assert "volume group" in refused["error"]["message"], refused
    # A component without one migrates like any container, and the record follows it to its new
    # host: the deployment stays HEALTHY throughout, and its undeploy removes the container there.
    moving = parts["transcode"]
    target = next(h.name for h in mesh.hosts if h.name != moving["host"])

    async def reported() -> bool:
        host = await f.call("GET", f"/v1/hosts/{moving['host']}")
        return any(c["id"] == moving["container"] for c in host.get("containers", []))

    await f.wait_for("transcode in its host's telemetry", reported, within=30)
    body = {"container": moving["container"], "to": target}
    started = await f.call("POST", "/v1/migrations", body, expect=202)

    async def finished() -> dict[str, Any] | None:
        m = await f.call("GET", f"/v1/migrations/{started['id']}")
        return m if m["done"] else None

    async def followed() -> dict[str, Any] | None:
        now = await f.call("GET", f"/v1/deployments/{record['id']}")
        assert now["state"] == "HEALTHY", now
        return now if {c["name"]: c for c in now["components"]}["transcode"]["host"] == target else None

    outcome = await f.wait_for("the migration", finished, within=120)
    assert outcome["state"] == "committed", outcome
    after = await f.wait_for("the record following transcode", followed, within=60)
    assert [c["state"] for c in after["components"]] == ["healthy", "healthy", "healthy"], after
    where = await deployed_containers(f)
    assert moving["container"] in where[target] and moving["container"] not in where[moving["host"]], where
    got = await mesh.aexec_in(mesh.client, ["busybox", "wget", "-qO-", f"http://{moving['address']}:{PORT}/frame"])
    assert got.stdout.strip().startswith("transcoded:rendered:"), got

    listed = await ferryctl_json(f, "deployments")
    assert [(d["id"], d["state"]) for d in listed["deployments"]] == [(record["id"], "HEALTHY")]
    status = await f.ferryctl("deployment", "status", record["id"])
    assert status.returncode == 0 and f"deployment {record['id']} of transcode@1.0.0: HEALTHY" in status.stdout

    removed = await ferryctl_json(f, "undeploy", record["id"], "--wait", "60")
    assert removed["state"] == "REMOVED", removed
    assert {c["state"] for c in removed["components"]} == {"removed"}
    await assert_nothing_left(f, record)
    assert not volume.exists()
    # Its addresses went back to the pool, behind those never used (a peer's ARP entry may still point
    # them at their old hosts): the next deployment takes the next three.
    again = await ferryctl_json(f, "deploy", "transcode", "--wait", "120")
    assert again["state"] == "HEALTHY"
    first = [ipaddress.ip_address(c["address"]) for c in record["components"]]
    assert [ipaddress.ip_address(c["address"]) for c in again["components"]] == [first[-1] + n for n in (1, 2, 3)]
    await ferryctl_json(f, "undeploy", again["id"])
    await assert_nothing_left(f, again)


async def test_failures_leave_nothing_behind_and_raise_one_alert_each(
    fleet3: CoordinatedFleet, alerts: dict[str, AlertReceiver]
) -> None:
    f, mesh = fleet3, fleet3.mesh
    receiver = alerts["receiver"]
    detect = await push(mesh, "detect", DETECT)
    sick = await push(mesh, "sick", "exec sleep 3600")  # runs, but never answers its check
    never = {"kind": "http", "port": PORT, "path": "/healthz", "interval": 0.2, "timeout": 0.2, "retries": 3}
    missing = mesh.image_ref(f"test/absent-{secrets.token_hex(3)}", "v1")
    for document in (
        entry("detect", detect),
        entry("broken", missing, {"detect": "http"}),
        entry("sick", sick, {"detect": "http"}, never),
    ):
        await f.call("POST", "/v1/catalog", document, expect=201)

    cases = [("broken", "pull", "could not be pulled"), ("sick", "unhealthy", "became unhealthy")]
    for n, (name, reason, why) in enumerate(cases, start=1):
        record = await ferryctl_json(f, "deploy", name, "--wait", "120", code=Exit.NOT_DEPLOYED)
        assert record["state"] == "FAILED", record
        assert record["failed_component"] == name and why in record["error"], record
        assert [s["state"] for s in record["history"]][-2:] == ["ROLLING_BACK", "FAILED"]
        # detect had started and was healthy: the rollback removed it too.
        assert record["components"][0]["name"] == "detect" and record["components"][0]["state"] == "removed"
        await assert_nothing_left(f, record)
        bodies = await receiver.wait_for(n)
        assert len(bodies) == n  # one alert per failure
        [alert] = bodies[-1]["alerts"]
        assert bodies[-1]["version"] == "4" and bodies[-1]["status"] == "firing"
        assert alert["labels"] == {
            "alertname": "FerrymanDeploymentFailed",
            "severity": "critical",
            "deployment": record["id"],
            "image": f"{name}@1.0.0",
            "component": name,
            "reason": reason,
        }
        assert why in alert["annotations"]["description"]
        status = await f.ferryctl("deployment", "status", record["id"])
        assert status.returncode == Exit.NOT_DEPLOYED and f"failed: {name}: " in status.stdout

    metrics = await f.call("GET", "/metrics")
    assert 'ferryman_coordinator_deployment_failures_total{reason="pull"} 1.0' in metrics
    assert 'ferryman_coordinator_deployment_failures_total{reason="unhealthy"} 1.0' in metrics
    assert 'ferryman_coordinator_alert_webhooks_total{result="sent"} 2.0' in metrics


async def test_a_coordinator_killed_mid_deployment_rolls_it_back_when_it_starts_again(
    fleet3: CoordinatedFleet, alerts: dict[str, AlertReceiver]
) -> None:
    f, mesh = fleet3, fleet3.mesh
    detect = await push(mesh, "detect", DETECT)
    slow = await push(mesh, "slow", "exec sleep 3600")  # never healthy, and its start period is long
    waiting = {"kind": "tcp", "port": PORT, "interval": 0.5, "timeout": 0.5, "retries": 3, "start_period": 600}
    for document in (entry("detect", detect), entry("slow", slow, {"detect": "http"}, waiting)):
        await f.call("POST", "/v1/catalog", document, expect=201)
    record = await ferryctl_json(f, "deploy", "slow", "--no-wait")

    async def slow_created() -> bool:
        now = await f.call("GET", f"/v1/deployments/{record['id']}")
        running = [c for cs in (await deployed_containers(f)).values() for c in cs]
        return bool(now["level"] == 1 and len(running) == 2)

    await f.wait_for("slow created at level 1", slow_created, within=60)
    assert f.coordinator.proc is not None
    f.coordinator.proc.kill()  # a crash: no rollback on the way out
    await f.coordinator.stop()
    assert len([c for cs in (await deployed_containers(f)).values() for c in cs]) == 2  # left running
    await f.coordinator.start()

    async def failed() -> dict[str, Any] | None:
        now = await f.call("GET", f"/v1/deployments/{record['id']}")
        return dict(now) if now["state"] == "FAILED" else None

    after = await f.wait_for("rolled back after the restart", failed, within=60)
    assert "coordinator restarted" in after["error"] and after["failed_component"] == "", after
    await assert_nothing_left(f, after)
    [body] = await alerts["receiver"].wait_for(1)
    assert body["alerts"][0]["labels"]["reason"] == "coordinator_restart"


async def assert_one_alert(
    receiver: AlertReceiver, record: dict[str, Any], component: str, reason: str, why: str
) -> None:
    [body] = await receiver.wait_for(1)
    [alert] = body["alerts"]
    assert alert["labels"] == {
        "alertname": "FerrymanDeploymentFailed",
        "severity": "critical",
        "deployment": record["id"],
        "image": record["root"],
        "component": component,
        "reason": reason,
    }
    assert why in alert["annotations"]["description"], alert


async def test_a_crash_loop_fails_the_deployment_and_leaves_nothing(
    fleet3: CoordinatedFleet, alerts: dict[str, AlertReceiver]
) -> None:
    f, mesh = fleet3, fleet3.mesh
    detect = await push(mesh, "detect", DETECT)
    crashing = await push(mesh, "crashing", "echo starting; exit 3")  # the agent restarts it, it exits again
    for document in (entry("detect", detect), entry("crashing", crashing, {"detect": "http"})):
        await f.call("POST", "/v1/catalog", document, expect=201)

    record = await ferryctl_json(f, "deploy", "crashing", "--wait", "120", code=Exit.NOT_DEPLOYED)
    assert record["state"] == "FAILED", record
    assert record["failed_component"] == "crashing", record
    # At least crash_loop_exits (3): runs that end within milliseconds are counted from the agent's
    # restart count, which may be one ahead by the time it is read.
    exits = re.search(r"exited (\d+) times while it started \(restart policy on-failure\)", record["error"])
    assert exits is not None and int(exits.group(1)) >= 3, record
    assert [c["state"] for c in record["components"]] == ["removed", "failed"]
    await assert_nothing_left(f, record)
    await assert_one_alert(alerts["receiver"], record, "crashing", "crash_loop", "times while it started")
    # Its host's agent did restart it (the exits were real runs, not one exit seen three times).
    host = mesh[record["components"][1]["host"]]
    assert len(host.log_events("restarted exited container")) >= 2, host.agent_log_tail()


async def test_a_host_lost_mid_deploy_is_rolled_back_and_swept_when_it_returns(
    fleet3: CoordinatedFleet, alerts: dict[str, AlertReceiver]
) -> None:
    f, mesh = fleet3, fleet3.mesh
    detect = await push(mesh, "detect", DETECT)
    slow = await push(mesh, "slow", "exec sleep 3600")  # never healthy, and its start period is long
    waiting = {"kind": "tcp", "port": PORT, "interval": 0.5, "timeout": 0.5, "retries": 3, "start_period": 600}
    for document in (entry("detect", detect), entry("slow", slow, {"detect": "http"}, waiting)):
        await f.call("POST", "/v1/catalog", document, expect=201)
    record = await ferryctl_json(f, "deploy", "slow", "--no-wait")

    async def slow_created() -> dict[str, Any] | None:
        now = await f.call("GET", f"/v1/deployments/{record['id']}")
        running = [c for cs in (await deployed_containers(f)).values() for c in cs]
        return dict(now) if now["level"] == 1 and len(running) == 2 else None

    started = await f.wait_for("slow created at level 1", slow_created, within=60)
    lost = mesh[started["components"][1]["host"]]
    await lost.kill_agent()  # the host is gone for the coordinator; its containerd still runs `slow`

    async def failed() -> dict[str, Any] | None:
        now = await f.call("GET", f"/v1/deployments/{record['id']}")
        return dict(now) if now["state"] == "FAILED" else None

    after = await f.wait_for("rolled back without the lost host", failed, within=60)
    assert after["failed_component"] == "slow", after
    assert f"slow: host {lost.name} was lost while it started" in after["error"], after
    remaining = [h for h in mesh.hosts if h is not lost]
    assert await deployed_containers(f, remaining) == {h.name: [] for h in remaining}
    assert {h.name: await leftovers(h, record["id"]) for h in remaining} == {h.name: [] for h in remaining}
    reservations = (await f.call("GET", "/v1/reservations"))["reservations"]
    assert [r for r in reservations if record["id"] in r["purpose"]] == []  # released here; the agent's expires
    parts = {c["name"]: c for c in after["components"]}
    assert parts["slow"]["left_behind"] is True and parts["slow"]["state"] == "failed", parts
    await assert_one_alert(alerts["receiver"], after, "slow", "host_lost", "was lost while it started")

    await lost.start_agent()  # back: the coordinator removes what it could not before

    async def swept() -> dict[str, Any] | None:
        now = await f.call("GET", f"/v1/deployments/{record['id']}")
        return dict(now) if not any(c["left_behind"] for c in now["components"]) else None

    final = await f.wait_for("leftovers removed once the host answers", swept, within=90)
    await assert_nothing_left(f, final)
    assert len(await alerts["receiver"].wait_for(1)) == 1  # still the one alert


async def test_a_shared_volume_that_cannot_be_mounted_fails_and_leaves_nothing(
    fleet3: CoordinatedFleet, alerts: dict[str, AlertReceiver]
) -> None:
    f, mesh = fleet3, fleet3.mesh
    provider = await push(mesh, "detect", DETECT_TO_VOLUME)
    # A file where the volume is to be mounted: the provider made the volume, the dependent cannot mount it.
    occupied = Layer([File(FRAMES.lstrip("/"), b"not a directory\n")])
    user = await push(mesh, "render", RENDER_FROM_VOLUME, occupied)
    for document in (entry("detect", provider), entry("render", user, {"detect": "shared_volume"})):
        await f.call("POST", "/v1/catalog", document, expect=201)

    record = await ferryctl_json(f, "deploy", "render", "--wait", "120", code=Exit.NOT_DEPLOYED)
    assert record["state"] == "FAILED", record
    assert record["failed_component"] == "render" and "could not start" in record["error"], record
    assert [(c["name"], c["state"]) for c in record["components"]] == [("detect", "removed"), ("render", "failed")]
    await assert_nothing_left(f, record)
    await assert_one_alert(alerts["receiver"], record, "render", "create", "could not start")


async def test_a_dependency_that_fails_later_is_restarted_and_its_dependents_are_told(
    fleet3: CoordinatedFleet, alerts: dict[str, AlertReceiver]
) -> None:
    f, mesh = fleet3, fleet3.mesh
    receiver = alerts["receiver"]
    detect = await push(mesh, "detect", DETECT)
    transcode = await push(mesh, "transcode", fetch_then_serve("DETECT", "transcoded"))
    for document in (entry("detect", detect), entry("transcode", transcode, {"detect": "http"})):
        await f.call("POST", "/v1/catalog", document, expect=201)
    record = await ferryctl_json(f, "deploy", "transcode", "--wait", "120")
    assert record["state"] == "HEALTHY", record
    dep = record["components"][0]
    host = mesh[dep["host"]]

    async def now() -> dict[str, Any]:
        return dict(await f.call("GET", f"/v1/deployments/{record['id']}"))

    async def in_state(state: str) -> dict[str, Any] | None:
        got = await now()
        return got if got["state"] == state else None

    # Its check fails (the process runs on): the deployment is DEGRADED, its dependent is told.
    await host.actr("tasks", "exec", "--exec-id", f"rm{secrets.token_hex(3)}", dep["container"], "rm", HEALTHZ)
    degraded = await f.wait_for("DEGRADED", lambda: in_state("DEGRADED"), within=30)
    parts = {c["name"]: c for c in degraded["components"]}
    assert parts["detect"]["state"] == "degraded" and "became unhealthy" in parts["detect"]["error"], parts
    assert parts["transcode"]["state"] == "healthy" and parts["transcode"]["waiting_on"] == ["detect"], parts
    status = await f.ferryctl("deployment", "status", record["id"])
    assert status.returncode == 0 and f"{record['id']} of transcode@1.0.0: DEGRADED" in status.stdout, status
    assert "transcode (transcode@1.0.0) healthy" in status.stdout and "waiting on detect" in status.stdout
    [fired] = await receiver.wait_for(1)
    assert fired["status"] == "firing" and fired["alerts"][0]["labels"] == {
        "alertname": "FerrymanDeploymentComponentDegraded",
        "severity": "warning",
        "deployment": record["id"],
        "image": "transcode@1.0.0",
        "component": "detect",
        "dependents": "transcode",
    }
    await host.actr("tasks", "exec", "--exec-id", f"ok{secrets.token_hex(3)}", dep["container"], "touch", HEALTHZ)
    healthy = await f.wait_for("HEALTHY again", lambda: in_state("HEALTHY"), within=30)
    assert [c["waiting_on"] for c in healthy["components"]] == [[], []]
    resolved = (await receiver.wait_for(2))[1]
    assert resolved["status"] == "resolved" and resolved["alerts"][0]["endsAt"] != "0001-01-01T00:00:00Z"
    assert resolved["alerts"][0]["startsAt"] == fired["alerts"][0]["startsAt"]

    # Its process dies: its agent restarts it by the policy (on-failure), and the same is told.
    await host.actr("tasks", "kill", "-s", "SIGKILL", dep["container"])
    bodies = await receiver.wait_for(4)
    assert [b["status"] for b in bodies[2:]] == ["firing", "resolved"]
    assert bodies[2]["alerts"][0]["labels"]["component"] == "detect"
    back = await f.wait_for("HEALTHY after the restart", lambda: in_state("HEALTHY"), within=30)
    assert [s["state"] for s in back["history"]][-4:] == ["DEGRADED", "HEALTHY", "DEGRADED", "HEALTHY"]

    async def restarted() -> bool:  # the agent logs it once the restart call returns
        return len(host.log_events("restarted exited container")) == 1

    await f.wait_for("the agent's restart logged", restarted, within=10)
    assert mesh.client is not None
    got = await mesh.aexec_in(
        mesh.client, ["busybox", "wget", "-qO-", f"http://{dep['address']}:{PORT}/frame"], check=True
    )
    assert got.stdout.startswith("detected:")  # at the same service address
    # Undeploying does not count the teardown's exits as a component degrading.
    removed = await ferryctl_json(f, "undeploy", record["id"], "--wait", "60")
    assert removed["state"] == "REMOVED", removed
    await assert_nothing_left(f, removed)
    assert len(await receiver.wait_for(4)) == 4
    metrics = await f.call("GET", "/metrics")
    assert 'ferryman_coordinator_deployment_component_changes_total{to="degraded"} 2.0' in metrics
