"""Chain handovers of a stage holding 64 MiB of state: the gap a client sees, none lost or twice.

A 3-host coordinated fleet and a client namespace. Every stage is tests/workloads/stage.c, the
first seeded with `--state-mib` of buffer, each later one loading the state of the one before
(its buffer + 1) as the chain hands over to it (`POST /v1/chains/{id}/advance`, one after the
other; a chain has at most 32 stages, so `--handovers` runs over as many chains as it takes).
A client in its own namespace sends `POST /work` every 1 ms over one HTTP/1.1 keep-alive
connection the whole time, opening a new one only when the one it has breaks (the address moved
under it). For each handover: the client-visible gap, from the last answer of the stage handing
over to the first answer of the next; and the counters the client was given must be 1, 2, 3, ...
(none lost, none twice).

- **shared_volume, live** (the result line): the next stage on the same host, the state's 64 MiB
  handed over through the chain's volume (the export names a file; the next stage maps it and,
  as its step of the workflow, writes the buffer + 1 into a file of its own), the handover
  `live`: the stage handing over serves on through EXPORT, TRANSFER and IMPORT (a snapshot with
  its version is carried), and at SWITCH exports only the delta since (its counter), which the
  next stage applies before the address moves. The client waits through SWITCH only.
- **shared_volume** (baseline, same run): the same, not live: the stage handing over refuses
  changes from EXPORT on, so the client waits through EXPORT, TRANSFER, IMPORT (the 64 MiB
  rewrite) and SWITCH.
- **http_state, live** (baseline, same run): the next stage on another host, the 64 MiB
  snapshot relayed through both agents and the coordinator, the address moved between hosts.

Run as root from the repo: .venv/bin/python bench/handover.py [--handovers 50] [--baseline-handovers 10]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness.containerd import scratch_dir
from tests.harness.fleet import CoordinatedFleet, coordinated_fleet
from tests.harness.mesh import Mesh
from tests.harness.netns import acall_in_netns
from tests.test_chains import PORT, push_stage_image

TARGET_MS = 50.0
MAX_HANDOVERS_PER_CHAIN = 31
VOLUME = "/handover"


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[-1] if len(values) >= 2 else values[0]


class OneConnectionClient:
    """POST /work every 1 ms over one keep-alive connection, a new one only when it breaks."""

    def __init__(self, netns: str, address: str) -> None:
        self.netns, self.address = netns, address
        self.answers: list[tuple[float, int, str]] = []
        self.connections = 0
        self._stop = threading.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(acall_in_netns(self.netns, self._loop))

    async def stop(self) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task

    def _loop(self) -> None:
        conn: http.client.HTTPConnection | None = None
        while not self._stop.is_set():
            if conn is None:
                conn = http.client.HTTPConnection(self.address, PORT, timeout=5.0)
                self.connections += 1
            try:
                conn.request("POST", "/work", body=b"", headers={"Connection": "keep-alive"})
                resp = conn.getresponse()
                body = resp.read().decode(errors="replace")
                self.answers.append((time.monotonic(), resp.status, body))
                if resp.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                self.answers.append((time.monotonic(), 0, type(exc).__name__))
                conn.close()
                conn = None
            time.sleep(0.001)
        if conn is not None:
            conn.close()

    def served(self) -> list[tuple[float, str, int]]:
        out = []
        for at, status, body in self.answers:
            if status == 200:
                name, count = body.split()
                out.append((at, name, int(count)))
        return out


def stage_doc(image: str, index: int, protocol: str, state_bytes: int, live: bool) -> dict[str, Any]:
    name = f"s{index}"
    seed = state_bytes if index == 0 else 0
    args = ["/bin/stage", name, str(PORT), str(seed), "none"]
    handover: dict[str, Any] = {"protocol": protocol, "port": PORT, "drain": 0.2, "deadline": 120, "live": live}
    if protocol == "shared_volume":
        args.append(VOLUME)
        handover["path"] = VOLUME
    doc: dict[str, Any] = {
        "name": name,
        "image": image,
        "args": args,
        "health": {
            "kind": "http",
            "port": PORT,
            "path": "/healthz",
            "interval": 0.2,
            "timeout": 0.2,
            "retries": 3,
            "start_period": 30,
        },
        "handover": handover,
        "resources": {"cpu_millis": 100, "memory_bytes": 3 * state_bytes},
    }
    if index:
        doc["consumes"] = {"from": f"s{index - 1}", "state": ["counter", "buffer", "trail"]}
    return doc


async def serving(f: CoordinatedFleet, chain_id: str, stage: str, within: float = 300.0) -> dict[str, Any]:
    """The chain's record once it is RUNNING with `stage` serving (the API's waits are bounded)."""
    deadline = time.monotonic() + within
    while True:
        record = dict(await f.call("GET", f"/v1/chains/{chain_id}"))
        if record["state"] == "RUNNING" and record["serving"] == stage:
            return record
        if record["state"] in ("FAILED", "ABORTED", "COMPLETED") or time.monotonic() > deadline:
            raise AssertionError(f"chain {chain_id} never served {stage}: {record['state']} {record.get('error')}")
        await asyncio.sleep(0.1)


async def ended(f: CoordinatedFleet, chain_id: str) -> dict[str, Any] | None:
    record = dict(await f.call("GET", f"/v1/chains/{chain_id}"))
    return record if record["state"] == "ABORTED" else None


async def one_chain(
    f: CoordinatedFleet, image: str, protocol: str, handovers: int, state_bytes: int, n: int, live: bool
) -> tuple[list[float], list[dict[str, Any]], OneConnectionClient]:
    """Run one chain through `handovers` handovers; the gaps (ms), the handover records, the client."""
    assert f.mesh.client is not None
    manifest = {
        "version": 1,
        "name": f"bench-{protocol.replace('_', '-')}{'-live' if live else ''}-{n}",
        "port": PORT,
        "stages": [stage_doc(image, i, protocol, state_bytes, live) for i in range(handovers + 1)],
    }
    record = await f.call("POST", "/v1/chains?wait=20", manifest, expect=None)
    record = await serving(f, record["id"], "s0")
    client = OneConnectionClient(f.mesh.client.netns, record["address"])
    client.start()
    try:
        await asyncio.sleep(0.5)
        for i in range(handovers):
            await f.call("POST", f"/v1/chains/{record['id']}/advance?wait=20", expect=None)
            done = await serving(f, record["id"], f"s{i + 1}")
            last = done["handovers"][-1]
            assert last["outcome"] == "done", last
            await asyncio.sleep(0.3)
    finally:
        await client.stop()
        await f.call("POST", f"/v1/chains/{record['id']}/abort?wait=20", expect=None)
        final = await f.wait_for("the chain aborted", lambda: ended(f, record["id"]), within=120)
    served = client.served()
    counters = [c for _, _, c in served]
    if counters != list(range(1, len(counters) + 1)):
        at = next(i for i, c in enumerate(counters) if c != i + 1)
        when = served[at][0]
        around = [a for a in client.answers if abs(a[0] - when) < 0.05]
        raise AssertionError(f"counter {at + 1} lost or given twice: {served[max(0, at - 2) : at + 2]}; {around}")
    gaps = []
    for i in range(handovers):
        last_old = max(at for at, name, _ in served if name == f"s{i}")
        first_new = min(at for at, name, _ in served if name == f"s{i + 1}")
        gaps.append((first_new - last_old) * 1000)
    return gaps, list(final["handovers"]), client


async def run(
    f: CoordinatedFleet, image: str, protocol: str, handovers: int, state_bytes: int, live: bool, per_chain: int
) -> dict[str, Any]:
    gaps: list[float] = []
    records: list[dict[str, Any]] = []
    requests = connections = 0
    n = 0
    while len(gaps) < handovers:
        count = min(per_chain, MAX_HANDOVERS_PER_CHAIN, handovers - len(gaps))
        chain_gaps, chain_records, client = await one_chain(f, image, protocol, count, state_bytes, n, live)
        gaps += chain_gaps
        records += chain_records
        requests += len(client.answers)
        connections += client.connections
        n += 1
    phases = {p: statistics.median(r["phases_ms"][p] for r in records) for p in records[0]["phases_ms"]}
    state = statistics.median(r["state_bytes"] for r in records)
    frozen = (
        f"; frozen (delta + switch) p50 {statistics.median(r['frozen_ms'] for r in records):.1f} ms" if live else ""
    )
    steps = [r["switch_steps_ms"] for r in records if r.get("switch_steps_ms")]
    if steps:  # the agent's takeover, step by step (a live handover on one host)
        frozen += "; takeover steps p50/p99 (ms): " + ", ".join(
            f"{name} {statistics.median(s[name] for s in steps):.1f}/{p99([s[name] for s in steps]):.1f}"
            for name in steps[0]
        )
    print(
        f"{protocol}{' live' if live else ''}: {handovers} handovers, gap p50 {statistics.median(gaps):.1f} ms, "
        f"p99 {p99(gaps):.1f} ms, max {max(gaps):.1f} ms; exported state {state:.0f} bytes; {requests} requests "
        f"over {connections} connections, none lost or twice; phases p50 (ms): "
        + ", ".join(f"{p} {v:.0f}" for p, v in phases.items())
        + frozen,
        flush=True,
    )
    return {"gaps": gaps}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--handovers", type=int, default=50)
    parser.add_argument("--baseline-handovers", type=int, default=10)
    parser.add_argument("--state-mib", type=int, default=64)
    parser.add_argument("--per-chain", type=int, default=MAX_HANDOVERS_PER_CHAIN, help="handovers per chain")
    args = parser.parse_args()
    state_bytes = args.state_mib << 20

    def tables(mesh: Mesh) -> dict[str, dict[str, Any]]:
        pool = f"{mesh.subnet.network_address + 192}/28"
        return {"deployments": {"address_pool": pool, "health_timeout": 60.0}}

    async with (
        scratch_dir() as base,
        coordinated_fleet(base, 3, coordinator_for=tables, with_client=True) as f,
    ):
        image = await push_stage_image(f.mesh)
        n, per = args.baseline_handovers, args.per_chain
        result = await run(f, image, "shared_volume", args.handovers, state_bytes, live=True, per_chain=per)
        frozen = await run(f, image, "shared_volume", n, state_bytes, live=False, per_chain=per)
        across = await run(f, image, "http_state", n, state_bytes, live=True, per_chain=per)
    print(f"shared_volume, not live (baseline): gap p99 {p99(frozen['gaps']):.1f} ms")
    print(f"http_state, live, across hosts (baseline): gap p99 {p99(across['gaps']):.1f} ms")
    print(f"bench handover: {p99(result['gaps']):.1f} ms (target <= {TARGET_MS:g})")


if __name__ == "__main__":
    asyncio.run(main())
