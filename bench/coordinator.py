"""The coordinator on etcd: failover, concurrent placements and telemetry ingest, on this machine.

Three etcd members and three coordinator daemons on loopback (tests/harness/etcd.py,
tests/harness/coordinator.py), the shipped drain model, everything over mTLS; `leader_ttl` 2 s for
the failover and the placements, the default 5 s for the ingest (a fresh set of replicas).

  failover:   the leader is SIGKILLed; a client keeps asking every live replica to drain the next
              registered host (a leader-only write that commits a decision to etcd) and times the
              first accepted one. Baseline in the same run: the leader stopped cleanly (SIGTERM: it
              revokes its lease), measured the same way.
  placements: three clients, one per replica, each with 16 requests in flight, reserve 256 MiB
              "auto" on 30 new hosts with room for 40 each until a request is refused (placement
              also fills the failover hosts' room); then every replica lists the reservations:
              exactly the grants, and no host over its capacity.
              Baseline: one client through one replica, on 30 other hosts.
  ingest:     N simulated agents (one process, one mTLS connection each, their own certificates)
              start at `--connect-rate` a second (a fleet coming up; over one period when slower),
              register (a replica's 503 with Retry-After honoured as agents do) and push one sample
              every `--period` s (phases spread; over a telemetry session each, or with
              `--transport post` one POST each) to the leader (or, with `--push-to all`, agent i to
              replica i % 3; with `--push-to followers`, agent i to follower i % 2, as agents do
              while the leader leaves pushes to the others: the followers' samples reach the
              leader's scoring through their history shares in etcd). The replicas run
              `leader_takes_pushes = "when_alone"` with `followers`, "always" otherwise. An agent
              whose push ran past its period skips the missed periods and keeps its phase, as
              agents do; a skip in the window fails the round. The window
              (`--seconds`) opens once every agent pushes and one period's pushes are within 5 % of
              N/period; the leader's policy tick every `--tick` s. Reported: pushes per second
              against N/period, push latency, the tick's p99 and mean
              (ferryman_coordinator_tick_seconds, diffed over the window), its phases
              (ferryman_coordinator_tick_phase_seconds) and the CPU each process spent.

Result lines:
  bench failover: <median seconds from the kill to the next committed decision> s (target <= 5)
  bench placements: <placements per second, 3 replicas at once> /s (target >= 200)
  bench ingest: <largest N that kept up with the tick p99 under 1 s> agents (target >= 10000)

Run as root from the repo: .venv/bin/python bench/coordinator.py [--rounds 3] [--agents 1000,2000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.telemetry.push import retry_delay
from core.event_loop import EVENT_LOOPS, loop_factory
from core.http.validate import PROTOBUF
from core.security.pki import issue_host
from core.security.tls import client_context
from tests.harness.containerd import scratch_dir
from tests.harness.coordinator import (
    COORDINATOR_NAME,
    CoordinatorPki,
    CoordinatorProcess,
    TelemetryPushes,
    registration,
)
from tests.harness.etcd import EtcdCluster

MODEL = Path(__file__).resolve().parent.parent / "models" / "drain" / "drain.onnx"
GIB = 1 << 30
LEADER_TTL = 2
SLOT = 256 << 20
SLOTS_PER_HOST = 40
PLACEMENT_HOSTS = 30


WARM_UP_MAX = 300.0
"""Seconds an ingest round waits for every agent to register and have a push taken."""
SETTLE_MAX = 120.0
"""Seconds an ingest round then waits for the pushes of one period to come within STEADY of the rate."""
STEADY = 0.05
"""How far from N/period the pushes per second may be, to open the window and to count as kept up."""
METRICS_TIMEOUT = 120.0
"""Seconds the bench waits for a leader's /metrics (its loop serves every agent's pushes too)."""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


class TickHistogram(dict[str, float]):
    """The tick's histogram buckets by `le` (and "sum"), and the hosts the latest tick scored."""

    def __init__(self) -> None:
        super().__init__()
        self.scored: set[str] = set()
        self.phases: defaultdict[str, dict[str, float]] = defaultdict(dict)
        """ferryman_coordinator_tick_phase_seconds: phase -> its buckets by `le` (and "sum")."""


def bucket_p99(before: dict[str, float], after: dict[str, float]) -> tuple[float, float, float]:
    """(count, mean, p99 bucket bound) of a histogram's observations between two reads."""
    diff = {b: after[b] - before.get(b, 0.0) for b in after}
    total = diff.pop("sum", 0.0)
    count = diff.get("+Inf", 0.0)
    ordered = sorted(diff.items(), key=lambda kv: float(kv[0]))
    p99 = next((float(b) for b, c in ordered if count and c >= 0.99 * count), float("inf"))
    return count, (total / count if count else float("nan")), p99


class Bench:
    def __init__(self, base: Path, cluster: EtcdCluster, args: argparse.Namespace, leader_ttl: int, name: str) -> None:
        self.base = base
        self.cluster = cluster
        self.args = args
        self.pki = CoordinatorPki(base / f"{name}-pki")
        self.ops_ctx = self.pki.client_ssl(self.pki.operator("bench"))
        self.leader_ttl = leader_ttl
        store = {
            "backend": "etcd",
            "etcd_endpoints": cluster.endpoints,
            "etcd_prefix": f"/{name}/",
            "leader_ttl": leader_ttl,
        }
        overrides = {
            "store": store,
            "event_loop": args.event_loop,
            "log_level": "INFO",
            "model": {"path": str(MODEL), "tick_period": args.tick},
            # Hosts that registered and then went quiet (the failover and placement hosts) stay ready.
            "heartbeat": {"suspect_after": 3600.0, "down_after": 7200.0},
            "telemetry": {
                "max_samples_per_host": 64,
                "leader_takes_pushes": "when_alone" if args.push_to == "followers" else "always",
            },
        }
        self.replicas = []
        for i in range(3):
            (base / f"{name}-c{i}").mkdir()
            self.replicas.append(CoordinatorProcess(base / f"{name}-c{i}", self.pki, overrides=overrides))
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        self._host_seq = 0
        self._granted = 0
        self.refused = 0
        """Placements answered 503 (not_leader, store_unavailable) and retried."""
        """Reservations granted by earlier placement runs (they stay held)."""

    async def close(self) -> None:
        await self.session.close()
        for r in self.replicas:
            await r.stop()

    async def call(
        self, replica: CoordinatorProcess, method: str, path: str, body: Any = None, within: float = 30.0
    ) -> tuple[int, Any]:
        async with self.session.request(
            method,
            replica.url + path,
            json=body,
            ssl=self.ops_ctx,
            server_hostname=COORDINATOR_NAME,
            timeout=aiohttp.ClientTimeout(total=within),
        ) as resp:
            text = await resp.text()
            return resp.status, (json.loads(text) if text and resp.content_type == "application/json" else text)

    async def health(self, replica: CoordinatorProcess) -> dict[str, Any] | None:
        try:
            status, body = await self.call(replica, "GET", "/healthz")
        except (aiohttp.ClientError, OSError, TimeoutError):
            return None
        return body if status == 200 else None

    async def leader(self, within: float = 20.0) -> CoordinatorProcess:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            live = [r for r in self.replicas if r.proc is not None]
            health = [await self.health(r) for r in live]
            acting = [r for r, h in zip(live, health, strict=True) if h and h["acting"]]
            if len(acting) == 1:
                return acting[0]
            await asyncio.sleep(0.05)
        raise RuntimeError("no single leader")

    async def register(self, replica: CoordinatorProcess, names: list[str], memory: int = 4 * GIB) -> None:
        async def one(name: str) -> None:
            ctx = client_context(self.pki.agent(name))
            body = registration(name, cpu_millis=1_000_000, memory_bytes=memory)
            async with self.session.post(
                replica.url + "/v1/register", json=body, ssl=ctx, server_hostname=COORDINATOR_NAME
            ) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"register {name}: {resp.status} {await resp.text()}")

        for i in range(0, len(names), 50):
            await asyncio.gather(*(one(n) for n in names[i : i + 50]))

    # ----- failover

    async def next_decision(self) -> float:
        """Seconds until some live replica accepts the drain of the next registered host."""
        started = time.monotonic()
        while True:
            name = f"f{self._host_seq}"
            for replica in [r for r in self.replicas if r.proc is not None]:
                try:
                    status, body = await self.call(replica, "POST", f"/v1/hosts/{name}/drain")
                except (aiohttp.ClientError, OSError, TimeoutError):
                    continue
                if status == 202:
                    self._host_seq += 1
                    return time.monotonic() - started
                if status not in (503,):
                    raise RuntimeError(f"drain {name} on {replica.url}: {status} {body}")
            await asyncio.sleep(0.02)

    async def failover(self) -> tuple[list[float], list[float]]:
        leader = await self.leader()
        await self.register(leader, [f"f{i}" for i in range(4 * self.args.rounds + 4)])
        await self.next_decision()  # the path works before anything is killed
        killed, clean = [], []
        for round_ in range(self.args.rounds):
            for how in ("kill", "term"):
                leader = await self.leader()
                assert leader.proc is not None
                if how == "kill":
                    leader.proc.kill()
                    took = await self.next_decision()
                    await leader.proc.wait()
                    leader.proc = None
                    killed.append(took)
                else:
                    stopping = asyncio.create_task(leader.stop())
                    await asyncio.sleep(0)
                    took = await self.next_decision()
                    await stopping
                    clean.append(took)
                print(f"  round {round_ + 1} {how}: next committed decision after {took:.2f} s (load {load()})")
                await leader.start()  # back as a follower for the next round
        return killed, clean

    # ----- placements

    async def place_until_full(self, clients: list[CoordinatorProcess], hosts: list[str]) -> tuple[int, float]:
        leader = await self.leader()
        await self.register(leader, hosts, memory=SLOTS_PER_HOST * SLOT)
        request = {"capacity": {"cpu_millis": 10, "memory_bytes": SLOT}, "host": "auto", "purpose": "bench"}
        held = 0
        started = time.monotonic()
        full = asyncio.Event()

        async def worker(replica: CoordinatorProcess) -> None:
            nonlocal held
            while not full.is_set():
                status, body = await self.call(replica, "POST", "/v1/reservations", request)
                if status == 201:
                    held += 1
                elif status == 409:
                    full.set()
                elif status == 503:  # a leader that lost its term while writing: nothing was held
                    self.refused += 1
                    await asyncio.sleep(0.05)
                else:
                    raise RuntimeError(f"reserve on {replica.url}: {status} {body}")

        await asyncio.gather(*(worker(r) for r in clients for _ in range(16)))
        elapsed = time.monotonic() - started
        # No double-booking: every replica lists every grant, and no host holds more than its room
        # (placement may also use hosts registered earlier in the run: all of them are checked).
        status, fleet = await self.call(leader, "GET", "/v1/hosts")
        assert status == 200, fleet
        room = {h["name"]: h["capacity"]["memory_bytes"] for h in fleet["hosts"]}
        for replica in self.replicas:
            status, listed = await self.call(replica, "GET", "/v1/reservations")
            assert status == 200, listed
            counts: dict[str, int] = defaultdict(int)
            for r in listed["reservations"]:
                counts[r["host"]] += r["capacity"]["memory_bytes"]
            over = {h: b for h, b in counts.items() if b > room[h]}
            total = len(listed["reservations"])
            if over or total != self._granted + held:
                raise AssertionError(f"on {replica.url}: over {over}, {total} listed, {self._granted + held} granted")
        self._granted += held
        return held, elapsed

    # ----- ingest

    async def ingest(self, n: int) -> dict[str, Any]:
        leader = await self.leader()
        names = [f"a{n}-{i}" for i in range(n)]
        t0 = time.monotonic()
        ca = self.pki.ca_dir
        certs = [issue_host(ca, name, self.base / "agents" / name, ["127.0.0.1"]) for name in names]
        issued = time.monotonic() - t0
        contexts = [client_context(c) for c in certs]
        sessions = [
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=1, ssl=ctx), timeout=aiohttp.ClientTimeout(total=30)
            )
            for ctx in contexts
        ]
        latencies: list[float] = []
        failures: defaultdict[str, int] = defaultdict(int)
        registration_failures: defaultdict[str, int] = defaultdict(int)
        retry_after: dict[aiohttp.ClientSession, float] = {}
        """A replica's Retry-After on an agent's last refused request (registrations_busy)."""
        period, seconds = self.args.period, self.args.seconds
        stop_at = 0.0

        live = [r for r in self.replicas if r.proc is not None]
        pool = {"all": live, "followers": [r for r in live if r is not leader], "leader": [leader]}[self.args.push_to]
        targets = {s: pool[i % len(pool)] for i, s in enumerate(sessions)}

        async def post(session: aiohttp.ClientSession, path: str, body: Any) -> bool:
            """POST `body`: JSON, or bytes as binary protobuf (the telemetry, as agents send it)."""
            sent = time.monotonic()
            kw: dict[str, Any] = (
                {"data": body, "headers": {"Content-Type": PROTOBUF}} if isinstance(body, bytes) else {"json": body}
            )
            try:
                url = targets[session].url + path
                async with session.post(url, server_hostname=COORDINATOR_NAME, **kw) as resp:
                    await resp.read()
                    ok = resp.status == 200
                    if not ok:
                        failures[f"http {resp.status}"] += 1
                        if "Retry-After" in resp.headers:
                            retry_after[session] = float(resp.headers["Retry-After"])
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                failures[type(exc).__name__] += 1
                return False
            if ok and path == "/v1/telemetry":
                latencies.append(time.monotonic() - sent)
            return ok

        async def push_over(
            session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse | None, body: bytes
        ) -> aiohttp.ClientWebSocketResponse | None:
            """One push over the agent's telemetry session (opened at its first push, again after a
            failure), as agents push; the session to use next (None: open a new one)."""
            sent = time.monotonic()
            try:
                if ws is None:
                    ws = await session.ws_connect(
                        targets[session].url + "/v1/telemetry/stream", server_hostname=COORDINATOR_NAME, compress=0
                    )
                await ws.send_bytes(body)
                msg = await ws.receive(timeout=30)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                failures[type(exc).__name__] += 1
                if ws is not None:
                    await ws.close()
                return None
            if msg.type is not aiohttp.WSMsgType.BINARY:
                failures[f"stream {msg.type.name}"] += 1
                await ws.close()
                return None
            latencies.append(time.monotonic() - sent)
            return ws

        async def agent(i: int, session: aiohttp.ClientSession) -> None:
            nonlocal pushed, skipped
            # Spread the registrations (and handshakes): over one period, or at --connect-rate a
            # second when that is longer (a fleet coming up, not every agent within 5 s).
            await asyncio.sleep(random.uniform(0, max(period, n / self.args.connect_rate)))
            name = names[i]
            while not await post(session, "/v1/register", registration(name)):  # as an agent: again later
                registration_failures[name] += 1
                pause = retry_after.pop(session, None)  # a busy replica says when, as agents honour it
                await asyncio.sleep(retry_delay(pause) if pause is not None else 1.0)
            pushes = TelemetryPushes(name)
            next_at = time.monotonic() + random.uniform(0, period)
            ws: aiohttp.ClientWebSocketResponse | None = None
            pushing = False
            try:
                while True:
                    await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                    if stop_at and time.monotonic() >= stop_at:
                        return
                    if self.args.transport == "stream":
                        ws = await push_over(session, ws, pushes.body(time.time()))
                        ok = ws is not None
                    else:
                        ok = await post(session, "/v1/telemetry", pushes.body(time.time()))
                    if ok:
                        pushed += 1
                    if ok and not pushing:
                        pushing = True
                        started.append(name)
                        if len(started) == n:
                            all_started.set()
                    next_at += period
                    now = time.monotonic()
                    if next_at < now:
                        # As an agent does after a stall: the missed periods are skipped, the phase
                        # kept; its next push carries the latest sample (no backlog at full speed).
                        missed = math.ceil((now - next_at) / period)
                        skipped += missed
                        next_at += missed * period
            finally:
                if ws is not None:
                    await ws.close()

        pids = {
            f"coordinator :{r.port}{' (leader)' if r is leader else ''}": r.proc.pid for r in self.replicas if r.proc
        }
        pids.update({f"etcd {m.name}": m.proc.pid for m in self.cluster.members if m.proc})
        started: list[str] = []
        """The agents that registered and had a push taken."""
        pushed = 0
        """Pushes taken so far (all agents)."""
        skipped = 0
        """Push periods the agents skipped because a push ran past its period."""
        all_started = asyncio.Event()
        tasks = [asyncio.create_task(agent(i, s)) for i, s in enumerate(sessions)]
        try:
            # Everyone registered and pushing (thousands of handshakes at once take a while on a
            # loaded machine), then one period more for the phases to settle.
            t0 = time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_started.wait(), WARM_UP_MAX)
            warm_up = time.monotonic() - t0
            # Then steady: the pushes of one period within 5 % of the fleet's rate (the starts' late
            # registrations and a loaded replica's answers settle), before the window opens.
            expected = n / period
            settled_at = time.monotonic()
            while time.monotonic() - settled_at < SETTLE_MAX:
                before = pushed
                await asyncio.sleep(period)
                if abs((pushed - before) / period - expected) <= STEADY * expected:
                    break
            settle = time.monotonic() - settled_at
            assert leader.proc is not None
            print(f"  window open: {seconds:.0f} s, leader pid {leader.proc.pid}; load {load()}", flush=True)
            before_ticks = await self.tick_histogram(leader)
            # The window's counts start after that read: a loaded leader takes seconds to answer it,
            # and the pushes meanwhile are not in the window's time.
            latencies.clear()
            failures.clear()
            skipped_before = skipped
            before_cpu = self.cpu(pids)
            window_start = time.monotonic()
            await asyncio.sleep(seconds)
            window = time.monotonic() - window_start
            pushes = len(latencies)
            skipped_in_window = skipped - skipped_before
            after_cpu = self.cpu(pids)
            after_ticks = await self.tick_histogram(leader)
            still = await self.leader()
            stop_at = time.monotonic()
            # Which of this round's hosts the leader scored in the window: with --push-to all, two
            # thirds of them reach its scoring only through the followers' shares.
            ours = set(names)
            scored = len(ours & after_ticks.scored)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for s in sessions:
                await s.close()
        count, tick_mean, p99 = bucket_p99(before_ticks, after_ticks)
        phases = {
            phase: bucket_p99(before_ticks.phases.get(phase, {}), buckets)[1:]
            for phase, buckets in after_ticks.phases.items()
        }
        return {
            "agents": n,
            "certs_s": issued,
            "pushes_per_s": pushes / window,
            "expected_per_s": n / period,
            "latency_p50": statistics.median(latencies) if latencies else float("nan"),
            "latency_p99": statistics.quantiles(latencies, n=100)[98] if len(latencies) >= 100 else float("nan"),
            "failures": dict(failures),
            "ticks": count,
            "tick_p99_le": p99,
            "tick_mean": tick_mean,
            "phases": phases,
            "cpu": {k: (after_cpu[k] - before_cpu[k]) / window for k in after_cpu},
            "load": load(),
            "registration_retries": sum(registration_failures.values()),
            "leader_kept": still is leader,
            "scored": scored,
            "warm_up_s": warm_up,
            "settle_s": settle,
            "skipped": skipped_in_window,
            "started": len(started),
        }

    @staticmethod
    def cpu(pids: dict[str, int]) -> dict[str, float]:
        return {k: cpu_seconds(p) for k, p in pids.items()} | {"bench (simulated agents)": time.process_time()}

    async def tick_histogram(self, replica: CoordinatorProcess) -> TickHistogram:
        """ferryman_coordinator_tick_seconds buckets (le -> cumulative count) from the replica's /metrics,
        and the hosts its latest tick scored (their ferryman_coordinator_drain_probability series: the
        stored predictions move only past the deadband, so their timestamps do not say it)."""
        # A loaded leader answers late (10 000 agents' pushes on its loop): a longer bound, still one.
        status, text = await self.call(replica, "GET", "/metrics", within=METRICS_TIMEOUT)
        assert status == 200
        out = TickHistogram()
        for line in str(text).splitlines():
            if line.startswith("ferryman_coordinator_tick_seconds_bucket{"):
                le = line.split('le="', 1)[1].split('"', 1)[0]
                out[le] = float(line.rsplit(" ", 1)[1])
            elif line.startswith("ferryman_coordinator_tick_seconds_sum "):
                out["sum"] = float(line.rsplit(" ", 1)[1])
            elif line.startswith("ferryman_coordinator_tick_phase_seconds_"):
                kind, labels = line.split("{", 1)
                phase = labels.split('phase="', 1)[1].split('"', 1)[0]
                if kind.endswith("_bucket"):
                    out.phases[phase][labels.split('le="', 1)[1].split('"', 1)[0]] = float(line.rsplit(" ", 1)[1])
                elif kind.endswith("_sum"):
                    out.phases[phase]["sum"] = float(line.rsplit(" ", 1)[1])
            elif line.startswith('ferryman_coordinator_drain_probability{host="'):
                out.scored.add(line.split('host="', 1)[1].split('"', 1)[0])
        return out


async def start(bench: Bench) -> None:
    await bench.replicas[0].start()  # the first leads; the others join as followers
    await bench.leader()
    await asyncio.gather(*(r.start() for r in bench.replicas[1:]))
    print(f"3 coordinators on the 3 etcd members, leader_ttl {bench.leader_ttl} s; load {load()}")


async def run(args: argparse.Namespace) -> int:
    results: list[str] = []
    async with scratch_dir("ferryman-bench-coordinator-") as base, EtcdCluster(base / "etcd", size=3) as cluster:
        # Failover and placements with leader_ttl 2 s; the ingest with the default 5 s, as a loaded
        # leader's renewals run late (see docs/benchmarks.md).
        for ttl, name, parts in ((LEADER_TTL, "fast", ("failover", "placements")), (5, "ingest", ("ingest",))):
            if not set(parts) & set(args.parts):
                continue
            bench = Bench(base, cluster, args, ttl, name)
            try:
                await start(bench)
                if "failover" in args.parts and "failover" in parts:
                    killed, clean = await bench.failover()
                    results.append(f"bench failover: {statistics.median(killed):.2f} s (target <= 5)")
                    print(
                        f"failover: SIGKILL -> next committed decision {', '.join(f'{t:.2f}' for t in killed)} s; "
                        f"clean stop (baseline) {', '.join(f'{t:.2f}' for t in clean)} s"
                    )
                if "placements" in args.parts and "placements" in parts:
                    await placements(bench, results)
                if "ingest" in args.parts and "ingest" in parts:
                    await ingest(bench, args, results)
            finally:
                await bench.close()
    print("\n".join(results))
    return 0


async def placements(bench: Bench, results: list[str]) -> None:
    one_held, one_s = await bench.place_until_full([await bench.leader()], [f"q{i}" for i in range(PLACEMENT_HOSTS)])
    print(f"placements, 1 replica (baseline): {one_held} held in {one_s:.2f} s = {one_held / one_s:.0f}/s")
    three_held, three_s = await bench.place_until_full(bench.replicas, [f"p{i}" for i in range(PLACEMENT_HOSTS)])
    print(
        f"placements, 3 replicas at once: {three_held} held in {three_s:.2f} s = {three_held / three_s:.0f}/s; "
        f"every replica lists every grant, no host over its room; {bench.refused} requests answered 503 "
        f"and retried (load {load()})"
    )

    results.append(f"bench placements: {three_held / three_s:.0f} /s (target >= 200)")


async def ingest(bench: Bench, args: argparse.Namespace, results: list[str]) -> None:
    if args.nice:
        # The simulated agents stand for N machines of their own: on a shared machine they may yield
        # to the replicas and etcd (started already, so not reniced). A round whose agents then
        # missed their periods does not count as kept up.
        os.nice(args.nice)
        print(f"simulated agents at niceness {os.nice(0)}")
    largest = 0
    for n in args.agents:
        r = await bench.ingest(n)
        # Kept up: the rate within STEADY of N/period both ways (above it is agents catching up after a
        # stall), no push failed, and no agent had to skip a period (the simulator kept its rate).
        kept_up = (
            abs(r["pushes_per_s"] - r["expected_per_s"]) <= STEADY * r["expected_per_s"]
            and not r["failures"]
            and not r["skipped"]
        )
        ok = kept_up and r["tick_p99_le"] <= 1.0 and r["scored"] == n
        print(
            f"ingest {n} agents: {r['pushes_per_s']:.0f} pushes/s of {r['expected_per_s']:.0f} expected, "
            f"latency p50 {1000 * r['latency_p50']:.0f} ms p99 {1000 * r['latency_p99']:.0f} ms, "
            f"failures {r['failures'] or 0}; {r['ticks']:.0f} ticks, p99 <= {r['tick_p99_le']} s, "
            f"mean {r['tick_mean']:.2f} s; "
            f"certificates issued in {r['certs_s']:.1f} s; {r['started']} agents pushing after "
            f"{r['warm_up_s']:.0f} s, steady after {r['settle_s']:.0f} s more; {r['skipped']} push periods "
            f"skipped in the window; {r['registration_retries']} registrations retried; "
            f"{'same leader' if r['leader_kept'] else 'THE LEADER CHANGED'}; "
            f"{r['scored']} of {n} hosts scored by the leader in the window; load {r['load']}"
        )
        order = ("list", "prepare", "score", "store", "decide")
        print(
            "  tick phases (mean s, p99 bucket): "
            + ", ".join(f"{k} {r['phases'][k][0]:.3f} <= {r['phases'][k][1]}" for k in order if k in r["phases"])
        )
        print("  CPU (cores busy): " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["cpu"].items())))
        if not ok:
            break
        largest = n
    results.append(f"bench ingest: {largest} agents (target >= 10000)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="leader kills (and clean stops)")
    p.add_argument("--agents", default="1000,2000,4000", help="simulated agent counts, tried in order")
    p.add_argument("--period", type=float, default=5.0, help="each agent's telemetry period (s)")
    p.add_argument("--seconds", type=float, default=30.0, help="the measured window per agent count")
    p.add_argument("--parts", default="failover,placements,ingest", help="which measurements, comma-separated")
    p.add_argument("--tick", type=float, default=5.0, help="the leader's policy tick period (s)")
    p.add_argument(
        "--push-to",
        choices=("leader", "all", "followers"),
        default="leader",
        help="ingest: every agent pushes to the leader, or agent i to replica i %% 3, or to the followers "
        "only (the leader leaving pushes to them); the summaries and the drain-risk history shares "
        "reach the leader through etcd",
    )
    p.add_argument(
        "--connect-rate",
        type=float,
        default=100.0,
        help="ingest: agents starting (connecting and registering) per second at most, spread over one "
        "period when that is slower: a fleet comes up in waves, not all at once",
    )
    p.add_argument(
        "--event-loop",
        choices=EVENT_LOOPS,
        default="asyncio",
        help="the replicas' event_loop (config), and the bench's own (the simulated agents)",
    )
    p.add_argument(
        "--nice",
        type=int,
        default=0,
        help="ingest: the simulated agents' niceness increment (the replicas and etcd keep theirs)",
    )
    p.add_argument(
        "--transport",
        choices=("stream", "post"),
        default="stream",
        help="ingest: pushes over each agent's telemetry session (GET /v1/telemetry/stream, as agents push "
        "to a coordinator that offers it), or one POST /v1/telemetry each",
    )
    args = p.parse_args()
    args.agents = [int(a) for a in args.agents.split(",")]
    args.parts = args.parts.split(",")
    # The simulated agents run on the replicas' kind of loop too (they stand for agents' machines).
    with asyncio.Runner(loop_factory=loop_factory(args.event_loop)) as runner:
        return runner.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
