"""Chains on a real 3-host coordinated fleet: a counter handed over across hosts, failures rolled back.

Every stage is tests/workloads/stage.c, a static program that speaks the HTTP state contract: its
state is a counter (one per request a client makes) and a buffer, which each stage transforms as it
loads it (every byte + 1, its name appended to a trail). A client in its own namespace calls the
chain's address every 10 ms over fresh connections the whole time, through every handover, the
rollbacks and a coordinator killed and started again: each answer it gets names the stage and the
counter, and the counters it was given must be exactly 1, 2, 3, ... (none lost, none twice).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import msgpack
import pytest

from agent.ctl.exits import Exit
from tests.harness.alerts import AlertReceiver
from tests.harness.fleet import CoordinatedFleet, api, coordinated_fleet
from tests.harness.images import Dir, File, ImageBuilder, Layer, busybox_layer
from tests.harness.mesh import Mesh, MeshHost
from tests.harness.netns import acall_in_netns
from tests.harness.workloads import static_binary

PORT = 8080
SEED_BYTES = 4096
NEVER_HEALTHY = {"kind": "http", "port": PORT, "path": "/healthz", "interval": 0.2, "timeout": 0.2, "start_period": 600}
"""A check that fails, but within a start period that outlasts any handover: it stays in HEALTH."""
USAGE_MODEL = Path(__file__).resolve().parent.parent / "models" / "chains" / "usage.onnx"
SHORT_DEADLINE = {"protocol": "http_state", "port": PORT, "drain": 0.5, "deadline": 20}


def stage(name: str, image: str, consumes: str = "", fault: str = "none", **extra: Any) -> dict[str, Any]:
    seed = SEED_BYTES if not consumes else 0
    out: dict[str, Any] = {
        "name": name,
        "image": image,
        "args": ["/bin/stage", name, str(PORT), str(seed), fault],
        "health": {"kind": "http", "port": PORT, "path": "/healthz", "interval": 0.2, "timeout": 0.2, "retries": 3},
        "handover": {"protocol": "http_state", "port": PORT, "drain": 0.5, "deadline": 60},
        "resources": {"cpu_millis": 100, "memory_bytes": 64 << 20},
    }
    if consumes:
        out["consumes"] = {"from": consumes, "state": ["counter", "buffer", "trail"]}
    out.update(extra)
    return out


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
            "chains": {"usage_model": str(USAGE_MODEL), "predict_period": 0.5},
        }

    async with coordinated_fleet(base_dir, 3, coordinator_for=tables, with_client=True) as f:
        await alerts["receiver"].start()
        yield f


async def push_stage_image(mesh: Mesh) -> str:
    layer = Layer([Dir("bin"), File("bin/stage", static_binary("stage"), 0o755)], comment="stage")
    image = ImageBuilder([busybox_layer(), layer], cmd=("/bin/stage", "idle", str(PORT), "0", "none"))
    repo = f"test/stage-{secrets.token_hex(3)}"
    await image.push(mesh.push_host, repo, "v1")
    return mesh.image_ref(repo, "v1")


class Client:
    """POST /work to the chain's address every 10 ms, fresh connection each, from the client netns."""

    def __init__(self, netns: str, address: str, timeout: float = 1.0) -> None:
        self.netns = netns
        self.address = address
        self.timeout = timeout
        self.answers: list[tuple[float, int, str]] = []
        self._stop = threading.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(acall_in_netns(self.netns, self._loop))

    async def stop(self) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task

    def _loop(self) -> None:
        while not self._stop.is_set():
            conn = http.client.HTTPConnection(self.address, PORT, timeout=self.timeout)
            try:
                conn.request("POST", "/work", body=b"")
                resp = conn.getresponse()
                self.answers.append((time.monotonic(), resp.status, resp.read().decode(errors="replace")))
            except (OSError, http.client.HTTPException) as exc:
                self.answers.append((time.monotonic(), 0, f"{type(exc).__name__}: {exc}"))
            finally:
                conn.close()
            time.sleep(0.01)

    def served(self) -> list[tuple[str, int]]:
        """(stage, counter) of every request a stage took, in order."""
        out = []
        for _, status, body in self.answers:
            if status == 200:
                name, count = body.split()
                out.append((name, int(count)))
        return out

    async def served_by(self, name: str, within: float = 20.0) -> None:
        """Wait until `name` has answered at least one request."""
        deadline = time.monotonic() + within
        while not any(s == name for s, _ in self.served()[-5:]):
            assert time.monotonic() < deadline, f"{name} never answered: {self.answers[-5:]}"
            await asyncio.sleep(0.1)


def assert_exactly_once(client: Client) -> None:
    counters = [n for _, n in client.served()]
    assert counters == list(range(1, len(counters) + 1)), [c for c in client.answers if c[1] != 200][:20]


async def stage_get(f: CoordinatedFleet, address: str, path: str) -> bytes:
    """The serving stage's answer to `GET path` (no side effect), from the client."""
    assert f.mesh.client is not None

    def get() -> bytes:
        conn = http.client.HTTPConnection(address, PORT, timeout=5.0)
        try:
            conn.request("GET", path)
            return conn.getresponse().read()
        finally:
            conn.close()

    return await acall_in_netns(f.mesh.client.netns, get)


async def stage_state(f: CoordinatedFleet, address: str) -> dict[str, Any]:
    """The serving stage's state, as its `GET /state` gives it."""
    return dict(msgpack.unpackb(await stage_get(f, address, "/state")))


async def chain_containers(f: CoordinatedFleet) -> dict[str, list[str]]:
    out = {}
    for host in f.mesh.hosts:
        listed = (await api(host, "GET", "/v1/containers"))["containers"]
        out[host.name] = sorted(c["id"] for c in listed if "ferryman.chain" in (c.get("labels") or {}))
    return out


async def ferryctl_json(f: CoordinatedFleet, *args: str, code: int = Exit.OK) -> Any:
    res = await f.ferryctl("--json", *args)
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr, f.coordinator.logs()[-3000:])
    return json.loads(res.stdout)


async def run_chain(f: CoordinatedFleet, base_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """`ferryctl chain run` of the manifest (written as <name>.json); its record, once RUNNING."""
    path = base_dir / f"{manifest['name']}.json"
    path.write_text(json.dumps(manifest))
    record: dict[str, Any] = await ferryctl_json(f, "chain", "run", str(path), "--wait", "120")
    assert record["state"] == "RUNNING", record
    return record


async def advance_onto_standby(f: CoordinatedFleet, chain: str, standby: dict[str, Any]) -> dict[str, Any]:
    """`ferryctl chain advance` onto transform's standby: the record once transform serves from the
    standby's own container (thawed or restored), not a new one."""
    done: dict[str, Any] = await ferryctl_json(f, "chain", "advance", chain, "--wait", "120")
    assert done["state"] == "RUNNING" and done["serving"] == "transform", done
    [handover] = done["handovers"]
    assert handover["outcome"] == "done" and handover["from_standby"] is True, handover
    runs = {r["stage"]: r for r in done["runs"]}
    assert runs["transform"]["container"] == standby["container"]
    return done


async def until_run_state(f: CoordinatedFleet, chain: str, stage: str, state: str, within: float) -> dict[str, Any]:
    """The stage's run in the chain's record once it is in `state` (a standby: frozen, checkpointed)."""

    async def in_state() -> dict[str, Any] | None:
        now = await f.call("GET", f"/v1/chains/{chain}")
        runs = {r["stage"]: r for r in now["runs"]}
        return dict(runs[stage]) if runs.get(stage, {}).get("state") == state else None

    found: dict[str, Any] = await f.wait_for(f"{stage}'s standby {state}", in_state, within=within)
    return found


async def until_serving(f: CoordinatedFleet, chain: str, stage: str, within: float = 120) -> dict[str, Any]:
    """The chain's record once it is RUNNING with `stage` serving; on a timeout, the last record seen."""
    last: dict[str, Any] = {}

    async def serving() -> dict[str, Any] | None:
        now = await f.call("GET", f"/v1/chains/{chain}")
        last.update(now)
        return dict(now) if now["state"] == "RUNNING" and now["serving"] == stage else None

    try:
        return cast(dict[str, Any], await f.wait_for(f"{stage} serving", serving, within=within))
    except AssertionError as exc:
        raise AssertionError(f"{stage} not serving within {within:g} s; the chain: {json.dumps(last)[:4000]}") from exc


async def test_a_counter_is_handed_over_across_hosts_and_failed_handovers_roll_back_intact(
    fleet3: CoordinatedFleet, alerts: dict[str, AlertReceiver], base_dir: Path
) -> None:
    f, mesh = fleet3, fleet3.mesh
    receiver = alerts["receiver"]
    assert mesh.client is not None
    image = await push_stage_image(mesh)
    manifest = {
        "version": 1,
        "name": "counter",
        "port": PORT,
        "stages": [
            stage("ingest", image),
            stage("transform", image, "ingest", fault="import", fallback="transform-safe"),
            stage("publish", image, "transform", fault="health", health=NEVER_HEALTHY),
        ],
        "fallbacks": [stage("transform-safe", image, "ingest", handover=SHORT_DEADLINE)],
    }
    path = base_dir / "chain.json"
    path.write_text(json.dumps(manifest))
    schema = await f.call("GET", "/v1/chains/schema")
    assert "urn:ferryman:chain-manifest:v1" in json.dumps(schema)
    # A manifest that is wrong is refused, every problem named, and nothing of it created.
    criu = {"protocol": "criu", "become": True}
    bad = {"version": 1, "name": "bad", "stages": [{"name": "a", "image": image, "handover": criu}]}
    (base_dir / "bad.json").write_text(json.dumps(bad))
    res = await f.ferryctl("chain", "run", str(base_dir / "bad.json"))
    assert res.returncode == Exit.ERROR, (res.returncode, res.stdout, res.stderr)
    assert "stages[0].handover.become: a is the last stage; there is no stage to become" in res.stderr, res.stderr
    assert "stages[0].health: required" in res.stderr
    assert (await f.call("GET", "/v1/chains"))["chains"] == []

    record = await ferryctl_json(f, "chain", "run", str(path), "--wait", "120")
    assert record["state"] == "RUNNING" and record["serving"] == "ingest", record
    address = record["address"]
    client = Client(mesh.client.netns, address)
    client.start()
    try:
        await client.served_by("ingest")
        await asyncio.sleep(0.5)

        # ingest -> transform: transform refuses the state in IMPORT; rolled back to ingest, which keeps
        # its counter; then transform's fallback takes over, on another host, with that counter.
        # (The fallback starts as soon as the rollback ends: the answer may come from either.)
        res = await f.ferryctl("--json", "chain", "advance", record["id"], "--wait", "120")
        rolled = json.loads(res.stdout)
        first = rolled["handovers"][0]
        assert (first["source"], first["target"], first["outcome"], first["failed_phase"]) == (
            "ingest", "transform", "rolled_back", "IMPORT",
        )  # fmt: skip
        assert "refused the import: HTTP 500: import refused (fault)" in first["error"]

        now = await until_serving(f, record["id"], "transform-safe")
        await client.served_by("transform-safe")
        done = now["handovers"][1]
        assert (done["source"], done["target"], done["outcome"]) == ("ingest", "transform-safe", "done")
        assert set(done["phases_ms"]) == {"PREPARING", "HEALTH", "EXPORT", "TRANSFER", "IMPORT", "SWITCH"}
        runs = {r["stage"]: r for r in now["runs"]}
        assert runs["ingest"]["state"] == "removed" and runs["transform"]["state"] == "failed"
        assert runs["transform-safe"]["state"] == "serving"
        assert runs["transform-safe"]["host"] != runs["ingest"]["host"]  # across hosts
        served = client.served()  # before the state: the client goes on calling meanwhile
        state = await stage_state(f, address)
        assert state["trail"] == "ingest,transform-safe"
        assert state["buffer"] == bytes((i % 251 + 1) % 256 for i in range(SEED_BYTES))
        assert state["counter"] >= served[-1][1]
        assert [name for name, _ in served if name not in ("ingest", "transform-safe")] == []
        assert await chain_containers(f) == {
            h.name: [runs["transform-safe"]["container"]] if h.name == runs["transform-safe"]["host"] else []
            for h in mesh.hosts
        }

        # transform-safe -> publish, whose check never passes: the coordinator is killed while the
        # handover waits in HEALTH. The stage serves on (the coordinator is not in the data path);
        # the coordinator started again rolls the handover back (an exported state would have been
        # in the killed process's memory), and transform-safe keeps serving its counter.
        await ferryctl_json(f, "chain", "advance", record["id"], "--no-wait")

        async def in_health() -> bool:
            return bool((await f.call("GET", f"/v1/chains/{record['id']}"))["state"] == "HEALTH")

        await f.wait_for("the handover to publish waiting in HEALTH", in_health, within=60)
        assert f.coordinator.proc is not None
        f.coordinator.proc.kill()
        await f.coordinator.stop()
        before = len(client.served())
        await asyncio.sleep(1.0)
        assert len(client.served()) > before
        await f.coordinator.start()

        async def rolled_back() -> dict[str, Any] | None:
            now = await f.call("GET", f"/v1/chains/{record['id']}")
            last = now["handovers"][-1]
            return dict(now) if now["state"] == "RUNNING" and last["outcome"] == "rolled_back" else None

        resumed = await f.wait_for("rolled back after the restart", rolled_back, within=60)
        last = resumed["handovers"][-1]
        assert (last["target"], last["failed_phase"]) == ("publish", "HEALTH"), last
        assert "the coordinator restarted during the handover" in last["error"]
        assert resumed["serving"] == "transform-safe" and resumed["failed"] == ["publish"]
        assert await chain_containers(f) == {
            h.name: [runs["transform-safe"]["container"]] if h.name == runs["transform-safe"]["host"] else []
            for h in mesh.hosts
        }

        # Driven on by the new coordinator: advance tries publish again, which is not healthy within
        # transform-safe's handover deadline (20 s): rolled back, transform-safe serves on.
        rolled = await ferryctl_json(f, "chain", "advance", record["id"], "--wait", "120", code=Exit.NOT_DEPLOYED)
        assert rolled["state"] == "RUNNING" and rolled["serving"] == "transform-safe", rolled
        last = rolled["handovers"][-1]
        assert (last["target"], last["outcome"], last["failed_phase"]) == ("publish", "rolled_back", "HEALTH")
        assert rolled["failed"] == ["publish"] and len(rolled["handovers"]) == 4
        count = client.served()[-1][1]
        await asyncio.sleep(0.5)
        assert client.served()[-1] > ("transform-safe", count)
        status = await f.ferryctl("chain", "status", record["id"])
        assert status.returncode == 0 and "failed in HEALTH" in status.stdout, status
    finally:
        await client.stop()
    assert_exactly_once(client)
    assert {name for name, _ in client.served()} == {"ingest", "transform-safe"}

    # One alert per rolled-back handover, with the phase that failed.
    bodies = await receiver.wait_for(3)
    labels = [b["alerts"][0]["labels"] for b in bodies]
    assert [(a["alertname"], a["target"], a["phase"]) for a in labels] == [
        ("FerrymanChainHandoverFailed", "transform", "IMPORT"),
        ("FerrymanChainHandoverFailed", "publish", "HEALTH"),
        ("FerrymanChainHandoverFailed", "publish", "HEALTH"),
    ]
    metrics = await f.call("GET", "/metrics")  # counted since the coordinator's restart
    assert 'ferryman_coordinator_chain_handover_failures_total{phase="HEALTH"} 2.0' in metrics
    assert 'ferryman_coordinator_chain_handovers_total{outcome="rolled_back"} 2.0' in metrics

    aborted = await ferryctl_json(f, "chain", "abort", record["id"], "--wait", "60")
    assert aborted["state"] == "ABORTED", aborted
    assert await chain_containers(f) == {h.name: [] for h in mesh.hosts}
    reservations = (await f.call("GET", "/v1/reservations"))["reservations"]
    assert [r for r in reservations if record["id"] in r["purpose"]] == []
    assert not await mesh.can_connect(mesh.client, address, PORT)
    listed = await ferryctl_json(f, "chains")
    assert [(c["id"], c["state"]) for c in listed["chains"]] == [(record["id"], "ABORTED")]
    busy = await ferryctl_json(f, "chain", "advance", record["id"], code=Exit.ERROR)
    assert busy["error"]["code"] == "chain_busy", busy
    missing = await ferryctl_json(f, "chain", "status", "counter-00000000", code=Exit.ERROR)
    assert missing["error"]["code"] == "chain_not_found", missing


async def test_handovers_failing_at_export_transfer_and_switch_roll_back_with_the_state_intact(
    fleet3: CoordinatedFleet, alerts: dict[str, AlertReceiver], base_dir: Path
) -> None:
    """Three chains side by side, each with a handover that fails in one phase: the serving stage
    refuses to export (EXPORT); the next stage consumes a field the state has not (TRANSFER); the
    next stage dies between taking the state and getting the address, after the address left the
    serving stage's host (SWITCH). Each rolls back: the serving stage serves on with its state as it
    was, its client sees every counter once, and one alert names the phase."""
    f, mesh = fleet3, fleet3.mesh
    receiver = alerts["receiver"]
    assert mesh.client is not None
    image = await push_stage_image(mesh)
    cases = {
        "EXPORT": [stage("ingest", image, fault="export"), stage("transform", image, "ingest")],
        "TRANSFER": [stage("ingest", image), stage("transform", image, "ingest")],
        "SWITCH": [stage("ingest", image), stage("transform", image, "ingest", fault="switch")],
    }
    cases["TRANSFER"][1]["consumes"]["state"].append("ledger")  # a field no stage exports
    records: dict[str, dict[str, Any]] = {}
    for phase, stages in cases.items():
        path = base_dir / f"chain-{phase.lower()}.json"
        path.write_text(json.dumps({"version": 1, "name": f"fail-{phase.lower()}", "port": PORT, "stages": stages}))
        records[phase] = await ferryctl_json(f, "chain", "run", str(path), "--wait", "120")
        assert records[phase]["state"] == "RUNNING", records[phase]
    clients = {phase: Client(mesh.client.netns, r["address"]) for phase, r in records.items()}
    for client in clients.values():
        client.start()
    try:
        for client in clients.values():
            await client.served_by("ingest")
        await asyncio.sleep(0.5)
        before = {phase: await stage_state(f, r["address"]) for phase, r in records.items()}

        async def advance(phase: str) -> dict[str, Any]:
            args = ("chain", "advance", records[phase]["id"], "--wait", "120")
            return dict(await ferryctl_json(f, *args, code=Exit.NOT_DEPLOYED))

        rolled = dict(zip(cases, await asyncio.gather(*(advance(p) for p in cases)), strict=True))
        for phase, record in rolled.items():
            assert record["state"] == "RUNNING" and record["serving"] == "ingest", record
            assert record["failed"] == ["transform"], record
            [handover] = record["handovers"]
            assert (handover["target"], handover["outcome"], handover["failed_phase"]) == (
                "transform", "rolled_back", phase,
            ), handover  # fmt: skip
            runs = {r["stage"]: r for r in record["runs"]}
            assert runs["ingest"]["state"] == "serving" and runs["transform"]["state"] == "failed", runs
        assert "refused the export: HTTP 500: export refused (fault)" in rolled["EXPORT"]["handovers"][0]["error"]
        assert "ledger" in rolled["TRANSFER"]["handovers"][0]["error"]
        assert "is stopped: its address is not published" in rolled["SWITCH"]["handovers"][0]["error"]

        # Each chain's first stage serves on, its state the one it had, its counter going on.
        for phase, record in records.items():
            count = clients[phase].served()[-1][1]
            await asyncio.sleep(0.3)
            assert clients[phase].served()[-1] > ("ingest", count), phase
            last = clients[phase].served()[-1][1]
            state = await stage_state(f, record["address"])
            assert (state["trail"], state["buffer"]) == (before[phase]["trail"], before[phase]["buffer"]), phase
            assert state["counter"] >= last > before[phase]["counter"], phase
        containers = await chain_containers(f)
        serving = sorted(next(r["container"] for r in rec["runs"] if r["stage"] == "ingest") for rec in rolled.values())
        assert sorted(c for listed in containers.values() for c in listed) == serving, containers
    finally:
        for client in clients.values():
            await client.stop()
    for phase, client in clients.items():
        assert_exactly_once(client)
        assert {name for name, _ in client.served()} == {"ingest"}, phase

    # One alert per rolled-back handover, naming its chain and phase.
    bodies = await receiver.wait_for(3)
    labels = sorted((b["alerts"][0]["labels"]["chain"], b["alerts"][0]["labels"]["phase"]) for b in bodies)
    assert labels == sorted((r["id"], phase) for phase, r in records.items()), labels
    await asyncio.sleep(1.0)
    assert len(receiver.bodies) == 3, receiver.bodies
    metrics = await f.call("GET", "/metrics")
    for phase in cases:
        assert f'ferryman_coordinator_chain_handover_failures_total{{phase="{phase}"}} 1.0' in metrics


VOLUME = "/handover"
BIG_SEED = 1 << 20
BIG_STATE = 16 << 20


async def test_a_counter_is_handed_over_on_one_host_through_the_chains_volume(
    fleet3: CoordinatedFleet, alerts: dict[str, AlertReceiver], base_dir: Path
) -> None:
    """`shared_volume`: the next stage runs on the serving stage's host and maps the buffer the
    serving stage keeps in the chain's volume, so the exported state is a few bytes whatever the
    buffer's size; the address moves by flipping the host's route from one veth to the other. A
    handover that fails there (the next stage refuses the import) flips it back: the serving stage
    keeps its state; its fallback then takes over on the same host."""
    f, mesh = fleet3, fleet3.mesh
    receiver = alerts["receiver"]
    assert mesh.client is not None
    image = await push_stage_image(mesh)
    over_volume = {"protocol": "shared_volume", "port": PORT, "path": VOLUME, "drain": 0.5, "deadline": 60}

    def on_volume(name: str, consumes: str = "", fault: str = "none", **extra: Any) -> dict[str, Any]:
        out = stage(name, image, consumes, fault, handover=over_volume, **extra)
        out["args"] = ["/bin/stage", name, str(PORT), str(0 if consumes else BIG_SEED), fault, VOLUME]
        return out

    manifest = {
        "version": 1,
        "name": "local",
        "port": PORT,
        "stages": [on_volume("ingest"), on_volume("transform", "ingest", fault="import", fallback="transform-safe")],
        "fallbacks": [on_volume("transform-safe", "ingest")],
    }
    record = await run_chain(f, base_dir, manifest)
    address, ingest_host = record["address"], record["runs"][0]["host"]
    client = Client(mesh.client.netns, address)
    client.start()
    try:
        await client.served_by("ingest")
        await asyncio.sleep(0.5)
        # (The fallback starts as soon as the rollback ends: the answer may come from either.)
        res = await f.ferryctl("--json", "chain", "advance", record["id"], "--wait", "120")
        first = json.loads(res.stdout)["handovers"][0]
        assert (first["target"], first["outcome"], first["failed_phase"]) == ("transform", "rolled_back", "IMPORT")
        assert first["state_bytes"] < 256, first  # the buffer's name, not its MiB

        now = await until_serving(f, record["id"], "transform-safe")
        await client.served_by("transform-safe")
        runs = {r["stage"]: r for r in now["runs"]}
        assert {r["host"] for r in runs.values()} == {ingest_host}, runs  # every stage on one host
        assert runs["transform"]["state"] == "failed" and runs["ingest"]["state"] == "removed"
        done = now["handovers"][1]
        assert (done["target"], done["outcome"]) == ("transform-safe", "done") and done["state_bytes"] < 256
        state = await stage_state(f, address)
        assert state["trail"] == "ingest,transform-safe"
        assert state["buffer"] == {"file": "transform-safe.buffer", "bytes": BIG_SEED}
        assert await chain_containers(f) == {
            h.name: [runs["transform-safe"]["container"]] if h.name == ingest_host else [] for h in mesh.hosts
        }
        # The buffer itself, as the serving stage has it: ingest's seed, + 1 by transform-safe.
        expected = bytes((i % 251 + 1) % 256 for i in range(BIG_SEED))
        assert await stage_get(f, address, "/buffer") == expected
        host = next(h for h in mesh.hosts if h.name == ingest_host)
    finally:
        await client.stop()
    assert_exactly_once(client)
    assert {name for name, _ in client.served()} == {"ingest", "transform-safe"}
    bodies = await receiver.wait_for(1)
    assert [(b["alerts"][0]["labels"]["target"], b["alerts"][0]["labels"]["phase"]) for b in bodies] == [
        ("transform", "IMPORT")
    ]

    # The volume is the chain's: it goes with it.
    volume = f"/v1/volumes/{record['id']}"
    refused = await api(host, "DELETE", volume, expect=409)
    assert "mount" in json.dumps(refused), refused
    aborted = await ferryctl_json(f, "chain", "abort", record["id"], "--wait", "60")
    assert aborted["state"] == "ABORTED", aborted
    missing = await api(host, "DELETE", volume, expect=404)
    assert missing["error"]["code"] == "volume_not_found", missing


async def test_a_frozen_standby_is_thawed_at_its_handover(
    fleet3: CoordinatedFleet, alerts: dict[str, AlertReceiver], base_dir: Path
) -> None:
    """`standby: frozen`: while ingest serves, transform is made on another host, healthy, and frozen
    (the agent's task paused, no probe of it counted); the handover thaws it instead of starting it.
    The state is 16 MiB: it arrives in many reads through each agent's relay, and whole."""
    f, mesh = fleet3, fleet3.mesh
    assert mesh.client is not None
    image = await push_stage_image(mesh)
    ingest = stage("ingest", image)
    ingest["args"][3] = str(BIG_STATE)
    manifest = {
        "version": 1,
        "name": "standby",
        "port": PORT,
        "stages": [ingest, stage("transform", image, "ingest", standby="frozen")],
    }
    record = await run_chain(f, base_dir, manifest)
    standby = await until_run_state(f, record["id"], "transform", "frozen", within=60)
    host = next(h for h in mesh.hosts if h.name == standby["host"])
    assert standby["host"] != record["runs"][0]["host"]
    listed = {c["id"]: c for c in (await api(host, "GET", "/v1/containers"))["containers"]}
    assert listed[standby["container"]]["state"] == "paused", listed[standby["container"]]
    health = await api(host, "GET", f"/v1/containers/{standby['container']}/health")
    assert health["status"] == "healthy", health  # frozen: not probed, so not failing
    client = Client(mesh.client.netns, record["address"])
    client.start()
    try:
        await client.served_by("ingest")
        done = await advance_onto_standby(f, record["id"], standby)
        [handover] = done["handovers"]
        assert len(done["runs"]) == 2
        await client.served_by("transform")
    finally:
        await client.stop()
    assert_exactly_once(client)
    state = await stage_state(f, record["address"])
    assert state["trail"] == "ingest,transform"
    assert state["buffer"] == bytes((i % 251 + 1) % 256 for i in range(BIG_STATE))
    assert handover["state_bytes"] > BIG_STATE
    listed = {c["id"]: c for c in (await api(host, "GET", "/v1/containers"))["containers"]}
    assert listed[standby["container"]]["state"] == "running"
    aborted = await ferryctl_json(f, "chain", "abort", record["id"], "--wait", "60")
    assert aborted["state"] == "ABORTED", aborted


async def test_the_next_stage_is_preallocated_from_its_predicted_usage(
    fleet3: CoordinatedFleet, alerts: dict[str, AlertReceiver], base_dir: Path
) -> None:
    """While ingest serves, transform's usage is predicted (its manifest's `predicted`: the chain
    has no history yet) and reserved on the host its handover will place it on; the handover
    places it there, on that reservation, released once the handover is done. Each serving stage's
    peak is measured from its host's telemetry, so the chain's next run predicts from this one's
    history (the model)."""
    f, mesh = fleet3, fleet3.mesh
    assert mesh.client is not None
    image = await push_stage_image(mesh)
    predicted = {"cpu_millis": 150, "memory_bytes": 48 << 20}
    manifest = {
        "version": 1,
        "name": "predicted",
        "port": PORT,
        "stages": [stage("ingest", image), stage("transform", image, "ingest", predicted=predicted)],
    }
    record = await run_chain(f, base_dir, manifest)

    async def preallocated() -> dict[str, Any] | None:
        now = await f.call("GET", f"/v1/chains/{record['id']}")
        return dict(now) if now["preallocation"] else None

    now = await f.wait_for("transform's capacity pre-allocated", preallocated, within=30)
    pre = now["preallocation"]
    assert now["prediction"]["basis"] == "manifest" and now["prediction"]["stage"] == "transform", now["prediction"]
    assert (pre["stage"], pre["cpu_millis"], pre["memory_bytes"]) == ("transform", 150, 48 << 20), pre
    assert pre["host"] != record["runs"][0]["host"]
    reservations = {r["id"]: r for r in (await f.call("GET", "/v1/reservations"))["reservations"]}
    assert reservations[pre["reservation"]]["host"] == pre["host"], reservations
    assert reservations[pre["reservation"]]["capacity"]["cpu_millis"] == 150
    status = await f.ferryctl("chain", "status", record["id"])
    assert "pre-allocated" in status.stdout and pre["host"] in status.stdout, status.stdout
    client = Client(mesh.client.netns, record["address"])
    client.start()
    try:
        await client.served_by("ingest")
        await asyncio.sleep(2.0)  # a few telemetry samples of ingest serving
        done = await ferryctl_json(f, "chain", "advance", record["id"], "--wait", "120")
        assert done["state"] == "RUNNING" and done["serving"] == "transform", done
        [handover] = done["handovers"]
        assert handover["outcome"] == "done" and handover["preallocated"] is True, handover
        runs = {r["stage"]: r for r in done["runs"]}
        assert runs["transform"]["host"] == pre["host"] and runs["transform"]["reservation"] == ""
        assert runs["ingest"]["peak_memory_bytes"] > 0, runs["ingest"]
        assert runs["ingest"]["peak_request_rate"] > 0, runs["ingest"]  # the client's packets, counted
        assert done["preallocation"] == {}, done["preallocation"]  # the last stage serves: nothing follows
        await client.served_by("transform")
        await asyncio.sleep(2.0)
    finally:
        await client.stop()
    assert_exactly_once(client)
    reservations = {r["id"]: r for r in (await f.call("GET", "/v1/reservations"))["reservations"]}
    assert pre["reservation"] not in reservations, reservations
    completed = await ferryctl_json(f, "chain", "advance", record["id"], "--wait", "60")
    assert completed["state"] == "COMPLETED", completed
    assert all(r["peak_memory_bytes"] > 0 for r in completed["runs"]), completed["runs"]

    again = await run_chain(f, base_dir, manifest)

    async def from_history() -> dict[str, Any] | None:
        now = await f.call("GET", f"/v1/chains/{again['id']}")
        made = now["prediction"].get("basis") == "model" and now["preallocation"]
        return dict(now["prediction"]) if made and now["prediction"].get("rate_growth") is not None else None

    # With a client again, ingest's request rate now over its rate in the first run is the model's
    # rate_growth: the feature is measured, not missing.
    client = Client(mesh.client.netns, again["address"])
    client.start()
    try:
        prediction = await f.wait_for("transform predicted from the first run", from_history, within=30)
    finally:
        await client.stop()
    assert prediction["stage"] == "transform" and prediction["memory_bytes"] > 0, prediction
    assert prediction["request_rate"] > 0 and prediction["rate_growth"] > 0, prediction
    aborted = await ferryctl_json(f, "chain", "abort", again["id"], "--wait", "60")
    assert aborted["state"] == "ABORTED", aborted
    reservations = (await f.call("GET", "/v1/reservations"))["reservations"]
    assert [r for r in reservations if again["id"] in r["purpose"]] == [], reservations


async def test_a_checkpointed_standby_is_restored_at_its_handover(
    fleet3: CoordinatedFleet, alerts: dict[str, AlertReceiver], base_dir: Path
) -> None:
    """`standby: checkpointed`: while ingest serves, transform is made on another host, healthy,
    then checkpointed to that host's disk (its processes ended, its images kept there); the
    handover restores it instead of starting it, and the state handed over is whole."""
    f, mesh = fleet3, fleet3.mesh
    assert mesh.client is not None
    image = await push_stage_image(mesh)
    manifest = {
        "version": 1,
        "name": "checkpointed",
        "port": PORT,
        "stages": [stage("ingest", image), stage("transform", image, "ingest", standby="checkpointed")],
    }
    record = await run_chain(f, base_dir, manifest)
    standby = await until_run_state(f, record["id"], "transform", "checkpointed", within=90)
    host = next(h for h in mesh.hosts if h.name == standby["host"])
    assert standby["host"] != record["runs"][0]["host"]
    inspected = await api(host, "GET", f"/v1/containers/{standby['container']}")
    assert inspected["pid"] is None, inspected  # no process: only its images on the host's disk
    images = Path(inspected["labels"]["io.ferryman.checkpoint"])
    assert any(images.glob("pages-*.img")), sorted(p.name for p in images.iterdir())
    client = Client(mesh.client.netns, record["address"])
    client.start()
    try:
        await client.served_by("ingest")
        await advance_onto_standby(f, record["id"], standby)
        await client.served_by("transform")
    finally:
        await client.stop()
    assert_exactly_once(client)
    state = await stage_state(f, record["address"])
    assert state["trail"] == "ingest,transform"
    assert state["buffer"] == bytes((i % 251 + 1) % 256 for i in range(SEED_BYTES))
    assert not images.exists()  # deleted once restored
    aborted = await ferryctl_json(f, "chain", "abort", record["id"], "--wait", "60")
    assert aborted["state"] == "ABORTED", aborted


async def test_a_live_handover_serves_on_until_the_switch_and_a_failed_delta_rolls_back(
    fleet3: CoordinatedFleet, alerts: dict[str, AlertReceiver], base_dir: Path
) -> None:
    """`live`: the serving stage answers its client through EXPORT, TRANSFER and IMPORT (a snapshot
    with its version is carried over); at SWITCH it exports only the delta since (its counter) and
    the next stage applies it, so requests made during the handover are neither lost nor counted
    twice. A second chain whose next stage refuses the delta rolls back at SWITCH: the serving stage
    serves on with its state and its counter going on."""
    f, mesh = fleet3, fleet3.mesh
    receiver = alerts["receiver"]
    assert mesh.client is not None
    image = await push_stage_image(mesh)
    live = {"protocol": "http_state", "port": PORT, "drain": 0.5, "deadline": 60, "live": True}
    cases = {
        "done": [stage("ingest", image, handover=live), stage("transform", image, "ingest")],
        "rolled_back": [stage("ingest", image, handover=live), stage("transform", image, "ingest", fault="delta")],
    }
    records: dict[str, dict[str, Any]] = {}
    for case, stages in cases.items():
        path = base_dir / f"live-{case}.json"
        path.write_text(
            json.dumps({"version": 1, "name": f"live-{case.replace('_', '-')}", "port": PORT, "stages": stages})
        )
        records[case] = await ferryctl_json(f, "chain", "run", str(path), "--wait", "120")
        assert records[case]["state"] == "RUNNING", records[case]
    clients = {case: Client(mesh.client.netns, r["address"]) for case, r in records.items()}
    for client in clients.values():
        client.start()
    try:
        for client in clients.values():
            await client.served_by("ingest")
        before = await stage_state(f, records["rolled_back"]["address"])

        async def advance(case: str) -> dict[str, Any]:
            code = Exit.OK if case == "done" else Exit.NOT_DEPLOYED
            return dict(await ferryctl_json(f, "chain", "advance", records[case]["id"], "--wait", "120", code=code))

        ended = dict(zip(cases, await asyncio.gather(*(advance(c) for c in cases)), strict=True))
        done = await until_serving(f, records["done"]["id"], "transform")
        [handover] = done["handovers"]
        assert handover["outcome"] == "done" and handover["snapshot_version"] > 0, handover
        assert 0 < handover["frozen_ms"] <= handover["phases_ms"]["SWITCH"], handover
        await clients["done"].served_by("transform")
        # ingest answered while its state was carried: after the snapshot, before the switch.
        ingest_last = max(n for s, n in clients["done"].served() if s == "ingest")
        assert ingest_last > handover["snapshot_version"], (ingest_last, handover)
        state = await stage_state(f, records["done"]["address"])
        assert state["trail"] == "ingest,transform"
        assert state["buffer"] == bytes((i % 251 + 1) % 256 for i in range(SEED_BYTES))

        rolled = ended["rolled_back"]
        assert rolled["state"] == "RUNNING" and rolled["serving"] == "ingest", rolled
        [failed] = rolled["handovers"]
        assert (failed["outcome"], failed["failed_phase"]) == ("rolled_back", "SWITCH"), failed
        assert "delta refused (fault)" in failed["error"], failed
        count = clients["rolled_back"].served()[-1][1]
        await asyncio.sleep(0.3)
        assert clients["rolled_back"].served()[-1] > ("ingest", count)
        after = await stage_state(f, records["rolled_back"]["address"])
        assert (after["trail"], after["buffer"]) == (before["trail"], before["buffer"])
    finally:
        for client in clients.values():
            await client.stop()
    for client in clients.values():
        assert_exactly_once(client)
    assert {name for name, _ in clients["rolled_back"].served()} == {"ingest"}
    bodies = await receiver.wait_for(1)
    assert [(b["alerts"][0]["labels"]["chain"], b["alerts"][0]["labels"]["phase"]) for b in bodies] == [
        (records["rolled_back"]["id"], "SWITCH")
    ]


async def test_a_live_handover_on_one_host_takes_over_in_one_agent_request(
    fleet3: CoordinatedFleet, alerts: dict[str, AlertReceiver], base_dir: Path
) -> None:
    """`live` over `shared_volume`: at SWITCH the host's agent takes the delta out of the serving
    stage, into the next and flips the route in one request, its connections and route made before
    the export (`switch_steps_ms` says each step); the client's requests are neither lost nor
    counted twice. A second chain whose next stage refuses the delta rolls back at SWITCH: the
    route stays with the serving stage, which serves on with its state."""
    f, mesh = fleet3, fleet3.mesh
    assert mesh.client is not None
    image = await push_stage_image(mesh)
    live = {"protocol": "shared_volume", "port": PORT, "path": VOLUME, "drain": 0.5, "deadline": 60, "live": True}

    def on_volume(name: str, consumes: str = "", fault: str = "none") -> dict[str, Any]:
        out = stage(name, image, consumes, fault, handover=live)
        out["args"] = ["/bin/stage", name, str(PORT), str(0 if consumes else SEED_BYTES), fault, VOLUME]
        return out

    cases = {
        "done": [on_volume("ingest"), on_volume("transform", "ingest")],
        "rolled_back": [on_volume("ingest"), on_volume("transform", "ingest", fault="delta")],
    }
    records: dict[str, dict[str, Any]] = {}
    for case, stages in cases.items():
        manifest = {"version": 1, "name": f"local-live-{case.replace('_', '-')}", "port": PORT, "stages": stages}
        records[case] = await run_chain(f, base_dir, manifest)
    clients = {case: Client(mesh.client.netns, r["address"]) for case, r in records.items()}
    for client in clients.values():
        client.start()
    try:
        for client in clients.values():
            await client.served_by("ingest")
        before = await stage_state(f, records["rolled_back"]["address"])
        done = await ferryctl_json(f, "chain", "advance", records["done"]["id"], "--wait", "120")
        [handover] = done["handovers"]
        assert handover["outcome"] == "done", handover
        steps = handover["switch_steps_ms"]
        assert set(steps) == {"look_up", "connect", "export", "patch", "flip", "publish"}, handover
        assert steps["export"] + steps["patch"] + steps["flip"] <= handover["frozen_ms"], handover
        await clients["done"].served_by("transform")
        runs = {r["stage"]: r for r in done["runs"]}
        assert runs["ingest"]["host"] == runs["transform"]["host"], runs

        rolled = await ferryctl_json(
            f, "chain", "advance", records["rolled_back"]["id"], "--wait", "120", code=Exit.NOT_DEPLOYED
        )
        assert rolled["state"] == "RUNNING" and rolled["serving"] == "ingest", rolled
        [failed] = rolled["handovers"]
        assert (failed["outcome"], failed["failed_phase"]) == ("rolled_back", "SWITCH"), failed
        assert "delta refused (fault)" in failed["error"], failed
        count = clients["rolled_back"].served()[-1][1]
        await asyncio.sleep(0.3)
        assert clients["rolled_back"].served()[-1] > ("ingest", count)  # the route stayed with ingest
        after = await stage_state(f, records["rolled_back"]["address"])
        assert (after["trail"], after["buffer"]) == (before["trail"], before["buffer"])
    finally:
        for client in clients.values():
            await client.stop()
    for client in clients.values():
        assert_exactly_once(client)
    assert {name for name, _ in clients["rolled_back"].served()} == {"ingest"}


async def restart_with_failpoints(host: MeshHost, failpoints: str | None) -> None:
    await host.stop_agent()
    host.agent_env = {"FERRYMAN_FAILPOINTS": failpoints} if failpoints else {}
    await host.start_agent()


async def test_a_stage_moves_its_live_process_by_criu_and_a_failed_move_rolls_back(
    fleet3: CoordinatedFleet, alerts: dict[str, AlertReceiver], base_dir: Path
) -> None:
    """`criu`: a 3-stage chain whose first stage's process moves to another host and *is* the
    second stage (`become`), whose second stage's process moves next to the third and hands its
    state over there by the contract, on one host. First, the move fails (the other hosts' agents
    cannot restore it: a failpoint corrupts the images): the handover rolls back at MIGRATE and the
    first stage serves on where it was, its counter going on. The client calls the chain's address
    throughout, and every counter is given once."""
    f, mesh = fleet3, fleet3.mesh
    receiver = alerts["receiver"]
    assert mesh.client is not None
    image = await push_stage_image(mesh)
    args = ["/bin/stage", "ingest", str(PORT), str(SEED_BYTES), "none"]
    manifest = {
        "version": 1,
        "name": "moving",
        "port": PORT,
        "stages": [
            stage("ingest", image, args=args, handover={"protocol": "criu", "become": True, "deadline": 120}),
            {
                **stage(
                    "ingest-moved",
                    image,
                    "ingest",
                    args=args,
                    handover={"protocol": "criu", "port": PORT, "drain": 0.5, "deadline": 120},
                ),
                "consumes": {"from": "ingest", "state": []},  # nothing: it is ingest's process
            },
            stage("transform", image, "ingest-moved"),
        ],
    }
    record = await run_chain(f, base_dir, manifest)
    chain, address = record["id"], record["address"]
    [first] = record["runs"]
    others = [h for h in mesh.hosts if h.name != first["host"]]
    for host in others:
        await restart_with_failpoints(host, "target.corrupt_images=corrupt")

    async def ready(name: str) -> bool:
        return bool((await f.host(name))["state"] == "ready")

    for host in others:
        await f.wait_for(f"{host.name} ready", lambda n=host.name: ready(n), within=60)  # type: ignore[misc]
    # A migration freezes the process for a moment: the client waits it out rather than give up on
    # a request the moved process then answers.
    client = Client(mesh.client.netns, address, timeout=30.0)
    client.start()
    try:
        await client.served_by("ingest")
        before = await stage_state(f, address)
        rolled = await ferryctl_json(f, "chain", "advance", chain, "--wait", "300", code=Exit.NOT_DEPLOYED)
        assert rolled["state"] == "RUNNING" and rolled["serving"] == "ingest", rolled
        [failed] = rolled["handovers"]
        assert (failed["target"], failed["outcome"], failed["failed_phase"]) == (
            "ingest-moved",
            "rolled_back",
            "MIGRATE",
        )
        assert failed["migration"], failed
        [run] = [r for r in rolled["runs"] if r["state"] == "serving"]
        assert (run["container"], run["host"]) == (first["container"], first["host"]), rolled["runs"]
        count = client.served()[-1][1]
        await asyncio.sleep(0.5)
        assert client.served()[-1] > ("ingest", count)
        after = await stage_state(f, address)
        assert (after["trail"], after["buffer"]) == (before["trail"], before["buffer"])
        assert after["counter"] > before["counter"]

        for host in others:
            await restart_with_failpoints(host, None)
        for host in others:
            await f.wait_for(f"{host.name} ready", lambda n=host.name: ready(n), within=60)  # type: ignore[misc]

        # `become`: the same process, moved; the chain's next stage is it.
        moved = await ferryctl_json(f, "chain", "advance", chain, "--wait", "300")
        moved = await until_serving(f, chain, "ingest-moved", within=300)
        handover = moved["handovers"][-1]
        assert (handover["target"], handover["outcome"]) == ("ingest-moved", "done"), handover
        assert handover["moved_from"] == first["host"], handover
        [run] = [r for r in moved["runs"] if r["state"] == "serving"]
        assert run["stage"] == "ingest-moved" and run["container"] == first["container"], moved["runs"]
        assert run["host"] != first["host"], run
        count = client.served()[-1][1]
        await asyncio.sleep(0.5)
        assert client.served()[-1] > ("ingest", count)  # the process answers on, with its counter
        state = await stage_state(f, address)
        assert (state["trail"], state["buffer"]) == (before["trail"], before["buffer"])

        # criu with the contract: the process moves next to the next stage, then hands over on one host.
        await ferryctl_json(f, "chain", "advance", chain, "--wait", "300")
        done = await until_serving(f, chain, "transform", within=300)
        handover = done["handovers"][-1]
        assert (handover["target"], handover["outcome"]) == ("transform", "done"), handover
        assert handover["moved_from"] == run["host"], handover
        assert "MIGRATE" in handover["phases_ms"] and "EXPORT" in handover["phases_ms"], handover
        runs = {r["stage"]: r for r in done["runs"] if r["state"] in ("serving", "removed")}
        assert runs["transform"]["state"] == "serving" and runs["transform"]["host"] != run["host"], runs
        await client.served_by("transform")
        state = await stage_state(f, address)
        assert state["trail"] == "ingest,transform"
        assert state["buffer"] == bytes((i % 251 + 1) % 256 for i in range(SEED_BYTES))
        containers = await chain_containers(f)
        assert sorted(c for listed in containers.values() for c in listed) == [runs["transform"]["container"]]
    finally:
        await client.stop()
    assert_exactly_once(client)
    assert {name for name, _ in client.served()} == {"ingest", "transform"}
    bodies = await receiver.wait_for(1)
    assert [(b["alerts"][0]["labels"]["chain"], b["alerts"][0]["labels"]["phase"]) for b in bodies] == [
        (chain, "MIGRATE")
    ]
