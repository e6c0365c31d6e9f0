"""The pager: the one process that holds the target's end of the lazy-pages daemon's page socket.

While a migrated task runs on the target with pages still on the source (POSTCOPY), the daemon's
page requests pass through here to the agent, which carries them over the migration stream. The
pager is its own process, in its own session, so that an agent restart does not cut the daemon off:
it keeps the unanswered requests and sends them again when the (new) agent is back.

It also guards the workload. If the daemon stopped before every page arrived, or the agent stays
away longer than --reconnect-timeout, or the agent aborts the migration (SIGTERM), the restored task
would read zero-filled memory where its pages should be. The pager kills it first.

Usage: python -m agent.migration.pager --ps-fd N --agent-socket PATH --pid-file PATH --result PATH
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

from agent.checkpoint.images import PAGE_SIZE
from agent.checkpoint.pageserver import HEADER, STATUS, PageServerError, Request


class Pager:
    def __init__(self, ps: socket.socket, agent_socket: Path, pid_file: Path, result: Path, timeout: float) -> None:
        self.ps = ps
        self.agent_socket = agent_socket
        self.pid_file = pid_file
        self.result = result
        self.timeout = timeout
        self.outstanding: collections.deque[Request] = collections.deque()
        self.pages = 0
        self.closed = False  # the daemon's close was answered: every page is on this host
        self._agent: asyncio.StreamWriter | None = None
        self._agent_back = asyncio.Event()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        ps_reader, ps_writer = await asyncio.open_unix_connection(sock=self.ps, limit=1 << 16)
        tasks = {
            asyncio.create_task(self._requests(ps_reader), name="requests"),
            asyncio.create_task(self._agent_loop(ps_writer), name="agent"),
            asyncio.create_task(stop.wait(), name="sigterm"),
        }
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        finished = next(iter(done))
        error = None if finished.cancelled() else finished.exception()
        if finished.get_name() == "requests" and error is None and self.closed:
            self._write_result(ok=True, error="")
            return 0
        if finished.get_name() == "sigterm":
            reason = "the migration was aborted"
        elif error is not None:
            reason = str(error)
        else:
            reason = "the lazy-pages daemon stopped before every page arrived"
        self._kill_workload()
        self._write_result(ok=False, error=reason)
        return 1

    async def _requests(self, reader: asyncio.StreamReader) -> None:
        """Daemon -> agent. Ends at the daemon's EOF (after its close, or because it died)."""
        while True:
            try:
                raw = await reader.readexactly(HEADER.size)
            except asyncio.IncompleteReadError:
                return
            request = Request.parse(raw)
            self.outstanding.append(request)
            if self._agent is not None:
                with contextlib.suppress(OSError):
                    self._agent.write(raw)

    async def _agent_loop(self, ps_writer: asyncio.StreamWriter) -> None:
        """Agent -> daemon, reconnecting; replies are passed on whole, so a cut never splits one."""
        lost_at = time.monotonic()
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.agent_socket), limit=1 << 22)
            except OSError:
                if time.monotonic() - lost_at > self.timeout:
                    raise PageServerError(f"the agent stayed away for more than {self.timeout:.0f} s") from None
                await asyncio.sleep(0.1)
                continue
            self._agent = writer
            for request in self.outstanding:  # unanswered ones again: a GET is idempotent
                writer.write(request.raw)
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                await self._replies(reader, ps_writer)
            self._agent = None
            writer.close()
            lost_at = time.monotonic()

    async def _replies(self, reader: asyncio.StreamReader, ps_writer: asyncio.StreamWriter) -> None:
        """Each reply starts with a 32-byte header; a close's status is its first 4 bytes."""
        while True:
            header = await reader.readexactly(HEADER.size)
            if not self.outstanding:
                raise PageServerError("a reply nobody asked for")
            request = self.outstanding[0]
            if request.closes:
                out = header[: STATUS.size]
            else:
                nr_pages = HEADER.unpack(header)[1]
                out = header + await reader.readexactly(nr_pages * PAGE_SIZE)
                self.pages += nr_pages
            ps_writer.write(out)
            await ps_writer.drain()
            self.outstanding.popleft()
            if request.closes:
                self.closed = True

    def _kill_workload(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(self.pid_file.read_text()), signal.SIGKILL)  # init of the task's pid namespace

    def _write_result(self, *, ok: bool, error: str) -> None:
        tmp = self.result.with_suffix(".tmp")
        tmp.write_text(json.dumps({"ok": ok, "pages": self.pages, "error": error}))
        tmp.replace(self.result)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ferryman-pager")
    parser.add_argument("--ps-fd", type=int, required=True)
    parser.add_argument("--agent-socket", type=Path, required=True)
    parser.add_argument("--pid-file", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--reconnect-timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    ps = socket.socket(fileno=args.ps_fd)
    pager = Pager(ps, args.agent_socket, args.pid_file, args.result, args.reconnect_timeout)
    return asyncio.run(pager.run())


if __name__ == "__main__":
    sys.exit(main())
