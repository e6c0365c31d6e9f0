"""Composition assembly: what a shared prefix saves, and what the fetch order changes.

Layers: a base chain of 4 x 8 MiB (80 % of a composition) and two tops of 8 MiB each; compositions
A and B are the base chain with one top each, their layers taken from two images. The registry is
behind a proxy at 100 Mbit/s (12.5 MB/s). Each round, on fresh containerds:

- cold: B assembled on an empty host;
- shared: A assembled first, then B (timed): B fetches and applies only its top;
- order: B with one fetch at a time, in the agent's order, then (emptied again) with the preference
  list forcing the reverse; the time to the first committed snapshot of each.

Result lines: `bench composition: <shared / cold> ratio (target <= 0.35)` (the ideal is 0.2: only
the top's bytes), and `bench composition-order: <first snapshot, agent's order / reverse> ratio
(target <= 0.5)`, medians over the rounds.

Run as root from the repo: .venv/bin/python bench/composition.py [--rounds 3] [--layer-mib 8]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import secrets
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.app import Agent
from agent.config import RegistryConfig
from tests.harness.agent import agent_config, running_agent
from tests.harness.containerd import PrivateContainerd, scratch_dir
from tests.harness.images import ImageBuilder, Layer, random_layer
from tests.harness.proxy import FaultyProxy
from tests.harness.registry import DockerRegistry

LINK = 12.5e6
"""Bytes per second of the registry link: 100 Mbit/s."""


@contextlib.asynccontextmanager
async def fresh_agent(base: Path, proxy: FaultyProxy) -> AsyncIterator[Agent]:
    work = base / f"host-{secrets.token_hex(3)}"
    ctrd = PrivateContainerd(work / "ctrd")
    await ctrd.start()
    try:
        config = agent_config(ctrd, [RegistryConfig(host=proxy.host, plain_http=True)], work)
        async with running_agent(config) as agent:
            yield agent
    finally:
        await ctrd.stop()


def manifest(name: str, ref: str, base: list[Layer], top_ref: str, top: Layer, **kw: Any) -> dict[str, Any]:
    nodes = [{"id": f"b{i}", "ref": ref, "digest": la.digest, "size": la.size} for i, la in enumerate(base)]
    nodes.append({"id": "top", "ref": top_ref, "digest": top.digest, "size": top.size})
    ids = [n["id"] for n in nodes]
    edges = [{"node": upper, "depends_on": lower} for lower, upper in itertools.pairwise(ids)]
    return {"version": 1, "name": name, "nodes": nodes, "edges": edges, **kw}


async def timed(agent: Agent, doc: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    result = await agent.assembly.assemble(doc)
    return time.perf_counter() - started, result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layer-mib", type=int, default=8)
    args = parser.parse_args()
    size = args.layer_mib << 20

    async with scratch_dir() as base:
        registry = DockerRegistry(base / "registry")
        await registry.start()
        proxy = FaultyProxy(registry.url, rate=LINK)
        await proxy.start()
        try:
            chain = [random_layer(size, seed=100 + i, file_size=4 << 20, directory=f"base/{i}") for i in range(4)]
            top_a = random_layer(size, seed=200, file_size=4 << 20, directory="app")
            top_b = random_layer(size, seed=201, file_size=4 << 20, directory="app")
            await ImageBuilder([*chain, top_a]).build().push(registry.host, "bench/comp-a", "v1")
            await ImageBuilder([*chain, top_b]).build().push(registry.host, "bench/comp-b", "v1")
            ref_a, ref_b = f"{proxy.host}/bench/comp-a:v1", f"{proxy.host}/bench/comp-b:v1"
            doc_a = manifest("bench-a", ref_a, chain, ref_a, top_a)
            doc_b = manifest("bench-b", ref_a, chain, ref_b, top_b)
            total = sum(la.size for la in chain) + top_b.size
            print(f"composition B: 5 layers, {total / 1e6:.1f} MB, registry link {LINK * 8 / 1e6:.0f} Mbit/s")

            shares, orders = [], []
            for n in range(args.rounds):
                async with fresh_agent(base, proxy) as agent:
                    cold, _ = await timed(agent, doc_b)
                async with fresh_agent(base, proxy) as agent:
                    await timed(agent, doc_a)
                    shared, result = await timed(agent, doc_b)
                    assert result["reused_snapshots"] == 4 and result["bytes_fetched"] == top_b.size, result
                ordered = {**doc_b, "prefetch_granularity": 1}
                async with fresh_agent(base, proxy) as agent:
                    _, chosen = await timed(agent, ordered)
                async with fresh_agent(base, proxy) as agent:
                    _, forced = await timed(agent, {**ordered, "preference": ["top", "b3", "b2", "b1", "b0"]})
                shares.append(shared / cold)
                orders.append(chosen["first_snapshot_seconds"] / forced["first_snapshot_seconds"])
                print(
                    f"round {n + 1}: cold {cold:.2f} s, after A {shared:.2f} s (ratio {shares[-1]:.3f}); first"
                    f" snapshot {chosen['first_snapshot_seconds']:.2f} s in the agent's order,"
                    f" {forced['first_snapshot_seconds']:.2f} s reversed (ratio {orders[-1]:.3f}); runnable"
                    f" {chosen['runnable_seconds']:.2f} s, {forced['runnable_seconds']:.2f} s"
                )
            print(f"bench composition: {statistics.median(shares):.3f} ratio (target <= 0.35)")
            print(f"bench composition-order: {statistics.median(orders):.3f} ratio (target <= 0.5)")
        finally:
            await proxy.stop()
            await registry.stop()


if __name__ == "__main__":
    asyncio.run(main())
