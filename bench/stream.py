"""Migration stream throughput vs a raw TCP socket, over a veth pair between two network namespaces.

The stream side is the real stack: fleet mTLS contexts (core.security), TlsSocket, the framing,
lz4 and AES-256-GCM of agent.stream, page batches through Channel.send_pages. The raw side sends
the same bytes with one plain socket.sendall(). Both receivers run in one process in namespace B,
the sender in namespace A; the two cases alternate after a warm-up of each (freshly touched
memory is slow on these VMs). Each case times from the first byte to the receiver's
acknowledgement of the last one.

Data sets:
  incompressible  os.urandom pages (--mib, default 512)
  criu-pages      real CRIU page images: memhog (tests/workloads, --criu-mib resident, default 256)
                  is started, `criu dump`ed into a tmpfs dir, and its pages-*.img contents are
                  sent as page batches (or the pages-*.img under --pages-dir, if given)
  synthetic-pages a mix (--mib / 2): 1/3 zero pages, 1/3 text-like pages (lz4 shrinks them ~3x),
                  1/3 random pages, in a fixed shuffled order
  file            the incompressible bytes once more through send_file (SHA-256 on both sides)

The stream side leaves TLS records after its HELLOs (StreamOptions.leave_tls, the default), so
each byte is encrypted once. Three "info" lines split the cost: the same bytes through TlsSocket
alone (no framing), the framing + lz4 + AES-GCM over plain TCP (no TLS at all), and the stream
with TLS records kept under the frames (leave_tls=False: everything encrypted twice).

Run as root from the repo: .venv/bin/python bench/stream.py [--mib 512] [--rounds 3] [--criu-mib 256]
[--pages-dir DIR]. Besides one line per case, `info criu-pages: <ratio>` gives the ratio for the
real CRIU page images. The last line is
`bench stream: <stream/raw MB/s, incompressible pages> ratio (target >= 0.7)`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.stream import (
    Control,
    FileChunk,
    PageBatch,
    StreamOptions,
    TlsSocket,
    accept_receiver,
    accept_tls,
    connect_tls,
    open_sender,
)
from core.security import pki
from core.security import tls as fleet_tls

PAGE = 4096
RAW_PORT = 7601
STREAM_PORT = 7602
TLS_ONLY_PORT = 7603  # info: the same bytes through TlsSocket, no framing
PLAIN_STREAM_PORT = 7604  # info: framing + lz4 + AES-GCM over plain TCP, no TLS
MIB = 1 << 20


# ---- data sets ----


def incompressible(mib: int) -> bytes:
    return os.urandom(mib * MIB)


def synthetic_pages(mib: int, seed: int = 7) -> bytes:
    """A third zero pages, a third text-like pages, a third random pages, shuffled."""
    n = mib * MIB // PAGE
    rng = random.Random(seed)
    words = [bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(2000)]
    text = b" ".join(rng.choices(words, k=400_000))  # ~2.4 MB of word soup to cut pages from
    noise = os.urandom(n // 3 * PAGE + PAGE)
    kinds = [i % 3 for i in range(n)]
    rng.shuffle(kinds)
    out = bytearray(n * PAGE)
    view = memoryview(out)
    r = 0
    for i, kind in enumerate(kinds):
        if kind == 1:
            off = rng.randrange(0, len(text) - PAGE)
            view[i * PAGE : (i + 1) * PAGE] = text[off : off + PAGE]
        elif kind == 2:
            view[i * PAGE : (i + 1) * PAGE] = noise[r * PAGE : (r + 1) * PAGE]
            r += 1
    return bytes(out)


def criu_pages(directory: Path) -> bytes:
    """Concatenated CRIU pages-*.img contents (raw page data), cut to whole pages."""
    files = sorted(directory.rglob("pages-*.img"))
    if not files:
        raise SystemExit(f"no pages-*.img under {directory}")
    blob = b"".join(f.read_bytes() for f in files)
    return blob[: len(blob) // PAGE * PAGE]


# ---- receivers (namespace B) ----


def raw_server(listener: socket.socket) -> None:
    buf = bytearray(MIB)
    while True:
        conn, _ = listener.accept()
        with conn:
            while conn.recv_into(buf):
                pass
            conn.sendall(b"k")


def tls_only_server(listener: socket.socket, paths: pki.HostCertPaths) -> None:
    ctx = fleet_tls.server_context(paths)
    view = memoryview(bytearray(MIB))
    while True:
        sock, _ = listener.accept()
        conn = TlsSocket.handshake(sock, ctx, server_side=True)
        while conn.recv_into(view):
            pass
        conn.sendall(b"k")
        conn.close()


async def stream_server(listener: socket.socket, paths: pki.HostCertPaths | None) -> None:
    ctx = fleet_tls.server_context(paths) if paths is not None else None
    loop = asyncio.get_running_loop()
    listener.setblocking(False)
    while True:
        if ctx is not None:
            conn: object = await accept_tls(listener, ctx)
        else:
            conn, _ = await loop.sock_accept(listener)
        ch = await accept_receiver(conn, "bench", "bench-b")
        got = 0
        async for msg in ch:
            if isinstance(msg, PageBatch):
                got += msg.raw_size
            elif isinstance(msg, FileChunk):
                got += len(msg.data)
            elif isinstance(msg, Control) and msg.body.get("type") == "done":
                await ch.send_control({"type": "ack", "bytes": got})
        await ch.end()
        await ch.close()


def serve(args: argparse.Namespace) -> None:
    paths = side_paths(args.pki, "b")
    listeners = {
        port: socket.create_server(("0.0.0.0", port))
        for port in (RAW_PORT, STREAM_PORT, TLS_ONLY_PORT, PLAIN_STREAM_PORT)
    }
    threading.Thread(target=raw_server, args=(listeners[RAW_PORT],), daemon=True).start()
    threading.Thread(target=tls_only_server, args=(listeners[TLS_ONLY_PORT], paths), daemon=True).start()
    print("ready", flush=True)

    async def both() -> None:
        await asyncio.gather(
            stream_server(listeners[STREAM_PORT], paths), stream_server(listeners[PLAIN_STREAM_PORT], None)
        )

    asyncio.run(both())


# ---- sender (namespace A) ----


def send_raw(host: str, data: bytes) -> float:
    with socket.create_connection((host, RAW_PORT)) as sock:
        started = time.perf_counter()
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        if sock.recv(1) != b"k":
            raise RuntimeError("raw receiver did not acknowledge")
        return time.perf_counter() - started


def send_tls_only(host: str, paths: pki.HostCertPaths, data: bytes) -> float:
    ctx = fleet_tls.client_context(paths)
    sock = socket.create_connection((host, TLS_ONLY_PORT))
    conn = TlsSocket.handshake(sock, ctx, server_side=False, server_hostname="bench-b")
    view = memoryview(data)
    started = time.perf_counter()
    for off in range(0, len(view), MIB):  # frame-sized writes, as the stream does
        conn.sendall(view[off : off + MIB])
    conn.shutdown_write()
    ack = bytearray(1)
    if conn.recv_into(memoryview(ack)) != 1:
        raise RuntimeError("TLS receiver did not acknowledge")
    elapsed = time.perf_counter() - started
    conn.close()
    return elapsed


async def send_stream(
    host: str, paths: pki.HostCertPaths, data: bytes, as_file: bool, tls: bool = True, leave_tls: bool = True
) -> tuple[float, dict[str, Any]]:
    if tls:
        ctx = fleet_tls.client_context(paths)
        conn: object = await connect_tls(host, STREAM_PORT, ctx, server_hostname="bench-b")
    else:
        conn = socket.create_connection((host, PLAIN_STREAM_PORT))
    ch = await open_sender(conn, "bench", "bench-a", options=StreamOptions(leave_tls=leave_tls))
    started = time.perf_counter()
    if as_file:
        await ch.send_file(data, "bench.img")
    else:
        await ch.send_pages(range(len(data) // PAGE), data)
    await ch.send_control({"type": "done"})
    reply = await ch.receive()
    elapsed = time.perf_counter() - started
    if not isinstance(reply, Control) or reply.body.get("bytes") != len(data):
        raise RuntimeError(f"stream receiver answered {reply!r}")
    await ch.end()
    if await ch.receive() is not None:
        raise RuntimeError("stream receiver sent more than its ack")
    await ch.close()
    stats = {
        "wire": ch.sent.wire_bytes,
        "frames": ch.sent.frames,
        "compressed": ch.sent.compressed_frames,
        "zero_pages": ch.sent.zero_pages,
        "tls": (conn.version() or "?") + (" handshake, then direct frames" if ch.direct else " records")
        if isinstance(conn, TlsSocket)
        else "no TLS",
        "cipher": (conn.cipher() or ("?",))[0] if isinstance(conn, TlsSocket) else "-",
    }
    return elapsed, stats


def send(args: argparse.Namespace) -> None:
    paths = side_paths(args.pki, "a")
    sets: list[tuple[str, bytes, bool]] = []
    rand = incompressible(args.mib)
    sets.append(("incompressible", rand, False))
    sets.append(("criu-pages", criu_pages(Path(args.pages_dir)), False))
    sets.append(("synthetic-pages", synthetic_pages(max(args.mib // 2, 3)), False))
    sets.append(("incompressible-file", rand, True))
    results: dict[str, Any] = {}
    for name, data, as_file in sets:
        raw_times: list[float] = []
        stream_times: list[float] = []
        stats: dict[str, Any] = {}
        # Warm-up: one untimed run of each side, then alternate which goes first.
        send_raw(args.host, data)
        asyncio.run(send_stream(args.host, paths, data, as_file))
        for r in range(args.rounds):
            order = ("raw", "stream") if r % 2 == 0 else ("stream", "raw")
            for side in order:
                if side == "raw":
                    raw_times.append(send_raw(args.host, data))
                else:
                    elapsed, stats = asyncio.run(send_stream(args.host, paths, data, as_file))
                    stream_times.append(elapsed)
        results[name] = {
            "bytes": len(data),
            "raw": [len(data) / t / 1e6 for t in raw_times],
            "stream": [len(data) / t / 1e6 for t in stream_times],
            "stats": stats,
        }
    # Where the cost goes, on the incompressible pages: TLS alone, and our layer alone.
    tls_only: list[float] = []
    plain: list[float] = []
    twice: list[float] = []
    asyncio.run(send_stream(args.host, paths, rand, False, tls=False))
    asyncio.run(send_stream(args.host, paths, rand, False, leave_tls=False))
    for _ in range(args.rounds):
        tls_only.append(len(rand) / send_tls_only(args.host, paths, rand) / 1e6)
        plain.append(len(rand) / asyncio.run(send_stream(args.host, paths, rand, False, tls=False))[0] / 1e6)
        twice.append(len(rand) / asyncio.run(send_stream(args.host, paths, rand, False, leave_tls=False))[0] / 1e6)
    results["info"] = {"tls_only": tls_only, "stream_without_tls": plain, "tls_records_kept": twice}
    print(json.dumps(results), flush=True)


# ---- orchestration (root namespace) ----


# ---- real CRIU page images (root namespace, before the bench starts) ----


@contextlib.contextmanager
def criu_dump(resident_mib: int) -> Any:
    """Dump a running memhog (tests/workloads) with `criu dump` into a tmpfs dir; yields the dir.

    memhog fills every page with xorshift output, so these images are as incompressible as the
    urandom case, but they are CRIU's real pages-*.img (laid out by CRIU, with the binary's and
    libc's pages among them).
    """
    from tests.harness.workloads import static_binary

    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="fm-bench-criu-") as tmp:
        where = Path(tmp)
        binary = where / "memhog"
        binary.write_bytes(static_binary("memhog"))
        binary.chmod(0o755)
        log = where / "memhog.out"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [str(binary), str(resident_mib), "0", str(where / "status")],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        try:
            deadline = time.monotonic() + 60
            while b"memhog ready" not in log.read_bytes():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"memhog did not start: {log.read_text(errors='replace')[-500:]}")
                time.sleep(0.05)
            images = where / "images"
            images.mkdir()
            dump = subprocess.run(
                ["criu", "dump", "-t", str(proc.pid), "-D", str(images), "-o", "dump.log"],
                capture_output=True,
                text=True,
            )
            if dump.returncode != 0:
                log_file = images / "dump.log"
                tail = log_file.read_text(errors="replace")[-1000:] if log_file.exists() else ""
                raise SystemExit(f"criu dump failed ({dump.returncode}): {dump.stderr[-500:]}{tail}")
            yield images
        finally:
            if proc.poll() is None:  # criu dump kills the task; only a failed dump leaves it
                proc.kill()
            proc.wait()


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@contextlib.contextmanager
def veth_pair() -> Any:
    """Two namespaces joined by a veth pair; 10.x addresses exist only inside them."""
    tag = secrets.token_hex(2)
    ns_a, ns_b = f"fmbench-a-{tag}", f"fmbench-b-{tag}"
    dev_a, dev_b = f"fmba{tag}", f"fmbb{tag}"
    octet = int(tag, 16) % 200 + 20
    addr_a, addr_b = f"10.{octet}.77.1", f"10.{octet}.77.2"
    try:
        ip("netns", "add", ns_a)
        ip("netns", "add", ns_b)
        ip("link", "add", dev_a, "type", "veth", "peer", "name", dev_b)
        ip("link", "set", dev_a, "netns", ns_a)
        ip("link", "set", dev_b, "netns", ns_b)
        ip("-n", ns_a, "addr", "add", f"{addr_a}/30", "dev", dev_a)
        ip("-n", ns_b, "addr", "add", f"{addr_b}/30", "dev", dev_b)
        for ns, dev in ((ns_a, dev_a), (ns_b, dev_b)):
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "link", "set", dev, "up")
        yield ns_a, ns_b, addr_b
    finally:
        for ns in (ns_a, ns_b):  # deleting a namespace deletes its end of the veth, and so the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", dev_a], capture_output=True)


def make_pki(directory: Path) -> None:
    pki.init_ca(directory / "ca")
    for side in ("a", "b"):
        pki.issue_host(directory / "ca", f"bench-{side}", directory / side)


def side_paths(directory: Path, side: str) -> pki.HostCertPaths:
    where = directory / side
    return pki.HostCertPaths(ca_file=where / "ca.pem", cert_file=where / "host.pem", key_file=where / "host-key.pem")


def orchestrate(args: argparse.Namespace) -> None:
    if os.geteuid() != 0:
        raise SystemExit("bench/stream.py needs root (network namespaces)")
    me = [sys.executable, str(Path(__file__).resolve())]
    # SIGTERM/SIGHUP unwind through the finally blocks below, so namespaces never leak.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(1))
    with contextlib.ExitStack() as stack:
        pages_dir = Path(args.pages_dir).resolve() if args.pages_dir else stack.enter_context(criu_dump(args.criu_mib))
        out = run_cases(args, me, pages_dir)
    report(json.loads(out.strip().splitlines()[-1]))


def run_cases(args: argparse.Namespace, me: list[str], pages_dir: Path) -> str:
    with tempfile.TemporaryDirectory(prefix="fm-bench-") as tmp, veth_pair() as (ns_a, ns_b, addr_b):
        make_pki(Path(tmp))
        server = subprocess.Popen(
            ["ip", "netns", "exec", ns_b, *me, "--serve", "--pki", tmp], stdout=subprocess.PIPE, text=True
        )
        try:
            assert server.stdout is not None
            if server.stdout.readline().strip() != "ready":
                raise SystemExit("receiver did not start")
            cmd = ["ip", "netns", "exec", ns_a, *me, "--send", "--pki", tmp, "--host", addr_b]
            cmd += ["--mib", str(args.mib), "--rounds", str(args.rounds), "--pages-dir", str(pages_dir)]
            return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
        finally:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def report(results: dict[str, Any]) -> None:
    ratios: dict[str, float] = {}
    info = results.pop("info")
    for name, res in results.items():
        raw, stream = statistics.median(res["raw"]), statistics.median(res["stream"])
        st = res["stats"]
        print(
            f"case {name}: {res['bytes'] / MIB:.0f} MiB  raw {raw:.0f} MB/s  stream {stream:.0f} MB/s  "
            f"ratio {stream / raw:.2f}  (wire {st['wire'] / res['bytes']:.2f}x of raw bytes, "
            f"{st['compressed']}/{st['frames']} frames compressed, {st['zero_pages']} zero pages elided, "
            f"{st['tls']} {st['cipher']}; runs raw {[round(x) for x in res['raw']]} "
            f"stream {[round(x) for x in res['stream']]}, per-round ratios {spread_ratios(res)})"
        )
        ratios[name] = stream / raw
    headline = ratios["incompressible"]
    raw_incompressible = statistics.median(results["incompressible"]["raw"])
    for label, key in (
        ("TLS only (TlsSocket, no framing)", "tls_only"),
        ("framing + lz4 + AES-GCM, no TLS", "stream_without_tls"),
        ("stream with TLS records kept (leave_tls=False, encrypted twice)", "tls_records_kept"),
    ):
        speed = statistics.median(info[key])
        print(
            f"info {label}: {speed:.0f} MB/s, {speed / raw_incompressible:.2f} of raw "
            f"(runs {[round(x) for x in info[key]]})"
        )
    print(f"info criu-pages: {ratios['criu-pages']:.2f} ratio (stream / raw, real CRIU page images)")
    print(f"bench stream: {headline:.2f} ratio (target >= 0.7)")


def spread_ratios(res: dict[str, Any]) -> str:
    """Each timed stream round against the raw round next to it: the spread contention causes."""
    per_round = [s / r for s, r in zip(res["stream"], res["raw"], strict=True)]
    return f"{min(per_round):.2f}..{max(per_round):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=512, help="incompressible data set size")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--criu-mib", type=int, default=256, help="memhog size for the CRIU page images")
    parser.add_argument("--pages-dir", help="send the pages-*.img of this CRIU dump dir instead of a fresh dump")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--send", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pki", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--host", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args)
    elif args.send:
        send(args)
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
