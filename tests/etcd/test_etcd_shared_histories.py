"""Agents pushing to followers: their samples reach the leader's drain-risk scoring.

Three coordinator daemons on three etcd members, the shipped model. Two hosts push the same
samples, one to the leader and one split over both followers: the leader scores them alike, and
drains the one that only followers heard from. A notice with a deadline pushed to a follower is a
fact on the leader, and a calm host pushing to a follower is scored there too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require
from tests.harness.coordinator import (
    CoordinatorPki,
    CoordinatorProcess,
    etcd_replicas,
    registration,
    sample,
    scoring_overrides,
    single_leader,
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> CoordinatorPki:
    return CoordinatorPki(tmp_path_factory.mktemp("shared-pki"))


@pytest.fixture
async def replicas(workdir: Path, pki: CoordinatorPki) -> AsyncIterator[list[CoordinatorProcess]]:
    require("etcd")
    # The test pushes to the leader too: both parts must add up on it.
    overrides = scoring_overrides("always")
    async with etcd_replicas(workdir, pki, overrides=overrides) as procs:
        yield procs


async def _push(proc: CoordinatorProcess, pki: CoordinatorPki, name: str, samples: list[dict[str, Any]]) -> None:
    async with proc.client(pki.agent(name)) as agent:
        status, body = await agent.post("/v1/telemetry", {"host": name, "samples": samples})
        assert status == 200 and body["accepted"] == len(samples), body


async def _register(proc: CoordinatorProcess, pki: CoordinatorPki, name: str) -> None:
    async with proc.client(pki.agent(name)) as agent:
        status, body = await agent.post("/v1/register", registration(name))
        assert status == 200, body


async def test_pushes_to_followers_are_scored_by_the_leader(
    replicas: list[CoordinatorProcess], pki: CoordinatorPki
) -> None:
    leader = await single_leader(replicas, pki)
    followers = [p for p in replicas if p is not leader]
    for name in ("twin-leader", "twin-followers", "calm", "noticed"):
        await _register(followers[0], pki, name)
    now = time.time()
    warning = [{"kind": "DRAIN_NOTICE", "ts": now - 1, "detail": "terminate at +120s"}]
    series = [sample(now - 40 + i) for i in range(39)] + [sample(now - 1, events=warning)]
    await _push(leader, pki, "twin-leader", series)
    # The same samples, in two batches, each to another follower: both replicas' parts must add up.
    await _push(followers[0], pki, "twin-followers", series[:20])
    await _push(followers[1], pki, "twin-followers", series[20:])
    await _push(followers[1], pki, "calm", [sample(now - 40 + i) for i in range(40)])
    deadline_event = [{"kind": "DRAIN_NOTICE", "ts": now - 1, "deadline": now + 300, "detail": "spot reclaim"}]
    await _push(followers[0], pki, "noticed", [sample(now - 2), sample(now - 1, events=deadline_event)])
    pushed = time.monotonic()

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    async with leader.client(pki.operator()) as ops:
        while True:
            _, body = await ops.get("/v1/predictions")
            p = {x["host"]: x for x in body["predictions"] if x["ts"] >= now}
            # The leader's latest scores (what is stored moves only past the deadband).
            twins = [(await ops.get(f"/v1/predictions/{name}"))[1] for name in ("twin-leader", "twin-followers")]
            scored = "calm" in p and "noticed" in p and "twin-followers" in p
            scored = scored and (twins[0].get("ts") or 0) >= now and twins[0]["ts"] == twins[1].get("ts")
            if scored and abs(twins[0]["probability"] - twins[1]["probability"]) < 1e-5:
                break
            assert loop.time() < deadline, body
            await asyncio.sleep(0.2)
        print(f"followers' samples scored by the leader {time.monotonic() - pushed:.2f} s after the pushes")
        threshold = body["threshold"]
        assert twins[1]["probability"] >= threshold > p["calm"]["probability"], (twins, body)
        assert p["twin-followers"]["probability"] >= threshold, body  # stored as it crossed the threshold
        assert p["noticed"]["probability"] == 1.0, body
        _, why = await ops.get("/v1/predictions/noticed")
        assert why["source"] == "notice" and why["notice"]["detail"] == "spot reclaim", why
        # Only followers heard from the host: the leader's policy drains it on the model's word.
        for _ in range(100):
            _, host = await ops.get("/v1/hosts/twin-followers")
            if host["state"] in ("draining", "drained"):
                break
            await asyncio.sleep(0.1)
        assert host["state"] in ("draining", "drained"), host
        drain = next(d for d in host["decisions"] if d["kind"] == "drain")
        assert drain["detail"].startswith("predicted: model "), drain
