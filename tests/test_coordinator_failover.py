"""Coordinator replicas on a real etcd, driving a real mesh: the leader is killed in the middle of a
drain and the next leader finishes it from the store, migrating each container exactly once.

The etcd member and the three replicas run in the mesh's fabric namespace, where the agents reach
them; the replicas share one etcd prefix. The agents list every replica and push to one of them.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from tests.conftest import require
from tests.harness.coordinator import CoordinatorProcess, new_token
from tests.harness.etcd import EtcdCluster
from tests.harness.fleet import (
    COORDINATOR_PORT,
    OPS_PORT,
    CoordinatedFleet,
    MeshCoordinatorPki,
    api,
    coordinator_agent_config,
    fleet,
    memhog_status,
    run_memhog,
    task_states,
    verify_memory,
)
from tests.harness.mesh import Mesh, MeshHost

LEADER_TTL = 2
MODEL = Path(__file__).resolve().parent.parent / "models" / "drain" / "drain.onnx"
REPLICAS = 3


class ReplicatedFleet(CoordinatedFleet):
    """A coordinated fleet with several coordinator replicas; `coordinator` is the one that leads."""

    replicas: list[CoordinatorProcess]

    async def health(self, replica: CoordinatorProcess) -> dict[str, Any] | None:
        saved, self.coordinator = self.coordinator, replica
        try:
            return dict(await self.call("GET", "/healthz"))
        except (OSError, AssertionError):
            return None
        finally:
            self.coordinator = saved

    async def leader(self, among: list[CoordinatorProcess] | None = None) -> CoordinatorProcess | None:
        """The one replica that acts as the leader (and all others agree), else None."""
        among = among or [r for r in self.replicas if r.proc is not None]
        health = [await self.health(r) for r in among]
        acting = [r for r, h in zip(among, health, strict=True) if h and h["acting"]]
        if len(acting) != 1 or any(h is None or h["leader"] != acting[0].url for h in health):
            return None
        return acting[0]


def _agent_config(mesh: Mesh, host: MeshHost, urls: list[str]) -> str:
    text = coordinator_agent_config(mesh, host, telemetry_period=0.5)
    single = f'url = "https://{mesh.gateway}:{COORDINATOR_PORT}"'
    assert single in text
    return text.replace(single, "urls = [" + ", ".join(f'"{u}"' for u in urls) + "]")


@asynccontextmanager
async def replicated_fleet(base: Path, overrides: dict[str, Any]) -> AsyncIterator[ReplicatedFleet]:
    """Three hosts, one etcd member and REPLICAS coordinators in the fabric; every agent lists them all."""
    require("etcd")
    token = new_token()
    held: dict[str, Any] = {}

    async def start_replicas(mesh: Mesh) -> None:
        pki = MeshCoordinatorPki(mesh)
        etcd = EtcdCluster(mesh.dir / "etcd", size=1, netns=mesh.fabric.netns, host=mesh.gateway)
        await etcd.start()
        held["etcd"] = etcd
        store = {
            "backend": "etcd",
            "etcd_endpoints": etcd.endpoints,
            "etcd_prefix": f"/{secrets.token_hex(4)}/",
            "leader_ttl": LEADER_TTL,
        }
        replicas = []
        for i in range(REPLICAS):
            workdir = mesh.dir / f"coordinator-{i}"
            workdir.mkdir()
            replicas.append(
                CoordinatorProcess(
                    workdir,
                    pki,
                    host=mesh.gateway,
                    port=COORDINATOR_PORT + i,
                    netns=mesh.fabric.netns,
                    tokens=(token,),
                    overrides={**overrides, "store": store},
                )
            )
        held["replicas"] = replicas
        # The first replica alone first: it leads, and the test knows which one to kill.
        await replicas[0].start()
        f = ReplicatedFleet(mesh, replicas[0], pki, token)
        f.replicas = replicas
        held["fleet"] = f
        await asyncio.gather(*(r.start() for r in replicas[1:]))

    def agent_config(host: MeshHost) -> str:
        urls = [f"https://{host.mesh.gateway}:{COORDINATOR_PORT + i}" for i in range(REPLICAS)]
        return _agent_config(host.mesh, host, urls)

    try:
        async with fleet(base, 3, extra_config=agent_config, ops_port=OPS_PORT, before_agents=start_replicas) as mesh:
            f = held["fleet"]
            assert isinstance(f, ReplicatedFleet)
            f.coordinator = await f.wait_for("one leader", f.leader, within=20)

            async def all_registered() -> bool:
                hosts = (await f.call("GET", "/v1/hosts"))["hosts"]
                return len(hosts) == len(mesh.hosts) and all(h["state"] == "ready" and h["api_url"] for h in hosts)

            await f.wait_for("every agent registered", all_registered, within=30)
            yield f
    finally:
        for replica in held.get("replicas", []):
            await replica.stop()
        if "etcd" in held:
            await held["etcd"].stop()


async def _source_records(host: MeshHost) -> list[dict[str, Any]]:
    return [m for m in (await api(host, "GET", "/v1/migrations"))["migrations"] if m["role"] == "source"]


async def test_the_leader_killed_in_the_middle_of_a_drain(base_dir: Path) -> None:
    overrides: dict[str, Any] = {
        "heartbeat": {"suspect_after": 3.0, "down_after": 6.0, "check_period": 0.5},
        # One migration out of a host at a time: the kill lands with one running and others pending.
        "migrations": {"poll_period": 0.3, "timeout": 120.0, "max_per_host": 1},
        "reservations": {"sweep_period": 1.0},
        "agents": {"request_timeout": 10.0},
        "model": {"path": str(MODEL), "tick_period": 1.0},
    }
    async with replicated_fleet(base_dir, overrides) as f:
        h1 = f.mesh["h1"]
        names = ("one", "two", "three")
        for name in names:
            await run_memhog(h1, f.mesh, name, resident_mib=12)
        before = {n: await memhog_status(h1, n) for n in names}

        async def reported() -> bool:
            return {c["id"] for c in (await f.host("h1"))["containers"]} == set(names)

        await f.wait_for("h1 reports its containers", reported)
        doomed = f.coordinator
        await f.call("POST", "/v1/hosts/h1/drain", expect=202)

        async def one_running() -> bool:
            return any(m["state"] == "running" for m in (await f.call("GET", "/v1/migrations"))["migrations"])

        await f.wait_for("a drain migration running", one_running, period=0.1)
        at_kill = (await f.call("GET", "/v1/migrations"))["migrations"]
        assert doomed.proc is not None
        doomed.proc.kill()  # SIGKILL: no resignation, its lease has to expire
        await doomed.proc.wait()
        doomed.proc = None
        killed = asyncio.get_running_loop().time()

        f.coordinator = await f.wait_for("a new leader", f.leader, within=LEADER_TTL + 10, period=0.2)
        assert f.coordinator is not doomed
        took = asyncio.get_running_loop().time() - killed
        print(f"leader killed with {[m['state'] for m in at_kill]} migrations; a new leader in {took:.2f} s")

        async def drained() -> bool:
            return bool((await f.host("h1"))["state"] == "drained")

        await f.wait_for("h1 drained under the new leader", drained, within=120)
        assert "resumed migrations" in f.coordinator.log_path.read_text()
        migrations = (await f.call("GET", "/v1/migrations"))["migrations"]
        committed = [m for m in migrations if m["state"] == "committed"]
        assert sorted(m["container"] for m in committed) == sorted(names), migrations
        assert all(m["attempt"] == 1 for m in committed), migrations
        # The agents' own records: each container left h1 exactly once, and committed.
        records = await _source_records(h1)
        assert Counter(r["container"] for r in records) == Counter(names), records
        assert {r["state"] for r in records} == {"COMMIT"}, records
        for other in (f.mesh["h2"], f.mesh["h3"]):
            assert await _source_records(other) == []
        assert task_states(h1) == {}
        for name in names:
            where = [h for h in f.mesh.hosts if task_states(h).get(name) == "RUNNING"]
            assert len(where) == 1, (name, where)
            assert (await memhog_status(where[0], name)).beats > before[name].beats
            assert await verify_memory(where[0], name) == "ok"
        # No reservation left, in the store or on any agent.
        assert (await f.call("GET", "/v1/reservations"))["reservations"] == []
        for host in f.mesh.hosts:
            assert (await api(host, "GET", "/v1/reservations"))["reservations"] == [], host.name

        # Whichever replica the agents push to (the dead leader's agents moved to the next one), the
        # new leader scores every host: the followers share their part of the histories.
        async def scored() -> bool:
            data = await f.call("GET", "/v1/predictions")
            return {p["host"] for p in data["predictions"]} == {"h1", "h2", "h3"}

        await f.wait_for("the new leader scores every host", scored)
