"""A real Docker distribution registry (Debian's docker-registry) on loopback, for tests and benches."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
from pathlib import Path

import aiohttp


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} not found: run scripts/setup-host")
    return path


class DockerRegistry:
    """One docker-registry process with its own storage, on a random loopback port."""

    def __init__(self, workdir: Path, bind: str = "127.0.0.1") -> None:
        self.workdir = workdir
        self.bind = bind
        self.port = free_port(bind)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"{self.bind}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def config_text(self) -> str:
        storage = self.workdir / "storage"
        return (
            "version: 0.1\n"
            "log:\n  level: warn\n"
            f"storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.host}\n"
        )

    async def start(self) -> None:
        binary = require_binary("docker-registry")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "config.yml"
        config.write_text(self.config_text())
        log = (self.workdir / "registry.log").open("wb")
        self.proc = subprocess.Popen([binary, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
        await self._wait_ready()

    async def _wait_ready(self, timeout: float = 20.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with aiohttp.ClientSession() as session:
            while loop.time() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"docker-registry exited: see {self.workdir / 'registry.log'}")
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with session.get(f"{self.url}/v2/") as resp:
                        if resp.status in (200, 401):
                            return
                await asyncio.sleep(0.05)
        raise RuntimeError(f"docker-registry did not answer on {self.host} within {timeout}s")

    async def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            await asyncio.to_thread(self.proc.wait, 10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait)
        self.proc = None
