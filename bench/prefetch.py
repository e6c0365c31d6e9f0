"""Predictive prefetch on a 3-host mesh: a held-out trace of task starts replayed with warms on and off.

The trace: `models/prefetch/generate.py`'s held-out regime (`eval`) from a seed neither training
nor the model card used, 3 hosts; the starts of a window around its mix shift are replayed, the
history before the window only fed to the predictor (the coordinator would have recorded it). Each
trace layer becomes an incompressible layer of its size / `--scale` (a fixed seed per layer), each
signature an image (busybox + its layers, in the trace's order); a start is `POST /v1/containers
?start=1` of that image on its host's agent (`/bin/true`) after `POST /v1/images/pull` of it, timed
from the pull's request to the start's answer, then removed. The registry sits behind 100 Mbit/s
(tc tbf on the mesh bridge; peers unshaped, and peer sharing on, as in bench/p2p.py); each agent's
layer cache is bounded ([cache] max_bytes) to
`--cache-share` of the median working set of the three hosts over the window.

Two passes in the same run, same trace, alternating order with `--rounds`, every host emptied of
the trace's images and blobs before each:
  off: no prefetch.
  on:  the coordinator's warming loop run in this process on trace time: after every start and
       every 300 trace-seconds per host, the shipped layer predictor (models/prefetch/prefetch.onnx,
       through `LayerPredictor`, as coordinator/warm.py serves it) scores the host's candidates from
       its start history (with the releases the fleet has seen, from the registry's pushes of
       the trace's released images on: `Trace.pushes`, `--no-pushes` for from their first start),
       `warming.plan` picks them under the waste controller's aggressiveness
       (coordinator/waste_control.py, a round every 300 trace-seconds) with their expected waste,
       read with P calibrated to the lease, within the bound, and the host's agent fetches
       each (`POST /v1/prefetch/layers/{digest}`, peers first) under a lease of the model's 1 h of
       trace time: the bench ends the agent's lease itself when a start uses the warm or its trace
       hour passes (containerd's lease delete), so the lease follows trace time however long a trace hour
       takes on the wall. Before the warms, `warming.keep` picks the predicted layers the host
       holds already, and the same endpoint keeps each (`"kept": true`: a lease, nothing fetched)
       so the cache bound leaves it, ended like a warm's; keeps and warms under lease share the
       half of the cache bound. A keep is used or its lease ends unused, counted apart from warms:
       it moved no bytes, so the waste figure is of warms alone. With `--retrain-every` (2 trace
       hours), the coordinator's retraining rounds (coordinator/warm_retraining.py) run on the starts
       recorded before each round from the window's start on, holding out `--retrain-holdout-h`, and
       a candidate that beats the served model replaces it from that trace time on (computed before
       the passes: their inputs are the trace's).

A start is all-local when its host held every layer before it (containerd's content list, read
through a gRPC client in this process, as are the lease ends: no `ctr` runs in a timed pass). A warm is used
when a start on its host needs it within its lease (trace time), else wasted (the trace's starts
of one lease after the window settle the last warms, without running); the byte budget per
decision is the sim's (models/prefetch/evaluate.py) scaled like the layers, and warms under lease
hold at most half the cache bound, as there. Before a pass each host
pulls the images of its starts of the `--prime-h` trace hours before the window (untimed, no
task), and the first `--warmup` starts are not counted.

Result lines:
  bench prefetch: <share of cold starts with every layer local, prefetch on> ratio (target >= 0.6)
  in the text: the same share without prefetch, wasted / warmed bytes (target <= 0.25), mean start
  latency on / off (target <= 0.5), the mean bytes a start fetched on / off, starts after the shift
  until 50 are back to 90 % of the hit rate before it (target <= 50), and the predictor's time per
  host decision (model alone, target <= 1 ms).

`warming.plan` also gets the layers the other hosts hold (their content lists, as the coordinator knows
them from their registrations): a layer none of them holds is warmed at a lower bar.

Each pass also runs the cache simulation (models/prefetch/evaluate.py) on the same starts and warms
and prints where each missed layer went and the MB a start fetched by why (new to the fleet, new to
the host, evicted by the bound, warmed then lost) and by layer kind, and the starts by where their
bytes came from (the pull's `bytes_from_peers`: all local, peers only, some from the registry) with
the registry MB a start; `--record FILE` writes every start, warm and keep as JSON lines. The cache
simulation has no keeps: its figures are of warms alone.
Before the passes the same simulation says what the window allows at the bound: no prefetching, an
oracle warming each host's next start, and warms that know the generator's workflows and crons
(`replay_window`, `oracle_ranker`, `structure_ranker`).

The defaults: 3 trace hours before the shift and 9 after (285 starts, 214 of them after the shift:
enough 50-start windows to see whether the hit rate comes back), layers at 1/4 of the trace's sizes
(an image of 25-100 MB, so a start that misses spends most of its time fetching layers, over the
100 Mbit/s link or from a peer, against ~0.2 s of containerd's create and start with every layer
local); 15-20 min on a busy 2-core box.

Run as root from the repo: .venv/bin/python bench/prefetch.py [--rounds 1] [--before-h 3] [--after-h 9]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.containerd import Containerd
from coordinator.model import StartRecord
from coordinator.predictor import run_training
from coordinator.warm_features import FleetStarts, HostStarts
from coordinator.warm_predictor import LayerPredictor
from coordinator.warm_retraining import recorded, verdict
from coordinator.warming import Candidate, WarmOutcome, keep, plan, warm_budget
from coordinator.waste_control import ControlLimits, ControlState, control, initial
from models.prefetch.evaluate import (
    Cache,
    EvalConfig,
    SimResult,
    oracle_ranker,
    recovery,
    replay_window,
    structure_ranker,
    windows_after,
)
from models.prefetch.generate import REGIMES, Trace, TraceSpec, generate, make_catalog
from tests.harness.containerd import scratch_dir
from tests.harness.fleet import api, fleet
from tests.harness.images import ImageBuilder, Layer, busybox_layer, random_layer
from tests.harness.mesh import Mesh, MeshHost

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "prefetch" / "prefetch.onnx"
SHARING: dict[str, Any] = {"stall_timeout": 10.0}
EVAL = EvalConfig()
LINK = 12.5e6
"""100 Mbit/s, as the registry's shaping."""
AGENT_TTL = 3 * 3600.0
"""The agent's lease of a warm in wall seconds: longer than any pass; the bench ends each lease on
trace time."""


@dataclass
class Replay:
    """One host's view of the window: its starts (trace time) and decision times."""

    trace: Trace
    begin: float
    end: float
    events: list[tuple[float, int, str, int]] = field(default_factory=list)
    """(ts, 0 start / 1 decision / 2 settling start / 3 registry push, host, start or push index or
    -1), in time order."""

    @classmethod
    def of(cls, trace: Trace, begin: float, end: float, tick: float, settle: float, pushes: bool) -> Replay:
        """Starts and decisions in [begin, end), then the starts of `settle` more seconds, which only
        settle the warms still under lease (used or not); they are not run. With `pushes`, the
        registry's pushes of released images in the window reach the coordinator too."""
        r = cls(trace, begin, end)
        if pushes:
            r.events += [(p.ts, 3, "", k) for k, p in enumerate(trace.pushes) if begin <= p.ts < end]
        for i, (host, s) in enumerate(trace.starts):
            if begin <= s.ts < end:
                r.events += [(s.ts, 0, host, i), (s.ts, 1, host, -1)]
            elif end <= s.ts < end + settle:
                r.events.append((s.ts, 2, host, i))
        for host in trace.hosts:
            r.events += [(t, 1, host, -1) for t in np.arange(begin, end, tick).tolist()]
        r.events.sort(key=lambda e: (e[0], e[1], e[2]))
        return r


def layer_for(digest: str, size: int, scale: int) -> Layer:
    seed = int(hashlib.sha256(digest.encode()).hexdigest()[:8], 16)
    return random_layer(max(64 << 10, size // scale), seed=seed, file_size=1 << 20, compression="none")


def working_set(trace: Trace, hosts: list[str], begin: float, end: float, sizes: dict[str, int]) -> int:
    held: dict[str, set[str]] = {h: set() for h in hosts}
    for host, s in trace.starts:
        if begin <= s.ts < end:
            held[host].update(s.layers)
    return int(statistics.median(sum(sizes[d] for d in ds) for ds in held.values()))


async def held_digests(store: Containerd) -> set[str]:
    """The blobs a host's containerd holds, through a client in this process: a `ctr` (nsenter and
    ctr, two processes) at every decision and lease end loaded the two cores in the prefetch pass
    alone and slowed its starts, a cost the coordinator (which knows holdings from the agents'
    registrations) does not have."""
    return {info.digest for info in await store.content.infos()}


async def forget_all(mesh: Mesh, stores: Mapping[str, Containerd], digests: list[str]) -> None:
    for host in mesh.hosts:
        for name in (await host.actr("images", "ls", "-q")).stdout.split():
            if "bench/sig-" in name:
                await host.actr("images", "rm", "--sync", name)
        held = await held_digests(stores[host.name])
        left = [d for d in digests if d in held]
        if left:
            await host.actr("content", "rm", *left)


@dataclass
class PassResult:
    sim: SimResult = field(default_factory=SimResult)
    latencies: list[float] = field(default_factory=list)
    fetched: list[int] = field(default_factory=list)
    """Per counted start, the bytes of its layers that were not local (what its latency pays for)."""
    sources: list[tuple[int, int, float]] = field(default_factory=list)
    """Per counted start, the bytes its pull fetched from peers and from the registry (the agent's
    `bytes_from_peers`), and its seconds."""
    warmed: int = 0
    wasted: int = 0
    used: int = 0
    warm_requests: int = 0
    failed_warms: int = 0
    kept: int = 0
    """Keeps (a warm lease on a predicted layer the host held: nothing fetched) and their bytes."""
    kept_bytes: int = 0
    keeps_used: int = 0
    """Keeps a start on the host used within their lease, and those whose lease ended unused."""
    keeps_ended: int = 0
    predict_ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    model_ms: list[float] = field(default_factory=list)
    thresholds: list[float] = field(default_factory=list)
    pushes: int = 0
    """Registry pushes the coordinator took as releases (with prefetch)."""
    evicted_before_create: int = 0
    """Starts whose image the agent's cache evicted between the pull and the create (pulled again)."""
    shadow: SimResult = field(default_factory=SimResult)
    """The cache simulation (models/prefetch/evaluate.py) fed the same starts and the same warms."""
    records: list[dict[str, Any]] = field(default_factory=list)
    """Per start and per warm, what happened (--record writes them as JSON lines)."""


async def prime(mesh: Mesh, replay: Replay, refs: dict[str, str], hours: float) -> None:
    """Each host's caches as its last `hours` of starts before the window left them: their images
    pulled in time order (no task, untimed), the same for both passes."""
    names = dict(zip(replay.trace.hosts, sorted(h.name for h in mesh.hosts), strict=True))
    by_name = {h.name: h for h in mesh.hosts}
    for host, s in replay.trace.starts:
        if replay.begin - 3600 * hours <= s.ts < replay.begin:
            await api(by_name[names[host]], "POST", "/v1/images/pull", {"ref": refs[s.signature]})


async def run_pass(
    mesh: Mesh,
    replay: Replay,
    prefetch: bool,
    refs: dict[str, str],
    layer_ref: dict[str, str],
    built: dict[str, Layer],
    predictor: LayerPredictor,
    bound: int,
    args: argparse.Namespace,
    stores: Mapping[str, Containerd],
    swaps: Sequence[tuple[float, LayerPredictor]] = (),
) -> PassResult:
    """`stores`: a containerd client per mesh host (by name), through which the pass lists blobs and
    ends leases."""
    trace, out = replay.trace, PassResult()
    fleet_starts = FleetStarts()
    hosts = {h: HostStarts() for h in trace.hosts}
    seen_fleet: set[str] = set()
    """Layers some start of the fleet used, and per host the layers its own starts used: a layer a
    start misses was new to the fleet, new to its host, or the cache bound evicted it."""
    seen_host: dict[str, set[str]] = {h: set() for h in trace.hosts}
    for host, s in trace.starts:  # the history before the window: recorded, never run here
        if s.ts >= replay.begin:
            break
        hosts[host].add(s, fleet_starts)
        seen_fleet.update(s.layers)
        seen_host[host].update(s.layers)
    if args.pushes:
        for p in trace.pushes:  # a push before the window (none at the defaults)
            if p.ts < replay.begin:
                fleet_starts.pushed(p.source, p.layers)
    limits = ControlLimits()
    state: ControlState = initial(predictor.info.threshold, limits)
    window = [0] * 7
    pending: dict[str, dict[str, tuple[int, float]]] = {h: {} for h in trace.hosts}
    """host -> digest -> (bytes, trace time its lease ends): warms no start used yet."""
    leases: dict[str, dict[str, str]] = {h: {} for h in trace.hosts}
    """host -> digest -> the agent's lease of its warm or keep, until the bench ends it."""
    kept: dict[str, dict[str, tuple[int, float]]] = {h: {} for h in trace.hosts}
    """host -> digest -> (bytes, trace time its lease ends): keeps no start used yet."""
    next_round = replay.begin + EVAL.control_s
    lease = predictor.info.lease
    counted = 0
    by_name = {h.name: h for h in mesh.hosts}
    names = dict(zip(trace.hosts, sorted(by_name), strict=True))
    sizes = {d: layer.size for d, layer in built.items()}
    kinds = make_catalog(trace.spec).kinds
    shadow = {h: Cache(bound, sizes) for h in trace.hosts}
    for host, s in trace.starts:  # primed as prime() primes the hosts
        if replay.begin - 3600 * args.prime_h <= s.ts < replay.begin:
            shadow[host].start(s.ts, s.layers, SimResult(), False)
    warmed_at: dict[str, dict[str, tuple[float, float]]] = {h: {} for h in trace.hosts}
    """host -> digest -> (trace ts, wall time) of its last warm in this pass."""

    async def end_leases(host: str, digests: Sequence[str], collect: bool) -> None:
        """The agent's leases of these warms ended now (trace time), as the lease of 1 trace hour
        would end them: with `collect`, containerd collects the blobs no image holds."""
        ids = [leases[host].pop(d) for d in digests if d in leases[host]]
        for lease_id in ids:
            await stores[names[host]].leases.delete(lease_id, sync=collect)

    async def expire(now: float) -> None:
        for host, digests in pending.items():
            ended = [d for d, (_, until) in digests.items() if until <= now]
            for d in ended:
                size, _ = digests.pop(d)
                out.wasted += size
                window[1] += size
                window[2] += 1
            await end_leases(host, ended, collect=True)
        for host, digests in kept.items():
            ended = [d for d, (_, until) in digests.items() if until <= now]
            for d in ended:
                digests.pop(d)
                out.keeps_ended += 1
            await end_leases(host, ended, collect=True)

    later = list(swaps)
    wall0 = time.perf_counter()
    for n, (ts, kind, host, i) in enumerate(replay.events):
        while prefetch and later and ts >= later[0][0]:
            predictor = later.pop(0)[1]  # what the retraining round swapped in at that trace time
        await expire(ts)
        for cache in shadow.values():
            cache.expire(ts, out.shadow)
        while prefetch and ts >= next_round:
            state = control(state, WarmOutcome(*window), limits)
            window = [0] * 7
            out.thresholds.append(state.aggressiveness.threshold)
            next_round += EVAL.control_s
        if kind == 3:  # the registry's notification of a push (coordinator: POST /v1/registry/events)
            if prefetch:
                push = trace.pushes[i]
                out.pushes += fleet_starts.pushed(push.source, push.layers)
            continue
        agent = by_name[names[host]]
        if kind == 2:
            for d in trace.starts[i][1].layers:
                if d in pending[host]:
                    out.used += pending[host].pop(d)[0]
                if d in kept[host]:
                    kept[host].pop(d)
                    out.keeps_used += 1
            continue
        if kind == 0:
            start = trace.starts[i][1]
            have = await held_digests(stores[agent.name])
            local = all(built[d].digest in have for d in start.layers)
            layers = []
            for d in start.layers:
                at = warmed_at[host].get(d)
                present = built[d].digest in have
                layers.append(
                    {
                        "digest": d,
                        "bytes": built[d].size,
                        "local": present,
                        "sim_local": d in shadow[host].entries,
                        "warmed_at": at[0] if at else None,
                        "pending": d in pending[host],
                        "kept": d in kept[host],
                        # a warm whose layer is gone before its start: its lease ended unused (trace
                        # time) or the bound evicted it after the start that used it
                        "lost": None
                        if at is None or present
                        else ("lease ended" if ts - at[0] >= lease else "evicted"),
                        "kind": kinds.get(d, "?"),
                        "seen": "host" if d in seen_host[host] else ("fleet" if d in seen_fleet else "new"),
                    }
                )
            seen_fleet.update(start.layers)
            seen_host[host].update(start.layers)
            shadow[host].start(ts, start.layers, out.shadow, counted + 1 > args.warmup)
            t0 = time.perf_counter()
            cid = f"p{int(prefetch)}-{n}"
            # what a start does on a host: the image's missing layers fetched (peers first), then the task
            from_peers = from_registry = 0
            for attempt in range(3):
                pulled = await api(agent, "POST", "/v1/images/pull", {"ref": refs[start.signature]})
                from_peers += pulled["bytes_from_peers"]
                from_registry += pulled["bytes_fetched"] - pulled["bytes_from_peers"]
                try:
                    await api(
                        agent,
                        "POST",
                        "/v1/containers?start=1",
                        {"id": cid, "image": refs[start.signature], "args": ["/bin/true"]},
                        expect=201,
                    )
                    break
                except AssertionError as exc:
                    # an eviction between the pull and the create (the agent's periodic check keeps
                    # recently used images since it happened once under load): pulled again, counted
                    if "image_not_found" not in str(exc) or attempt == 2:
                        raise
                    out.evicted_before_create += 1
            elapsed = time.perf_counter() - t0
            await api(agent, "DELETE", f"/v1/containers/{cid}?force=1", expect=None)
            for d in start.layers:
                if d in pending[host]:
                    size, _ = pending[host].pop(d)
                    out.used += size
                    window[2] += 1
                    window[6] += size
                if d in kept[host]:
                    kept[host].pop(d)
                    out.keeps_used += 1
            # a used warm is an ordinary layer now (the image holds it), as in the cache simulation
            await end_leases(host, [d for d in start.layers if d in leases[host]], collect=False)
            window[3] += 1
            window[4] += local
            hosts[host].add(start, fleet_starts)
            counted += 1
            out.records.append(
                {
                    "kind": "start",
                    "ts": ts,
                    "host": host,
                    "signature": start.signature,
                    "local": local,
                    "sim_local": all(x["sim_local"] for x in layers),
                    "counted": counted > args.warmup,
                    "seconds": elapsed,
                    "from_peers": from_peers,
                    "from_registry": from_registry,
                    "layers": layers,
                }
            )
            if counted > args.warmup:
                out.sim.starts += 1
                out.sim.all_local += local
                out.sim.hits.append((ts, local))
                out.latencies.append(elapsed)
                out.fetched.append(sum(built[d].size for d in start.layers if built[d].digest not in have))
                out.sources.append((from_peers, from_registry, elapsed))
            continue
        if not prefetch:
            continue
        t0 = time.perf_counter()
        scored = predictor.host_layers(hosts[host], fleet_starts, ts)
        out.predict_ms.append(1e3 * (time.perf_counter() - t0))
        agg = state.aggressiveness
        budget = min(EVAL.budget_bytes, warm_budget(LINK, 0.0, EVAL.tick_s, agg.bandwidth_share)) // args.scale
        # as in the cache simulation: warms (and here keeps) under lease hold at most half the cache
        room = int(EVAL.max_pending_share * bound) - sum(size for size, _ in pending[host].values())
        room -= sum(size for size, _ in kept[host].values())
        candidates = [
            Candidate(s.digest, s.probability, built[s.digest].size, s.lease_probability)
            for s in scored
            if s.digest in built
        ]
        have = await held_digests(stores[agent.name])
        held = {d for d in built if built[d].digest in have}
        # what the other hosts hold, as the coordinator knows it from their registrations: a layer
        # none of them holds comes from the registry when a start misses it (warming.plan's lower bar)
        elsewhere: set[str] = set()
        for other in mesh.hosts:
            if other is not agent:
                elsewhere |= await held_digests(stores[other.name])
        on_peers = {d for d in built if built[d].digest in elsewhere}
        # keeps first in the room: a layer the host holds kept from the bound costs no bandwidth
        for c in keep(candidates, held, set(kept[host]) | set(pending[host]), agg, room, on_peers=on_peers):
            body = {"ref": layer_ref[c.digest], "ttl": AGENT_TTL, "model": predictor.version}
            try:
                answer = await api(agent, "POST", f"/v1/prefetch/layers/{built[c.digest].digest}", body, expect=200)
            except AssertionError as exc:
                print(f"  keep failed: {exc}", flush=True)
                continue
            leases[host][c.digest] = answer["lease"]
            if not answer["kept"]:  # collected between the listing and the request: fetched again
                out.failed_warms += 1
            kept[host][c.digest] = (c.size, ts + lease)
            room -= c.size
            out.kept += 1
            out.kept_bytes += c.size
            out.records.append(
                {"kind": "keep", "ts": ts, "host": host, "digest": c.digest, "bytes": c.size,
                 "probability": c.probability, "threshold": agg.threshold}
            )  # fmt: skip
        budget = min(budget, room)
        for c in plan(
            candidates, held, set(pending[host]), agg, budget, max_expected_waste=limits.max_waste, on_peers=on_peers
        ):
            # The bench ends each lease itself on trace time (used, or 1 trace hour unused): a lease
            # in wall seconds scaled from trace time ended early whenever a trace hour took longer
            # on the wall than planned (load, slower pulls). The agent's TTL only bounds a lease the
            # bench leaves behind.
            body = {"ref": layer_ref[c.digest], "ttl": AGENT_TTL, "model": predictor.version}
            out.warm_requests += 1
            try:
                warmed = await api(agent, "POST", f"/v1/prefetch/layers/{built[c.digest].digest}", body, expect=200)
                leases[host][c.digest] = warmed["lease"]
            except AssertionError as exc:
                out.failed_warms += 1
                print(f"  warm failed: {exc}", flush=True)
            pending[host][c.digest] = (c.size, ts + lease)
            warmed_at[host][c.digest] = (ts, time.perf_counter())
            shadow[host].warm(ts, [c.digest], EVAL, out.shadow, replace(agg, max_layers=1))
            out.records.append(
                {
                    "kind": "warm",
                    "ts": ts,
                    "host": host,
                    "digest": c.digest,
                    "bytes": c.size,
                    "probability": c.probability,
                    "lease_probability": c.lease_probability,
                    "threshold": agg.threshold,
                }
            )
            out.warmed += c.size
            window[0] += c.size
            window[5] += 1
    for digests in pending.values():  # still pending at the end: not used either
        out.wasted += sum(size for size, _ in digests.values())
    out.keeps_ended += sum(len(digests) for digests in kept.values())  # not used either
    for host, held_leases in leases.items():  # no lease outlives its pass
        await end_leases(host, list(held_leases), collect=False)
    out.wall_s = time.perf_counter() - wall0
    return out


def breakdown(res: PassResult) -> dict[str, int]:
    """The counted starts by what they found, and each layer a start missed by why."""
    out: dict[str, int] = {}

    def count(key: str) -> None:
        out[key] = out.get(key, 0) + 1

    for r in res.records:
        if r["kind"] != "start" or not r["counted"]:
            continue
        count(f"starts local={r['local']} sim_local={r['sim_local']}")
        for la in r["layers"]:
            if la["local"]:
                count("layers local, warmed and pending" if la["pending"] else "layers local")
            elif la["lost"]:
                count(f"layers missed: warmed, then {la['lost']}")
            else:
                count("layers missed, not warmed" + (" (in the sim's cache)" if la["sim_local"] else ""))
    return dict(sorted(out.items()))


def missed_bytes(res: PassResult) -> dict[str, dict[str, float]]:
    """The mean bytes (MB) a counted start fetched, by why each missing layer was missing and by the
    layer's kind: a warm policy can only save what was not new to the fleet."""
    out: dict[str, dict[str, float]] = {}
    starts = 0
    for r in res.records:
        if r["kind"] != "start" or not r["counted"]:
            continue
        starts += 1
        for la in r["layers"]:
            if la["local"]:
                continue
            if la["lost"]:
                why = f"warmed, then {la['lost']}"
            else:
                why = {
                    "new": "not warmed, new to the fleet",
                    "fleet": "not warmed, new to the host",
                    "host": "not warmed, the host ran it before (evicted)",
                }[la["seen"]]
            row = out.setdefault(why, {})
            row[la["kind"]] = row.get(la["kind"], 0.0) + la["bytes"]
    return {
        why: {kind: round(b / 1e6 / max(1, starts), 2) for kind, b in sorted(row.items())}
        for why, row in sorted(out.items())
    }


def by_source(res: PassResult) -> dict[str, Any]:
    """The counted starts by where their bytes came from: all local, peers only, some from the
    registry; per group the count, the mean MB from peers and from the registry, the median seconds;
    and the registry and peer MB per start over all."""
    groups: dict[str, list[tuple[int, int, float]]] = {"local": [], "peers only": [], "registry": []}
    for peer, registry, seconds in res.sources:
        groups["registry" if registry else "peers only" if peer else "local"].append((peer, registry, seconds))
    n = max(1, len(res.sources))
    return {
        "registry_mb_per_start": round(sum(r for _, r, _ in res.sources) / 1e6 / n, 2),
        "peer_mb_per_start": round(sum(p for p, _, _ in res.sources) / 1e6 / n, 2),
        **{
            name: {
                "starts": len(rows),
                "peer_mb": round(statistics.mean(p for p, _, _ in rows) / 1e6, 2),
                "registry_mb": round(statistics.mean(r for _, r, _ in rows) / 1e6, 2),
                "median_s": round(statistics.median(t for _, _, t in rows), 3),
            }
            for name, rows in groups.items()
            if rows
        },
    }


def retrained(
    trace: Trace, begin: float, end: float, first: Path, args: argparse.Namespace, workdir: Path
) -> list[tuple[float, LayerPredictor]]:
    """The coordinator's retraining rounds (coordinator/warm_retraining.py) every `--retrain-every`
    trace hours from the window's start: the starts recorded before each round, the same child
    (models/prefetch/retrain.py) and the same verdict against the model served then. Their inputs
    are the trace's, not the live pass's, so they run before the passes (a round takes 20-60 s of
    wall time, longer than the agents' leases in wall seconds). (trace time, model) per swap."""
    out: list[tuple[float, LayerPredictor]] = []
    served = first
    for k, t in enumerate(np.arange(begin, end, 3600 * args.retrain_every).tolist()):
        starts = [
            StartRecord(
                host=h, ts=s.ts, signature=s.signature, layers=s.layers, sizes=tuple(trace.sizes[d] for d in s.layers)
            )
            for h, s in trace.starts
            if s.ts < t
        ]
        data, judged, candidate = (
            workdir / f"starts-{k}.json",
            workdir / f"verdict-{k}.json",
            workdir / f"warm-{k}.onnx",
        )
        data.write_text(json.dumps(recorded(starts)))
        run_training(
            "models.prefetch.retrain",
            [
                *("--recorded", str(data), "--current", str(served), "--out", str(candidate), "--verdict", str(judged)),
                *("--holdout", f"{3600 * args.retrain_holdout_h:g}", "--model-version", f"warm-bench-{k}"),
            ],
            timeout=1800.0,
        )
        figures = json.loads(judged.read_text())
        ok, why = verdict(figures["candidate"], figures["active"], EVAL.max_waste)
        print(
            f"retraining at {(t - trace.shift_ts) / 3600:+.1f} h from the shift: {'swap' if ok else 'keep'}; {why}",
            flush=True,
        )
        if ok:
            served = candidate
            out.append((t, LayerPredictor.load(candidate)))
    return out


def model_ms(predictor: LayerPredictor, trace: Trace, samples: int = 200) -> list[float]:
    """The model alone per host decision: one run over a host's candidates' feature rows."""
    fleet_starts, state = FleetStarts(), HostStarts()
    host = trace.hosts[0]
    out = []
    starts = [s for h, s in trace.starts if h == host]
    step = max(1, len(starts) // samples)
    for k, s in enumerate(starts):
        state.add(s, fleet_starts)
        if k % step == 0 and k > 20:
            X = state.features(s.ts + 1.0, state.candidates(s.ts + 1.0, fleet_starts), fleet_starts)
            t0 = time.perf_counter()
            predictor.predict(X)
            out.append(1e3 * (time.perf_counter() - t0))
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=20261231, help="the trace's seed (not the card's)")
    parser.add_argument("--before-h", type=float, default=3.0, help="trace hours replayed before the shift")
    parser.add_argument("--after-h", type=float, default=9.0, help="trace hours replayed after the shift")
    parser.add_argument("--scale", type=int, default=4, help="layer bytes = trace bytes / scale")
    parser.add_argument("--cache-share", type=float, default=0.6)
    parser.add_argument("--prime-h", type=float, default=2.0, help="trace hours of starts pulled before a pass")
    parser.add_argument("--warmup", type=int, default=5, help="starts of a pass not counted")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--rate", default="100mbit")
    parser.add_argument(
        "--retrain-every", type=float, default=2.0, help="trace hours between retraining rounds (0: none)"
    )
    parser.add_argument("--retrain-holdout-h", type=float, default=3.0, help="trace hours a round holds out")
    parser.add_argument(
        "--pushes",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the registry's pushes of released images reach the coordinator (models/prefetch/README.md)",
    )
    parser.add_argument("--record", type=Path, help="write every start and warm of every pass here (JSON lines)")
    args = parser.parse_args()

    predictor = LayerPredictor.load(MODEL)
    trace = generate(TraceSpec(REGIMES["eval"], args.seed, n_hosts=3, days=2.0))
    begin, end = trace.shift_ts - 3600 * args.before_h, trace.shift_ts + 3600 * args.after_h
    replay = Replay.of(trace, begin, end, EVAL.tick_s, predictor.info.lease, args.pushes)
    window_starts = [s for _, s in trace.starts if begin <= s.ts < end]
    used = {d for s in window_starts for d in s.layers}
    # candidates may name layers used before the window: build those too (they can be warmed)
    used |= {d for _, s in trace.starts if s.ts < end for d in s.layers}
    built = {d: layer_for(d, trace.sizes[d], args.scale) for d in sorted(used)}
    sizes = {d: built[d].size for d in built}
    bound = int(args.cache_share * working_set(trace, trace.hosts, begin, end, sizes))
    sigs = sorted({s.signature: s.layers for _, s in trace.starts if s.ts < end}.items())
    print(
        f"{trace.spec.data_version()}: {len(window_starts)} starts in {args.before_h + args.after_h:g} trace hours "
        f"around the shift, {len(sigs)} signatures, {len(built)} layers, {sum(sizes.values()) / 1e6:.0f} MB "
        f"(trace bytes / {args.scale}); cache bound {bound / 1e6:.1f} MB per host; registry at {args.rate}",
        flush=True,
    )

    async def all_sharing(mesh: Mesh) -> None:
        for host in mesh.hosts:
            host.settings["sharing"] = dict(SHARING)

    def cache_table(_: MeshHost) -> str:
        return f"\n[cache]\nmax_bytes = {bound}\nlow_watermark = 1.0\ninterval = 5.0\n"

    # what the window allows at this bound, in the cache simulation (trace bytes): no prefetching, an
    # oracle that warms the host's next start, and warms that know the generator's workflows and crons
    catalog = make_catalog(trace.spec)
    rankers = {
        "none": None,
        "oracle": oracle_ranker(trace, 1, predictor.info.lease),
        "structure": structure_ranker(trace, catalog.successors(), catalog.crons()),
    }
    ceilings = {}
    for name, ranker in rankers.items():
        sim = replay_window(
            trace, begin, end, bound * args.scale, trace.sizes, ranker, EVAL,
            prime_s=3600 * args.prime_h, warmup=args.warmup,
        )  # fmt: skip
        ceilings[name] = {"hit_rate": round(sim.hit_rate, 3), "waste": round(sim.waste, 3)}
    print(f"the window at this bound, simulated: {json.dumps(ceilings)}", flush=True)
    results: dict[str, list[PassResult]] = {"on": [], "off": []}
    models = Path(tempfile.mkdtemp(prefix="ferryman-bench-prefetch-"))
    t0 = time.perf_counter()
    try:
        swaps = retrained(trace, begin, end, MODEL, args, models) if args.retrain_every > 0 else []
    finally:
        shutil.rmtree(models, ignore_errors=True)  # the swapped models are loaded already
    print(f"retraining rounds: {len(swaps)} swaps in {time.perf_counter() - t0:.0f} s", flush=True)
    busybox = busybox_layer()
    async with (
        scratch_dir() as base,
        fleet(base, hosts=3, idle_timeout=60.0, before_agents=all_sharing, extra_config=cache_table) as mesh,
    ):
        refs: dict[str, str] = {}
        layer_ref: dict[str, str] = {}
        t0 = time.perf_counter()
        for k, (sig, layers) in enumerate(sigs):
            await (
                ImageBuilder([busybox, *(built[d] for d in layers)])
                .build()
                .push(mesh.push_host, f"bench/sig-{k}", "v1")
            )
            refs[sig] = mesh.image_ref(f"bench/sig-{k}", "v1")
            for d in layers:
                layer_ref.setdefault(d, refs[sig])
        print(f"pushed {len(sigs)} images in {time.perf_counter() - t0:.0f} s", flush=True)
        await mesh.shape_registry(args.rate)
        digests = [str(layer.digest) for layer in built.values()]
        stores = {h.name: await Containerd.connect(h.containerd.socket, h.containerd.namespace) for h in mesh.hosts}
        for r in range(args.rounds):
            for side in ("on", "off") if r % 2 == 0 else ("off", "on"):
                await forget_all(mesh, stores, digests)
                await prime(mesh, replay, refs, args.prime_h)
                t0 = time.perf_counter()
                res = await run_pass(
                    mesh, replay, side == "on", refs, layer_ref, built, predictor, bound, args, stores, swaps
                )
                results[side].append(res)
                if args.record:
                    with args.record.open("a") as f:
                        for rec in res.records:
                            f.write(json.dumps({"round": r + 1, "side": side, **rec}) + "\n")
                print(
                    f"round {r + 1} {side}: {res.sim.all_local}/{res.sim.starts} all local, mean start "
                    f"{statistics.mean(res.latencies):.2f} s, warmed {res.warmed / 1e6:.1f} MB "
                    f"({res.warm_requests} requests, {res.failed_warms} failed; {res.pushes} pushes taken as "
                    f"releases), used {res.used / 1e6:.1f} MB, "
                    f"wasted {res.wasted / 1e6:.1f} MB; kept {res.kept} held layers ({res.kept_bytes / 1e6:.1f} MB: "
                    f"{res.keeps_used} used, {res.keeps_ended} lease ended unused); "
                    f"{res.evicted_before_create} images evicted between "
                    f"pull and create; {time.perf_counter() - t0:.0f} s "
                    f"({res.wall_s / (args.before_h + args.after_h):.0f} s of wall time per trace hour)",
                    flush=True,
                )
                print(
                    f"  the cache simulation on the same starts and warms: {res.shadow.all_local}/"
                    f"{res.shadow.starts} all local; {json.dumps(breakdown(res))}",
                    flush=True,
                )
                print(f"  MB a start fetched, by why and by layer kind: {json.dumps(missed_bytes(res))}", flush=True)
                print(f"  starts by where their bytes came from: {json.dumps(by_source(res))}", flush=True)
        for store in stores.values():  # before the mesh stops its containerds
            await store.close()

    def share(side: str) -> float:
        return sum(r.sim.all_local for r in results[side]) / max(1, sum(r.sim.starts for r in results[side]))

    on, off = results["on"], results["off"]
    warmed = sum(r.warmed for r in on)
    waste = sum(r.wasted for r in on) / warmed if warmed else 0.0
    latency = statistics.mean(x for r in on for x in r.latencies) / statistics.mean(x for r in off for x in r.latencies)
    rec_on = [recovery(r.sim, trace.shift_ts) for r in on]
    rec_off = [recovery(r.sim, trace.shift_ts) for r in off]
    predict = [x for r in on for x in r.predict_ms]
    alone = model_ms(predictor, trace)
    thresholds = [t for r in on for t in r.thresholds]
    print(
        json.dumps(
            {
                "share_on": share("on"),
                "share_off": share("off"),
                "simulated": ceilings,
                "waste": waste,
                "latency_ratio": latency,
                "keeps": {
                    "kept": sum(r.kept for r in on),
                    "kept_mb": sum(r.kept_bytes for r in on) / 1e6,
                    "used": sum(r.keeps_used for r in on),
                    "lease_ended": sum(r.keeps_ended for r in on),
                },
                "fetched_ratio": statistics.mean(x for r in on for x in r.fetched)
                / statistics.mean(x for r in off for x in r.fetched),
                "recovery_on": rec_on,
                "recovery_off": rec_off,
                "threshold_p10_p50_p90": np.quantile(thresholds, [0.1, 0.5, 0.9]).round(3).tolist()
                if thresholds
                else [],
                "decision_ms_median": statistics.median(predict) if predict else None,
                "model_ms_median": statistics.median(alone),
                "model_ms_p99": float(np.percentile(alone, 99)),
            }
        )
    )
    print(f"without prefetch: {share('off'):.3f} of cold starts with every layer local (same run)")
    print(f"prefetch waste: {waste:.3f} wasted / warmed bytes (target <= 0.25)")
    fetched = statistics.mean(x for r in on for x in r.fetched) / statistics.mean(x for r in off for x in r.fetched)
    print(f"mean start latency with / without prefetch: {latency:.3f} (target <= 0.5)")
    print(
        f"mean bytes a start fetched with / without prefetch: {fetched:.3f} "
        f"({statistics.mean(x for r in on for x in r.fetched) / 1e6:.1f} / "
        f"{statistics.mean(x for r in off for x in r.fetched) / 1e6:.1f} MB)"
    )
    registry_mb = {side: statistics.mean(x[1] for r in results[side] for x in r.sources) / 1e6 for side in results}
    print(
        f"registry MB a start fetched with / without prefetch: {registry_mb['on']:.2f} / {registry_mb['off']:.2f} "
        f"(peers: {statistics.mean(x[0] for r in on for x in r.sources) / 1e6:.2f} / "
        f"{statistics.mean(x[0] for r in off for x in r.sources) / 1e6:.2f})"
    )
    print(
        "recovery after the mix shift: "
        + ", ".join(f"{x['starts_to_recover']} starts (before {x['hit_rate_before']:.2f})" for x in rec_on)
        + f" with prefetch, {', '.join(str(x['starts_to_recover']) for x in rec_off)} without (target <= 50)"
    )
    for side, passes in (("with", on), ("without", off)):
        runs = ["/".join(f"{x:.2f}" for x in windows_after(r.sim, trace.shift_ts)) for r in passes]
        print(f"  all local in each run of 50 starts after the shift, {side} prefetch: {', '.join(runs)}")
    print(
        f"predictor per host decision: model {statistics.median(alone):.3f} ms median "
        f"({float(np.percentile(alone, 99)):.3f} ms p99, target <= 1 ms); with features "
        f"{statistics.median(predict) if predict else float('nan'):.3f} ms median"
    )
    print(f"bench prefetch: {share('on'):.3f} ratio (target >= 0.6)")


if __name__ == "__main__":
    asyncio.run(main())
