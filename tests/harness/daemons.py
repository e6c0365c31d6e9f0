"""What the harness's daemon wrappers share: stopping a process gracefully with a deadline, and the
tail of its log for a failure message."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any


async def terminate(proc: asyncio.subprocess.Process, within: float) -> int:
    """SIGTERM and wait, SIGKILL after `within` seconds; the exit code."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(proc.wait(), within)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
    return await proc.wait()


def log_tail(path: Path, chars: int = 8000) -> str:
    """The last `chars` characters of a log file ("" if it cannot be read)."""
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


async def start_daemon(
    name: str,
    argv: Sequence[str],
    log_path: Path,
    ready: Callable[[], Awaitable[bool]],
    *,
    within: float,
    stop_within: float,
    **spawn: Any,
) -> asyncio.subprocess.Process:
    """Start `argv` with its output appended to `log_path` and poll `ready()` until it says yes.

    RuntimeError with the log's tail if the process exits first ("NAME exited with CODE") or is not
    ready within `within` seconds; the process is stopped before that raises."""
    with log_path.open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=log, stderr=log, stdin=asyncio.subprocess.DEVNULL, **spawn
        )
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            if proc.returncode is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log_tail(log_path)}")
            if await ready():
                return proc
            if loop.time() >= deadline:
                raise RuntimeError(f"{name} did not answer within {within:g}s:\n{log_tail(log_path)}")
            await asyncio.sleep(0.1)
    except BaseException:
        await terminate(proc, stop_within)
        raise
