"""Blob sharing on a 4-host fleet with a real registry: pulls take blobs from peers before the
registry, and nothing peers do wrong fails a pull.

Every host serves its blobs on <address>:7445 over mutual TLS ([sharing]) and lists the others in
`[[peers]]`. Faulty peers are real agents with a failpoint (`sharing.serve=corrupt|stall`) or
killed. Each test ends with the pulled image running under `ctr` and no lease, ingest or stray
snapshot left on the host that pulled.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.fleet import api, coordinated_fleet, fleet, migrate, run_memhog, task_states
from tests.harness.images import ImageBuilder, busybox_layer, random_layer
from tests.harness.mesh import Mesh, MeshHost

pytestmark = pytest.mark.timeout(600)

SHARING = {"stall_timeout": 2.0, "range_size": 4 << 20, "rendezvous_delay": 0.3}


@pytest.fixture
async def mesh(base_dir: Path) -> AsyncIterator[Mesh]:
    async def sharing(mesh: Mesh) -> None:
        for host in mesh.hosts:
            host.settings["sharing"] = dict(SHARING)

    async with fleet(base_dir, hosts=4, before_agents=sharing) as m:
        yield m


async def push_image(mesh: Mesh, layer_mib: int = 24) -> tuple[str, int]:
    """busybox and one incompressible layer (uncompressed, so its blob is `layer_mib` MiB): (ref, layer bytes)."""
    ref, layers = await push_image_layers(mesh, layer_mib)
    return ref, sum(layers.values())


async def push_image_layers(mesh: Mesh, layer_mib: int = 24) -> tuple[str, dict[str, int]]:
    """push_image's image: (ref, its layers' digest -> size)."""
    repo = f"test/shared-{secrets.token_hex(3)}"
    big = random_layer(layer_mib << 20, seed=secrets.randbelow(1 << 30), compression="none")
    image = ImageBuilder([busybox_layer(), big], cmd=("/bin/sh", "-c", "true")).build()
    await image.push(mesh.push_host, repo, "v1")
    return mesh.image_ref(repo, "v1"), {layer.digest: layer.size for layer in image.layers}


async def pull(host: MeshHost, ref: str) -> dict[str, Any]:
    result: dict[str, Any] = await api(host, "POST", "/v1/images/pull", {"ref": ref})
    return result


async def metric(host: MeshHost, sample: str) -> float:
    """The sum of the agent's metric samples whose line starts with `sample` (name and labels)."""
    async with host.session() as http, http.get("/metrics") as resp:
        text = await resp.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(sample))


async def peer_bytes_in(host: MeshHost) -> float:
    return await metric(host, 'ferryman_peer_bytes_total{direction="in"}')


async def assert_runs_and_clean(host: MeshHost, ref: str) -> None:
    """`ctr run` runs the image; no lease, ingest or active snapshot is left."""
    cid = f"check-{secrets.token_hex(3)}"
    res = await host.actr("run", "--rm", *host.containerd.run_flags(cid), ref, cid, "/bin/sh", "-c", "exit 0")
    assert res.returncode == 0, res.stderr
    leases = (await host.actr("leases", "ls", "-q")).stdout.split()
    assert leases == [], leases
    active = (await host.actr("content", "active")).stdout.splitlines()
    assert active[1:] == [], active
    snapshots = (await host.actr("snapshots", "ls")).stdout.splitlines()
    assert not [s for s in snapshots[1:] if "Active" in s], snapshots


async def test_a_pull_takes_the_blobs_from_a_peer_with_the_registry_stopped(mesh: Mesh) -> None:
    h1, h2 = mesh["h1"], mesh["h2"]
    ref, size = await push_image(mesh)
    await pull(h1, ref)
    await mesh.registry.stop()
    summary = await pull(h2, ref)
    assert summary["name"] == ref
    assert await peer_bytes_in(h2) >= size - (2 << 20)  # all but the small blobs, at least
    # The cache's counters name the peers as where the layers came from.
    assert await metric(h2, 'ferryman_cache_bytes_total{source="peer"}') >= size - (2 << 20)
    await assert_runs_and_clean(h2, ref)


async def test_a_peer_killed_mid_transfer_leaves_the_pull_to_the_others(mesh: Mesh) -> None:
    h1, h2, h3 = mesh["h1"], mesh["h2"], mesh["h3"]
    ref, _ = await push_image(mesh, layer_mib=64)
    await asyncio.gather(pull(h1, ref), pull(h3, ref))
    # Slow both holders' uploads (64 MiB at 2 x 8 MiB/s: about 4 s) so that the kill lands
    # mid-transfer: with h3 unthrottled, a quiet machine had the blob from h3 alone within 1 s.
    for holder in (h1, h3):
        holder.settings["sharing"] = {**SHARING, "upload_rate": 8 << 20}
        await holder.restart_agent()
    pulling = asyncio.create_task(pull(h2, ref))
    await asyncio.sleep(1.0)
    await h1.kill_agent()
    summary = await asyncio.wait_for(pulling, 120)
    assert summary["name"] == ref
    dropped = [e for e in h2.log_events("peer dropped") if e.get("peer") == "h1"]
    assert dropped, "h2 never dropped the killed peer"
    await assert_runs_and_clean(h2, ref)


@pytest.mark.parametrize(
    ("fault", "event"),
    [
        ("corrupt", "peer sent bad bytes: dropped"),  # caught at commit, traced through the registry's copy
        ("stall", "peer dropped"),  # abandoned after stall_timeout
    ],
)
async def test_a_peer_serving_bad_bytes_or_stalling_is_dropped(mesh: Mesh, fault: str, event: str) -> None:
    h1, h2 = mesh["h1"], mesh["h2"]
    ref, _ = await push_image(mesh)
    await pull(h1, ref)
    h1.agent_env["FERRYMAN_FAILPOINTS"] = f"sharing.serve={fault}"
    await h1.restart_agent()
    started = time.monotonic()
    summary = await pull(h2, ref)
    elapsed = time.monotonic() - started
    assert summary["name"] == ref
    assert [e["peer"] for e in h2.log_events(event)] == ["h1"]
    assert elapsed < SHARING["stall_timeout"] + 20, elapsed
    await assert_runs_and_clean(h2, ref)


async def test_four_hosts_pulling_at_once_share_the_download(mesh: Mesh) -> None:
    ref, size = await push_image(mesh, layer_mib=64)
    # The registry behind 200 Mbit/s (what it sends passes the bridge's qdisc; host-to-host does not).
    tbf = [
        "tc",
        "qdisc",
        "add",
        "dev",
        mesh.bridge,
        "root",
        "tbf",
        "rate",
        "200mbit",
        "burst",
        "64kb",
        "latency",
        "50ms",
    ]
    await mesh.aexec_in(mesh.fabric, tbf, check=True)
    summaries = await asyncio.gather(*(pull(h, ref) for h in mesh.hosts))
    assert all(s["name"] == ref for s in summaries)
    from_peers = [await peer_bytes_in(h) for h in mesh.hosts]
    # The registry sent the image about once; the other three hosts read it from peers.
    sent = await mesh.registry_sent()
    assert sent < 1.5 * size, (sent, size, from_peers)
    assert sum(from_peers) >= 2.5 * (64 << 20), from_peers
    for host in mesh.hosts:
        await assert_runs_and_clean(host, ref)


async def test_a_migration_target_without_the_layers_gets_them_from_the_source(mesh: Mesh) -> None:
    h1, h2 = mesh["h1"], mesh["h2"]
    ref = await run_memhog(h1, mesh, "hog")
    record = await migrate(h1, "hog", "h2", mode="precopy")
    assert record["state"] == "COMMIT", record
    assert task_states(h2) == {"hog": "RUNNING"}
    [ready] = h2.log_events("image ready")
    assert ready["from"] == "peer" and record["stats"]["image_from"] == "peer", (ready, record["stats"])
    await api(h2, "DELETE", "/v1/containers/hog?force=1", expect=None)
    await assert_runs_and_clean(h2, ref)


async def test_without_static_peers_the_coordinators_tracker_finds_them(base_dir: Path) -> None:
    """No agent lists a peer's blob address: the coordinator's tracker names who holds (or is
    fetching) each blob. A pull finds the holder with the registry stopped, two hosts pulling at once
    find each other, and with the coordinator stopped pulls still work (from the registry)."""
    async with coordinated_fleet(base_dir, hosts=3, sharing=SHARING) as f:
        mesh = f.mesh
        h1, h2, h3 = mesh["h1"], mesh["h2"], mesh["h3"]
        assert "blobs" not in (h2.dir / "agent.toml").read_text()
        ref, layers = await push_image_layers(mesh)
        size = sum(layers.values())
        await pull(h1, ref)
        await mesh.registry.stop()
        summary = await pull(h2, ref)
        assert summary["name"] == ref
        assert await peer_bytes_in(h2) >= size - (2 << 20)
        holders = await f.call("POST", "/v1/layers/holders", {"digests": []})
        assert sorted(h["host"] for h in holders["holders"]) == ["h1", "h2", "h3"], holders
        assert await metric(h2, 'ferryman_tracker_calls_total{call="holders",result="ok"}') >= 1
        await assert_runs_and_clean(h2, ref)

        # Two hosts starting one new image at once: the registry sends it about once.
        await mesh.registry.start()
        ref2, size2 = await push_image(mesh, layer_mib=48)
        await mesh.shape_registry("400mbit")  # counts what the registry sends (hosts talk past it)
        before = await mesh.registry_sent()
        await asyncio.gather(pull(h1, ref2), pull(h3, ref2))
        sent = await mesh.registry_sent() - before
        assert sent < 1.5 * size2, (sent, size2)
        for host in (h1, h3):
            await assert_runs_and_clean(host, ref2)

        # A new container through the coordinator goes where its layers are (h1 and h2 hold the
        # image; h3 would have to fetch it), charged to the reservation made for it.
        started = await f.call(
            "POST",
            "/v1/containers",
            {"container": {"id": "placed", "image": ref, "args": ["sleep", "300"]}, "layers": layers},
            expect=201,
        )
        placed = started["placement"]["host"]
        assert placed in ("h1", "h2") and started["placement"]["predicted"]["bytes_held"] == sum(layers.values())
        assert started["placement"]["candidates"][-1]["host"] == "h3", started["placement"]
        listed = {c["id"]: c["state"] for c in (await api(mesh[placed], "GET", "/v1/containers"))["containers"]}
        assert listed.get("placed") == "running", listed
        bad = await f.call(
            "POST",
            "/v1/containers",
            {"container": {"id": "bad", "image": "no/such:image"}, "layers": layers},
            expect=None,
        )
        assert "error" in bad, bad
        reservations = (await f.call("GET", "/v1/reservations"))["reservations"]
        assert reservations == [], reservations  # released once each create returned, worked or not
        await api(mesh[placed], "DELETE", "/v1/containers/placed?force=1", expect=None)
        # The same through ferryctl: `run --to auto`.
        res = await f.ferryctl("--json", "run", "--to", "auto", "--name", "cli-placed", ref, "sleep", "300")
        assert res.returncode == 0, (res.stdout, res.stderr)
        answer = json.loads(res.stdout)
        assert answer["container"]["id"] == "cli-placed" and answer["placement"]["host"] in ("h1", "h2"), answer
        await api(mesh[answer["placement"]["host"]], "DELETE", "/v1/containers/cli-placed?force=1", expect=None)

        # Without the coordinator the pull goes on: the tracker's failures fall back to [[peers]]
        # (none with blobs here), then the registry.
        await f.coordinator.stop()
        ref3, _ = await push_image(mesh, layer_mib=4)
        assert (await pull(h2, ref3))["name"] == ref3
        assert await metric(h2, 'ferryman_tracker_calls_total{call="holders",result="failed"}') >= 1
        await assert_runs_and_clean(h2, ref3)
