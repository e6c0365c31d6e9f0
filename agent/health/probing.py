"""Running one probe of a container's check: the four kinds, each under the check's timeout.

Network probes go through the probes adapter (agent/probes), from inside the container's network
namespace; exec probes through containerd's exec (agent/containerd/tasks.py), with the container's
own process settings (environment, user, working directory) and the check's command. Whether a
probe passed is decided here from what came back; the state it leads to, in agent/health/states.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import secrets
import signal
from pathlib import Path
from typing import Any, Protocol

from agent.health.spec import MAX_OUTPUT, HealthCheck, Kind
from agent.health.states import ProbeResult
from agent.probes import SERVING, ProbeFailed, connect, grpc_health, http_get, netns_of
from core.errors import FerrymanError

EXEC_GRACE = 2.0
"""Seconds an exec probe killed at its timeout gets to be reaped before the probe gives up on it."""


class ExecTasks(Protocol):
    """containerd's exec of a process into a running task (agent.containerd.tasks.TaskService)."""

    async def exec(
        self, container_id: str, exec_id: str, process_spec: bytes, stdout: str = "", stderr: str = ""
    ) -> None: ...
    async def start_process(self, container_id: str, exec_id: str) -> int: ...
    async def wait_process(self, container_id: str, exec_id: str) -> int: ...
    async def kill_process(self, container_id: str, exec_id: str, signal: int) -> None: ...
    async def delete_process(self, container_id: str, exec_id: str) -> int: ...


def exec_process(container_process: dict[str, Any], command: tuple[str, ...]) -> bytes:
    """The exec'd process's OCI spec: the container's own process (user, env, cwd, capabilities) with
    the check's command and no terminal."""
    process = {k: v for k, v in container_process.items() if k not in ("consoleSize", "terminal")}
    process["args"] = list(command)
    process["terminal"] = False
    return json.dumps(process).encode()


class Prober:
    """Runs probes; one per monitor. `output_dir` holds an exec probe's output while it runs."""

    def __init__(self, tasks: ExecTasks, output_dir: Path) -> None:
        self._tasks = tasks
        self._output_dir = output_dir

    async def probe(self, container_id: str, pid: int, process: dict[str, Any], check: HealthCheck) -> ProbeResult:
        """One probe of `check` against the run whose init process is `pid`; never raises a probe's
        failure, which is a result like any other (a bug still raises)."""
        loop = asyncio.get_running_loop()
        at = dt.datetime.now(dt.UTC)
        began = loop.time()
        try:
            if check.kind is Kind.EXEC:
                passed, output, exit_code = await self._exec(container_id, process, check)
            else:
                passed, output, exit_code = await self._network(netns_of(pid), check)
        except ProbeFailed as exc:
            passed, output, exit_code = False, exc.message, None
        except TimeoutError:
            passed, output, exit_code = False, f"no answer within the timeout ({check.timeout:g} s)", None
        except FerrymanError as exc:  # containerd refused the exec: the task is gone or paused
            passed, output, exit_code = False, exc.message, None
        return ProbeResult(passed, output[:MAX_OUTPUT], at, loop.time() - began, exit_code)

    async def _network(self, netns: str, check: HealthCheck) -> tuple[bool, str, int | None]:
        async with asyncio.timeout(check.timeout):
            if check.kind is Kind.TCP:
                sock = await connect(netns, check.host, check.port)
                sock.close()
                return True, f"connected to {check.target}", None
            if check.kind is Kind.HTTP:
                answer = await http_get(netns, check.host, check.port, check.path, MAX_OUTPUT)
                low, high = check.status
                text = f"HTTP {answer.status} {answer.reason}".rstrip()
                body = answer.body.decode(errors="replace").strip()
                return low <= answer.status <= high, f"{text}: {body}" if body else text, None
            status = await grpc_health(netns, check.host, check.port, check.service, check.timeout)
            return status == SERVING, status, None

    async def _exec(
        self, container_id: str, process: dict[str, Any], check: HealthCheck
    ) -> tuple[bool, str, int | None]:
        exec_id = f"health-{secrets.token_hex(6)}"
        await asyncio.to_thread(self._output_dir.mkdir, parents=True, exist_ok=True)
        capture = OutputFifo(self._output_dir / f"{container_id}.{exec_id}")  # two syscalls: on the loop
        created = False
        try:
            spec = exec_process(process, check.command)
            await self._tasks.exec(container_id, exec_id, spec, str(capture.path), str(capture.path))
            created = True
            await self._tasks.start_process(container_id, exec_id)
            async with asyncio.timeout(check.timeout):
                code = await self._tasks.wait_process(container_id, exec_id)
            # The shim copies the output until the process's pipes close; delete waits for that.
            await self._tasks.delete_process(container_id, exec_id)
            created = False
            return code == 0, capture.output(), code
        finally:
            if created:  # it failed to start, timed out, or the probe was cancelled: reap it, within bounds
                with contextlib.suppress(FerrymanError, TimeoutError):
                    async with asyncio.timeout(EXEC_GRACE):
                        await self._reap(container_id, exec_id)
            capture.close()

    async def _reap(self, container_id: str, exec_id: str) -> None:
        try:
            await self._tasks.delete_process(container_id, exec_id)  # one that never started, or ended
        except FerrymanError:  # still running: a probe past its timeout
            with contextlib.suppress(FerrymanError):
                await self._tasks.kill_process(container_id, exec_id, signal.SIGKILL)
            await self._tasks.wait_process(container_id, exec_id)
            await self._tasks.delete_process(container_id, exec_id)


class OutputFifo:
    """An exec'd process's stdout and stderr, through one FIFO the shim writes into, read as it comes.

    Not a file:// URI as a task's log is: with one, containerd's shim (1.6) closes the file when
    stdout ends, and stderr written after that is lost (its copy shares the descriptor); a probe of
    `cat /missing` then said nothing, 4 times in 60. The FIFO is held open for reading and writing,
    so it never reads as ended before the shim opens it; its bytes are read as they arrive (a
    chatty command does not block on a full pipe) and the first MAX_OUTPUT are kept."""

    def __init__(self, path: Path) -> None:
        self.path = path
        os.mkfifo(path, 0o600)
        self._fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self._kept = bytearray()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._fd, self._read)

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self._fd, 65536)
            except (BlockingIOError, InterruptedError):
                return
            if not data:
                return
            self._kept += data[: max(0, MAX_OUTPUT - len(self._kept))]

    def output(self) -> str:
        """What the process wrote, once the shim is done with it (after the process is deleted)."""
        self._read()
        return self._kept.decode(errors="replace").strip()

    def close(self) -> None:
        if self._fd < 0:
            return
        self._loop.remove_reader(self._fd)
        os.close(self._fd)
        self._fd = -1
        self.path.unlink(missing_ok=True)
