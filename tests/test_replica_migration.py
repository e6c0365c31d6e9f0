"""Replicas and their balancer follow migrations, on a real 3-host coordinated fleet.

The echo component of tests/test_component_replicas.py, scaled to 2: the component's own container
owns the balancer (nftables DNAT on its host), replica 1 runs on another host. Migrating the owner
to the third host moves the balancer with it (its table there, none left on the old host), and
migrating the replica moves its record; after each, new connections to the service address still
spread over both and succeed, and scaling back to 1 and undeploying leave nothing anywhere.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.fleet import CoordinatedFleet, api, coordinated_fleet
from tests.harness.images import DEFAULT_PATH, ImageBuilder, busybox_layer
from tests.harness.mesh import Mesh
from tests.test_component_replicas import SERVE, scale, serving, spread


@pytest.fixture
async def fleet3(base_dir: Path) -> AsyncIterator[CoordinatedFleet]:
    def tables(mesh: Mesh) -> dict[str, dict[str, Any]]:
        pool = f"{mesh.subnet.network_address + 192}/28"
        return {"deployments": {"address_pool": pool, "health_timeout": 30.0, "drain_timeout": 10.0}}

    async with coordinated_fleet(base_dir, 3, coordinator_for=tables, with_client=True) as f:
        yield f


async def migrate(f: CoordinatedFleet, container: str, to: str) -> None:
    async def reported() -> bool:
        hosts = (await f.call("GET", "/v1/hosts"))["hosts"]
        return any(c["id"] == container for h in hosts for c in h.get("containers", []))

    await f.wait_for(f"{container} in telemetry", reported, within=30)
    started = await f.call("POST", "/v1/migrations", {"container": container, "to": to}, expect=202)

    async def finished() -> dict[str, Any] | None:
        m = await f.call("GET", f"/v1/migrations/{started['id']}")
        return m if m["done"] else None

    outcome = await f.wait_for(f"the migration of {container}", finished, within=120)
    assert outcome["state"] == "committed", outcome


async def test_the_balancer_and_the_replicas_follow_their_containers_migrations(
    fleet3: CoordinatedFleet,
) -> None:
    f, mesh = fleet3, fleet3.mesh
    repo = "test/echo-moving"
    await ImageBuilder([busybox_layer()], cmd=("/bin/sh", "-c", SERVE), env=[f"PATH={DEFAULT_PATH}"]).push(
        mesh.push_host, repo, "v1"
    )
    check = {"kind": "http", "port": 8080, "path": "/healthz", "interval": 0.5, "timeout": 0.5, "retries": 3}
    document = {
        "name": "echo",
        "version": "1.0.0",
        "image": mesh.image_ref(repo, "v1"),
        "manifest": {"required_images": [], "data_transfer_protocols": {}, "dependency_health_check": check},
    }
    await f.call("POST", "/v1/catalog", document, expect=201)
    record = await f.call("POST", "/v1/deployments?wait=120", {"image": "echo"})
    assert record["state"] == "HEALTHY", record
    deployment, own = record["id"], record["components"][0]
    service = own["address"]
    component = await scale(f, deployment, 2, "--wait", "120")
    replica = serving(component)[1]
    old_owner = mesh[own["host"]]
    assert replica["host"] != old_owner.name, component
    ids = {own["container"], replica["container"]}
    assert set(await spread(mesh, service, 20)) == ids

    # The owner moves to the third host: the balancer goes with it, the replica stays reachable.
    third = next(h for h in mesh.hosts if h.name not in (old_owner.name, replica["host"]))
    await migrate(f, own["container"], third.name)

    async def owner_followed() -> dict[str, Any] | None:
        now = await f.call("GET", f"/v1/deployments/{deployment}")
        assert now["state"] == "HEALTHY", now
        return now if now["components"][0]["host"] == third.name else None

    await f.wait_for("the record following the owner", owner_followed, within=60)

    async def balancer_moved() -> dict[str, Any] | None:
        body = await api(third, "GET", f"/v1/network/balancers/{service}", expect=None)
        return body if isinstance(body, dict) and "backends" in body else None

    balancer = await f.wait_for("the balancer on the new owner", balancer_moved, within=30)
    assert balancer["backends"] == [service, replica["address"]], balancer
    await api(old_owner, "GET", f"/v1/network/balancers/{service}", expect=404)
    seen = await spread(mesh, service, 20)
    assert set(seen) == ids and all(n == 10 for n in seen.values()), seen

    # The replica moves to the old owner's host: its record follows, the balancer's backend (its
    # own address, which moved with it) is unchanged, and it still takes its share.
    await migrate(f, replica["container"], old_owner.name)

    async def replica_followed() -> dict[str, Any] | None:
        now = await f.call("GET", f"/v1/deployments/{deployment}")
        assert now["state"] == "HEALTHY", now
        r = serving(now["components"][0]).get(1)
        return now if r is not None and r["host"] == old_owner.name else None

    await f.wait_for("the record following the replica", replica_followed, within=60)
    seen = await spread(mesh, service, 20)
    assert set(seen) == ids and all(n == 10 for n in seen.values()), seen

    # Back to 1: the replica goes from where it runs now, the balancer from the new owner.
    component = await scale(f, deployment, 1, "--wait", "120")
    assert component["replicas"] == [], component
    for host in mesh.hosts:
        listed = (await api(host, "GET", "/v1/containers"))["containers"]
        assert replica["container"] not in {c["id"] for c in listed}, host.name
    await api(third, "GET", f"/v1/network/balancers/{service}", expect=404)
    assert set(await spread(mesh, service, 5)) == {own["container"]}

    removed = await f.call("DELETE", f"/v1/deployments/{deployment}?wait=60")
    assert removed["state"] == "REMOVED", removed
    for host in mesh.hosts:
        listed = (await api(host, "GET", "/v1/containers"))["containers"]
        assert [c["id"] for c in listed if deployment in c["id"]] == []
