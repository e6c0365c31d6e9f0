"""Predictive scaling against an HPA-like baseline, on one 3-stage pipeline on a 3-host mesh.

The pipeline is A -> B -> C (A requires B, B requires C): three `loadstage` images
(tests/workloads/loadstage.c), each serving HTTP with a metrics endpoint (`metrics_port`, so the
coordinator keeps request rate, latency and errors per component); a request burns `work_us` of CPU
(A 1 ms, B and C `--work-us`, 2 ms) under the component's CPU limit (`[deployments] cpu_millis`, 100
millicores by default), so a replica short of CPU answers late while the 2 cores are not the limit.
B and C listen `--start-ms` after they start (an initialisation): their cold start.

The load is a replayed trace of models/scaling's generator, regime `bursty`, seed `--seed` (held
out: no training, validation or evaluation trace of the shipped model used it). The generator gives
each stage's requests per second, B's following A's by 15 s and C's following B's by 25 s (the true
lags); each count is thinned by `--rate-scale`. A client in its own namespace sends every request on
a new connection (so the kernel's balancer spreads them over the replicas) at even spacing within
its second, to each stage's service address. The window replayed is `--warmup` seconds and then the
measured `--duration` seconds. The warm-up is the history the correlation engine needs (300 s at
least) and must hold a burst: the engine finds a lag only over a window with variation in it, and
over a quiet warm-up the predictive policy would decide on its naive forecast. So the window is
chosen on the trace alone (before any run) as the start, every 30 s, that maximises the smaller of
two peak-over-median scores of A's 10 s mean rate: the warm-up's, and the measured part's with its
peak in the middle 60 % (a burst cut by an edge measures neither policy).

Run on the same deployment, in one invocation, `--pairs` times (1 by default) each policy: the
coordinator's predictive scaling (`[scaling]` enabled, a decision every `--period` s, warm standbys
on) and the reactive policy (`PUT /v1/scaling/{id}/policy reactive`: the HPA's computation, 15 s
sync, 70 % CPU target, 10 % tolerance, 300 s scale-down stabilisation), each replaying the same
requests (warm-up included) after B and C are put back to their initial counts; the order
alternates from pair to pair (predictive first in odd pairs), so a trend in the shared machine's
load falls on both, and each half prints the load average it ran at. Only the downstream
components B and C are scaled (A has no upstream); A keeps its manifest's replicas.

Measured over the measured window, for B and C: SLO-violation seconds (a second of a stage is in
violation when the p99 latency of the requests sent to it in that second exceeds `--slo-ms`, or one of
them failed or timed out, 5 s); replica-seconds (serving and starting copies each second, plus each
warm standby at `standby_cost` of a replica, the configured cost: it holds memory, no CPU); p99
latency of all their requests; and, after the predictive run, the lags the correlation engine found
(`GET /v1/scaling/{id}/explain`) against the true ones.

Result line: `bench scaling: <SLO-violation seconds predictive / reactive> ratio (target <= 0.2)`,
summed over the pairs; the replica-seconds ratio (target <= 1.1), the p99 both ways, the lags the
decisions used and the ones discovered at each predictive half's end against the true ones, and
each half's figures and load in the text.

Run as root from the repo: .venv/bin/python bench/scaling.py [--duration 420] [--warmup 320] [--pairs 2]
[--out run.json]. One pair at `--duration 300` takes about 25 minutes (two replays of 620 s, the
deploy and the put-backs); `--out` keeps every second's latencies, replica counts, load samples and
decisions for a look afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.scaling.generate import REGIMES, TraceSpec, generate
from tests.harness import netns as nsh
from tests.harness.containerd import scratch_dir
from tests.harness.fleet import CoordinatedFleet, coordinated_fleet
from tests.harness.mesh import Mesh
from tests.harness.workloads import loadstage_image

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "models/scaling/scaling.onnx"
PORT = 8080
STAGES = ("A", "B", "C")
"""The generator's stages; the catalog's names are their lower case."""
DOWNSTREAM = ("b", "c")
POLICIES = ("predictive", "reactive")
TARGET_SLO = 0.2
TARGET_REPLICAS = 1.1
TRACE_S = 3600
TIMEOUT_S = 5.0

DRIVER = r"""
import asyncio, json, sys, time

schedule = json.load(open(sys.argv[1]))
addresses, counts, start = schedule["addresses"], schedule["counts"], schedule["start"]
stages = list(addresses)
lat = {s: [[] for _ in counts] for s in stages}
failed = {s: [0] * len(counts) for s in stages}
REQUEST = b"POST /work HTTP/1.1\r\nHost: stage\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

async def one(stage, second, at):
    await asyncio.sleep(max(0.0, at - time.time()))
    began = time.monotonic()
    ok = False
    try:
        async with asyncio.timeout(TIMEOUT_S):
            reader, writer = await asyncio.open_connection(addresses[stage], PORT)
            writer.write(REQUEST)
            line = await reader.readline()
            ok = line.startswith(b"HTTP/1.1 200")
            await reader.read()
            writer.close()
    except (OSError, TimeoutError):
        ok = False
    took = (time.monotonic() - began) * 1000.0
    lat[stage][second].append(round(took, 1))
    if not ok:
        failed[stage][second] += 1

async def main():
    tasks = []
    for second, row in enumerate(counts):
        at0 = start + second
        await asyncio.sleep(max(0.0, at0 - 0.5 - time.time()))
        for stage, n in zip(stages, row):
            for k in range(n):
                tasks.append(asyncio.create_task(one(stage, second, at0 + (k + 0.5) / n)))
        if second % 30 == 0:
            tasks = [t for t in tasks if not t.done()]
            print(json.dumps({"second": second, "pending": len(tasks)}), flush=True)
    await asyncio.gather(*tasks)
    print(json.dumps({"done": True, "latency_ms": lat, "failed": failed}), flush=True)

asyncio.run(main())
""".replace("TIMEOUT_S", str(TIMEOUT_S)).replace("PORT)", f"{PORT})")


def burst_score(smooth: np.ndarray, start: int, length: int, middle: bool) -> float:
    """Peak over median of a window of A's 10 s mean rate; with `middle`, 0 unless the peak lies in
    the window's middle 60 % (a burst cut by either edge measures neither policy)."""
    part = smooth[start : start + length]
    if middle and not 0.2 * length <= int(np.argmax(part)) <= 0.8 * length:
        return 0.0
    return float(part.max() / np.median(part))


def pick_window(offered_a: np.ndarray, warmup: int, duration: int) -> int:
    """The start of the measured window, on the trace alone: the best of the starts (every 30 s)
    where both the warm-up before it and the measured window hold a burst, by the smaller of their
    peak-over-median scores (the correlation engine finds a lag only over a window with variation in
    it, so a quiet warm-up would leave the predictive policy on its naive forecast)."""
    smooth = np.convolve(offered_a, np.ones(10) / 10, mode="same")
    best, best_score = warmup, -1.0
    for start in range(warmup, len(smooth) - duration, 30):
        score = min(
            burst_score(smooth, start, duration, middle=True),
            burst_score(smooth, start - warmup, warmup, middle=False),
        )
        if score > best_score:
            best, best_score = start, score
    return best


def schedule(args: argparse.Namespace) -> tuple[list[list[int]], list[tuple[str, str, int]], int]:
    trace = generate(TraceSpec(REGIMES["bursty"], args.seed, duration_s=TRACE_S))
    start = pick_window(trace.offered, args.warmup, args.duration)
    rng = np.random.default_rng(args.seed)
    rows = []
    for t in range(start - args.warmup, start + args.duration):
        arrived = [int(trace.components[s].rate[t]) for s in STAGES]
        rows.append([int(rng.binomial(c, args.rate_scale)) for c in arrived])
    return rows, trace.edges, start


def entry(name: str, ref: str, requires: list[str], replicas: int) -> dict[str, Any]:
    check = {"kind": "http", "port": PORT, "path": "/healthz", "interval": 1.0, "timeout": 1.0, "retries": 5}
    return {
        "name": name,
        "version": "1.0.0",
        "image": ref,
        "manifest": {
            "required_images": requires,
            "data_transfer_protocols": {r: {"protocol": "http", "port": PORT} for r in requires},
            "dependency_health_check": {**check, "start_period": 30.0},
            "replicas": replicas,
            "metrics_port": PORT,
        },
    }


def counts(component: dict[str, Any]) -> tuple[int, int]:
    """(serving or starting copies, standbys) of a component."""
    live = 1 + sum(r["state"] in ("serving", "starting") for r in component["replicas"])
    return live, sum(r["state"] == "standby" for r in component["replicas"])


async def put_back(f: CoordinatedFleet, deployment: str, initial: dict[str, int]) -> None:
    """B and C to their initial counts, no standby, none starting or draining (retried while
    another scale runs; after 180 s the reactive run starts from where they are, said)."""
    deadline = time.monotonic() + 180
    while True:
        record = await f.call("GET", f"/v1/deployments/{deployment}")
        now = {c["name"]: (counts(c), sorted(r["state"] for r in c["replicas"])) for c in record["components"]}
        off = [n for n in DOWNSTREAM if now[n][0] != (initial[n], 0) or {"starting", "draining"} & set(now[n][1])]
        if not off:
            return
        if time.monotonic() > deadline:
            print(f"  B and C did not all go back to {initial}: {now}; the reactive run starts from there", flush=True)
            return
        for name in off:
            body = {"replicas": initial[name], "standbys": 0, "drain_timeout": 10}
            await f.call("POST", f"/v1/deployments/{deployment}/components/{name}/scale", body, expect=None)
        await asyncio.sleep(2.0)


async def run(
    f: CoordinatedFleet,
    deployment: str,
    addresses: dict[str, str],
    rows: list[list[int]],
    args: argparse.Namespace,
    label: str,
    work: Path,
) -> dict[str, Any]:
    """Replay the schedule once; per-second latencies and failures, and replica counts per second."""
    mesh = f.mesh
    assert mesh.client is not None
    begin = time.time() + 5.0
    plan = work / f"schedule-{label}.json"
    plan.write_text(json.dumps({"addresses": addresses, "counts": rows, "start": begin}))
    proc = await asyncio.create_subprocess_exec(
        "nsenter",
        f"--net={nsh.netns_path(mesh.client.netns)}",
        sys.executable,
        "-c",
        DRIVER,
        str(plan),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        limit=1 << 26,
    )
    assert proc.stdout is not None
    replicas: dict[str, list[tuple[float, int, int]]] = {n: [] for n in DOWNSTREAM}
    load: list[tuple[float, float]] = []
    decisions: dict[tuple[float, str], dict[str, Any]] = {}

    async def sample() -> None:
        tick = 0
        while True:
            if tick % 20 == 0:  # the store keeps the last 200 decisions: gather them as the run goes
                for d in (await f.call("GET", f"/v1/scaling/{deployment}/history"))["decisions"]:
                    if d["ts"] >= begin - 5.0:
                        decisions[(d["ts"], d["component"])] = d
            tick += 1
            record = await f.call("GET", f"/v1/deployments/{deployment}")
            ts = time.time()
            load.append((ts, os.getloadavg()[0]))
            for c in record["components"]:
                if c["name"] in replicas:
                    live, standby = counts(c)
                    replicas[c["name"]].append((ts, live, standby))
            await asyncio.sleep(1.0)

    sampler = asyncio.create_task(sample())
    result: dict[str, Any] = {}
    try:
        while True:
            line = await proc.stdout.readline()
            if not line:
                break
            data = json.loads(line)
            if data.get("done"):
                result = data
            elif data["second"] % 120 == 0:
                status = await f.call("GET", f"/v1/deployments/{deployment}")
                now = {c["name"]: counts(c) for c in status["components"] if c["name"] in DOWNSTREAM}
                print(f"  {label}: second {data['second']}/{len(rows)}, B/C (copies, standbys) {now}", flush=True)
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
    await proc.wait()
    if not result:
        err = await proc.stderr.read() if proc.stderr else b""
        raise RuntimeError(f"the load driver failed: {err.decode()[-2000:]}")
    result["replicas"] = replicas
    result["load"] = load
    for d in (await f.call("GET", f"/v1/scaling/{deployment}/history"))["decisions"]:
        if d["ts"] >= begin - 5.0:
            decisions[(d["ts"], d["component"])] = d
    result["decisions"] = [decisions[k] for k in sorted(decisions)]
    result["begin"] = begin
    return result


def measure(result: dict[str, Any], args: argparse.Namespace, standby_cost: float) -> dict[str, Any]:
    """SLO-violation seconds, replica-seconds and p99 of B and C over the measured window."""
    first = args.warmup
    violations = 0
    every: list[float] = []
    per_stage = {}
    for stage in (s.upper() for s in DOWNSTREAM):
        seconds = 0
        for t in range(first, first + args.duration):
            lat = result["latency_ms"][stage][t]
            bad = result["failed"][stage][t] > 0 or (bool(lat) and float(np.percentile(lat, 99)) > args.slo_ms)
            seconds += bad
            every.extend(lat)
        per_stage[stage] = seconds
        violations += seconds
    lo = result["begin"] + first
    hi = lo + args.duration
    replica_s = 0.0
    standby_s = 0.0
    for stage in DOWNSTREAM:
        points = [(ts, live, sb) for ts, live, sb in result["replicas"][stage] if lo <= ts < hi]
        # each sample holds until the next (about 1 s)
        for (ts, live, sb), nxt in zip(points, [*points[1:], (hi, 0, 0)], strict=True):
            dt = nxt[0] - ts
            replica_s += live * dt
            standby_s += sb * dt
    loads = [v for ts, v in result["load"] if lo <= ts < hi]
    return {
        "load": (min(loads), float(np.mean(loads)), max(loads)) if loads else (math.nan,) * 3,
        "violation_s": violations,
        "per_stage": per_stage,
        "replica_s": replica_s + standby_cost * standby_s,
        "replica_s_full": replica_s + standby_s,
        "standby_s": standby_s,
        "p99_ms": float(np.percentile(every, 99)) if every else math.nan,
        "requests": len(every),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=420, help="measured seconds of the trace")
    parser.add_argument("--warmup", type=int, default=320, help="seconds replayed before (history for the engine)")
    parser.add_argument("--seed", type=int, default=20261605, help="the generator's seed (held out)")
    parser.add_argument("--rate-scale", type=float, default=0.35, help="share of the trace's requests sent")
    parser.add_argument("--work-us", type=int, default=2000, help="CPU per request at B and C (microseconds)")
    parser.add_argument("--cpu-millis", type=int, default=100, help="[deployments] cpu_millis: each copy's limit")
    parser.add_argument("--start-ms", type=int, default=8000, help="B's and C's initialisation before they listen")
    parser.add_argument("--slo-ms", type=float, default=250.0, help="p99 latency per second within the SLO")
    parser.add_argument("--period", type=float, default=5.0, help="[scaling] period of the predictive policy")
    parser.add_argument(
        "--lone-replica-risk",
        type=float,
        default=0.1,
        help="[scaling] lone_replica_risk: share of seconds one copy alone answers late on the shared machine",
    )
    parser.add_argument("--pairs", type=int, default=1, help="predictive/reactive pairs, the order alternating")
    parser.add_argument("--out", default="", help="write every run's samples and decisions here (JSON)")
    args = parser.parse_args()
    rows, edges, window = schedule(args)
    true_lags = {(u, d): lag for u, d, lag in edges}
    standby_cost = 0.2
    # Initial copies: enough for the trace's median load at half the limit, counting a request's
    # connection and thread as much CPU again as its work (a saturated stage's CPU stops following
    # its upstream, and the engine would find no lead); the same for both runs.
    per_request_s = {"A": 0.002, "B": 2 * args.work_us / 1e6, "C": 2 * args.work_us / 1e6}
    capacity = args.cpu_millis / 1000.0 * 0.5
    median = {s: float(np.median([r[i] for r in rows])) for i, s in enumerate(STAGES)}
    initial = {s.lower(): max(1, math.ceil(median[s] * per_request_s[s] / capacity)) for s in STAGES}
    initial["a"] = max(initial["a"], 2)
    print(
        f"trace: bursty, seed {args.seed}, window {window - args.warmup}..{window + args.duration} s of {TRACE_S} "
        f"(warm-up {args.warmup} s, measured {args.duration} s), x{args.rate_scale} of its requests; "
        f"median req/s {median}, peak {[max(r[i] for r in rows) for i in range(3)]}; initial copies {initial}",
        flush=True,
    )

    def tables(mesh: Mesh) -> dict[str, dict[str, Any]]:
        return {
            "deployments": {
                "address_pool": f"{mesh.subnet.network_address + 160}/27",
                "health_timeout": 60.0,
                "cpu_millis": args.cpu_millis,
                "drain_timeout": 10.0,
            },
            "scaling": {
                "enabled": True,
                "model": str(MODEL),
                "period": args.period,
                "min_replicas": 1,
                "max_replicas": 8,
                "max_lag": 40,
                "cold_start": args.start_ms / 1000.0 + 2.0,
                "standbys": 1,
                "standby_cost": standby_cost,
                "utilization": 0.7,
                "lone_replica_risk": args.lone_replica_risk,
                "lone_replica_share": 0.5,
            },
        }

    async with (
        scratch_dir() as base,
        coordinated_fleet(base, 3, coordinator_for=tables, with_client=True, telemetry_period=2.0) as f,
    ):
        mesh = f.mesh
        refs = {}
        for name in ("a", "b", "c"):
            work_us = 1000 if name == "a" else args.work_us
            start_ms = 0 if name == "a" else args.start_ms
            repo = f"bench/stage-{name}"
            await loadstage_image(PORT, work_us, start_ms).push(mesh.push_host, repo, "v1")
            refs[name] = mesh.image_ref(repo, "v1")
        for name, requires in (("c", []), ("b", ["c"]), ("a", ["b"])):
            await f.call("POST", "/v1/catalog", entry(name, refs[name], requires, initial[name]), expect=201)
        record = await f.call("POST", "/v1/deployments", {"image": "a"}, expect=None)
        deadline = time.monotonic() + 300
        while record["state"] not in ("HEALTHY", "FAILED") and time.monotonic() < deadline:
            await asyncio.sleep(2.0)
            record = await f.call("GET", f"/v1/deployments/{record['id']}")
        if record["state"] != "HEALTHY":
            raise RuntimeError(f"the pipeline did not deploy: {record}")
        deployment = record["id"]
        while True:  # the manifests' replicas start once the deployment is HEALTHY
            record = await f.call("GET", f"/v1/deployments/{deployment}")
            copies = {c["name"]: 1 + sum(r["state"] == "serving" for r in c["replicas"]) for c in record["components"]}
            if copies == initial:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the manifests' replicas did not start: {copies} of {initial}")
            await asyncio.sleep(2.0)
        addresses = {c["name"]: c["address"] for c in record["components"]}
        addresses = {s: addresses[s.lower()] for s in STAGES}
        print(f"deployed {deployment}: {addresses}", flush=True)

        started = time.time()
        results: dict[str, list[dict[str, Any]]] = {"predictive": [], "reactive": []}
        for k in range(args.pairs):
            # alternate which policy goes first, so a trend in the machine's load falls on both
            for n, policy in enumerate(POLICIES if k % 2 == 0 else POLICIES[::-1]):
                if k or n:
                    await f.call("PUT", f"/v1/scaling/{deployment}/policy", {"policy": "off"})
                    await put_back(f, deployment, initial)
                await f.call("PUT", f"/v1/scaling/{deployment}/policy", {"policy": policy})
                result = await run(f, deployment, addresses, rows, args, f"{policy}-{k + 1}", base)
                m = measure(result, args, standby_cost)
                print(f"  {policy} (pair {k + 1}): {m}", flush=True)
                if policy == "predictive":
                    result["explain"] = await f.call("GET", f"/v1/scaling/{deployment}/explain")
                results[policy].append(result)
        behaviour = {
            n: await f.call("GET", f"/v1/deployments/{deployment}/components/{n}/behaviour") for n in DOWNSTREAM
        }
        elapsed = time.time() - started

    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "initial": initial, "results": results}))
    m = {policy: [measure(r, args, standby_cost) for r in runs] for policy, runs in results.items()}
    total = {policy: {key: sum(x[key] for x in ms) for key in ("violation_s", "replica_s")} for policy, ms in m.items()}
    print(f"runs took {elapsed:.0f} s in all; {args.pairs} pair(s), the order alternating")
    for policy in POLICIES:
        for k, x in enumerate(m[policy]):
            print(
                f"{policy} (pair {k + 1}): SLO-violation seconds {x['violation_s']} (b {x['per_stage']['B']}, "
                f"c {x['per_stage']['C']}) of {2 * args.duration}; replica-seconds {x['replica_s']:.0f} (standbys "
                f"{x['standby_s']:.0f} s at {standby_cost}; {x['replica_s_full']:.0f} counting them whole); p99 "
                f"{x['p99_ms']:.0f} ms over {x['requests']} requests to B and C; load average "
                f"{x['load'][0]:.1f}-{x['load'][2]:.1f} (mean {x['load'][1]:.1f})"
            )
    for k, result in enumerate(results["predictive"]):
        decisions = [d for d in result["decisions"] if d.get("policy") == "predictive"]
        acted = [d for d in decisions if d.get("action") in ("scale-out", "scale-in")]
        warm = sum(int(d.get("warm_starts") or 0) for d in acted)
        naive = sum("the need now taken as the forecast" in str(d.get("reason")) for d in decisions)
        used: dict[str, collections.Counter[int]] = {n: collections.Counter() for n in DOWNSTREAM}
        for d in decisions:
            if d.get("lag_s") is not None:
                used[d["component"]][int(d["lag_s"])] += 1
        found = {}
        for pair in result["explain"]["pairs"]:
            lead = pair.get("lead") or {}
            up, down = pair["upstream"].upper(), pair["downstream"].upper()
            found[(up, down)] = (lead.get("lag_s"), lead.get("upstream_metric"))
        lags_used = {n: dict(c.most_common(3)) for n, c in used.items()}
        print(
            f"predictive (pair {k + 1}): {len(decisions)} decisions, {len(acted)} scaled ({warm} warm starts), "
            f"{naive} on the naive forecast; lags the decisions used (lag: decisions) {lags_used}; "
            "lags at its end, discovered (metric) vs true: "
            + ", ".join(
                f"{u}->{d} {found.get((u, d), (None, None))[0]} s ({found.get((u, d), (None, None))[1]}) vs {lag} s"
                for (u, d), lag in true_lags.items()
            )
        )
    for result in results["reactive"]:
        acted = [d for d in result["decisions"] if d.get("policy") == "reactive" and d["action"] != "hold"]
        print(f"reactive: {len(acted)} passes scaled")
    print("measured cold starts: " + ", ".join(f"{n} {behaviour[n]['cold_start_s'] or 0:.1f} s" for n in DOWNSTREAM))
    p, r = total["predictive"], total["reactive"]
    ratio = p["violation_s"] / r["violation_s"] if r["violation_s"] else (0.0 if p["violation_s"] == 0 else math.inf)
    replica_ratio = p["replica_s"] / r["replica_s"] if r["replica_s"] else math.inf
    p99 = {policy: float(np.percentile([x["p99_ms"] for x in m[policy]], 50)) for policy in POLICIES}
    print(
        f"SLO-violation seconds predictive {p['violation_s']}, reactive {r['violation_s']}; replica-seconds "
        f"predictive / reactive: {replica_ratio:.3f} (target <= {TARGET_REPLICAS}); p99 latency predictive "
        f"{p99['predictive']:.0f} ms, reactive {p99['reactive']:.0f} ms (median over pairs)"
    )
    print(f"bench scaling: {ratio:.3f} ratio (target <= {TARGET_SLO})")


if __name__ == "__main__":
    asyncio.run(main())
