"""Composition manifests on real components: a registry, a containerd of its own, the agent's API.

Layers of three images are composed into one; `ctr run` runs it, a second composition sharing the
lower layers applies only its own top, invalid manifests leave nothing behind, and the fetch order
changes how soon the first snapshot is there.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer

from agent.api import build_app, serve
from agent.app import Agent
from agent.config import PullConfig, RegistryConfig
from agent.ctl.main import main as ferryctl
from tests.harness.agent import agent_config, running_agent
from tests.harness.containerd import PrivateContainerd
from tests.harness.images import Image, ImageBuilder, Layer, busybox_layer, random_layer
from tests.harness.proxy import FaultyProxy
from tests.harness.registry import DockerRegistry

KIB, MIB = 1 << 10, 1 << 20
CHECK = "ls /data/random/f00000 /opt/tools/f00000 /srv/app/f00000 >/dev/null && echo composed"


@pytest.fixture
async def ctrd(workdir: Path) -> AsyncIterator[PrivateContainerd]:
    """A containerd of its own: an empty store, so "nothing left" and "nothing fetched" are exact."""
    daemon = PrivateContainerd(workdir / "ctrd")
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.stop()


@dataclasses.dataclass
class Images:
    base: Image
    tools: Image
    app: Image
    app2: Image
    refs: dict[str, str]


def unique(size: int, directory: str) -> Layer:
    return random_layer(size, seed=secrets.randbits(31), directory=directory)


async def push_images(host: str) -> Images:
    """base = busybox + /data/random; tools = busybox + /opt/tools; app and app2 = busybox + /srv/app."""
    cmd = ["/bin/sh", "-c", CHECK]
    images = {
        "base": ImageBuilder([busybox_layer(), unique(1 * MIB, "data/random")]).build(),
        "tools": ImageBuilder([busybox_layer(), unique(512 * KIB, "opt/tools")]).build(),
        "app": ImageBuilder([busybox_layer(), unique(256 * KIB, "srv/app")], cmd=cmd).build(),
        "app2": ImageBuilder([busybox_layer(), unique(128 * KIB, "srv/app")], cmd=cmd).build(),
    }
    refs = {}
    for key, image in images.items():
        repo = f"test/comp-{key}-{secrets.token_hex(3)}"
        await image.push(host, repo, "v1")
        refs[key] = f"{host}/{repo}:v1"
    return Images(images["base"], images["tools"], images["app"], images["app2"], refs)


def layer_node(node_id: str, ref: str, layer: Layer, **kw: Any) -> dict[str, Any]:
    return {
        "id": node_id,
        "ref": ref,
        "digest": layer.digest,
        "size": layer.size,
        "media_type": layer.media_type(),
        **kw,
    }


def composition(im: Images, top: str = "app", **kw: Any) -> dict[str, Any]:
    """busybox at the bottom, data and tools on it (unordered: their paths differ), the app on both."""
    app = im.app if top == "app" else im.app2
    return {
        "version": 1,
        "name": f"web-{top}",
        "workload": "web:check-files",
        "nodes": [
            layer_node("busybox", im.refs["base"], im.base.layers[0]),
            layer_node("data", im.refs["base"], im.base.layers[1], paths=["/data/random"]),
            layer_node("tools", im.refs["tools"], im.tools.layers[1], paths=["/opt/tools"]),
            layer_node(top, im.refs[top], app.layers[1], paths=["/srv/app"]),
        ],
        "edges": [
            {"node": "data", "depends_on": "busybox"},
            {"node": "tools", "depends_on": "busybox"},
            {"node": top, "depends_on": "data"},
            {"node": top, "depends_on": "tools"},
        ],
        **kw,
    }


@contextlib.asynccontextmanager
async def api(agent: Agent) -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(build_app(agent))) as client:
        yield client


async def assert_nothing_made(agent: Agent, ctrd: PrivateContainerd) -> None:
    cd = agent.containerd
    assert await cd.leases.list() == [], "no lease"
    assert await cd.content.list_statuses() == [], "no ingest"
    assert await cd.content.infos() == [], "no content: nothing fetched"
    assert await cd.snapshots.list() == [], "no snapshot"
    assert await cd.images.list() == [], "no image"


def ctr_run(ctrd: PrivateContainerd, agent: Agent, image: str, *cmd: str) -> str:
    cid = f"ctr{secrets.token_hex(3)}"
    ns = agent.containerd.namespace
    return ctrd.ctr("run", "--rm", *ctrd.run_flags(cid), image, cid, *cmd, namespace=ns).stdout


async def test_layers_of_three_images_run_as_one_and_shared_prefixes_are_reused(
    ctrd: PrivateContainerd, registry: DockerRegistry, workdir: Path
) -> None:
    im = await push_images(registry.host)
    config = agent_config(ctrd, [registry.registry_config()], workdir)
    async with running_agent(config) as agent, api(agent) as client:
        doc = composition(im, preference=["tools"])
        # parse: the stack (dependencies below, ties by id), what is missing here, the preference list.
        resp = await client.post(
            "/v1/manifests/parse", data=yaml.safe_dump(doc), headers={"Content-Type": "application/yaml"}
        )
        assert resp.status == 200, await resp.text()
        parsed = await resp.json()
        assert [la["id"] for la in parsed["stack"]] == ["busybox", "data", "tools", "app"]
        assert parsed["missing"] == [la["digest"] for la in parsed["stack"]]
        assert parsed["preference"] == [{"id": "tools", "digest": im.tools.layers[1].digest}]
        assert parsed["fetch_order"][0] == im.tools.layers[1].digest
        assert parsed["stack"][-1]["chain_id"] and parsed["image"].startswith("composition.ferryman.local/web-app:")
        assert await agent.containerd.content.infos() == [], "parse fetches nothing"

        # Run it from the API: assembled, recorded, started.
        resp = await client.post("/v1/containers?start=1", json={"id": "web", "composition": doc})
        assert resp.status == 201, await resp.text()
        created = await resp.json()
        assert created["image"] == parsed["image"]
        # Where its time went: every layer fetched (from where, how much, how long) and applied.
        spent = created["assembly"]
        fetched = {e["digest"]: e for e in spent["timeline"] if e["event"] == "fetched"}
        assert set(fetched) == {la["digest"] for la in parsed["stack"]}
        assert all(
            e["source"].startswith("registry/") and e["bytes"] > 0 and e["seconds"] > 0 for e in fetched.values()
        )
        assert [e["digest"] for e in spent["timeline"] if e["event"] == "applied"] == parsed["missing"]
        assert 0 < spent["resolve_seconds"] < spent["seconds"] and spent["runnable_seconds"] < spent["seconds"]
        assert spent["create_seconds"] > 0 and spent["start_seconds"] > 0
        log = ""
        for _ in range(100):
            log = agent.containers.log_path("web").read_text() if agent.containers.log_path("web").exists() else ""
            if "composed" in log:
                break
            await asyncio.sleep(0.1)
        assert "composed" in log
        # An ordinary image: ctr runs it, and its manifest lists the stack's layers bottom first.
        assert "composed" in ctr_run(ctrd, agent, parsed["image"], "/bin/sh", "-c", CHECK)
        record = await agent.containerd.images.get(parsed["image"])
        manifest = json.loads(await agent.containerd.content.read_all(record.digest))
        assert [la["digest"] for la in manifest["layers"]] == [la["digest"] for la in parsed["stack"]]

        # Parsed again: nothing missing now.
        resp = await client.post("/v1/manifests/parse", json=doc)
        assert (await resp.json())["missing"] == []

        # A composition sharing busybox, data and tools: only its own top is fetched and applied.
        resp = await client.post("/v1/compositions", json=composition(im, top="app2"))
        assert resp.status == 201, await resp.text()
        second = await resp.json()
        top = im.app2.layers[1].digest
        assert second["reused_snapshots"] == 3
        assert second["applied"] == [top]
        assert second["fetched"] == [top]
        assert second["bytes_fetched"] == im.app2.layers[1].size
        assert "composed" in ctr_run(ctrd, agent, second["image"], "/bin/sh", "-c", CHECK)

        # The first composition again: its image is recorded, so nothing is fetched, applied or made.
        resp = await client.post("/v1/compositions", json=doc)
        assert resp.status == 201, await resp.text()
        again = await resp.json()
        assert (again["image"], again["reused_snapshots"], again["applied"], again["fetched"]) == (
            parsed["image"],
            4,
            [],
            [],
        )
        assert "composed" in ctr_run(ctrd, agent, again["image"], "/bin/sh", "-c", CHECK)

        # The measured costs: bytes and seconds per source, assembly seconds per byte.
        costs = await (await client.get("/v1/assembly/costs")).json()
        assert costs["sources"][f"registry/{registry.host}"]["bytes"] > 1 * MIB
        assert costs["assembly"]["bytes"] > 1 * MIB and costs["assembly"]["seconds_per_byte"] > 0
        # containerd's CPU time around each apply: it runs in this PID namespace, so it is measured.
        assert costs["assembly"]["cpu_seconds_per_byte"] is not None
        assert await agent.containerd.leases.list() == []
        assert await agent.containerd.content.list_statuses() == []

        # The schema is served.
        served = await (await client.get("/v1/manifests/schema")).json()
        assert served["title"].startswith("ferryman composition manifest")


async def test_invalid_manifests_are_refused_precisely_and_leave_nothing(
    ctrd: PrivateContainerd, registry: DockerRegistry, workdir: Path
) -> None:
    im = await push_images(registry.host)
    good = composition(im)

    def edited(change: Any) -> dict[str, Any]:
        doc = json.loads(json.dumps(good))
        change(doc)
        return doc

    cases = {
        "cycle": (
            edited(lambda d: d["edges"].append({"node": "busybox", "depends_on": "app"})),
            "cycle",
        ),
        "unknown digest": (
            edited(lambda d: d["nodes"][2].update(digest=im.app2.layers[1].digest, size=im.app2.layers[1].size)),
            f"unknown digest {im.app2.layers[1].digest}: it is not a layer of {im.refs['tools']}",
        ),
        "size": (
            edited(lambda d: d["nodes"][1].update(size=12345)),
            f"is {im.base.layers[1].size} bytes in registry {im.refs['base']}, the manifest says 12345",
        ),
        "duplicate": (
            edited(lambda d: d["nodes"].append(dict(d["nodes"][0]))),
            "duplicate node 'busybox'",
        ),
        "paths": (
            edited(lambda d: d["nodes"][2].update(paths=["/data"])),
            "nodes 'data' and 'tools' both write /data/random and /data",
        ),
        "missing image": (
            edited(lambda d: d["nodes"][3].update(ref=f"{registry.host}/test/no-such-image:v1")),
            "is not in its registry",
        ),
    }
    config = agent_config(ctrd, [registry.registry_config()], workdir)
    async with running_agent(config) as agent, api(agent) as client:
        for what, (doc, fragment) in cases.items():
            for path, body in (
                ("/v1/manifests/parse", doc),
                ("/v1/compositions", doc),
                ("/v1/containers", {"id": "bad", "composition": doc}),
            ):
                resp = await client.post(path, json=body)
                error = (await resp.json())["error"]
                assert resp.status == 400 and error["code"] == "invalid_composition", (what, path, error)
                assert fragment in error["message"], (what, error["message"])
            await assert_nothing_made(agent, ctrd)
        assert [c.id for c in await agent.containers.list()] == []


async def test_layers_that_declare_no_paths_are_checked_by_their_files(
    ctrd: PrivateContainerd, registry: DockerRegistry, workdir: Path
) -> None:
    """app and app2 both write /srv/app/f00000 (other bytes) and declare no paths: refused, from the
    local blobs when they are here (nothing created), else after the fetch, before either is applied
    (nothing left). data and tools declare none either, but their files do not meet: assembled."""
    im = await push_images(registry.host)
    clash = {
        "version": 1,
        "name": "clash",
        "nodes": [
            layer_node("busybox", im.refs["base"], im.base.layers[0]),
            layer_node("app", im.refs["app"], im.app.layers[1]),
            layer_node("app2", im.refs["app2"], im.app2.layers[1]),
        ],
        "edges": [{"node": "app", "depends_on": "busybox"}, {"node": "app2", "depends_on": "busybox"}],
    }
    message = "nodes 'app' and 'app2' both write /srv/app/f00000 (read from their layers' files)"
    config = agent_config(ctrd, [registry.registry_config()], workdir)
    async with running_agent(config) as agent, api(agent) as client:
        # Not here yet: parse says the check waits for the fetch, and the assembly refuses after it.
        resp = await client.post("/v1/manifests/parse", json=clash)
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["paths_checked_after_fetch"] == ["app", "app2"]
        for path, body in (("/v1/compositions", clash), ("/v1/containers", {"id": "clash", "composition": clash})):
            resp = await client.post(path, json=body)
            error = (await resp.json())["error"]
            assert resp.status == 400 and error["code"] == "invalid_composition", (path, error)
            assert message in error["message"], error["message"]
            await assert_nothing_made(agent, ctrd)

        # Both layers here (their images pulled): refused by parse itself, nothing new made.
        for key in ("app", "app2"):
            resp = await client.post("/v1/images/pull", json={"ref": im.refs[key]})
            assert resp.status == 200, await resp.text()
        cd = agent.containerd
        before = (await cd.content.infos(), await cd.snapshots.list(), await cd.images.list())
        for path in ("/v1/manifests/parse", "/v1/compositions"):
            resp = await client.post(path, json=clash)
            error = (await resp.json())["error"]
            assert resp.status == 400 and message in error["message"], (path, error)
        assert (await cd.content.infos(), await cd.snapshots.list(), await cd.images.list()) == before
        assert await cd.leases.list() == []

        # An edge decides: assembled, app2 on top.
        ordered = {**clash, "edges": [*clash["edges"], {"node": "app2", "depends_on": "app"}]}
        resp = await client.post("/v1/compositions", json=ordered)
        assert resp.status == 201, await resp.text()
        assert [la["id"] for la in (await resp.json())["stack"]] == ["busybox", "app", "app2"]

        # Layers without declared paths whose files do not meet: fine.
        disjoint = composition(im)
        for node in disjoint["nodes"]:
            node.pop("paths", None)
        resp = await client.post("/v1/compositions", json=disjoint)
        assert resp.status == 201, await resp.text()
        assert (await resp.json())["paths_checked_after_fetch"] == ["data", "tools"]


async def test_the_fetch_order_changes_the_time_to_the_first_snapshot(
    ctrd: PrivateContainerd, registry: DockerRegistry, workdir: Path
) -> None:
    """One fetch at a time over a slow link (4 MiB/s). Base first (the priority's choice: everything
    depends on it), the base is applied while the rest arrives; top first (forced by the preference
    list), nothing can be applied before everything is there."""
    sizes = {"base": 3 * MIB, "mid": 1 * MIB, "top": 256 * KIB}
    image = ImageBuilder([unique(size, f"l/{key}") for key, size in sizes.items()]).build()
    repo = f"test/comp-order-{secrets.token_hex(3)}"
    await image.push(registry.host, repo, "v1")
    proxy = FaultyProxy(registry.url, rate=4 * MIB)
    await proxy.start()
    ref = f"{proxy.host}/{repo}:v1"
    doc: dict[str, Any] = {
        "version": 1,
        "name": "chain",
        "prefetch_granularity": 1,
        "nodes": [layer_node(key, ref, layer) for key, layer in zip(sizes, image.layers, strict=True)],
        "edges": [{"node": "mid", "depends_on": "base"}, {"node": "top", "depends_on": "mid"}],
    }
    base, _, top = (layer.digest for layer in image.layers)
    try:
        config = agent_config(ctrd, [RegistryConfig(host=proxy.host, plain_http=True)], workdir, pull=PullConfig())
        async with running_agent(config) as agent:
            chosen = await agent.assembly.assemble(doc)
            assert chosen["fetch_order"] == [layer.digest for layer in image.layers]
            await agent.images.remove(chosen["image"])
            await agent.containerd.leases.delete(await agent.containerd.leases.create("gc", 60), sync=True)
            assert await agent.containerd.content.infos() == []

            forced = await agent.assembly.assemble({**doc, "preference": ["top", "mid", "base"]})
            assert forced["fetch_order"] == [layer.digest for layer in reversed(image.layers)]
    finally:
        await proxy.stop()

    def at(result: dict[str, Any], event: str, digest: str) -> float:
        return next(e["at"] for e in result["timeline"] if e["event"] == event and e["digest"] == digest)

    # The order of events: the base applied before the top arrived, or only after.
    assert at(chosen, "applied", base) < at(chosen, "fetched", top)
    assert at(forced, "applied", base) > at(forced, "fetched", base) > at(forced, "fetched", top)
    # And so the time: the first snapshot comes a whole fetch of mid and top earlier (~0.3 s here).
    assert chosen["first_snapshot_seconds"] < forced["first_snapshot_seconds"]
    print(
        f"first snapshot: {chosen['first_snapshot_seconds']:.3f} s prioritised,"
        f" {forced['first_snapshot_seconds']:.3f} s top first; runnable: {chosen['runnable_seconds']:.3f} s,"
        f" {forced['runnable_seconds']:.3f} s"
    )


async def test_a_warmed_layer_is_not_fetched_again(
    ctrd: PrivateContainerd, registry: DockerRegistry, workdir: Path
) -> None:
    im = await push_images(registry.host)
    data = im.base.layers[1]
    config = agent_config(ctrd, [registry.registry_config()], workdir)
    async with running_agent(config) as agent, api(agent) as client:
        # A digest the image does not hold: 404, and no lease is left.
        resp = await client.post(f"/v1/prefetch/layers/{im.app.layers[1].digest}", json={"ref": im.refs["base"]})
        assert resp.status == 404 and (await resp.json())["error"]["code"] == "layer_not_found"
        await assert_nothing_made(agent, ctrd)

        resp = await client.post(
            f"/v1/prefetch/layers/{data.digest}", json={"ref": im.refs["base"], "ttl": 60, "model": "warm-1"}
        )
        assert resp.status == 200, await resp.text()
        warmed = await resp.json()
        assert warmed["bytes_fetched"] == data.size
        # Held by a lease until the ttl runs out (or an image references it).
        (lease,) = await agent.containerd.leases.list()
        assert ("content", data.digest) in await agent.containerd.leases.resources(lease)

        status = await (await client.get("/v1/cache/status")).json()
        assert status["warms"] == {
            "warmed": 1,
            "warmed_bytes": data.size,
            "hits": 0,
            "hit_bytes": 0,
            "wasted": 0,
            "wasted_bytes": 0,
            "pending": 1,
            "waste": None,
            "model_version": "warm-1",
            "keeps": {
                "kept": 0, "kept_bytes": 0, "used": 0, "used_bytes": 0, "ended": 0, "ended_bytes": 0, "pending": 0
            },
        }

        result = await agent.assembly.assemble(composition(im))
        assert data.digest not in result["fetched"]
        assert result["missing"] == [la["digest"] for la in result["stack"] if la["digest"] != data.digest]
        # the assembly found the warmed layer local before its lease ended: a prefetch hit
        status = await (await client.get("/v1/cache/status")).json()
        assert (status["warms"]["hits"], status["warms"]["hit_bytes"], status["warms"]["pending"]) == (1, data.size, 0)
        metric = agent.metrics.cache.registry.get_sample_value
        assert metric("ferryman_cache_warms_total", {"outcome": "hit"}) == 1
        assert metric("ferryman_cache_warm_model_info", {"version": "warm-1"}) == 1


async def test_a_keep_is_counted_used_by_a_pull_or_ended_apart_from_the_warms(
    ctrd: PrivateContainerd, registry: DockerRegistry, workdir: Path, short_dir: Path
) -> None:
    """A warm request for a layer here already keeps it (nothing fetched): the cache status counts
    it apart from the warms, used when a pull finds the layer before its lease ends, ended when the
    lease ends first; `ferryctl cache status` and Prometheus show the same."""
    from tests.test_ctl_scripting import run

    im = await push_images(registry.host)
    data, base = im.base.layers[1], im.base.layers[0]
    config = agent_config(ctrd, [registry.registry_config()], workdir)
    async with running_agent(config) as agent, api(agent) as client:
        body = {"ref": im.refs["base"], "ttl": 60, "model": "warm-1"}
        warmed = await (await client.post(f"/v1/prefetch/layers/{data.digest}", json=body)).json()
        assert (warmed["kept"], warmed["bytes_fetched"]) == (False, data.size)
        for model in ("warm-2", "warm-2"):  # here now: kept, then renewed (counted once)
            body = {"ref": im.refs["base"], "ttl": 60, "model": model}
            kept = await (await client.post(f"/v1/prefetch/layers/{data.digest}", json=body)).json()
            assert (kept["kept"], kept["bytes_fetched"], kept["size"]) == (True, 0, data.size)
        warms = (await (await client.get("/v1/cache/status")).json())["warms"]
        assert (warms["warmed"], warms["pending"], warms["model_version"]) == (1, 1, "warm-2")
        assert warms["keeps"] == {
            "kept": 1, "kept_bytes": data.size, "used": 0, "used_bytes": 0, "ended": 0, "ended_bytes": 0, "pending": 1
        }

        await agent.images.pull(im.refs["base"])  # finds the layer local: the warm's hit, the keep's use
        # Under a lease of half a second, a layer no pull asks for again: the keep ends unused.
        body = {"ref": im.refs["base"], "ttl": 0.5}
        kept = await (await client.post(f"/v1/prefetch/layers/{base.digest}", json=body)).json()
        assert kept["kept"] is True
        await asyncio.sleep(0.7)
        warms = (await (await client.get("/v1/cache/status")).json())["warms"]
        assert warms["keeps"] == {
            "kept": 2,
            "kept_bytes": data.size + base.size,
            "used": 1,
            "used_bytes": data.size,
            "ended": 1,
            "ended_bytes": base.size,
            "pending": 0,
        }
        # the warms' own figures: one hit, no waste (an unused keep fetched nothing)
        assert (warms["hits"], warms["wasted_bytes"], warms["waste"]) == (1, 0, 0.0)
        metric = agent.metrics.cache.registry.get_sample_value
        assert metric("ferryman_cache_keeps_total", {"outcome": "kept"}) == 2
        assert metric("ferryman_cache_keeps_total", {"outcome": "used"}) == 1
        assert metric("ferryman_cache_keep_bytes_total", {"outcome": "ended"}) == base.size

        server = await serve(build_app(agent), f"unix://{short_dir}/agent.sock")
        try:
            r = await run(server, "cache", "status")
            assert r.code == 0, r
            assert "\nprefetch keeps: 2 layers here kept (" in r.out and "), 1 used (" in r.out, r.out
            assert "1 ended unused (" in r.out and "), 0 pending\n" in r.out, r.out
            r = await run(server, "cache", "status", "--json")
            assert r.json()["warms"]["keeps"]["kept"] == 2
            r = await run(server, "cache", "prefetch", "--layer", base.digest, "--from", im.refs["base"])
            assert r.out.startswith(f"kept {base.digest} (here already, "), r.out
        finally:
            await server.close()


async def test_a_warm_waits_while_a_pull_fetches(
    ctrd: PrivateContainerd, registry: DockerRegistry, workdir: Path
) -> None:
    """Warms never starve pulls (agent/images/pullgate.py): a warm reads nothing while a pull of
    other layers is in flight, then completes; a pull of the warm's own image is not held up by it."""
    im = await push_images(registry.host)
    data = im.base.layers[1]
    config = agent_config(ctrd, [registry.registry_config()], workdir)
    async with running_agent(config) as agent, api(agent) as client:
        with agent.images.puller.gate.pulling(["sha256:" + "0" * 64]):  # a pull of some other layer
            waiting = asyncio.create_task(
                client.post(f"/v1/prefetch/layers/{data.digest}", json={"ref": im.refs["base"], "ttl": 60})
            )
            await asyncio.sleep(1.0)
            assert not waiting.done(), "the warm waits for the pull"
            assert await agent.containerd.content.exists(data.digest) is None
            # a pull that needs the warm's layer lets it go on (it would wait for the warm's download)
            await asyncio.wait_for(agent.images.pull(im.refs["base"]), 30)
        resp = await asyncio.wait_for(waiting, 30)
        assert resp.status == 200, await resp.text()
        assert agent.images.puller.gate.pulls == 0


async def test_ferryctl_runs_a_composition_file(
    ctrd: PrivateContainerd, registry: DockerRegistry, workdir: Path, short_dir: Path
) -> None:
    im = await push_images(registry.host)
    path = workdir / "web.yaml"
    path.write_text(yaml.safe_dump(composition(im)))
    config = agent_config(ctrd, [registry.registry_config()], workdir)
    async with running_agent(config) as agent:
        server = await serve(build_app(agent), f"unix://{short_dir}/agent.sock")
        try:
            sock = f"unix://{short_dir}/agent.sock"
            code = await asyncio.to_thread(
                ferryctl, ["--agent", sock, "run", "--name", "ctl", "--composition", str(path)]
            )
            assert code == 0
            (summary,) = [c for c in await agent.containers.list() if c.id == "ctl"]
            assert summary.image.startswith("composition.ferryman.local/web-app:")
            warm = ["--agent", sock, "--json", "cache", "prefetch", "--layer", im.tools.layers[1].digest]
            code = await asyncio.to_thread(ferryctl, [*warm, "--from", im.refs["tools"]])
            assert code == 0
            # A manifest with a cycle never reaches the agent: exit 2, the problem named.
            bad = composition(im)
            bad["edges"].append({"node": "busybox", "depends_on": "app"})
            path.write_text(yaml.safe_dump(bad))
            code = await asyncio.to_thread(ferryctl, ["--agent", sock, "run", "--composition", str(path)])
            assert code == 2
            assert [c.id for c in await agent.containers.list()] == ["ctl"]
        finally:
            await server.close()


async def test_concurrent_assemblies_fetch_each_layer_once(
    ctrd: PrivateContainerd, registry: DockerRegistry, workdir: Path
) -> None:
    """The same composition twice at once is one assembly; two sharing layers share their downloads
    and their snapshots (whoever commits a chain ID first, the other uses it)."""
    im = await push_images(registry.host)
    config = agent_config(ctrd, [registry.registry_config()], workdir)
    async with running_agent(config) as agent:
        doc = composition(im)
        first, again, other = await asyncio.gather(
            agent.assembly.assemble(doc), agent.assembly.assemble(doc), agent.assembly.assemble(composition(im, "app2"))
        )
        # Each caller's own wait, and the host's rates as its answer was written; the assembly is the one.
        mine = ("seconds", "resolve_seconds", "layer_costs", "costs_at")
        assert {k: v for k, v in first.items() if k not in mine} == {k: v for k, v in again.items() if k not in mine}
        layers = {*(la["digest"] for la in first["stack"]), *(la["digest"] for la in other["stack"])}
        sizes = {la.digest: la.size for image in (im.base, im.tools, im.app, im.app2) for la in image.layers}
        assert first["bytes_fetched"] + other["bytes_fetched"] == sum(sizes[d] for d in layers)
        for image in (first["image"], other["image"]):
            assert "composed" in ctr_run(ctrd, agent, image, "/bin/sh", "-c", CHECK)
        assert await agent.containerd.leases.list() == []
