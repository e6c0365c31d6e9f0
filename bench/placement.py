"""Cost-aware placement of new containers against Kubernetes' ImageLocality rule, on a 4-host fleet.

The fleet: 4 agents serving their blobs to each other, a coordinator (the layer tracker, the cost
model), the registry behind 100 Mbit/s (tc tbf on the mesh bridge: hosts talk to each other
unshaped). The workload: 40 task starts (a fixed seed) over 16 compositions, each busybox + one of 3
base layers (64, 48 and 32 MiB) + one of 2 middle layers (8 MiB) + its own top layer (2 MiB), all
incompressible, each layer in an image of its own; the popular compositions come more often
(weights 1/sqrt(rank)). Tasks keep running until the run ends, each with a 160 MiB limit: a host
(2 GiB) admits 12, so both placements must spread the 40 (the baseline filters full hosts first,
as kube-scheduler's NodeResourcesFit does; the coordinator's placement is refused by a full agent).

  ferryman: `POST /v1/containers` on the coordinator (placed by the least predicted time to
            running: every missing layer at the host's measured rate from the cheapest holder, plus
            applying it, plus the start), created there by its agent.
  baseline: the ImageLocality rule (kube-scheduler's image_locality.go): the host that already holds
            the image by name scores its size scaled by the share of hosts holding it, clamped to
            23 MB-1000 MB; ties (no host has it) go round-robin, as the least-allocated spread of
            identical idle hosts would; the task is created on that host's agent directly, which
            pulls what it lacks from the registry, as a kubelet does ([sharing] min_peer_size above
            every layer on every host during this run).
  baseline-peers: the same rule with ferryman's peer sharing left on: what placement alone
            changes (printed in the text, not in the result line).

The bench's client keeps one HTTPS connection to the coordinator for the run (the baseline's calls
go to each agent's local socket, without TLS); the time a new mutual-TLS connection would add to
each start is printed first.

The same starting caches: before each run every host forgets every composition image and layer
(the registry's page cache is warmed once first). The runs alternate (`--rounds`, the order flips
each round). Time to running is measured at
the client, from the request to the answer that the container runs.

Result lines:
  bench placement: <ferryman mean time to running / baseline's> ratio (target <= 0.5)
  bench placement-error: <mean absolute percentage error of predicted vs measured> % (target <= 25)

Per ferryman task the bench prints the host, the measured and predicted seconds, the prediction's
parts and the coordinator's own timings (place and reserve, the agent's create, the release); per
baseline task the host and the seconds.

`--lifetime N`: each task finishes once N later tasks have started (removed, untimed, on both
sides), as batch tasks do; at most N run at once, so capacity no longer forces the bases apart.

Per task (both sides) it prints where the agent's time went: resolving the composition, each fetch
(source, size, seconds), the applies, the create and the start; `--record FILE` writes all of it,
with the predictions and every candidate's, as JSON.

Run as root from the repo: .venv/bin/python bench/placement.py [--rounds 1] [--tasks 40] [--rate 100mbit]
    [--lifetime N] [--record FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import itertools
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness.containerd import scratch_dir
from tests.harness.fleet import CoordinatedFleet, api, coordinated_fleet
from tests.harness.images import ImageBuilder, Layer, busybox_layer, random_layer
from tests.harness.mesh import Mesh, MeshHost
from tests.harness.netns import acall_in_netns

MIB = 1 << 20
BASES = {"base0": 64, "base1": 48, "base2": 32}
MIDS = {"mid0": 8, "mid1": 8}
TOP_MIB = 2
COMPOSITIONS = 16
TASK_MEMORY = 160 * MIB
"""Each task's memory limit: a host's 2 GiB admit 12 running tasks, so 40 must spread."""
TASKS_PER_HOST = 12
SHARING: dict[str, Any] = {"stall_timeout": 10.0}
REGISTRY_ONLY: dict[str, Any] = {**SHARING, "min_peer_size": 1 << 40}
MIN_LOCALITY, MAX_LOCALITY = 23 * MIB, 1000 * MIB
"""kube-scheduler's ImageLocality thresholds (minThreshold, maxContainerThreshold)."""


def layers() -> dict[str, Layer]:
    out = {"busybox": busybox_layer()}
    for seed, (name, mib) in enumerate([*BASES.items(), *MIDS.items()]):
        out[name] = random_layer(mib * MIB, seed=100 + seed, file_size=4 * MIB, compression="none")
    for i in range(COMPOSITIONS):
        out[f"top{i}"] = random_layer(TOP_MIB * MIB, seed=200 + i, file_size=MIB, compression="none")
    return out


def composition(i: int, refs: dict[str, str], built: dict[str, Layer]) -> dict[str, Any]:
    """Composition i: busybox, base i % 3, mid i % 2, top i."""
    chain = ["busybox", f"base{i % len(BASES)}", f"mid{i % len(MIDS)}", f"top{i}"]
    return {
        "version": 1,
        "name": f"task{i}",
        "config": {"Cmd": ["/bin/sleep", "600"]},
        "nodes": [{"id": n, "ref": refs[n], "digest": built[n].digest, "size": built[n].size} for n in chain],
        "edges": [{"node": upper, "depends_on": lower} for lower, upper in itertools.pairwise(chain)],
    }


def workload(tasks: int, seed: int = 7) -> list[int]:
    """Which composition each task runs: composition k has weight 1 / sqrt(k + 1)."""
    rng = random.Random(seed)
    weights = [1 / (k + 1) ** 0.5 for k in range(COMPOSITIONS)]
    return rng.choices(range(COMPOSITIONS), weights=weights, k=tasks)


async def forget_all(mesh: Mesh, digests: list[str]) -> None:
    """Every host back to the same empty cache: no composition image, no layer blob."""
    for host in mesh.hosts:
        names = (await host.actr("images", "ls", "-q")).stdout.split()
        for name in names:
            await host.actr("images", "rm", "--sync", name)
        held = set((await host.actr("content", "ls", "-q")).stdout.split())
        left = [d for d in digests if d in held]
        if left:
            await host.actr("content", "rm", *left)


async def images_by_host(mesh: Mesh) -> dict[str, dict[str, int]]:
    """Each host's images by name with their sizes (what the kubelet reports in the node status)."""
    out: dict[str, dict[str, int]] = {}
    for host in mesh.hosts:
        listed = (await api(host, "GET", "/v1/images"))["images"]
        out[host.name] = {i["name"]: int(i.get("size", 0)) for i in listed}
    return out


def image_locality(name: str, held: dict[str, dict[str, int]], hosts: list[str], turn: int) -> str:
    """The host ImageLocality prefers for image `name`; round-robin among equal scores."""
    having = [h for h in hosts if name in held[h]]
    spread = len(having) / len(hosts)

    def score(host: str) -> float:
        if host not in having:
            return 0.0
        size = held[host][name] * spread
        return (min(max(size, MIN_LOCALITY), MAX_LOCALITY) - MIN_LOCALITY) / (MAX_LOCALITY - MIN_LOCALITY) + 1e-9

    best = max(score(h) for h in hosts)
    tied = [h for h in hosts if score(h) == best]
    return tied[turn % len(tied)]


async def remove(host: MeshHost, cid: str) -> None:
    await api(host, "DELETE", f"/v1/containers/{cid}?force=1", expect=None)


async def finish(running: list[tuple[MeshHost, str]], n: int, lifetime: int) -> None:
    """With a lifetime, task n - lifetime has run its course: removed (untimed) before task n starts."""
    if lifetime and n >= lifetime:
        host, cid = running[n - lifetime]
        await remove(host, cid)


def spent(assembly: dict[str, Any]) -> str:
    """Where a start's time went on its agent: resolving the composition (the registry's manifests
    and configs), each fetch (source, MB, seconds), the applies, the container's create and start."""
    if not assembly:
        return "(no assembly timings)"
    events = assembly.get("timeline", [])
    fetches = [e for e in events if e["event"] == "fetched"]
    applies = [e for e in events if e["event"] == "applied"]
    last_fetch = max((e["at"] for e in fetches), default=0.0)
    fetched = ", ".join(
        f"{e['source'].split('/')[0]} {e['bytes'] / 1e6:.0f} MB {e['seconds']:.2f} s" for e in fetches if e.get("bytes")
    )
    return (
        f"resolve {assembly.get('resolve_seconds', 0):.2f}, fetches [{fetched}] done at {last_fetch:.2f}, "
        f"applies {sum(e.get('seconds', 0) for e in applies):.2f} "
        f"(runnable at {assembly.get('runnable_seconds', 0):.2f}), "
        f"assembly {assembly.get('seconds', 0):.2f}, create {assembly.get('create_seconds', 0):.2f}, "
        f"start {assembly.get('start_seconds', 0):.2f}"
    )


class KeptCoordinator:
    """One HTTPS connection to the coordinator for the run, as a client submitting tasks keeps one.
    The baseline's calls go to the agent's local socket without TLS; a new mutual-TLS connection per
    start (what `CoordinatedFleet.call` makes: a certificate loaded, a handshake) would charge
    ferryman's starts for the bench's client (`main` prints what each costs here)."""

    def __init__(self, f: CoordinatedFleet) -> None:
        self._f = f
        self._conn: http.client.HTTPSConnection | None = None

    def _blocking(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        for attempt in range(2):
            if self._conn is None:
                ctx = self._f.pki.client_ssl(self._f.operator)
                self._conn = http.client.HTTPSConnection(
                    self._f.coordinator.host, self._f.coordinator.port, timeout=30, context=ctx
                )
            try:
                self._conn.request(method, path, body=payload, headers=headers)
                resp = self._conn.getresponse()
                raw = resp.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                # The coordinator closed the idle connection before reading this request: once more.
                self._conn.close()
                self._conn = None
                if attempt:
                    raise
                continue
            if raw and (resp.getheader("Content-Type") or "").startswith("application/json"):
                return resp.status, json.loads(raw)
            return resp.status, raw.decode(errors="replace")
        raise AssertionError("unreachable")

    async def call(self, method: str, path: str, body: Any = None, expect: int | None = 200) -> Any:
        # Each call in a thread that joined the fabric netns (a reconnect happens there too).
        status, data = await acall_in_netns(self._f.mesh.fabric.netns, self._blocking, method, path, body)
        if expect is not None and status != expect:
            raise AssertionError(f"{method} {path}: {status} {data}")
        return data

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


async def request_seconds(call: Any, times: int = 10) -> float:
    """The mean seconds of a small coordinator request (GET /v1/hosts) through `call`."""
    started = time.perf_counter()
    for _ in range(times):
        await call("GET", "/v1/hosts")
    return (time.perf_counter() - started) / times


async def run_ferryman(
    f: KeptCoordinator,
    mesh: Mesh,
    order: list[int],
    comps: list[dict[str, Any]],
    lifetime: int = 0,
    record: list[dict[str, Any]] | None = None,
) -> list[tuple[float, float]]:
    """(measured, predicted) seconds to running per task."""
    out = []
    running: list[tuple[MeshHost, str]] = []
    for n, k in enumerate(order):
        await finish(running, n, lifetime)
        cid = f"fm{n}"
        started = time.perf_counter()
        spec = {"id": cid, "composition": comps[k], "resources": {"memory": TASK_MEMORY}}
        answer = await f.call("POST", "/v1/containers", {"container": spec}, expect=201)
        measured = time.perf_counter() - started
        predicted = answer["placement"]["predicted"]
        out.append((measured, float(predicted["seconds"])))
        assembly = answer["container"].get("assembly", {})
        print(
            f"  task {n} comp {k} -> {predicted['host']}: {measured:.2f} s, predicted {predicted['seconds']:.2f} s "
            f"(fetch {predicted['fetch_seconds']:.2f} incl. overhead {predicted.get('latency_seconds', 0):.2f}, "
            f"apply {predicted['apply_seconds']:.2f}, "
            f"peers {predicted['bytes_from_peers'] / 1e6:.0f} MB, "
            f"registry {predicted['bytes_from_registry'] / 1e6:.0f} MB, start {predicted['start_seconds']:.2f}, "
            f"measured rates: {predicted['measured']}; coordinator: place {answer['place_seconds']:.2f}, "
            f"create {answer['create_seconds']:.2f}, release {answer['release_seconds']:.2f})",
            flush=True,
        )
        print(f"    measured: {spent(assembly)}", flush=True)
        if record is not None:
            record.append(
                {
                    "side": "ferryman",
                    "task": n,
                    "comp": k,
                    "host": predicted["host"],
                    "measured": measured,
                    "predicted": predicted,
                    "candidates": answer["placement"]["candidates"],
                    "coordinator": {key: answer[key] for key in ("place_seconds", "create_seconds", "release_seconds")},
                    "assembly": assembly,
                }
            )
        running.append((mesh[answer["placement"]["host"]], cid))
    for host, cid in running[max(0, len(running) - lifetime) if lifetime else 0 :]:
        await remove(host, cid)
    return out


async def run_baseline(
    mesh: Mesh,
    order: list[int],
    comps: list[dict[str, Any]],
    lifetime: int = 0,
    side: str = "baseline",
    record: list[dict[str, Any]] | None = None,
) -> list[float]:
    out = []
    hosts = [h.name for h in mesh.hosts]
    placed: dict[str, str] = {}  # composition name -> the image name its assembly recorded
    running: list[tuple[MeshHost, str]] = []
    for n, k in enumerate(order):
        await finish(running, n, lifetime)
        live = running[max(0, n - lifetime + 1) :] if lifetime else running
        cid = f"bl{n}"
        held = await images_by_host(mesh)
        name = placed.get(comps[k]["name"], "")
        # NodeResourcesFit first (the agent admits 12 tasks' limits in its 2 GiB, as it does for
        # the coordinator's placements), then ImageLocality.
        fits = [h for h in hosts if sum(1 for t, _ in live if t.name == h) < TASKS_PER_HOST]
        target = image_locality(name, held, fits, n)
        spec = {"id": cid, "composition": comps[k], "resources": {"memory": TASK_MEMORY}}
        started = time.perf_counter()
        summary = await api(mesh[target], "POST", "/v1/containers?start=1", spec, expect=201)
        out.append(time.perf_counter() - started)
        print(
            f"  {side} task {n} comp {k} -> {target}: {out[-1]:.2f} s; {spent(summary.get('assembly', {}))}", flush=True
        )
        if record is not None:
            record.append(
                {
                    "side": side,
                    "task": n,
                    "comp": k,
                    "host": target,
                    "measured": out[-1],
                    "assembly": summary.get("assembly"),
                }
            )
        placed[comps[k]["name"]] = summary["image"]
        running.append((mesh[target], cid))
    for host, cid in running[max(0, len(running) - lifetime) if lifetime else 0 :]:
        await remove(host, cid)
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--tasks", type=int, default=40)
    parser.add_argument("--rate", default="100mbit")
    parser.add_argument(
        "--lifetime",
        type=int,
        default=0,
        help="each task finishes (is removed, untimed) when this many later tasks have started; 0 (the"
        " default): every task runs until the run ends, so the 12-per-host capacity forces spreading",
    )
    parser.add_argument("--record", type=Path, help="write every task's timings here (JSON), for analysis")
    args = parser.parse_args()
    record: list[dict[str, Any]] | None = [] if args.record else None

    built = layers()
    order = workload(args.tasks)
    fm_times: list[float] = []
    bl_times: list[float] = []
    peer_times: list[float] = []
    errors: list[float] = []
    async with scratch_dir() as base, coordinated_fleet(base, 4, sharing=SHARING) as f:
        mesh = f.mesh
        refs = {}
        for name, layer in built.items():
            await ImageBuilder([layer]).build().push(mesh.push_host, f"bench/layer-{name}", "v1")
            refs[name] = mesh.image_ref(f"bench/layer-{name}", "v1")
        comps = [composition(i, refs, built) for i in range(COMPOSITIONS)]
        digests = [layer.digest for layer in built.values()]
        await mesh.shape_registry(args.rate)
        print(
            f"{len(built)} layers, {sum(la.size for la in built.values()) / 1e6:.0f} MB; {COMPOSITIONS} compositions; "
            f"{args.tasks} tasks: {order}; registry at {args.rate}; "
            + (f"each task runs while the next {args.lifetime} start" if args.lifetime else "every task keeps running"),
            flush=True,
        )
        # The registry's page cache warm before anything is timed (the first run would pay for it).
        for ref in refs.values():
            await api(mesh["h1"], "POST", "/v1/images/pull", {"ref": ref})
        coordinator = KeptCoordinator(f)
        fresh, kept = await request_seconds(f.call), await request_seconds(coordinator.call)
        print(
            f"a small coordinator request: {1000 * fresh:.1f} ms on a new mutual-TLS connection, "
            f"{1000 * kept:.1f} ms on the kept one (ferryman's starts use the kept one)",
            flush=True,
        )
        for r in range(args.rounds):
            sides = ("ferryman", "baseline", "baseline-peers")
            for side in sides if r % 2 == 0 else sides[::-1]:
                await forget_all(mesh, digests)
                for host in mesh.hosts:
                    # A restart registers the host again: the coordinator sees the emptied cache.
                    host.settings["sharing"] = REGISTRY_ONLY if side == "baseline" else SHARING
                    await host.restart_agent()
                if side == "ferryman":
                    pairs = await run_ferryman(coordinator, mesh, order, comps, args.lifetime, record)
                    fm_times += [m for m, _ in pairs]
                    errors += [abs(p - m) / m for m, p in pairs]
                    mean = statistics.mean(m for m, _ in pairs)
                    mape = 100 * statistics.mean(abs(p - m) / m for m, p in pairs)
                    print(f"round {r + 1} ferryman: mean {mean:.2f} s to running, MAPE {mape:.0f} %", flush=True)
                else:
                    times = await run_baseline(mesh, order, comps, args.lifetime, side, record)
                    (bl_times if side == "baseline" else peer_times).extend(times)
                    print(f"round {r + 1} {side}: mean {statistics.mean(times):.2f} s to running", flush=True)
        coordinator.close()
    if args.record and record is not None:
        args.record.write_text(json.dumps(record, indent=1))
    print(
        f"placement alone (the baseline's rule with ferryman's peer sharing): ferryman / baseline-peers = "
        f"{statistics.mean(fm_times) / statistics.mean(peer_times):.3f}"
    )
    ratio = statistics.mean(fm_times) / statistics.mean(bl_times)
    print(f"bench placement: {ratio:.3f} ratio (target <= 0.5)")
    print(f"bench placement-error: {100 * statistics.mean(errors):.1f} % (target <= 25)")


if __name__ == "__main__":
    asyncio.run(main())
