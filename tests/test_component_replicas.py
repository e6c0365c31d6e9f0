"""Replicas of a deployment's component behind its one service address, on a real 3-host mesh.

The component is busybox: an HTTP health check on 8080 and, on 9000, a TCP echo that first sends
the replica's container id (its hostname). A client outside opens many short connections to the
service address (they spread over every replica) and one long-lived connection that sends a line
every 10 ms and checks the echo: it must see no error while other replicas are scaled out and in,
and scaling in its own replica must wait for it to close before the replica is stopped.
"""

from __future__ import annotations

import asyncio
import collections
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.network.balancer import check_backends, parse_backends, parse_balanced, table_name, table_script
from coordinator.deployments.behaviour import ComponentSeries
from coordinator.deployments.replicas import ScalePlan, plan_scale
from coordinator.deployments.states import ComponentRecord, ReplicaRecord, ReplicaState
from core.errors import InvalidRequest
from tests.harness import netns as nsh
from tests.harness.fleet import CoordinatedFleet, api, coordinated_fleet
from tests.harness.images import DEFAULT_PATH, ImageBuilder, busybox_layer
from tests.harness.mesh import Mesh

ECHO_PORT = 9000
SERVE = (
    "mkdir -p /www && hostname > /www/id && echo ok > /www/healthz && "
    "printf '#!/bin/sh\\ncat /www/id\\nexec cat\\n' > /serve && chmod +x /serve && "
    f"(nc -ll -p {ECHO_PORT} -e /serve &) && exec httpd -f -p 8080 -h /www"
)

SHORT_CLIENT = """
import json, socket, sys
seen = {}
for _ in range(int(sys.argv[2])):
    with socket.create_connection((sys.argv[1], 9000), timeout=5) as s:
        ident = s.makefile("rb").readline().decode().strip()
        seen[ident] = seen.get(ident, 0) + 1
print(json.dumps(seen))
"""

LONG_CLIENT = """
import socket, sys, threading, time
svc, want = sys.argv[1], sys.argv[2]
for _ in range(50):
    s = socket.create_connection((svc, 9000), timeout=5)
    f = s.makefile("rb")
    if f.readline().decode().strip() == want:
        break
    s.close()
else:
    print("never reached", want, flush=True)
    sys.exit(1)
print("connected", flush=True)
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
sent = errors = 0
while not stop.is_set():
    msg = f"{sent}\\n".encode()
    try:
        s.sendall(msg)
        if f.readline() != msg:
            errors += 1
    except OSError as exc:
        errors += 1
        print("error", exc, flush=True)
        break
    sent += 1
    time.sleep(0.01)
s.close()
print("done", sent, errors, flush=True)
"""


# ----- the rules, without I/O


def test_the_table_spreads_new_connections_only_and_masquerades_what_leaves_for_other_hosts() -> None:
    script = table_script("10.0.0.5", ["10.0.0.5", "10.0.0.6"], "eth0")
    assert "numgen inc mod 2 map { 0 : 10.0.0.5, 1 : 10.0.0.6 }" in script
    assert "tcp flags & (fin | syn | rst | ack) == syn" in script  # a mid-stream packet is never moved
    assert 'oifname "eth0" ct original ip daddr 10.0.0.5 ct status dnat masquerade' in script
    assert script.startswith("table ip fmlb_10_0_0_5\ndelete table ip fmlb_10_0_0_5\n")  # one transaction
    for bad in ([], ["10.0.0.6", "10.0.0.6"], ["127.0.0.1"], ["x"]):
        with pytest.raises(InvalidRequest):
            check_backends("10.0.0.5", bad)
    with pytest.raises(InvalidRequest):
        table_script("10.0.0.5", ["10.0.0.6"], 'eth0"; flush ruleset')
    listed = {
        "nftables": [
            {"table": {"name": table_name("10.0.0.5")}},
            {
                "rule": {
                    "table": "fmlb_10_0_0_5",
                    "chain": "prerouting",
                    "expr": [{"dnat": {"addr": {"map": {"data": {"set": [[1, "10.0.0.7"], [0, "10.0.0.5"]]}}}}}],
                }
            },
        ]
    }
    assert parse_backends(listed, "10.0.0.5") == ("10.0.0.5", "10.0.0.7")
    counted = {"rule": {"table": "fmlb_10_0_0_5", "chain": "output", "expr": [{"counter": {"packets": 4}}]}}
    assert parse_balanced({"nftables": [*listed["nftables"], counted, counted]}, "10.0.0.5") == 8
    assert parse_backends(listed, "10.0.0.9") is None


def test_scaling_plans_new_indexes_out_and_the_highest_in() -> None:
    c = ComponentRecord(name="echo", entry="echo@1", image="i", level=0, address="10.0.0.5", container="d-echo")
    assert plan_scale(c, 3, 16) == ScalePlan(add=(1, 2), remove=())
    r = (
        ReplicaRecord(1, "10.0.0.6", "h1", "d-echo-r1", state=ReplicaState.SERVING),
        ReplicaRecord(3, "10.0.0.7", "h2", "d-echo-r3", state=ReplicaState.SERVING),
        ReplicaRecord(2, "10.0.0.8", "h2", "d-echo-r2", state=ReplicaState.DRAINING),
    )
    c = ComponentRecord(**{**c.__dict__, "replicas": r})
    assert c.replica_count == 3
    assert plan_scale(c, 2, 16) == ScalePlan(add=(), remove=(3,))
    assert plan_scale(c, 1, 16) == ScalePlan(add=(), remove=(3, 1))
    assert plan_scale(c, 4, 16) == ScalePlan(add=(4,), remove=())  # 2 is still draining
    for bad in (0, 17):
        with pytest.raises(InvalidRequest):
            plan_scale(c, bad, 16)


def test_scaling_out_thaws_standbys_first_and_keeps_the_standbys_asked_for() -> None:
    c = ComponentRecord(name="echo", entry="echo@1", image="i", level=0, address="10.0.0.5", container="d-echo")
    r = (
        ReplicaRecord(1, "10.0.0.6", "h1", "d-echo-r1", state=ReplicaState.SERVING),
        ReplicaRecord(2, "10.0.0.7", "h2", "d-echo-r2", state=ReplicaState.STANDBY),
        ReplicaRecord(4, "10.0.0.8", "h2", "d-echo-r4", state=ReplicaState.STANDBY),
    )
    c = ComponentRecord(**{**c.__dict__, "replicas": r})
    assert c.replica_count == 2  # standbys do not serve
    assert plan_scale(c, 2, 16) == ScalePlan(add=(), remove=())  # standbys as they are
    assert plan_scale(c, 3, 16) == ScalePlan(add=(), remove=(), thaw=(2,))
    assert plan_scale(c, 5, 16) == ScalePlan(add=(3,), remove=(), thaw=(2, 4))
    assert plan_scale(c, 3, 16, standbys=2) == ScalePlan(add=(), remove=(), thaw=(2,), standby_add=(3,))
    assert plan_scale(c, 1, 16, standbys=0) == ScalePlan(add=(), remove=(1,), standby_remove=(4, 2))
    assert plan_scale(c, 2, 16, standbys=1) == ScalePlan(add=(), remove=(), standby_remove=(4,))
    # Standbys being started (index 5, not listed yet, and 3): not copies, not standbys, indexes taken.
    assert plan_scale(c, 5, 16, standbys=None, starting_standbys=(3, 5)) == ScalePlan(add=(6,), remove=(), thaw=(2, 4))
    assert plan_scale(c, 1, 16, starting_standbys=(3,)) == ScalePlan(add=(), remove=(1,))
    with pytest.raises(InvalidRequest, match="standbys"):
        plan_scale(c, 15, 16, standbys=2)
    with pytest.raises(InvalidRequest, match="standbys"):
        plan_scale(c, 2, 16, standbys=-1)


def test_behaviour_sums_a_components_containers_and_rates_its_balanced_connections() -> None:
    series = ComponentSeries(max_points=2)
    mine = {"ferryman.deployment": "d1", "ferryman.component": "echo"}
    sample = {
        "containers": [
            {"id": "d1-echo", "cpu_millis": 10.0, "memory_bytes": "1000", "labels": mine},
            {"id": "d1-echo-r1", "cpu_millis": 5.5, "memory_bytes": "500", "labels": {**mine, "ferryman.replica": "1"}},
            {"id": "other", "cpu_millis": 99.0, "memory_bytes": "1", "labels": {}},
        ]
    }
    series.observe("h1", [(1.0, sample), (2.0, sample), (3.0, sample)])
    usage = series.of("d1", "echo")["usage"]
    assert [(u["ts"], u["cpu_millis"], u["memory_bytes"], u["containers"]) for u in usage] == [
        (2.0, 15.5, 1500, 2),
        (3.0, 15.5, 1500, 2),
    ]  # bounded: the oldest point went
    series.observe_traffic("d1", "echo", 10.0, 100, {})
    series.observe_traffic("d1", "echo", 15.0, 150, {"10.0.0.6": 2})
    series.observe_traffic("d1", "echo", 20.0, 3, {})  # the table was rewritten: no rate across it
    assert [(t["new_connections_per_second"], t["open_connections"]) for t in series.of("d1", "echo")["traffic"]] == [
        (10.0, {"10.0.0.6": 2})
    ]
    series.forget("d1")
    assert series.of("d1", "echo") == {"usage": [], "traffic": [], "requests": []}


# ----- on the mesh


@pytest.fixture
async def fleet3(base_dir: Path) -> AsyncIterator[CoordinatedFleet]:
    def tables(mesh: Mesh) -> dict[str, dict[str, Any]]:
        pool = f"{mesh.subnet.network_address + 192}/28"
        return {"deployments": {"address_pool": pool, "health_timeout": 30.0, "drain_timeout": 60.0}}

    async with coordinated_fleet(base_dir, 3, coordinator_for=tables, with_client=True) as f:
        yield f


async def in_client(mesh: Mesh, script: str, *args: str) -> asyncio.subprocess.Process:
    assert mesh.client is not None
    nsenter = ["nsenter", f"--net={nsh.netns_path(mesh.client.netns)}"]
    return await asyncio.create_subprocess_exec(
        *nsenter,
        sys.executable,
        "-c",
        script,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def spread(mesh: Mesh, service: str, count: int) -> dict[str, int]:
    proc = await in_client(mesh, SHORT_CLIENT, service, str(count))
    out, err = await asyncio.wait_for(proc.communicate(b""), 60)
    assert proc.returncode == 0, err.decode()
    return collections.Counter(json.loads(out))


async def scale(f: CoordinatedFleet, deployment: str, n: int, *extra: str) -> dict[str, Any]:
    res = await f.ferryctl("--json", "scale", deployment, "echo", str(n), *extra, within=180)
    assert res.returncode == 0, (res.stdout, res.stderr, f.coordinator.logs()[-3000:])
    return json.loads(res.stdout)["components"][0]


async def wait_replicas(f: CoordinatedFleet, deployment: str, states: dict[int, str], within: float = 30) -> None:
    deadline = time.monotonic() + within
    while True:
        component = (await f.call("GET", f"/v1/deployments/{deployment}"))["components"][0]
        if {r["index"]: r["state"] for r in component["replicas"]} == states:
            return
        assert time.monotonic() < deadline, component
        await asyncio.sleep(0.2)


def serving(component: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {r["index"]: r for r in component["replicas"] if r["state"] == "serving"}


async def test_replicas_share_one_address_and_scale_without_dropping_connections(fleet3: CoordinatedFleet) -> None:
    f, mesh = fleet3, fleet3.mesh
    repo = "test/echo-replicas"
    await ImageBuilder([busybox_layer()], cmd=("/bin/sh", "-c", SERVE), env=[f"PATH={DEFAULT_PATH}"]).push(
        mesh.push_host, repo, "v1"
    )
    check = {"kind": "http", "port": 8080, "path": "/healthz", "interval": 0.5, "timeout": 0.5, "retries": 3}
    document = {
        "name": "echo",
        "version": "1.0.0",
        "image": mesh.image_ref(repo, "v1"),
        "manifest": {
            "required_images": [],
            "data_transfer_protocols": {},
            "dependency_health_check": check,
            "replicas": 3,
        },
    }
    await f.call("POST", "/v1/catalog", document, expect=201)
    # The manifest asks for 3: two more containers, each at its own address, healthy, behind the one
    # address, before the deploy's wait answers.
    record = await f.call("POST", "/v1/deployments?wait=120", {"image": "echo"})
    assert record["state"] == "HEALTHY", record
    deployment, service = record["id"], record["components"][0]["address"]
    owner = mesh[record["components"][0]["host"]]
    component = record["components"][0]
    replicas = serving(component)
    # Bad requests are refused with nothing changed.
    path = f"/v1/deployments/{deployment}/components/echo/scale"
    for body, status in (
        ({"replicas": 0}, 400),
        ({"replicas": 17}, 400),  # above [deployments] max_replicas
        ({"replicas": "2"}, 400),
        ({"replicas": 2, "drain_timeout": -1}, 400),
        ({"replicas": 2, "surplus": 1}, 400),
    ):
        refused = await f.call("POST", path, body, expect=status)
        assert refused["error"]["code"] == "invalid_request", refused
    missing = await f.call("POST", f"/v1/deployments/{deployment}/components/nope/scale", {"replicas": 2}, expect=404)
    assert missing["error"]["code"] == "component_not_found", missing
    assert (await f.call("GET", f"/v1/deployments/{deployment}"))["components"][0]["replicas"] == component["replicas"]
    assert sorted(replicas) == [1, 2], component
    ids = {record["components"][0]["container"], *(r["container"] for r in replicas.values())}
    hosts = {record["components"][0]["host"], *(r["host"] for r in replicas.values())}
    # Spread away from the owner: replicas on other hosts are reached over the fabric, masqueraded.
    assert owner.name not in (replicas[1]["host"], replicas[2]["host"]) and len(hosts) == 3, hosts
    balancer = await api(owner, "GET", f"/v1/network/balancers/{service}")
    assert balancer["backends"] == [service, replicas[1]["address"], replicas[2]["address"]], balancer
    # Many short connections reach every replica, evenly (round robin in the kernel).
    seen = await spread(mesh, service, 60)
    assert set(seen) == ids and all(n == 20 for n in seen.values()), (seen, hosts)

    # The coordinator keeps the component's behaviour: cgroup usage of its three containers from the
    # agents' telemetry, and the balancer's connection rate from the owner.
    deadline = time.monotonic() + 60
    while True:
        behaviour = await f.call("GET", f"/v1/deployments/{deployment}/components/echo/behaviour")
        latest = {u["host"]: u["containers"] for u in behaviour["usage"]}
        rates = [t["new_connections_per_second"] for t in behaviour["traffic"]]
        if sum(latest.values()) == 3 and any(r > 0 for r in rates):
            break
        assert time.monotonic() < deadline, behaviour
        await spread(mesh, service, 9)  # traffic between two reads of the counters (every 5 s)
        await asyncio.sleep(1.0)
    assert set(latest) == hosts and all(u["memory_bytes"] > 0 for u in behaviour["usage"][-3:]), behaviour

    # A replica that stops leaves the balancer (new connections never meet a closed port) and comes
    # back once its check passes again.
    r1_host = mesh[replicas[1]["host"]]
    await api(r1_host, "POST", f"/v1/containers/{replicas[1]['container']}/stop")
    await wait_replicas(f, deployment, {1: "degraded", 2: "serving"})
    assert set(await spread(mesh, service, 30)) == ids - {replicas[1]["container"]}
    await api(r1_host, "POST", f"/v1/containers/{replicas[1]['container']}/start")
    await wait_replicas(f, deployment, {1: "serving", 2: "serving"})
    assert set(await spread(mesh, service, 30)) == ids

    # A long-lived connection on replica 2 sees no error while replica 3 comes and goes.
    holder = await in_client(mesh, LONG_CLIENT, service, replicas[2]["container"])
    assert holder.stdout is not None and holder.stdin is not None
    line = await asyncio.wait_for(holder.stdout.readline(), 30)
    assert line == b"connected\n", line
    component = await scale(f, deployment, 4, "--wait", "120")
    assert sorted(serving(component)) == [1, 2, 3]
    assert set(await spread(mesh, service, 40)) == ids | {serving(component)[3]["container"]}
    component = await scale(f, deployment, 3, "--wait", "120")
    assert sorted(serving(component)) == [1, 2] and [r["index"] for r in component["replicas"]] == [1, 2]
    assert set(await spread(mesh, service, 30)) == ids

    # Scaling in replica 2 waits for its connection: out of the balancer at once, stopped once it closes.
    res = await f.ferryctl("--json", "scale", deployment, "echo", "2", "--no-wait")
    assert res.returncode == 0, res.stderr
    await asyncio.sleep(3.0)
    now = (await f.call("GET", f"/v1/deployments/{deployment}"))["components"][0]
    assert {r["index"]: r["state"] for r in now["replicas"]} == {1: "serving", 2: "draining"}, now
    r2_host = mesh[replicas[2]["host"]]
    listed = (await api(r2_host, "GET", "/v1/containers"))["containers"]
    assert replicas[2]["container"] in {c["id"] for c in listed}
    assert replicas[2]["container"] not in await spread(mesh, service, 20)  # no new connection reaches it
    busy = await f.call("DELETE", f"/v1/deployments/{deployment}", expect=409)  # not while it scales
    assert busy["error"]["code"] == "deployment_busy", busy
    counts = (await api(owner, "GET", f"/v1/network/balancers/{service}"))["connections"]
    assert counts.get(replicas[2]["address"]) == 1, counts
    holder.stdin.close()
    out, _ = await asyncio.wait_for(holder.communicate(), 30)
    closed = time.monotonic()
    words = out.decode().split()
    assert words[0] == "done" and int(words[1]) > 100 and words[2] == "0", out  # no error, ever
    while True:
        now = (await f.call("GET", f"/v1/deployments/{deployment}"))["components"][0]
        if [r["index"] for r in now["replicas"]] == [1]:
            break
        assert time.monotonic() - closed < 10, now
        await asyncio.sleep(0.2)
    listed = (await api(r2_host, "GET", "/v1/containers"))["containers"]
    assert replicas[2]["container"] not in {c["id"] for c in listed}

    # A standby being started does not hold back a scale out: the scale is taken at once and starts
    # a copy beside it, at another index.
    await f.call("POST", path, {"replicas": 2, "standbys": 1}, expect=202)
    await f.call("POST", path, {"replicas": 3}, expect=202)
    await wait_replicas(f, deployment, {1: "serving", 2: "standby", 3: "serving"}, within=60)

    # Undeploy removes the replicas and the balancer with the component.
    removed = await f.call("DELETE", f"/v1/deployments/{deployment}?wait=60")
    assert removed["state"] == "REMOVED", removed
    for host in mesh.hosts:
        listed = (await api(host, "GET", "/v1/containers"))["containers"]
        assert [c["id"] for c in listed if deployment in c["id"]] == []
    await api(owner, "GET", f"/v1/network/balancers/{service}", expect=404)
