"""Three coordinator daemons on one real etcd: they share the fleet and never double-book it."""

from __future__ import annotations

import asyncio
import os
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import require
from tests.harness.coordinator import (
    CoordinatorPki,
    CoordinatorProcess,
    etcd_replicas,
    free_port,
    registration,
    sample,
)
from tests.harness.etcd import EtcdCluster
from tests.harness.fleet import FERRYCTL


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> CoordinatorPki:
    return CoordinatorPki(tmp_path_factory.mktemp("coordinator-pki"))


@pytest.fixture
async def replicas(workdir: Path, pki: CoordinatorPki) -> AsyncIterator[list[CoordinatorProcess]]:
    require("etcd")
    async with etcd_replicas(workdir, pki, members=1, one_at_a_time=False) as procs:
        yield procs


async def test_three_replicas_placing_at_once_never_overbook(
    replicas: list[CoordinatorProcess], pki: CoordinatorPki
) -> None:
    # Each host registers with a different replica; every replica sees all three.
    for i, name in enumerate(("h1", "h2", "h3")):
        async with replicas[i].client(pki.agent(name)) as agent:
            status, body = await agent.post("/v1/register", registration(name, cpu_millis=64000, memory_bytes=4 << 30))
            assert status == 200, body
    request = {"capacity": {"cpu_millis": 100, "memory_bytes": 1 << 30}, "host": "auto", "purpose": "race"}
    async with (
        replicas[0].client(pki.operator("alice")) as a,
        replicas[1].client(pki.operator("alice")) as b,
        replicas[2].client(pki.operator("alice")) as c,
    ):
        ops = [a, b, c]
        results = await asyncio.gather(*(ops[i % 3].post("/v1/reservations", request) for i in range(200)))
        statuses: dict[int, int] = defaultdict(int)
        for status, _ in results:
            statuses[status] += 1
        assert dict(statuses) == {201: 12, 409: 188}
        by_replica = [sum(1 for i, (s, _) in enumerate(results) if s == 201 and i % 3 == r) for r in range(3)]
        for client in ops:
            _, listed = await client.get("/v1/reservations")
            per_host: dict[str, int] = defaultdict(int)
            for reservation in listed["reservations"]:
                per_host[reservation["host"]] += reservation["capacity"]["memory_bytes"]
            assert per_host == {"h1": 4 << 30, "h2": 4 << 30, "h3": 4 << 30}
    print(f"reservations held per replica: {by_replica}")


def _ctl_auth(pki: CoordinatorPki) -> list[str]:
    ops = pki.operator("alice")
    return ["--ca", str(pki.server.ca_file), "--cert", str(ops.cert_file), "--key", str(ops.key_file)]


async def _ferryctl(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    """ferryctl as a process (the exit code and stderr), as an operator would run it."""
    proc = await asyncio.create_subprocess_exec(
        str(FERRYCTL), *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def _health(proc: CoordinatorProcess, pki: CoordinatorPki) -> dict[str, object]:
    async with proc.client(pki.operator("alice")) as ops:
        status, body = await ops.get("/healthz")
    assert status == 200, body
    return body


async def test_one_replica_leads_and_a_killed_leader_is_replaced(workdir: Path, pki: CoordinatorPki) -> None:
    require("etcd")
    ttl = 2
    async with EtcdCluster(workdir / "etcd", size=3) as cluster:
        store = {"backend": "etcd", "etcd_endpoints": cluster.endpoints, "leader_ttl": ttl}
        procs = []
        for i in range(3):
            (workdir / f"c{i}").mkdir()
            procs.append(CoordinatorProcess(workdir / f"c{i}", pki, overrides={"store": store}))
        try:
            await asyncio.gather(*(p.start() for p in procs))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while True:
                health = [await _health(p, pki) for p in procs]
                leaders = [p for p, h in zip(procs, health, strict=True) if h["acting"]]
                if len(leaders) == 1 and all(h["leader"] == leaders[0].url for h in health):
                    break
                assert loop.time() < deadline, health
                await asyncio.sleep(0.1)
            leader = leaders[0]
            assert [h["role"] for h in health].count("leader") == 1
            # Followers serve reads and refuse what starts the leader's work, naming the leader.
            follower = next(p for p in procs if p is not leader)
            async with follower.client(pki.operator("alice")) as ops:
                status, body = await ops.post("/v1/hosts/h9/drain")
                assert status == 503 and body["error"]["code"] == "not_leader", body
                assert leader.url in body["error"]["message"] and body["error"]["leader"] == leader.url
                status, _ = await ops.get("/v1/hosts")
                assert status == 200
                # A deployment is driven by the leader (and taken over by the next one): not here.
                status, body = await ops.post("/v1/deployments", {"image": "pipeline"})
                assert status == 503 and body["error"]["code"] == "not_leader", body
                assert leader.url in body["error"]["message"]
                status, body = await ops.request("DELETE", "/v1/deployments/pipeline-1a2b3c4d")
                assert status == 503 and body["error"]["code"] == "not_leader", body
                status, _ = await ops.get("/v1/deployments")
                assert status == 200
            async with leader.client(pki.operator("alice")) as ops:
                status, body = await ops.post("/v1/hosts/h9/drain")
                assert status == 404 and body["error"]["code"] == "host_not_found", body
                status, body = await ops.post("/v1/deployments", {"image": "pipeline"})
                assert status == 404 and body["error"]["code"] == "deployment_not_found", body
            # ferryctl given a dead URL and a follower reaches the leader (a follower would refuse the
            # drain with not_leader; only the leader looks the host up).
            dead = f"https://127.0.0.1:{free_port()}"
            as_ops = _ctl_auth(pki)
            code, err = await _ferryctl(["--coordinator", dead, "--coordinator", follower.url, *as_ops, "drain", "h9"])
            assert code == 1 and "host_not_found" in err, err
            assert (await _ferryctl(["--coordinator", follower.url, *as_ops, "hosts"]))[0] == 0  # reads: any replica
            # The leader's process dies without a word; its lease expires and another replica takes over.
            assert leader.proc is not None
            leader.proc.kill()
            await leader.proc.wait()
            killed = loop.time()
            rest = [p for p in procs if p is not leader]
            while True:
                health = [await _health(p, pki) for p in rest]
                if sum(bool(h["acting"]) for h in health) == 1:
                    break
                assert loop.time() - killed < ttl + ttl / 3 + 3, health
                await asyncio.sleep(0.05)
            took = loop.time() - killed
            print(f"leader killed -> another replica leads in {took:.2f} s (lease {ttl} s)")
            new_leader = rest[[bool(h["acting"]) for h in health].index(True)]
            other = rest[1] if new_leader is rest[0] else rest[0]
            while (await _health(other, pki))["leader"] != new_leader.url:  # its next campaign round
                assert loop.time() - killed < ttl + ttl / 3 + 5
                await asyncio.sleep(0.05)
            # Every replica in $FERRYMAN_COORDINATOR, the dead one first: the drain reaches the new leader.
            urls = ",".join(p.url for p in procs)
            code, err = await _ferryctl([*as_ops, "drain", "h9"], env={"FERRYMAN_COORDINATOR": urls})
            assert code == 1 and "host_not_found" in err, err
        finally:
            for p in procs:
                await p.stop()


MODEL = Path(__file__).resolve().parent.parent / "models" / "drain" / "drain.onnx"


async def test_a_model_activated_at_run_time_is_the_next_leaders(workdir: Path, pki: CoordinatorPki) -> None:
    """Two replicas configured without a model: one activated on the leader (POST /v1/model) is what
    the replica that takes over after the leader dies scores with."""
    require("etcd")
    ttl = 2
    async with EtcdCluster(workdir / "etcd", size=1) as cluster:
        store = {"backend": "etcd", "etcd_endpoints": cluster.endpoints, "leader_ttl": ttl}
        procs = []
        for i in range(2):
            (workdir / f"c{i}").mkdir()
            procs.append(CoordinatorProcess(workdir / f"c{i}", pki, overrides={"store": store}))
        first, second = procs
        try:
            await first.start()  # alone: it leads
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while not (await _health(first, pki))["acting"]:
                assert loop.time() < deadline
                await asyncio.sleep(0.1)
            await second.start()
            async with first.client(pki.operator("alice")) as ops:
                assert (await ops.get("/v1/model"))[1]["active"] is None
                status, body = await ops.post("/v1/model", {"path": str(MODEL)})
                assert status == 200 and body["active"] == "drain-2", body
            async with second.client(pki.operator("alice")) as ops:
                assert (await ops.get("/v1/model"))[1]["active"] is None  # a follower scores nothing
            assert first.proc is not None
            first.proc.kill()
            await first.proc.wait()
            first.proc = None
            deadline = loop.time() + ttl + 10
            while not (await _health(second, pki))["acting"]:
                assert loop.time() < deadline
                await asyncio.sleep(0.1)
            async with second.client(pki.operator("alice")) as ops:
                # Acting comes first; the new leader then loads what the store names before its loops run.
                while True:
                    model = (await ops.get("/v1/model"))[1]
                    if model["active"] is not None or loop.time() > deadline:
                        break
                    await asyncio.sleep(0.1)
                assert model["active"] == "drain-2" and model["previous"] is None, model
            assert "drain model loaded from the store" in second.log_path.read_text()
        finally:
            for p in procs:
                await p.stop()


async def test_a_replica_on_uvloop_leads_and_takes_pushes(workdir: Path, pki: CoordinatorPki) -> None:
    # event_loop = "uvloop": the API (mTLS), the etcd client (grpc.aio) and the election all run on it.
    require("etcd")
    async with EtcdCluster(workdir / "etcd", size=1) as cluster:
        store = {"backend": "etcd", "etcd_endpoints": cluster.endpoints, "etcd_prefix": "/uv/"}
        proc = CoordinatorProcess(workdir, pki, overrides={"store": store, "event_loop": "uvloop"})
        await proc.start()
        try:
            async with proc.client(pki.agent("h1")) as agent:
                status, body = await agent.post("/v1/register", registration("h1"))
                assert status == 200, body
                now = time.time()
                status, body = await agent.post("/v1/telemetry", {"host": "h1", "samples": [sample(now)]})
                assert status == 200 and body["accepted"] == 1, body
            async with proc.client(pki.operator("alice")) as ops:
                for _ in range(100):
                    status, health = await ops.get("/healthz")
                    if health.get("acting"):
                        break
                    await asyncio.sleep(0.1)
                assert health["acting"], health
                status, host = await ops.get("/v1/hosts/h1")
                assert status == 200 and host["telemetry_samples"] == 1, host
            assert "uvloop.Loop" in proc.log_path.read_text()
        finally:
            assert await proc.stop() == 0, proc.logs()
