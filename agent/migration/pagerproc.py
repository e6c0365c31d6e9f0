"""The target's pager process: where a post-copy migration keeps its files, and starting the pager.

The pager (agent/migration/pager.py) is a process of its own, in its own session, so that it
outlives an agent restart like CRIU's lazy-pages daemon.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class PostcopyPaths:
    """Where a post-copy migration keeps its files on the target (all under the migration's work dir)."""

    work: Path

    @property
    def images(self) -> Path:
        return self.work / "images"

    @property
    def criu_work(self) -> Path:
        return self.work / "criu-work"

    @property
    def agent_socket(self) -> Path:
        return self.work / "pager.sock"

    @property
    def pid_file(self) -> Path:
        return self.work / "restored.pid"

    @property
    def result(self) -> Path:
        return self.work / "pager.json"


Process = subprocess.Popen[bytes]

SOCKET_BUFFER = 4 << 20
"""Send buffer of the pager's sockets (agent -> pager, pager -> daemon): a pushed MiB goes into the
kernel in one write and out in one read. With the default ~200 KiB, each MiB took about ten wake-ups
of both ends, and on a busy host each waits for a CPU: the relay waited 2.4-3.3 s of a 9-11 s push
for the pager to read."""
_SO_SNDBUFFORCE = 32  # Linux: past net.core.wmem_max, for a privileged process


def widen_send_buffer(sock: socket.socket | Any) -> None:
    """Best effort: SOCKET_BUFFER, above net.core.wmem_max if allowed, else as much as it allows."""
    for option in (_SO_SNDBUFFORCE, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
            return
        except OSError:
            continue


def spawn_pager(paths: PostcopyPaths, reconnect_timeout: float) -> tuple[Process, socket.socket]:
    """Start the pager; returns it and the other end of its page socket, for the lazy-pages daemon.

    The pager starts early (it is a Python process: its start-up must not add to the downtime); the
    daemon can only start once the images are here.
    """
    daemon_end, pager_end = socket.socketpair()
    try:
        widen_send_buffer(pager_end)  # the pager's replies to the daemon
        pager_end.set_inheritable(True)
        pager = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent.migration.pager",
                "--ps-fd",
                str(pager_end.fileno()),
                "--agent-socket",
                str(paths.agent_socket),
                "--pid-file",
                str(paths.pid_file),
                "--result",
                str(paths.result),
                "--reconnect-timeout",
                str(reconnect_timeout),
                "--images",
                str(paths.images),
            ],
            pass_fds=(pager_end.fileno(),),
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # outlives an agent restart, like the daemon
        )
    except BaseException:
        daemon_end.close()
        raise
    finally:
        pager_end.close()
    return pager, daemon_end
