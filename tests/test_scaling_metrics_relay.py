"""Request metrics and cold starts measured on a real 2-host mesh (docs/scaling.md, "Behaviour").

A component that declares `metrics_port` serves Prometheus text at /metrics (the scaling bench's
stage, tests/workloads/loadstage.c). Its agent relays the page from inside the container's network
namespace (`GET /v1/containers/{id}/metrics?port=P`); the leader reads every copy every 5 s and
keeps the request rate, mean latency and errors in the component's behaviour series. Scaling the
component out measures its cold start (scale request to healthy). A warm standby is started and
frozen beside the replicas (out of the balancer), and a scale out thaws it instead of starting one.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import netns as nsh
from tests.harness.fleet import CoordinatedFleet, api, coordinated_fleet
from tests.harness.mesh import Mesh
from tests.harness.workloads import loadstage_image

PORT = 8080
CLIENT = """
import socket, sys
failed = 0
for _ in range(int(sys.argv[2])):
    with socket.create_connection((sys.argv[1], 8080), timeout=5) as s:
        s.sendall(b"POST /work HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: 0\\r\\n\\r\\n")
        failed += not s.makefile("rb").readline().startswith(b"HTTP/1.1 200")
print(failed)
"""


@pytest.fixture
async def fleet2(base_dir: Path) -> AsyncIterator[CoordinatedFleet]:
    def tables(mesh: Mesh) -> dict[str, dict[str, Any]]:
        pool = f"{mesh.subnet.network_address + 192}/28"
        return {"deployments": {"address_pool": pool, "health_timeout": 30.0}}

    async with coordinated_fleet(base_dir, 2, coordinator_for=tables, with_client=True) as f:
        yield f


async def requests(mesh: Mesh, service: str, count: int) -> None:
    assert mesh.client is not None
    proc = await asyncio.create_subprocess_exec(
        "nsenter",
        f"--net={nsh.netns_path(mesh.client.netns)}",
        sys.executable,
        "-c",
        CLIENT,
        service,
        str(count),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0 and out.strip() == b"0", (out, err)


async def test_request_rate_latency_and_errors_and_the_cold_start_are_kept(fleet2: CoordinatedFleet) -> None:
    f, mesh = fleet2, fleet2.mesh
    repo = "test/loadstage"
    await loadstage_image(PORT, work_us=3000).push(mesh.push_host, repo, "v1")
    check = {"kind": "http", "port": PORT, "path": "/healthz", "interval": 0.5, "timeout": 0.5, "retries": 3}
    document = {
        "name": "stage",
        "version": "1.0.0",
        "image": mesh.image_ref(repo, "v1"),
        "manifest": {
            "required_images": [],
            "data_transfer_protocols": {},
            "dependency_health_check": check,
            "metrics_port": PORT,
        },
    }
    bad = {**document, "version": "0.9.0", "manifest": {**document["manifest"], "metrics_port": 70000}}
    refused = await f.call("POST", "/v1/catalog", bad, expect=400)
    assert "metrics_port" in str(refused), refused
    await f.call("POST", "/v1/catalog", document, expect=201)
    record = await f.call("POST", "/v1/deployments?wait=120", {"image": "stage"})
    assert record["state"] == "HEALTHY", record
    deployment, component = record["id"], record["components"][0]
    assert component["metrics_port"] == PORT
    host, service, container = mesh[component["host"]], component["address"], component["container"]

    # The agent relays the page from inside the container's network namespace; bad asks are refused.
    await requests(mesh, service, 5)
    page = await api(host, "GET", f"/v1/containers/{container}/metrics?port={PORT}")
    assert "requests_total 5" in page, page
    for path, status, code in (
        (f"/v1/containers/{container}/metrics", 400, "invalid_request"),
        (f"/v1/containers/{container}/metrics?port=0", 400, "invalid_request"),
        (f"/v1/containers/{container}/metrics?port={PORT}&x=1", 400, "invalid_request"),
        (f"/v1/containers/nope/metrics?port={PORT}", 404, "container_not_found"),
        (f"/v1/containers/{container}/metrics?port=9", 502, "component_unreachable"),
    ):
        answer = await api(host, "GET", path, expect=status)
        assert answer["error"]["code"] == code, (path, answer)

    # The leader reads it every 5 s: requests between two reads become a point.
    deadline = time.monotonic() + 60
    while True:
        await requests(mesh, service, 20)
        behaviour = await f.call("GET", f"/v1/deployments/{deployment}/components/stage/behaviour")
        busy = [p for p in behaviour["requests"] if p["requests_per_second"] > 0]
        if busy:
            break
        assert time.monotonic() < deadline, behaviour
        await asyncio.sleep(1.0)
    point = busy[-1]
    # 3 ms of CPU each, under the component's CPU limit (0.1 core): at least 3 ms, well below 5 s
    assert 3.0 <= point["latency_ms"] < 5000 and point["errors_per_second"] == 0, point
    assert behaviour["cold_start_s"] is None  # no replica started yet

    # Scaling out measures the cold start: scale request to a healthy replica.
    began = time.monotonic()
    res = await f.ferryctl("--json", "scale", deployment, "stage", "2", "--wait", "120", within=180)
    took = time.monotonic() - began
    assert res.returncode == 0, (res.stdout, res.stderr)
    behaviour = await f.call("GET", f"/v1/deployments/{deployment}/components/stage/behaviour")
    assert behaviour["cold_start_s"] is not None and 0 < behaviour["cold_start_s"] <= took, (behaviour, took)
    # Both copies are read and summed: the count keeps rising with requests spread over two.
    before = len(behaviour["requests"])
    deadline = time.monotonic() + 30
    while True:
        await requests(mesh, service, 20)
        behaviour = await f.call("GET", f"/v1/deployments/{deployment}/components/stage/behaviour")
        if len(behaviour["requests"]) > before + 1 and behaviour["requests"][-1]["requests_per_second"] > 0:
            break
        assert time.monotonic() < deadline, behaviour
        await asyncio.sleep(1.0)

    # A warm standby: started, healthy, frozen, out of the balancer; the next scale out thaws it.
    res = await f.ferryctl("--json", "scale", deployment, "stage", "2", "--standbys", "1", "--wait", "120", within=180)
    assert res.returncode == 0, (res.stdout, res.stderr)
    replicas = {r["index"]: r for r in json.loads(res.stdout)["components"][0]["replicas"]}
    assert {i: r["state"] for i, r in replicas.items()} == {1: "serving", 2: "standby"}, replicas
    standby = replicas[2]
    inspect = await api(mesh[standby["host"]], "GET", f"/v1/containers/{standby['container']}")
    assert inspect["state"] == "paused", inspect
    balancer = await api(host, "GET", f"/v1/network/balancers/{service}")
    assert standby["address"] not in balancer["backends"], balancer
    began = time.monotonic()
    res = await f.ferryctl("--json", "scale", deployment, "stage", "3", "--wait", "60", within=90)
    thawed_in = time.monotonic() - began
    assert res.returncode == 0, (res.stdout, res.stderr)
    replicas = {r["index"]: r for r in json.loads(res.stdout)["components"][0]["replicas"]}
    assert {i: r["state"] for i, r in replicas.items()} == {1: "serving", 2: "serving"}, replicas  # no new one
    assert replicas[2]["container"] == standby["container"]
    inspect = await api(mesh[standby["host"]], "GET", f"/v1/containers/{standby['container']}")
    assert inspect["state"] == "running", inspect
    balancer = await api(host, "GET", f"/v1/network/balancers/{service}")
    assert standby["address"] in balancer["backends"], balancer
    await requests(mesh, service, 9)  # every copy answers
    cold = (await f.call("GET", f"/v1/deployments/{deployment}/components/stage/behaviour"))["cold_start_s"]
    print(f"cold start {cold:.2f} s (median), thawed standby serving after {thawed_in:.2f} s (ferryctl round trip)")
    # Cutting the standbys stops them.
    res = await f.ferryctl("--json", "scale", deployment, "stage", "1", "--standbys", "0", "--wait", "120", within=180)
    assert res.returncode == 0 and json.loads(res.stdout)["components"][0]["replicas"] == [], res.stdout
