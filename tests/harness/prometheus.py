"""Run Debian's `prometheus` server as a real process for tests, inside a network namespace.

`PrometheusProcess` starts the server with a given configuration file (a temporary TSDB, the web
listener on the namespace's loopback), waits until it is ready, answers HTTP API queries from
inside the namespace, and stops it with SIGTERM. Only tests start it: scripts/setup-host installs
the package for `promtool` and leaves its service disabled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tests.harness.daemons import log_tail, start_daemon, terminate
from tests.harness.netns import acall_in_netns, nsenter_argv

START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
PORT = 19090


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


class PrometheusProcess:
    """One Prometheus server in `netns`, its TSDB and log under `workdir`."""

    def __init__(self, workdir: Path, config: Path, netns: str) -> None:
        self.workdir = workdir
        self.config = config
        self.netns = netns
        self.log_path = workdir / "prometheus.log"
        self.base = f"http://127.0.0.1:{PORT}"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("prometheus is not installed: run scripts/setup-host")
        argv = [
            *nsenter_argv(self.netns),
            binary,
            f"--config.file={self.config}",
            f"--storage.tsdb.path={self.workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{PORT}",
        ]

        async def ready() -> bool:
            with contextlib.suppress(OSError, ValueError):
                await acall_in_netns(self.netns, _get, f"{self.base}/api/v1/status/runtimeinfo")
                return True
            return False

        self.proc = await start_daemon(
            "prometheus", argv, self.log_path, ready, within=START_TIMEOUT, stop_within=STOP_TIMEOUT
        )

    async def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path> from inside the namespace; the `data` of a successful answer."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        body = await acall_in_netns(self.netns, _get, f"{self.base}/api/v1/{path}{query}")
        assert body["status"] == "success", body
        return body["data"]

    async def stop(self) -> int | None:
        proc, self.proc = self.proc, None
        return None if proc is None else await terminate(proc, STOP_TIMEOUT)

    def logs(self) -> str:
        return log_tail(self.log_path)
