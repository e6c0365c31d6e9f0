"""Raw HTTP/1.1 over a socket: for requests no HTTP client will send (bad request lines, oversized
headers, broken framing), which aiohttp refuses before the application sees them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from dataclasses import dataclass
from typing import Any

# Each is a whole request; "Connection: close" where the server would otherwise wait for more.
MALFORMED: dict[str, bytes] = {
    "garbage request line": b"GARBAGE\r\n\r\n",
    "bad method token": b"G(T / HTTP/1.1\r\nHost: x\r\n\r\n",
    "unknown HTTP version": b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n",
    "oversized header": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
    "too many headers": (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n"
    ),
    "oversized request line": b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "NUL in a header": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "Content-Length and chunked": (
        b"POST /v1/migrations HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "bad chunk size": (
        b"POST /v1/migrations HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nabc\r\n0\r\n\r\n"
    ),
    "bad gzip body": (
        b"POST /v1/migrations HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\nContent-Length: 5\r\n"
        b"Connection: close\r\n\r\nabcde"
    ),
    "unknown Expect": (
        b"POST /v1/migrations HTTP/1.1\r\nHost: x\r\nExpect: fancy\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
    ),
    # 9 MB: more than either daemon takes (the coordinator's telemetry takes 8 MiB).
    "body too large": (
        b"POST /v1/migrations HTTP/1.1\r\nHost: x\r\nContent-Length: 9000000\r\nConnection: close\r\n\r\n"
        + b"a" * 9_000_000
    ),
    "wrong method": b"PATCH /v1/migrations HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    "unknown route": b"GET /v1/nope/../../etc HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
}


@dataclass(frozen=True)
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def exchange(
    host: str,
    port: int,
    request: bytes,
    *,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    deadline: float = 10.0,
) -> RawResponse:
    """Send `request` as it is and read one response within `deadline` seconds."""
    async with asyncio.timeout(deadline):
        reader, writer = await asyncio.open_connection(host, port, ssl=ssl_context, server_hostname=server_hostname)
        try:
            writer.write(request)
            # The server may answer and close before it has read everything we sent.
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
            length = int(headers.get("content-length", "0"))
            body = await reader.readexactly(length)
            return RawResponse(status, headers, body)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()
