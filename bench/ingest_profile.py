"""Where one telemetry push costs the coordinator CPU: a real daemon, pushes over mTLS, cProfile.

One coordinator daemon on loopback (SQLite, or etcd with one real member: tests/harness/etcd.py),
the shipped drain model, `log_level` INFO as in production. `--agents` simulated agents (one mTLS
connection each, their own certificates) register, push `--history` samples each (5 s apart, the
last two hours: the steady state of a host's kept samples, `telemetry.max_samples_per_host`, whose
upkeep a push pays for), then push one sample each at `--rate` pushes per second in all for
`--seconds`. Measured in fresh daemons, once per `--encodings` and `--event-loops` (json: POSTs of JSON; binary: POSTs
in protobuf's binary encoding, the baseline in the same run; stream: the same binary batches as
messages of one telemetry session per agent, `GET /v1/telemetry/stream`, as agents push), then
profiled:

  plain:    the daemon's CPU seconds (/proc, every thread) over the window, less what it spent idle
            (registered agents, no pushes) over as long just before (the baseline in the same run),
            / the pushes answered 200: the per-push cost, comparable across machine loads (CPU time,
            not wall time);
  profiled: the last encoding's run under `python -m cProfile` (unless --no-profile); the top
            functions by cumulative and by own time (the event loop's thread only: SQLite's thread
            and gRPC's do not show there).

Result line:
  bench ingest-cpu: <CPU ms per push above idle, plain, the last backend and encoding given> ms (target <= 0.5)

0.5 ms per push is 10 000 agents at a 5 s period (2000 pushes/s) on one core.

Run as root from the repo: .venv/bin/python bench/ingest_profile.py [--backends sqlite,etcd]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pstats
import random
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.http.validate import PROTOBUF
from core.security.pki import issue_host
from core.security.tls import client_context
from tests.harness.containerd import scratch_dir
from tests.harness.coordinator import (
    COORDINATOR_NAME,
    REPO,
    START_TIMEOUT,
    STOP_TIMEOUT,
    CoordinatorPki,
    CoordinatorProcess,
    TelemetryPushes,
    registration,
    sample,
    telemetry_body,
)
from tests.harness.daemons import start_daemon
from tests.harness.etcd import EtcdCluster

MODEL = Path(__file__).resolve().parent.parent / "models" / "drain" / "drain.onnx"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


class ProfiledCoordinator(CoordinatorProcess):
    """The harness's daemon, started under cProfile (its output written when it exits on SIGTERM)."""

    def __init__(self, *args: Any, profile_to: Path | None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.profile_to = profile_to

    async def start(self) -> None:
        profiler = ["-m", "cProfile", "-o", str(self.profile_to)] if self.profile_to else []
        argv = [sys.executable, *profiler, "-m", "coordinator.daemon", "--config", str(self.config_path)]

        async def ready() -> bool:
            return await self.healthz() == 200

        self.proc = await start_daemon(
            "coordinator",
            argv,
            self.log_path,
            ready,
            within=3 * START_TIMEOUT,  # a profiled start on a loaded machine
            stop_within=STOP_TIMEOUT,
            cwd=REPO,
            env={**os.environ},
        )


async def run_one(
    base: Path, args: argparse.Namespace, store: dict[str, Any], profile_to: Path | None
) -> dict[str, Any]:
    pki = CoordinatorPki(base / "pki")
    overrides = {
        "store": store,
        "log_level": "INFO",
        "model": {"path": str(MODEL), "tick_period": 5.0},
        "heartbeat": {"suspect_after": 3600.0, "down_after": 7200.0},
        "telemetry": {"max_samples_per_host": max(1, args.history)},
        "event_loop": args.event_loop,
    }
    workdir = base / "coordinator"
    workdir.mkdir()
    coordinator = ProfiledCoordinator(workdir, pki, overrides=overrides, profile_to=profile_to)
    names = [f"h{i}" for i in range(args.agents)]
    pushes = [TelemetryPushes(name) for name in names]
    certs = [issue_host(pki.ca_dir, name, base / "agents" / name, ["127.0.0.1"]) for name in names]
    sessions: list[aiohttp.ClientSession] = []
    streams: dict[int, aiohttp.ClientWebSocketResponse] = {}
    answered = 0
    failed = 0

    async def stream_push(i: int, body: bytes) -> bool:
        """One push over agent i's telemetry session (opened at its first push), as agents push."""
        nonlocal failed
        if i not in streams:
            streams[i] = await sessions[i].ws_connect(
                coordinator.url + "/v1/telemetry/stream", server_hostname=COORDINATOR_NAME, compress=0
            )
        await streams[i].send_bytes(body)
        msg = await streams[i].receive(timeout=30)
        if msg.type is not aiohttp.WSMsgType.BINARY:
            failed += 1
        return msg.type is aiohttp.WSMsgType.BINARY

    async def post(session: aiohttp.ClientSession, path: str, body: Any) -> bool:
        """POST `body`: JSON, or bytes as binary protobuf (the telemetry, as agents send it)."""
        nonlocal failed
        kw: dict[str, Any] = (
            {"data": body, "headers": {"Content-Type": PROTOBUF}} if isinstance(body, bytes) else {"json": body}
        )
        async with session.post(coordinator.url + path, server_hostname=COORDINATOR_NAME, **kw) as resp:
            await resp.read()
            if resp.status != 200:
                failed += 1
            return resp.status == 200

    async def agent(i: int, stop_at: float) -> None:
        nonlocal answered
        period = args.agents / args.rate
        next_at = time.monotonic() + random.uniform(0, period)
        while True:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            if time.monotonic() >= stop_at:
                return
            if args.stream:
                ok = await stream_push(i, pushes[i].body(time.time()))
            else:
                body = (
                    pushes[i].body(time.time()) if args.binary else {"host": names[i], "samples": [sample(time.time())]}
                )
                ok = await post(sessions[i], "/v1/telemetry", body)
            if ok:
                answered += 1
            next_at += period

    await coordinator.start()
    try:
        for c in certs:
            connector = aiohttp.TCPConnector(limit=1, ssl=client_context(c))
            sessions.append(aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)))
        assert coordinator.proc is not None
        pid = coordinator.proc.pid
        await asyncio.gather(*(post(s, "/v1/register", registration(n)) for s, n in zip(sessions, names, strict=True)))
        now = time.time()
        past = [now - 5.0 * (args.history - k) for k in range(args.history)]
        filling = asyncio.Semaphore(4)  # a few large batches at a time: each is a long parse

        async def prefill(session: aiohttp.ClientSession, name: str) -> None:
            for start in range(0, len(past), 500):  # under telemetry.max_batch
                chunk = telemetry_body(name, [sample(ts) for ts in past[start : start + 500]])
                async with filling:
                    assert await post(session, "/v1/telemetry", chunk), "prefill refused"

        await asyncio.gather(*(prefill(s, n) for s, n in zip(sessions, names, strict=True)))
        warm = time.monotonic() + 3.0  # connections open, histories begun
        await asyncio.gather(*(agent(i, warm) for i in range(args.agents)))
        # Baseline: the same daemon with no pushes (its ticks, lease renewals, flushes, liveness).
        before, started = cpu_seconds(pid), time.monotonic()
        await asyncio.sleep(args.seconds / 2)
        idle_per_s = (cpu_seconds(pid) - before) / (time.monotonic() - started)
        answered = failed = 0
        spy = await start_spy(pid, args) if args.spy else None
        before, started = cpu_seconds(pid), time.monotonic()
        await asyncio.gather(*(agent(i, started + args.seconds) for i in range(args.agents)))
        cpu, window = cpu_seconds(pid) - before, time.monotonic() - started
        stacks = await spy.communicate() if spy is not None else None
    finally:
        for ws in streams.values():
            await ws.close()
        for s in sessions:
            await s.close()
        await coordinator.stop()
    return {
        "stacks": stacks[0].decode() if stacks else "",
        "pushes": answered,
        "failed": failed,
        "cpu_s": cpu,
        "idle_cpu_s": idle_per_s * window,
        "window_s": window,
        "load": load(),
    }


async def start_spy(pid: int, args: argparse.Namespace) -> asyncio.subprocess.Process:
    """py-spy sampling the daemon's threads over the measured window (CPU samples: idle threads are
    left out), its folded stacks on stdout."""
    return await asyncio.create_subprocess_exec(
        args.spy, "record", "--pid", str(pid), "--duration", str(int(args.seconds)), "--rate", "250",
        "--format", "raw", "--nonblocking", "--output", "/dev/stdout",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip


PUSH_STEPS = (
    ("epoll (waiting counts too: py-spy cannot tell it idle here)", ("EpollSelector.select",)),
    ("socket send (the kernel's loopback TCP)", ("_SelectorSocketTransport.write",)),
    ("TLS records (ssl, sslproto)", ("ssl.py", "sslproto.py")),
    ("protobuf parse and checks (wire.py, validate.py)", ("wire.py", "validate.py", "protobuf")),
    ("store update (the store, etcd client)", ("sqlite_store", "/etcd/", "aetcd", "grpc", "store.py")),
    ("drain-risk histories (predictions.py, features.py)", ("predictions.py", "features.py", "numpy")),
    ("metrics (prometheus_client)", ("prometheus_client",)),
    ("registry service (registry.py)", ("registry.py",)),
    ("middleware and auth (handlers.py, auth.py, errors.py)", ("handlers.py", "auth.py", "http/errors.py")),
    ("aiohttp: WebSocket frames", ("aiohttp/_websocket", "web_ws.py", "aiohttp/http_websocket")),
    ("aiohttp: request parse, routing, response", ("aiohttp", "multidict", "yarl")),
    ("asyncio and socket calls", ("asyncio/", "selectors.py")),
)
"""Where a sample's time goes: the step of its innermost frame that names one (py-spy's folded
stacks: `frame;frame;... count`, a frame `function (file:line)`)."""


def push_steps(folded: str) -> list[tuple[str, float]]:
    counts: dict[str, int] = {}
    for line in folded.splitlines():
        stack, _, n = line.rpartition(" ")
        if line.startswith("py-spy>") or not n.isdigit():  # py-spy's own summary shares stdout
            continue
        frames = stack.split(";")
        step = "other"
        for frame in reversed(frames):
            found = next((name for name, marks in PUSH_STEPS if any(m in frame for m in marks)), None)
            if found is not None:
                step = found
                break
        counts[step] = counts.get(step, 0) + int(n)
    total = sum(counts.values()) or 1
    return sorted(((k, v / total) for k, v in counts.items()), key=lambda kv: -kv[1])


AREAS = (
    ("start-up (imports)", ("compile", "marshal", "builtins.exec", "importlib", "_imp.", "__build_class__", "re/_")),
    ("etcd client (gRPC, aetcd, the store's JSON)", ("grpc", "aetcd", "/etcd/", "dataclasses.py", "copy.py")),
    ("TLS", ("_ssl.", "ssl.py", "sslproto.py")),
    ("socket I/O", ("_socket.", "selector_events.py")),
    ("parse and checks (JSON, protobuf, wire.py)", ("json_format", "validate.py", "wire.py", "json/", "message")),
    ("drain-risk histories (features, numpy)", ("features.py", "predictions.py", "numpy")),
    ("logging", ("logging/", "logs.py", "access_log.py", "strftime")),
    ("metrics", ("prometheus_client",)),
    ("aiohttp", ("aiohttp", "multidict", "yarl")),
    ("asyncio", ("asyncio/",)),
    ("the coordinator's own code", ("/coordinator/", "/core/")),
)


IDLE = "'poll' of 'select.epoll'"
"""The event loop waiting for work: cProfile's clock is the wall clock, and this is not CPU."""


def areas(stats: pstats.Stats) -> list[tuple[str, float]]:
    """Own time summed by area (the first AREAS pattern found in the file or function name), the
    event loop's idle wait left out."""
    found: dict[str, float] = {}
    for func, (_, _, tt, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        where = f"{func[0]}:{func[2]}"
        if IDLE in where:
            continue
        area = next((name for name, marks in AREAS if any(m in where for m in marks)), "other")
        found[area] = found.get(area, 0.0) + tt
    return sorted(found.items(), key=lambda kv: -kv[1])


def top(profile: Path, n: int) -> str:
    out = []
    stats = pstats.Stats(str(profile))
    total = sum(tt for _, tt in areas(stats))
    out.append(
        "  own time by area (wall clock, idle waits left out; the whole run, start and registrations included): "
        + ", ".join(f"{name} {100 * tt / total:.0f} %" for name, tt in areas(stats))
    )
    width = 110
    for sort in ("cumulative", "tottime"):
        stats.sort_stats(sort)
        rows = []
        for func in stats.fcn_list[:n]:  # type: ignore[attr-defined]
            _, nc, tt, ct, _ = stats.stats[func]  # type: ignore[attr-defined]
            where = f"{Path(func[0]).name}:{func[1]}({func[2]})"
            rows.append(f"    {tt:8.2f} {ct:8.2f} {nc:9d}  {where[:width]}")
        out.append(f"  by {sort} (own s, cumulative s, calls, function):\n" + "\n".join(rows))
    return "\n".join(out)


async def main_async(args: argparse.Namespace) -> int:
    last = float("nan")
    runs = [(encoding, loop, False) for loop in args.event_loops for encoding in args.encodings]
    runs += [(args.encodings[-1], args.event_loops[-1], True)] * args.profile
    for backend in args.backends:
        for encoding, event_loop, profiled in runs:
            args.event_loop = event_loop
            args.binary = encoding in ("binary", "stream")
            args.stream = encoding == "stream"
            async with scratch_dir("ferryman-bench-ingest-profile-") as base:
                profile = base / "coordinator.prof" if profiled else None
                if backend == "etcd":
                    async with EtcdCluster(base / "etcd", size=1) as cluster:
                        store = {"backend": "etcd", "etcd_endpoints": cluster.endpoints, "etcd_prefix": "/p/"}
                        r = await run_one(base, args, store, profile)
                else:
                    r = await run_one(base, args, {"backend": "sqlite"}, profile)
                per_push = 1000 * (r["cpu_s"] - r["idle_cpu_s"]) / max(1, r["pushes"])
                kind = f"{encoding}, {event_loop}, {'profiled' if profiled else 'plain'}"
                print(
                    f"{backend} {kind}: {r['pushes']} pushes in {r['window_s']:.1f} s "
                    f"({r['pushes'] / r['window_s']:.0f}/s, {r['failed']} failed), daemon CPU {r['cpu_s']:.2f} s, "
                    f"{r['idle_cpu_s']:.2f} s of it the idle baseline: {per_push:.2f} ms per push; load {r['load']}"
                )
                if r["stacks"]:
                    print(
                        f"  py-spy, the window (CPU samples by step, {per_push:.2f} ms a push): "
                        + ", ".join(f"{name} {100 * share:.0f} % ({per_push * share * 1000:.0f} us)"
                                    for name, share in push_steps(r["stacks"]))
                    )  # fmt: skip
                    if args.keep_profiles:
                        args.keep_profiles.mkdir(parents=True, exist_ok=True)
                        (args.keep_profiles / f"{backend}-{encoding}.folded").write_text(r["stacks"])
                if profiled:
                    assert profile is not None
                    print(top(profile, args.top))
                    if args.keep_profiles:
                        args.keep_profiles.mkdir(parents=True, exist_ok=True)
                        (args.keep_profiles / f"{backend}.prof").write_bytes(profile.read_bytes())
                else:
                    last = per_push
    print(f"bench ingest-cpu: {last:.2f} ms (target <= 0.5)")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="sqlite,etcd", help="comma-separated: sqlite, etcd")
    p.add_argument("--agents", type=int, default=100, help="simulated agents (one mTLS connection each)")
    p.add_argument("--rate", type=float, default=200.0, help="pushes per second, all agents together")
    p.add_argument("--seconds", type=float, default=20.0, help="the measured window")
    p.add_argument("--top", type=int, default=25, help="functions listed per sort order")
    p.add_argument(
        "--history",
        type=int,
        default=1440,
        help="samples each host has before the window (and keeps: the default's 2 h)",
    )
    p.add_argument(
        "--encodings",
        default="binary,stream",
        help="the pushes, comma-separated, each a plain run: json (POST /v1/telemetry as JSON), binary (POSTs "
        "of binary protobuf: the baseline), stream (binary protobuf over the telemetry session, as agents "
        "push); the last is the result",
    )
    p.add_argument(
        "--event-loops",
        default="asyncio",
        help="the daemon's event_loop, comma-separated (asyncio, uvloop): every encoding runs on each; the "
        "first is the baseline, the last the result",
    )
    p.add_argument("--no-profile", dest="profile", action="store_false", help="skip the profiled run")
    p.add_argument(
        "--spy",
        default="",
        help="py-spy's path: sample the daemon over each plain run's window, CPU by step (the samples "
        "cost the daemon some CPU, so compare the per-push figures of runs without it)",
    )
    p.add_argument("--keep-profiles", type=Path, help="copy each profile (BACKEND.prof) into this directory")
    args = p.parse_args()
    args.backends = [b for b in args.backends.split(",") if b]
    args.encodings = [e for e in args.encodings.split(",") if e in ("json", "binary", "stream")] or ["stream"]
    args.event_loops = [e for e in args.event_loops.split(",") if e in ("asyncio", "uvloop")] or ["asyncio"]
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
