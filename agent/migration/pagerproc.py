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


def spawn_pager(paths: PostcopyPaths, reconnect_timeout: float) -> tuple[Process, socket.socket]:
    """Start the pager; returns it and the other end of its page socket, for the lazy-pages daemon.

    The pager starts early (it is a Python process: its start-up must not add to the downtime); the
    daemon can only start once the images are here.
    """
    daemon_end, pager_end = socket.socketpair()
    try:
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
