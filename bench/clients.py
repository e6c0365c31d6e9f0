"""What clients see during a live migration: the longest gap between replies, failed requests and
the throughput while post-copy pages are still arriving, on a 2-host mesh with a client namespace.

The server: memhog (tests/workloads/memhog.c) holding --size-mib MiB and rewriting --rate MB/s, and
serving TCP on its service address from the same loop; each request reads one page of its memory
and the reply carries a digest the client checks (plus memhog's check of that page).
The client (bench/_client.py, in the mesh's client namespace): one persistent connection in
lock-step, a request every 1 ms, plus --short-rate short connections a second (connect, request,
reply, close). Each migration gets its own client process: --steady s before the migration, then
the migration, then --settle s after it.
For each mode (--modes) and run (--runs), the container starts on h1 with a service address,
migrates to h2 and back to h1; after each migration its memory is verified (client stopped).
  gap:        the longest time between two good replies on the persistent connection
  failed:     requests that got no good reply: connect errors, resets, timeouts (--timeout),
              wrong replies; persistent and short connections
  POSTCOPY tput: the persistent connection's replies/s from the target's resume until every page
              was there (stats.postcopy_ms, ending at the record's SWITCH), as a share of the
              replies/s in the --steady s before the migration
  slow after resume: from the resume until the persistent connection's replies stayed at half
              its steady rate or more, in 100 ms windows (issue 17: hybrid and precopy within 1 s)
  agents' peak RSS: VmHWM of each agent, reset before each mode (/proc/PID/clear_refs)
Baseline in the same run (once per run, first in odd runs, last in even ones): stop-and-copy with
containerd's own checkpoint, as bench/migrate.py does it, of the same image without a service
address. ctr's checkpoint resumes the source after its dump and cannot move the address, so no
client can follow that copy: its workload's own heartbeat gap (its freeze, dump + copy + restore)
is the least a client would see, and is what the baseline prints.
Run as root from the repo: .venv/bin/python bench/clients.py [--size-mib 1024] [--rate 50]
  [--modes auto,precopy,lazy,hybrid] [--runs 2]      (--size-mib 256 --runs 1: a quick run)
The result line (the last one): the longest client-visible gap over all runs of mode=auto. No
result line when a memory or data check failed (the script exits 1 naming it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.migrate import remove, stop_and_copy, warm_up_memory
from tests.harness import netns as nsh
from tests.harness.containerd import scratch_dir
from tests.harness.fleet import api, fleet, memhog_status, migrate, verify_memory
from tests.harness.mesh import Mesh, MeshHost
from tests.harness.workloads import memhog_image

PORT = 9000
CLIENT = Path(__file__).resolve().parent / "_client.py"
MIB = 1 << 20


@dataclass
class Outcome:
    """One migration as the client saw it."""

    mode: str
    ran: str
    direction: str
    gap_ms: float
    gap_end_ms: float | None
    """When the longest gap ended, in ms after the target's resume (None: no resume time)."""
    failed_persistent: int
    failed_short: int
    failure_kinds: dict[str, int]
    bad: int
    """Replies that were wrong or reported a bad page (a data check failure)."""
    persistent_total: int
    short_total: int
    short_longest_ms: float
    wire_per_memory: float
    downtime_ms: float
    held_packets: int
    """Packets sent during the freeze that the source kept and handed to the restored copy."""
    postcopy_ms: float
    steady_per_s: float
    postcopy_per_s: float | None
    settled_ms: float | None
    """From the resume until the persistent connection's rate stayed at half its steady rate or more
    (100 ms windows): how long the workload stayed slow after it ran again."""
    verified: str = "none"
    rss_mib: dict[str, float] = field(default_factory=dict)

    @property
    def postcopy_share(self) -> float | None:
        return None if self.postcopy_per_s is None else self.postcopy_per_s / self.steady_per_s

    def describe(self) -> str:
        share = "-" if self.postcopy_share is None else f"{self.postcopy_share:.0%}"
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.failure_kinds.items())) or "none"
        end = "" if self.gap_end_ms is None else f" (ended {self.gap_end_ms:+.0f} ms from resume)"
        return (
            f"gap {self.gap_ms:6.0f} ms{end}, failed {self.failed_persistent}+{self.failed_short} ({kinds}), "
            f"requests {self.persistent_total} + {self.short_total} short (longest {self.short_longest_ms:.0f} ms), "
            f"agent downtime {self.downtime_ms:.0f} ms ({self.held_packets} packets held), "
            f"wire/memory {self.wire_per_memory:.2f}, "
            f"post-copy {self.postcopy_ms:.0f} ms at {share} of {self.steady_per_s:.0f} replies/s, "
            f"slow for {'-' if self.settled_ms is None else f'{self.settled_ms:.0f}'} ms after the resume, "
            f"memory {self.verified}"
        )


def stamp(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def analyse(mode: str, direction: str, record: dict[str, Any], seen: dict[str, Any], size_mib: int) -> Outcome:
    replies = np.asarray(seen["replies"])
    started = stamp(record["started_at"])
    states = {state: stamp(at) for state, at in record.get("history", [])}
    stats = record["stats"]
    # Steady state: the replies before the migration started (the first 0.5 s, the client's own start, left out).
    steady_from = seen["started"] + 0.5
    steady_per_s = np.count_nonzero((replies >= steady_from) & (replies < started)) / (started - steady_from)
    gaps = np.diff(replies)
    longest = int(np.argmax(gaps))
    postcopy_per_s = resumed = None
    if "POSTCOPY" in states and "SWITCH" in states:  # post-copy ends where SWITCH begins
        end = states["SWITCH"]
        resumed = end - stats["postcopy_ms"] / 1000
        postcopy_per_s = np.count_nonzero((replies >= resumed) & (replies < end)) / (end - resumed)
    elif "SWITCH" in states:
        resumed = states["SWITCH"]
    kinds = [kind for _, kind in seen["errors"]] + [kind for _, _, kind in seen["short"] if kind != "ok"]
    return Outcome(
        settled_ms=None if resumed is None else settled_after(replies, resumed, steady_per_s) * 1000,
        mode=mode,
        ran=record.get("options", {}).get("mode", mode),
        direction=direction,
        gap_ms=float(gaps[longest]) * 1000,
        gap_end_ms=None if resumed is None else (float(replies[longest + 1]) - resumed) * 1000,
        failed_persistent=len(seen["errors"]),
        failed_short=sum(1 for _, _, kind in seen["short"] if kind != "ok"),
        failure_kinds={kind: kinds.count(kind) for kind in set(kinds)},
        bad=sum(1 for kind in kinds if kind in ("bad page", "wrong reply")),
        persistent_total=len(seen["replies"]) + len(seen["errors"]),
        short_total=len(seen["short"]),
        short_longest_ms=max((end - start for start, end, _ in seen["short"]), default=0.0) * 1000,
        wire_per_memory=stats["bytes_wire"] / (size_mib * MIB),
        downtime_ms=stats["downtime_ms"],
        held_packets=stats.get("held_packets", 0),
        postcopy_ms=stats["postcopy_ms"],
        steady_per_s=steady_per_s,
        postcopy_per_s=postcopy_per_s,
    )


SETTLE_WINDOW = 0.1
"""Seconds per window when telling when the reply rate came back after a resume."""


def settled_after(replies: np.ndarray, resumed: float, steady_per_s: float) -> float:
    """Seconds from `resumed` to the end of the last window (of SETTLE_WINDOW s, up to the last
    reply) whose reply count was under half the steady rate: 0 when none was."""
    after = replies[replies >= resumed]
    if after.size == 0:
        return 0.0
    edges = np.arange(resumed, float(after[-1]), SETTLE_WINDOW)
    if edges.size < 2:
        return 0.0
    counts, _ = np.histogram(after, bins=edges)
    slow = np.flatnonzero(counts < steady_per_s * SETTLE_WINDOW / 2)
    return 0.0 if slow.size == 0 else float(edges[slow[-1] + 1] - resumed)


class Client:
    """bench/_client.py in the client namespace; stop() ends it and returns what it saw."""

    def __init__(self, mesh: Mesh, ip: str, short_rate: float, timeout: float) -> None:
        assert mesh.client is not None
        self.argv = [
            *nsh.nsenter_argv(mesh.client.netns),
            sys.executable,
            str(CLIENT),
            ip,
            str(PORT),
            str(short_rate),
            str(timeout),
        ]
        self.timeout = timeout
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )

    async def stop(self) -> dict[str, Any]:
        assert self.proc is not None
        # Closing stdin is the stop signal (communicate() without input leaves it open); outstanding
        # short connections may take up to the timeout.
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            out, _ = await asyncio.wait_for(self.proc.communicate(), self.timeout + 30)
        except TimeoutError:
            self.proc.send_signal(signal.SIGUSR1)  # its stacks, to stderr
            await asyncio.sleep(1)
            raise
        if self.proc.returncode != 0:
            raise RuntimeError(f"the client exited {self.proc.returncode}")
        return dict(json.loads(out))

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()


def reset_peak_rss(host: MeshHost) -> float:
    """VmHWM back to the current RSS ("5" in clear_refs, Linux >= 4.0), so that each mode's peak is
    its own; returns that RSS in MiB (what the agent kept from before)."""
    assert host.agent_proc is not None
    Path(f"/proc/{host.agent_proc.pid}/clear_refs").write_text("5")
    return agent_status_mib(host, "VmRSS")


def agent_status_mib(host: MeshHost, key: str) -> float:
    assert host.agent_proc is not None
    for line in Path(f"/proc/{host.agent_proc.pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/PID/status")


async def wait_serving(mesh: Mesh, ip: str, within: float = 120.0) -> None:
    assert mesh.client is not None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await nsh.can_connect(mesh.client.netns, ip, PORT):
        if loop.time() > deadline:
            raise RuntimeError(f"nothing serves {ip}:{PORT}")
        await asyncio.sleep(0.2)


async def one_mode(mesh: Mesh, args: argparse.Namespace, ref: str, mode: str, run: int, ip: str) -> list[Outcome]:
    h1, h2 = mesh["h1"], mesh["h2"]
    name = f"c{run}-{mode}"
    before = {host.name: reset_peak_rss(host) for host in (h1, h2)}
    await api(h1, "POST", "/v1/containers?start=1", {"id": name, "image": ref, "service_ip": ip}, expect=201)
    await memhog_status(h1, name, within=120)  # past its initial fill
    await wait_serving(mesh, ip)
    outcomes = []
    try:
        for source, target in ((h1, h2), (h2, h1)):
            client = Client(mesh, ip, args.short_rate, args.timeout)
            await client.start()
            try:
                await asyncio.sleep(args.steady)
                record = await migrate(source, name, target.name, mode=mode)
                if record.get("state") != "COMMIT":
                    raise RuntimeError(f"{mode} {source.name}->{target.name} failed: {record.get('error')}")
                await asyncio.sleep(args.settle)
                seen = await client.stop()
            finally:
                client.kill()
            for path, data in ((args.records, record), (args.raw, seen)):
                if path is not None:
                    with path.open("a") as out:
                        out.write(json.dumps(data) + "\n")
            outcome = analyse(mode, f"{source.name}->{target.name}", record, seen, args.size_mib)
            outcome.verified = await verify_memory(target, name, within=120)
            status = await memhog_status(target, name)
            if status.bad_pages:
                outcome.verified += f" (memhog answered {status.bad_pages} requests with a bad page)"
            outcomes.append(outcome)
            print(f"run {run} {mode:7s} ({outcome.ran}) {outcome.direction}: {outcome.describe()}", flush=True)
    finally:
        await remove(h1, name)
        await remove(h2, name)
    peaks = {host.name: agent_status_mib(host, "VmHWM") for host in (h1, h2)}
    for outcome in outcomes:
        outcome.rss_mib = peaks
    print(
        f"run {run} {mode:7s} agents' peak RSS: "
        + ", ".join(f"{k} {v:.0f} MiB (RSS {before[k]:.0f} MiB at the start)" for k, v in peaks.items())
    )
    return outcomes


async def baseline(mesh: Mesh, ref: str, run: int) -> float:
    """Stop-and-copy through containerd's checkpoint (bench/migrate.py): the workload's freeze, in ms."""
    name = f"c{run}-stop"
    await api(mesh["h1"], "POST", "/v1/containers?start=1", {"id": name, "image": ref}, expect=201)
    await memhog_status(mesh["h1"], name, within=120)
    await asyncio.sleep(2.0)
    result = await stop_and_copy(mesh, name)
    print(
        f"run {run} stop-and-copy (ctr checkpoint, copy, restore; no clients): workload frozen "
        f"{result['downtime_ms']:.0f} ms, total {result['total_s']:.1f} s, wire {result['wire_mb']:.0f} MB, "
        f"memory {result['verified']}",
        flush=True,
    )
    if result["verified"] != "ok":
        raise DataCheckFailed(f"stop-and-copy run {run}: memory {result['verified']}")
    return float(result["downtime_ms"])


class DataCheckFailed(Exception):
    pass


def fmt(values: list[float], pattern: str) -> str:
    return "-" if not values else " / ".join(pattern.format(v) for v in values)


def table(outcomes: list[Outcome], baselines: list[float], modes: list[str]) -> list[str]:
    lines = [
        "| mode (ran) | longest gap, ms (median) | agent downtime, ms (max) | failed / requests | wire / memory | "
        "POSTCOPY, ms (max) | POSTCOPY tput / steady (lowest) | slow after resume, ms (max) | "
        "agents' peak RSS, MiB (h1 / h2) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mode in modes:
        rows = [o for o in outcomes if o.mode == mode]
        if not rows:
            continue
        gaps = [o.gap_ms for o in rows]
        shares = [o.postcopy_share for o in rows if o.postcopy_share is not None]
        postcopy = [o.postcopy_ms for o in rows if o.postcopy_ms]
        downtimes = [o.downtime_ms for o in rows]
        settled = [o.settled_ms for o in rows if o.settled_ms is not None]
        lines.append(
            f"| {mode} ({', '.join(sorted({o.ran for o in rows}))}) "
            f"| {max(gaps):.0f} ({statistics.median(gaps):.0f}) "
            f"| {statistics.median(downtimes):.0f} ({max(downtimes):.0f}) "
            f"| {sum(o.failed_persistent + o.failed_short for o in rows)} "
            f"/ {sum(o.persistent_total + o.short_total for o in rows)} "
            f"| {statistics.median([o.wire_per_memory for o in rows]):.2f} "
            f"| {'-' if not postcopy else f'{statistics.median(postcopy):.0f} ({max(postcopy):.0f})'} "
            f"| {'-' if not shares else f'{statistics.median(shares):.0%} ({min(shares):.0%})'} "
            f"| {'-' if not settled else f'{statistics.median(settled):.0f} ({max(settled):.0f})'} "
            f"| {max(o.rss_mib['h1'] for o in rows):.0f} / {max(o.rss_mib['h2'] for o in rows):.0f} |"
        )
    if baselines:
        lines.append(
            f"| stop-and-copy (ctr, no clients: the workload's freeze) | {max(baselines):.0f} "
            f"({statistics.median(baselines):.0f}) | the same | - | - | - | - | - |"
        )
    return lines


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rate", type=float, default=50.0, help="MB/s the server rewrites")
    parser.add_argument("--modes", default="auto,precopy,lazy,hybrid")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--short-rate", type=float, default=100.0, help="short connections a second")
    parser.add_argument("--timeout", type=float, default=30.0, help="s a request may take before it failed")
    parser.add_argument("--steady", type=float, default=3.0, help="s of client traffic before each migration")
    parser.add_argument("--settle", type=float, default=3.0, help="s of client traffic after each migration")
    parser.add_argument("--warm-up-gib", type=int, default=4, help="guest memory to touch once first")
    parser.add_argument("--no-baseline", action="store_true", help="skip stop-and-copy")
    parser.add_argument("--records", type=Path, help="append each migration's full record (JSON lines) here")
    parser.add_argument("--raw", type=Path, help="append what the client saw in each migration (JSON lines) here")
    parser.add_argument("--logs", type=Path, help="copy both agents' logs into this directory at the end")
    args = parser.parse_args()
    modes = args.modes.split(",")
    started = time.monotonic()
    warm_up_memory(args.warm_up_gib)
    print(f"warmed up {args.warm_up_gib} GiB of memory in {time.monotonic() - started:.1f} s", flush=True)
    outcomes: list[Outcome] = []
    baselines: list[float] = []
    failed: list[str] = []
    async with scratch_dir() as base, fleet(base, hosts=2, idle_timeout=60.0, with_client=True) as mesh:
        h1, h2 = mesh["h1"], mesh["h2"]
        repo = f"bench/memserve-{args.size_mib}-{int(args.rate)}"
        await memhog_image(args.size_mib, args.rate, port=PORT).build().push(mesh.push_host, repo, "v1")
        ref = f"{mesh.registry_host}/{repo}:v1"
        for host in (h1, h2):
            await api(host, "POST", "/v1/images/pull", {"ref": ref})
        for run in range(1, args.runs + 1):
            order: list[str] = [*modes]
            if not args.no_baseline:
                order = ["stop-and-copy", *modes] if run % 2 else [*modes, "stop-and-copy"]
            for index, mode in enumerate(order):
                try:
                    if mode == "stop-and-copy":
                        baselines.append(await baseline(mesh, ref, run))
                        continue
                    # A fresh address per container: no route of an earlier one can be in the way.
                    ip = str(mesh.subnet.network_address + 100 + (run * len(order) + index) % 100)
                    got = await one_mode(mesh, args, ref, mode, run, ip)
                except DataCheckFailed as exc:
                    failed.append(str(exc))
                    continue
                outcomes.extend(got)
                failed += [f"run {run} {o.mode} {o.direction}: memory {o.verified}" for o in got if o.verified != "ok"]
                failed += [f"run {run} {o.mode} {o.direction}: {o.bad} wrong replies" for o in got if o.bad]
        if args.logs is not None:
            args.logs.mkdir(parents=True, exist_ok=True)
            for host in (h1, h2):
                (args.logs / f"{host.name}.log").write_bytes(host.agent_log.read_bytes())
    print()
    print(f"{args.size_mib} MiB rewriting {args.rate:.0f} MB/s, {args.runs} run(s), both directions each:")
    for line in table(outcomes, baselines, modes):
        print(line)
    if failed:
        print(f"bench clients: no result, a data check failed: {'; '.join(failed)}", file=sys.stderr)
        sys.exit(1)
    auto = [o.gap_ms for o in outcomes if o.mode == "auto"]
    if not auto:
        sys.exit("bench clients: the result line needs mode auto in --modes")
    print(f"bench clients: {max(auto):.0f} ms (target <= 300)")


if __name__ == "__main__":
    asyncio.run(main())
