"""The client of bench/clients.py, run in the mesh's client namespace (stdlib only: it starts fast).

  python bench/_client.py IP PORT SHORT_PER_S TIMEOUT_S [PERIOD_MS]

Until its stdin closes it keeps
  - one persistent TCP connection in lock-step: a request every PERIOD_MS (1) milliseconds, each
    reply read and checked before the next request (the time of every good reply is recorded);
  - a load of short connections, SHORT_PER_S a second: connect, one request, read the reply, close.
Requests are "<seq> <nonce>\\n"; a good reply is "<seq> <mix(seq, nonce) in hex> ok\\n" (memhog's
protocol, tests/workloads/memhog.c). Anything else is a failure: connect errors, resets, a closed
connection, no reply within TIMEOUT_S, a wrong reply, or "bad" (the server's page check failed).
The persistent connection reconnects after a failure. Then it prints one JSON object: wall-clock
times (time.time(), comparable with the agents' records) of the good replies and of the failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import json
import os
import resource
import signal
import socket
import sys
import threading
import time
from typing import Any

MASK = (1 << 64) - 1


def mix(seq: int, nonce: int) -> int:
    """memhog's digest (splitmix64's finalizer), to check each reply."""
    z = ((seq * 0x9E3779B97F4A7C15) & MASK) ^ nonce
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def expected(seq: int, nonce: int) -> bytes:
    return b"%d %016x ok\n" % (seq, mix(seq, nonce))


def classify(reply: bytes, seq: int, nonce: int) -> str:
    if reply == expected(seq, nonce):
        return "ok"
    if not reply:
        return "closed"
    if reply.endswith(b" bad\n"):
        return "bad page"
    return "wrong reply"


def error_kind(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    return type(exc).__name__


def persistent(
    address: tuple[str, int], timeout: float, period: float, stop: threading.Event, out: dict[str, Any]
) -> None:
    replies: list[float] = []
    errors: list[tuple[float, str]] = []
    out["replies"], out["errors"] = replies, errors
    nonce = int.from_bytes(os.urandom(8), "little")
    sock: socket.socket | None = None
    seq = 0
    next_at = time.monotonic()
    while not stop.is_set():
        try:
            if sock is None:
                sock = socket.create_connection(address, timeout=timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                reader = sock.makefile("rb")
            seq += 1
            sock.sendall(b"%d %d\n" % (seq, nonce))
            kind = classify(reader.readline(), seq, nonce)
        except OSError as exc:
            kind = error_kind(exc)
        if kind == "ok":
            replies.append(time.time())
        else:  # the stream is out of step or gone: start a new connection
            errors.append((time.time(), kind))
            if sock is not None:
                sock.close()
                sock = None
        next_at += period
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:  # late (a stall): no burst to catch up, the pace starts again from now
            next_at = time.monotonic()
    if sock is not None:
        sock.close()


async def one_short(address: tuple[str, int], limit: float, seq: int, nonce: int) -> tuple[float, float, str]:
    started = time.time()
    try:
        async with asyncio.timeout(limit):
            reader, writer = await asyncio.open_connection(*address)
            try:
                writer.write(b"%d %d\n" % (seq, nonce))
                kind = classify(await reader.readline(), seq, nonce)
            finally:
                writer.close()
    except OSError as exc:
        kind = error_kind(exc)
    return started, time.time(), kind


async def short_load(address: tuple[str, int], per_s: float, limit: float, stop: asyncio.Event) -> list[Any]:
    loop = asyncio.get_running_loop()
    nonce = int.from_bytes(os.urandom(8), "little")
    tasks: list[asyncio.Task[tuple[float, float, str]]] = []
    next_at = loop.time()
    seq = 0
    while not stop.is_set():
        seq += 1
        tasks.append(asyncio.create_task(one_short(address, limit, seq, nonce)))
        next_at += 1 / per_s
        with contextlib.suppress(TimeoutError):  # the stop event ends the wait at once
            await asyncio.wait_for(stop.wait(), max(0.0, next_at - loop.time()))
    return list(await asyncio.gather(*tasks))


async def main() -> None:
    ip, port, per_s, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
    period = float(sys.argv[5]) / 1000 if len(sys.argv) > 5 else 0.001
    address = (ip, port)
    faulthandler.register(signal.SIGUSR1)  # where it is, should the bench find it stuck
    # A freeze leaves many short connections open at once.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loop = asyncio.get_running_loop()
    started = time.time()
    stop_thread, stop_load = threading.Event(), asyncio.Event()
    out: dict[str, Any] = {"started": started}
    thread = threading.Thread(target=persistent, args=(address, timeout, period, stop_thread, out), daemon=True)
    thread.start()
    load = asyncio.create_task(short_load(address, per_s, timeout, stop_load))
    await loop.run_in_executor(None, sys.stdin.buffer.read)  # until the bench closes our stdin
    stop_thread.set()
    stop_load.set()
    out["short"] = await load
    await asyncio.to_thread(thread.join)
    out["stopped"] = time.time()
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    asyncio.run(main())
