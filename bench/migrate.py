"""Live migration vs stop-and-copy through containerd's own checkpoint, side by side on a 2-host mesh.

For each workload (memhog: N MiB resident, idle or rewriting R MB/s, a heartbeat every ms):
  stop-and-copy: `ctr c checkpoint --task --rw` on h1 (pause, CRIU dump into the content store),
                 kill the source, copy the checkpoint blobs to h2's containerd, `ctr c restore --live --rw`
  auto:          POST /v1/migrations mode=auto on h1's agent (the production default: the agent picks)
  precopy:       mode=precopy (pre-copy rounds, then stop-copy)
  lazy:          mode=lazy (post-copy: memory-less dump, the target runs at once, pages follow)
  hybrid:        mode=hybrid (pre-copy rounds, then post-copy)
Downtime is the longest gap the workload's own heartbeat saw (pre-copy freezes included); "released"
is when the source held nothing of the workload any more (for post-copy: after the last page).
Run as root from the repo: .venv/bin/python bench/migrate.py [--sizes 64,256,1024] [--rates 0,50]
  [--modes precopy,lazy,hybrid] [--result migrate|postcopy]
The result line (the last one):
  migrate:  ferryman's downtime with mode=auto / stop-and-copy's, 1024 MiB at 50 MB/s
  postcopy: the best explicit mode's downtime at 1024 MiB idle
Within each size and rate the baseline runs first in one cell and last in the next (the VM's
first-touch cost falls on both sides alike).
First, the target's image (--image-mib, 0 skips it): a memhog image (64 MiB resident) with one incompressible
layer of that size added, the registry behind --registry-rate (tc tbf, as in bench/p2p.py). Each
round, alternating the order, h2 forgets the image and then either pulls it from the registry (what
a target without the source's help would do) or receives a pre-copy migration from h1, whose
record says how long the target's image took and where from (image_ms, image_from).
No result line is printed when any run's memory check failed: the script exits 1 naming the runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.containerd import Containerd, ImageRecord
from tests.harness.containerd import scratch_dir
from tests.harness.fleet import api, fleet, memhog_gaps, memhog_status, migrate, verify_memory
from tests.harness.images import random_layer
from tests.harness.mesh import Mesh, MeshHost
from tests.harness.workloads import memhog_image

NS = "ferryman"
REGISTRY_ONLY = {"min_peer_size": 1 << 40}


async def start_workload(mesh: Mesh, host: MeshHost, name: str, ref: str) -> int:
    await api(host, "POST", "/v1/containers?start=1", {"id": name, "image": ref}, expect=201)
    await asyncio.sleep(2.0)  # past the initial fill, into the steady state
    return (await memhog_status(host, name, within=120)).max_gap_us


async def remove(host: MeshHost, name: str) -> None:
    await api(host, "DELETE", f"/v1/containers/{name}?force=1", expect=None)
    host.ctr("tasks", "kill", "-s", "KILL", name, check=False)
    host.ctr("tasks", "rm", "-f", name, check=False)
    host.ctr("containers", "rm", name, check=False)
    host.ctr("snapshots", "rm", name, check=False)


async def copy_checkpoint(src: MeshHost, dst: MeshHost, ref: str) -> int:
    """Copy the checkpoint image's blobs between the two containerds; returns the bytes copied."""
    a = await Containerd.connect(src.containerd.socket, NS)
    b = await Containerd.connect(dst.containerd.socket, NS)
    copied = 0
    try:
        record = await a.images.get(ref)
        index = json.loads(await a.content.read_all(record.digest))
        blobs = [(record.digest, record.size)] + [(m["digest"], m["size"]) for m in index.get("manifests", [])]
        async with b.leases.held("bench-copy", 600) as lease:
            lb = b.leased(lease)
            for digest, size in blobs:
                if await lb.content.exists(digest) is not None:
                    continue
                labels = (await a.content.info(digest)).labels  # the GC references between the blobs
                async with lb.content.writer(f"copy-{digest}", size, digest) as writer:
                    async for chunk in a.content.read(digest):
                        await writer.write(chunk)
                        copied += len(chunk)
                    await writer.commit(labels)
            await lb.images.put(
                ImageRecord(name=ref, media_type=record.media_type, digest=record.digest, size=record.size)
            )
    finally:
        await a.close()
        await b.close()
    return copied


async def stop_and_copy(mesh: Mesh, name: str) -> dict[str, Any]:
    h1, h2 = mesh["h1"], mesh["h2"]
    ref = f"checkpoint/{name}:{secrets.token_hex(3)}"
    started = time.monotonic()
    await h1.actr("containers", "checkpoint", "--task", "--rw", name, ref, within=600)
    await h1.actr("tasks", "kill", "-s", "KILL", name, check=False)  # stop: the copy is the workload now
    await asyncio.sleep(0.2)
    await h1.actr("tasks", "rm", "-f", name, check=False)
    wire = await copy_checkpoint(h1, h2, ref)
    restored = await h2.actr("containers", "restore", "--live", "--rw", name, ref, within=600, check=False)
    if restored.returncode != 0:
        raise RuntimeError(f"ctr c restore failed: {restored.stderr.strip()}")
    total = time.monotonic() - started
    await asyncio.sleep(1.0)
    status = await memhog_status(h2, name)
    verified = await verify_memory(h2, name, within=120)
    await remove(h1, name)
    await remove(h2, name)
    h1.ctr("images", "rm", ref, check=False)
    h2.ctr("images", "rm", ref, check=False)
    return {
        "downtime_ms": status.max_gap_us / 1000,
        "total_s": total,
        "released_s": total,
        "wire_mb": wire / 1e6,
        "verified": verified,
    }


async def image_fetch(mesh: Mesh, layer_mib: int, rounds: int, rate: str) -> None:
    """The target's image: from the registry vs from the source during a migration (module doc)."""
    h1, h2 = mesh["h1"], mesh["h2"]
    builder = memhog_image(64, 0)
    builder.add_layer(random_layer(layer_mib << 20, seed=7, file_size=4 << 20, compression="none"))
    image = builder.build()
    await image.push(mesh.push_host, "bench/memhog-layers", "v1")
    ref = mesh.image_ref("bench/memhog-layers", "v1")
    digests = [layer.digest for layer in image.layers]
    size = sum(layer.size for layer in image.layers)
    await mesh.shape_registry(rate)
    await api(h1, "POST", "/v1/images/pull", {"ref": ref})
    registry_s: list[float] = []
    source_s: list[float] = []
    origins: set[str] = set()
    for n in range(rounds):
        for side in ("registry", "source") if n % 2 == 0 else ("source", "registry"):
            await h2.forget_image(ref, digests)
            # The baseline pulls from the registry alone: h2 asks no peer ([sharing] min_peer_size).
            await h2.configure("sharing", REGISTRY_ONLY if side == "registry" else {})
            if side == "registry":
                started = time.perf_counter()
                await api(h2, "POST", "/v1/images/pull", {"ref": ref})
                registry_s.append(time.perf_counter() - started)
            else:
                name = f"img-{n}"
                await start_workload(mesh, h1, name, ref)
                record = await migrate(h1, name, "h2", mode="precopy")
                if record.get("state") != "COMMIT":
                    raise RuntimeError(f"migration failed: {record.get('error')}")
                source_s.append(record["stats"]["image_ms"] / 1000)
                origins.add(record["stats"]["image_from"])
                await remove(h2, name)
            print(f"image round {n + 1} {side:8s}: {(registry_s if side == 'registry' else source_s)[-1]:.2f} s")
    await h2.forget_image(ref, digests)
    await h2.configure("sharing", {})
    await mesh.shape_registry("10gbit")  # the migrations below are not about the registry
    reg, src = statistics.median(registry_s), statistics.median(source_s)
    print(
        f"target image fetch ({len(digests)} layers, {size / 1e6:.0f} MB, registry at {rate}): from the registry "
        f"{reg:.2f} s, from the source during a migration {src:.2f} s (from: {', '.join(sorted(origins))}), "
        f"{src / reg:.3f} of the registry time (medians of {rounds})",
        flush=True,
    )


async def live(mesh: Mesh, name: str, mode: str, records: Path | None) -> dict[str, Any]:
    h1, h2 = mesh["h1"], mesh["h2"]
    started = time.monotonic()
    record = await migrate(h1, name, "h2", mode=mode)
    total = time.monotonic() - started
    if records is not None:
        with records.open("a") as out:
            out.write(json.dumps(record) + "\n")
    if record.get("state") != "COMMIT":
        raise RuntimeError(f"migration failed: {record.get('error')}")
    await asyncio.sleep(1.0)
    status = await memhog_status(h2, name)
    verify_at_us = time.time() * 1e6
    verified = await verify_memory(h2, name, within=120)
    gaps = [(end, gap) for end, gap in memhog_gaps(h2, name) if end - gap < verify_at_us]  # the check pauses it
    await remove(h2, name)
    stats = record["stats"]
    dumped = stats.get("lazy_pages", 0) * 4096
    return {
        "downtime_ms": status.max_gap_us / 1000,
        "total_s": total,
        "released_s": (stats["released_ms"] / 1000) or total,
        "wire_mb": stats["bytes_wire"] / 1e6,
        "verified": verified,
        "mode": record.get("options", {}).get("mode", mode),
        "agent_downtime_ms": stats["downtime_ms"],
        "postcopy_ms": stats["postcopy_ms"],
        "iterations": stats["iterations"],
        "freeze_dump_ms": stats["freeze_dump_ms"],
        "restore_ms": stats["restore_ms"],
        "gap_end_ms": gap_end_after_resume(record, status.max_gap_end_us),
        "lazy_mb": dumped / 1e6,
        "wire_per_lazy": stats["bytes_wire"] / dumped if dumped else None,
        "pages_pushed": stats.get("pages_pushed", 0),
        "pages_resent": stats.get("pages_resent", 0),
        "stall_after_300_ms": stall_after(record, gaps, 300.0),
        "stalls": stalls(record, gaps, 50.0),
    }


def stalls(record: dict[str, Any], gaps: list[tuple[int, int]], over_ms: float) -> list[tuple[int, int]]:
    """(ms from the resume to the start of the pause, its length in ms) of the pauses over `over_ms`."""
    states = dict((state, at) for state, at in record.get("history", []))
    resumed = states.get("POSTCOPY") or states.get("SWITCH")
    if resumed is None:
        return []
    at_us = datetime.fromisoformat(resumed).timestamp() * 1e6
    return [(round((end - gap - at_us) / 1000), round(gap / 1000)) for end, gap in gaps if gap > over_ms * 1000]


def stall_after(record: dict[str, Any], gaps: list[tuple[int, int]], after_ms: float) -> float | None:
    """The longest pause of the workload that ended more than `after_ms` after it resumed on the target
    (the entry into POSTCOPY): the stalls of post-copy's page faults, past the downtime."""
    states = dict((state, at) for state, at in record.get("history", []))
    resumed = states.get("POSTCOPY")
    if resumed is None:
        return None
    since_us = (datetime.fromisoformat(resumed).timestamp() * 1000 + after_ms) * 1000
    return max((gap / 1000 for end, gap in gaps if end > since_us), default=0.0)


def gap_end_after_resume(record: dict[str, Any], gap_end_us: int) -> float | None:
    """When the heartbeat's longest gap ended, in ms after the workload resumed on the target (the
    entry into POSTCOPY, else SWITCH): near 0 means the freeze was the gap, more means faults were."""
    states = dict((state, at) for state, at in record.get("history", []))
    resumed = states.get("POSTCOPY") or states.get("SWITCH")
    if resumed is None or not gap_end_us:
        return None
    return gap_end_us / 1000 - datetime.fromisoformat(resumed).timestamp() * 1000


def describe(r: dict[str, Any]) -> str:
    line = (
        f"downtime {r['downtime_ms']:8.0f} ms, total {r['total_s']:6.2f} s, released {r['released_s']:6.2f} s, "
        f"wire {r['wire_mb']:8.1f} MB, memory {r['verified']}"
    )
    if "iterations" in r:  # ferryman's own modes
        line += (
            f", rounds {r['iterations']}, freeze+dump {r['freeze_dump_ms']:.0f} ms, "
            f"restore {r['restore_ms']:.0f} ms, post-copy {r['postcopy_ms']:.0f} ms"
        )
    if r.get("gap_end_ms") is not None:
        line += f", longest gap ended {r['gap_end_ms']:+.0f} ms from resume"
    if r.get("wire_per_lazy") is not None:
        line += (
            f", lazy {r['lazy_mb']:.1f} MB, wire/lazy {r['wire_per_lazy']:.3f}, pushed {r['pages_pushed']} pages,"
            f" resent {r['pages_resent']} pages"
        )
    if r.get("stall_after_300_ms") is not None:
        line += f", longest stall after resume+300 ms {r['stall_after_300_ms']:.1f} ms"
    if r.get("stalls"):
        line += f", stalls over 50 ms (start from resume, length) {r['stalls']}"
    return line


def agent_memory(host: MeshHost) -> str:
    """The agent's resident memory now and at its peak: what keeping freed buffers costs (agent.malloc)."""
    proc = host.agent_proc
    if proc is None:
        return "not running"
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines() if ":" in line
    )
    return f"rss {fields['VmRSS'].strip()}, peak {fields['VmHWM'].strip()}"


def warm_up_memory(gib: int) -> None:
    """Touch (then free) guest memory once: on this VM a first touch runs at ~280 MB/s, later ones fast.

    Both sides of the comparison profit alike; without it whichever runs first pays for the VM.
    """
    path = Path("/dev/shm/ferryman-bench-warmup")
    block = b"\x01" * (64 << 20)
    try:
        with path.open("wb") as fh:
            for _ in range(gib * 16):
                fh.write(block)
    finally:
        path.unlink(missing_ok=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="64,256,1024")
    parser.add_argument("--rates", default="0,50")
    parser.add_argument("--modes", default="auto,precopy,lazy,hybrid")
    parser.add_argument("--result", choices=("migrate", "postcopy"), default="migrate")
    parser.add_argument("--warm-up-gib", type=int, default=8, help="guest memory to touch once first")
    parser.add_argument("--no-baseline", action="store_true", help="skip stop-and-copy (no result line)")
    parser.add_argument("--records", type=Path, help="append each migration's full record (JSON lines) here")
    parser.add_argument("--logs", type=Path, help="copy both agents' logs into this directory at the end")
    parser.add_argument("--image-mib", type=int, default=200, help="the target's image section (0: skip)")
    parser.add_argument("--image-rounds", type=int, default=3)
    parser.add_argument("--registry-rate", default="100mbit")
    args = parser.parse_args()
    started = time.monotonic()
    warm_up_memory(args.warm_up_gib)
    print(f"warmed up {args.warm_up_gib} GiB of memory in {time.monotonic() - started:.1f} s", flush=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    rates = [float(r) for r in args.rates.split(",")]
    modes = args.modes.split(",")
    results: dict[tuple[int, float], dict[str, dict[str, Any]]] = {}
    async def sharing(mesh: Mesh) -> None:  # each serves its blobs to the other (docs/sharing.md)
        for host in mesh.hosts:
            host.settings["sharing"] = {}

    async with scratch_dir() as base, fleet(base, hosts=2, idle_timeout=60.0, before_agents=sharing) as mesh:
        h1, h2 = mesh["h1"], mesh["h2"]
        if args.image_mib:
            await image_fetch(mesh, args.image_mib, args.image_rounds, args.registry_rate)
        cell = 0
        for size in sizes:
            for rate in rates:
                repo = f"bench/memhog-{size}-{int(rate)}"
                await memhog_image(size, rate).build().push(mesh.push_host, repo, "v1")
                ref = f"{mesh.registry_host}/{repo}:v1"
                for host in (h1, h2):
                    await api(host, "POST", "/v1/images/pull", {"ref": ref})
                row: dict[str, dict[str, Any]] = {}
                baseline = () if args.no_baseline else ("stop-and-copy",)
                order = (*baseline, *modes) if cell % 2 == 0 else (*modes, *baseline)
                cell += 1
                for method in order:
                    name = f"w{size}-{int(rate)}-{method[:4]}"
                    await start_workload(mesh, h1, name, ref)
                    if method == "stop-and-copy":
                        row[method] = await stop_and_copy(mesh, name)
                    else:
                        row[method] = await live(mesh, name, method, args.records)
                    print(f"{size:5d} MiB {rate:4.0f} MB/s {method:13s}: {describe(row[method])}", flush=True)
                results[(size, rate)] = row
        for host in (h1, h2):
            print(f"agent {host.name}: {agent_memory(host)}", flush=True)
        if args.logs is not None:
            args.logs.mkdir(parents=True, exist_ok=True)
            for host in (h1, h2):
                (args.logs / f"{host.name}.log").write_bytes(host.agent_log.read_bytes())
    failed = [
        f"{size} MiB {rate:.0f} MB/s {method}: {row['verified']}"
        for (size, rate), cells in results.items()
        for method, row in cells.items()
        if row["verified"] != "ok"
    ]
    if failed:
        print(f"bench {args.result}: no result, the memory check failed in {'; '.join(failed)}", file=sys.stderr)
        sys.exit(1)
    if args.no_baseline:
        return
    if args.result == "migrate":
        key = (1024, 50.0) if (1024, 50.0) in results else max(results)
        if "auto" not in results[key]:
            sys.exit("bench migrate: the result line needs mode auto in --modes")
        ratio = results[key]["auto"]["downtime_ms"] / results[key]["stop-and-copy"]["downtime_ms"]
        print(f"(result line: {key[0]} MiB at {key[1]:.0f} MB/s, mode=auto, which ran {results[key]['auto']['mode']})")
        print(f"bench migrate: {ratio:.3f} ratio (target <= 0.1)")
    else:
        key = (1024, 0.0) if (1024, 0.0) in results else min(results, key=lambda k: (-k[0], k[1]))
        explicit = [m for m in modes if m != "auto"] or modes
        best = min(explicit, key=lambda m: results[key][m]["downtime_ms"])
        print(f"(result line: {key[0]} MiB at {key[1]:.0f} MB/s, best mode {best})")
        print(f"bench postcopy: {results[key][best]['downtime_ms']:.0f} ms (target <= 300)")


if __name__ == "__main__":
    asyncio.run(main())
