"""The target's `criu lazy-pages` daemon: it owns the restored task's userfaultfds and fills them.

It talks the page-server protocol over an inherited socket (`--ps-socket`) instead of TCP: the
other end belongs to ferryman's pager, so no CRIU port is ever open on the fleet network.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
from pathlib import Path

from agent.checkpoint.images import read_pagemaps
from core.errors import FerrymanError

SOCKET_NAME = "lazy-pages.socket"  # CRIU's fixed name, in its work dir; the restore connects to it
# CRIU's page pipes want up to 819 pages per pipe; without CAP_SYS_RESOURCE the sysctl must allow it.
PIPE_MAX_SIZE = 4 << 20
PIPE_MAX_SIZE_SYSCTL = Path("/proc/sys/fs/pipe-max-size")


class LazyPagesError(FerrymanError):
    code = "lazy_pages_failed"
    http_status = 500


def ensure_pipe_max_size() -> None:
    """Raise fs.pipe-max-size to what CRIU's post-copy page pipes need (both sides)."""
    try:
        current = int(PIPE_MAX_SIZE_SYSCTL.read_text())
        if current < PIPE_MAX_SIZE:
            PIPE_MAX_SIZE_SYSCTL.write_text(str(PIPE_MAX_SIZE))
    except (OSError, ValueError) as exc:
        raise LazyPagesError(f"post-copy needs fs.pipe-max-size >= {PIPE_MAX_SIZE}: {exc}") from exc


def lazy_pages(image_dir: Path) -> int:
    """How many pages the dump left for post-copy."""
    return sum(r.nr_pages for pm in read_pagemaps(image_dir) for r in pm.lazy_ranges)


def spawn_daemon(
    image_dir: Path, work_dir: Path, ps_socket: socket.socket, idle_class: bool = True
) -> subprocess.Popen[bytes]:
    """Start the daemon in its own session, so it outlives an agent restart.

    Once the restore is done, CRIU 4.2.1's daemon polls its sockets without ever sleeping (its
    background transfer: epoll with a zero timeout) until the last page is in, one CPU's worth.
    With `idle_class` it runs SCHED_IDLE: the polling takes only CPU nobody else wants, the
    workload and both agents go first (measured at 1 GiB and 50 MB/s: median downtime 463 ms
    against 648 ms, 5 runs each, source and target on one 2-CPU machine). On a target with no
    idle CPU it would then wait behind everything, and so would every fault."""
    work_dir.mkdir(parents=True, exist_ok=True)
    fd = ps_socket.fileno()
    os.set_inheritable(fd, True)
    daemon = subprocess.Popen(
        [
            "criu", "lazy-pages", "--page-server", "--ps-socket", str(fd),
            "--images-dir", str(image_dir), "--work-dir", str(work_dir),
            "--log-file", "lazy-pages.log", "-v2",
        ],
        pass_fds=(fd,),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    if idle_class:
        with contextlib.suppress(OSError):  # it only costs CPU then
            os.sched_setscheduler(daemon.pid, os.SCHED_IDLE, os.sched_param(0))
    return daemon


async def wait_ready(daemon: subprocess.Popen[bytes], work_dir: Path, within: float = 10.0) -> None:
    socket_path = work_dir / SOCKET_NAME
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not socket_path.exists():
        if daemon.poll() is not None:
            raise LazyPagesError(f"criu lazy-pages exited with {daemon.returncode}: {log_tail(work_dir)}")
        if loop.time() > deadline:
            raise LazyPagesError("criu lazy-pages did not get ready")
        await asyncio.sleep(0.001)  # on the downtime path: the restore waits for it


def log_tail(work_dir: Path, lines: int = 5) -> str:
    try:
        text = (work_dir / "lazy-pages.log").read_text(errors="replace")
    except OSError:
        return "no log"
    return " | ".join(line for line in text.splitlines()[-lines:] if "Error" in line) or "see lazy-pages.log"
