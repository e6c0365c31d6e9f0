"""The leader's tick at fleet scale: every host scored and decided, on etcd, in one process.

One etcd member (tests/harness/etcd.py) and the coordinator's services in this process (no API,
no agents: what the tick does, without the pushes around it). `--hosts` hosts are registered in
etcd, each with two hours of 5 s samples in the leader's drain-risk history (bench/predict.py's
calm fleet). Each run is one `DrainPolicy.tick`, the step `ferryman_coordinator_tick_seconds`
times in the daemon: list the hosts, score every one with the shipped model (features and one
inference call, in a thread), store the predictions that crossed the threshold, apply them,
progress drains; the other predictions that moved past the deadband (`model.prediction_deadband`)
are stored after the tick, timed apart ("writes that followed"). Between runs `--churn` of the hosts
move by 0.1 (the real scores, shifted: a fleet whose risk changes), the rest stay, and `--pushed` of
the hosts push a summary to this replica that is still held back (not flushed) when the tick lists
(the leader's share of 10 000 agents in one flush period: some 667 hosts). Measured per
run: wall time, this process's CPU time, the event loop thread's (the coordinator's own work,
without the model's scoring thread) and etcd's, and the longest the tick held the event loop at
once (a probe sleeping 2 ms at a time: what a push or a lease renewal waits behind the tick).

Baseline in the same run: the model's scoring alone (`DrainPredictor.score` on the same
histories), the floor of a tick.

Result line:
  bench tick: <p99 wall seconds of a tick at --hosts> s (target < 1)

Run as root from the repo:
  .venv/bin/python bench/tick.py [--hosts 10000] [--runs 10] [--churn 0.05] [--pushed 0.067]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import json_format

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ingest_profile import cpu_seconds
from bench.predict import MODEL, NOW, fleet_histories
from coordinator.app import Coordinator
from coordinator.auth import TokenHashes
from coordinator.config import CoordinatorConfig
from coordinator.etcd.kv import EtcdKV
from coordinator.etcd.store import EtcdStore
from coordinator.features import HostHistory
from coordinator.model import Capacity, Host, Prediction
from coordinator.predictor import DrainPredictor
from coordinator.store import TelemetryUpdate
from coordinator.wire import registration_to_host
from proto.ferryman.v1 import fleet_pb2
from tests.harness.containerd import scratch_dir
from tests.harness.coordinator import NoAgents, registration
from tests.harness.etcd import EtcdCluster


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


class CountingStore(EtcdStore):
    """Counts the predictions stored and times the listings of the hosts."""

    written = 0
    listing = 0.0

    async def record_predictions(self, predictions: Sequence[Prediction]) -> None:
        self.written += len(predictions)
        await super().record_predictions(predictions)

    async def list_hosts(self) -> list[Host]:
        t0 = time.perf_counter()
        try:
            return await super().list_hosts()
        finally:
            self.listing += time.perf_counter() - t0


class ChurningModel:
    """The shipped model's scores, with a different `churn` share of the hosts shifted by 0.1 at
    every call (alternately up and down): hosts whose risk moves between ticks."""

    def __init__(self, model: DrainPredictor, churn: float) -> None:
        self._model = model
        self._churn = churn
        self._calls = 0
        self.version, self.threshold, self.horizon = model.version, model.threshold, model.horizon

    def score(self, histories: Mapping[str, HostHistory], now: float) -> dict[str, float]:
        scores = self._model.score(histories, now)
        hosts = sorted(scores)
        moved = int(len(hosts) * self._churn)
        shift = 0.1 if self._calls % 2 else 0.0
        self._calls += 1
        start = (self._calls * moved) % max(len(hosts), 1)
        for host in (hosts + hosts)[start : start + moved]:
            scores[host] = min(1.0, scores[host] + shift)
        return scores

    def explain(self, histories: Mapping[str, HostHistory], now: float) -> dict[str, list[Any]]:
        return self._model.explain(histories, now)  # type: ignore[return-value]


class LoopProbe:
    """The longest the event loop was held at once while the probe ran: what a push or a lease
    renewal on the same loop would wait behind the tick."""

    PERIOD = 0.002

    def __init__(self) -> None:
        self.longest = 0.0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.PERIOD
            await asyncio.sleep(self.PERIOD)
            self.longest = max(self.longest, loop.time() - due)


def pushed(name: str, at: float) -> TelemetryUpdate:
    """A push this replica took and holds back until its next flush."""
    return TelemetryUpdate(name, (), at, Capacity(cpu_millis=500, memory_bytes=1 << 30), (), {"cpu": 1.0})


async def run(args: argparse.Namespace) -> float:
    histories = fleet_histories(args.hosts, seed=1)
    model = DrainPredictor(MODEL, intra_op_threads=1)
    async with scratch_dir("ferryman-bench-tick-") as base, EtcdCluster(base / "etcd", size=1) as cluster:
        store = CountingStore(EtcdKV(cluster.endpoints), "/tick/")
        churning = ChurningModel(model, args.churn)
        coordinator = Coordinator(CoordinatorConfig(), store, NoAgents(), TokenHashes(), churning, lambda: NOW)
        try:
            started = time.monotonic()
            gate = asyncio.Semaphore(64)

            async def register(name: str) -> None:
                reg = json_format.ParseDict(registration(name), fleet_pb2.Registration())
                async with gate:
                    await store.register_host(registration_to_host(reg, NOW))

            await asyncio.gather(*(register(name) for name in histories))
            print(f"{args.hosts} hosts registered in {time.monotonic() - started:.1f} s; load {load()}")
            coordinator.predictions._histories.update(histories)  # as pushes would have built them
            scoring = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                await asyncio.to_thread(model.score, histories, NOW)
                scoring.append(time.perf_counter() - t0)
            member = cluster.members[0].proc
            assert member is not None
            walls, cpus, loop_cpus, etcd_cpus, held, follow, written = [], [], [], [], [], [], []
            listings: list[float] = []
            names = sorted(histories)
            pushing = int(len(names) * args.pushed)
            for run_index in range(args.runs):
                start = (run_index * pushing) % max(len(names), 1)
                for name in (names + names)[start : start + pushing]:  # held back, not flushed
                    await store.record_telemetry(pushed(name, NOW + run_index + 1), keep=10, max_age=600.0)
                store.written, store.listing = 0, 0.0
                c0, e0, t0 = time.process_time(), cpu_seconds(member.pid), time.perf_counter()
                l0 = time.thread_time()
                probe = LoopProbe()
                probing = asyncio.create_task(probe.run(), name="loop-probe")
                await coordinator.policy.tick()
                probing.cancel()
                held.append(probe.longest)
                walls.append(time.perf_counter() - t0)
                listings.append(store.listing)
                cpus.append(time.process_time() - c0)
                loop_cpus.append(time.thread_time() - l0)
                etcd_cpus.append(cpu_seconds(member.pid) - e0)
                t1 = time.perf_counter()
                await coordinator.predictions.flush()
                follow.append(time.perf_counter() - t1)
                await store.flush_telemetry()  # on its own schedule, as the daemon does
                written.append(store.written)
            predicted = await store.latest_predictions()
            assert len(predicted) == args.hosts, f"{len(predicted)} of {args.hosts} hosts predicted"
        finally:
            await store.close()
    p99 = float(np.percentile(walls, 99))
    print(
        f"scoring alone (baseline): p50 {statistics.median(scoring):.2f} s, p99 {np.percentile(scoring, 99):.2f} s\n"
        f"tick at {args.hosts} hosts: wall p50 {statistics.median(walls):.2f} s p99 {p99:.2f} s; "
        f"listing the hosts p50 {statistics.median(listings):.3f} s max {max(listings):.3f} s "
        f"({int(args.hosts * args.pushed)} summaries held back); "
        f"CPU p50 {statistics.median(cpus):.2f} s (event loop {statistics.median(loop_cpus):.2f} s, "
        f"etcd {statistics.median(etcd_cpus):.2f} s); every host predicted; the loop held at once "
        f"(a push or lease renewal waits that long) p50 {1000 * statistics.median(held):.0f} ms, "
        f"max {1000 * max(held):.0f} ms; "
        f"predictions stored per tick {written} (churn {args.churn:g}); writes that followed the tick "
        f"p50 {statistics.median(follow):.2f} s, max {max(follow):.2f} s; "
        f"load {load()}"
    )
    return p99


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hosts", type=int, default=10_000)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--pushed", type=float, default=0.067, help="share of the hosts with a summary held back at a tick")
    p.add_argument("--churn", type=float, default=0.05, help="share of the hosts whose P(drain) moves each tick")
    args = p.parse_args()
    p99 = asyncio.run(run(args))
    print(f"bench tick: {p99:.2f} s (target < 1)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
