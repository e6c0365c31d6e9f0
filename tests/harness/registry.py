"""A real Docker distribution registry (Debian's docker-registry) on loopback, for tests and benches.

Plain HTTP by default; optional htpasswd (basic) auth, token auth backed by
`tests.harness.tokenserver.TokenServer`, and TLS with certificates from `tests.harness.tls`.
`stop()` may be called mid-test to take the registry down and `start()` again brings it back on the
same port with the same storage.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import aiohttp

from agent.config import RegistryConfig
from tests.harness.netns import http_status, nsenter_argv

if TYPE_CHECKING:
    from tests.harness.tls import CertPair
    from tests.harness.tokenserver import TokenServer


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} not found: run scripts/setup-host")
    return path


def htpasswd_lines(users: Mapping[str, str]) -> str:
    """htpasswd content; docker-registry 2.8 accepts only bcrypt entries."""
    import bcrypt  # test-only dependency, imported here so plain registries do not need it

    # Cost 4 (the minimum) keeps each login check fast; the registry re-checks on every request.
    return "".join(
        f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()}\n"
        for user, password in users.items()
    )


@dataclass(frozen=True)
class Notifications:
    """One endpoint the registry POSTs its event envelopes to (distribution's `notifications`), each
    manifest event with its references (`includereferences`)."""

    url: str
    headers: Mapping[str, str]
    ca_file: Path | None = None
    """Trusted for the endpoint's TLS: the registry process's SSL_CERT_FILE (Go reads it)."""

    def config_text(self) -> str:
        headers = "".join(f"        {k}: [{json.dumps(v)}]\n" for k, v in self.headers.items())
        return (
            "notifications:\n  events:\n    includereferences: true\n  endpoints:\n"
            f"    - name: ferryman\n      url: {self.url}\n      headers:\n{headers}"
            "      timeout: 2s\n      threshold: 3\n      backoff: 200ms\n"
        )


class DockerRegistry:
    """One docker-registry process with its own storage, on a random loopback port."""

    def __init__(
        self,
        workdir: Path,
        bind: str = "127.0.0.1",
        *,
        port: int | None = None,
        tls: CertPair | None = None,
        htpasswd: Mapping[str, str] | None = None,
        token: TokenServer | None = None,
        netns: str | None = None,
        notifications: Notifications | None = None,
    ) -> None:
        """`netns`: run inside that named network namespace (plain HTTP; pass `port`, as `bind` is not ours).
        `notifications`: where the registry posts its events."""
        if htpasswd is not None and token is not None:
            raise ValueError("docker-registry supports one auth method at a time")
        if netns is not None and (port is None or tls is not None):
            raise ValueError("a registry in a netns needs an explicit port and no TLS")
        self.workdir = workdir
        self.bind = bind
        self.port = port or free_port(bind)
        self.tls = tls
        self.htpasswd = dict(htpasswd) if htpasswd is not None else None
        self.token = token
        self.netns = netns
        self.notifications = notifications
        # Stable across restarts so upload state signed before a stop() stays valid.
        self._secret = secrets.token_hex(16)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"{self.bind}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "registry.log"

    def registry_config(
        self, *, username: str | None = None, password: str | None = None, trust_ca: bool = True
    ) -> RegistryConfig:
        """The agent-side settings that reach this registry (trust_ca=False leaves the test CA out)."""
        return RegistryConfig(
            host=self.host,
            plain_http=self.tls is None,
            ca_file=str(self.tls.ca_path) if self.tls is not None and trust_ca else None,
            username=username,
            password=password,
        )

    def config_text(self) -> str:
        storage = self.workdir / "storage"
        text = (
            "version: 0.1\n"
            "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.host}\n  secret: {self._secret}\n"
        )
        if self.tls is not None:
            text += f"  tls:\n    certificate: {self.tls.cert_path}\n    key: {self.tls.key_path}\n"
        if self.htpasswd is not None:
            path = self.workdir / "htpasswd"
            path.write_text(htpasswd_lines(self.htpasswd))
            text += f"auth:\n  htpasswd:\n    realm: ferryman-test\n    path: {path}\n"
        if self.token is not None:
            text += (
                "auth:\n  token:\n"
                f"    realm: {self.token.realm}\n"
                f"    service: {self.token.service}\n"
                f"    issuer: {self.token.issuer}\n"
                f"    rootcertbundle: {self.token.rootcertbundle}\n"
            )
        if self.notifications is not None:
            text += self.notifications.config_text()
        return text

    async def start(self) -> None:
        if self.proc is not None:
            return
        binary = require_binary("docker-registry")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "config.yml"
        config.write_text(self.config_text())
        # The child keeps its own copy of the descriptor; ours is closed right away. Popen (not
        # asyncio's subprocess) keeps `proc` usable from sync code and other event loops.
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.to_thread(
                subprocess.Popen,
                [*nsenter_argv(self.netns), binary, "serve", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env(),
            )
        try:
            await self._wait_ready()
        except BaseException:
            await self.stop()
            raise

    def _env(self) -> dict[str, str] | None:
        if self.notifications is None or self.notifications.ca_file is None:
            return None
        return {**os.environ, "SSL_CERT_FILE": str(self.notifications.ca_file)}

    def _client_ssl(self) -> ssl.SSLContext | bool:
        if self.tls is None:
            return False
        return ssl.create_default_context(cafile=str(self.tls.ca_path))

    async def _wait_ready(self, within: float = 20.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        ssl_ctx = self._client_ssl()
        if self.netns is not None:
            await self._wait_ready_in_netns(deadline)
            return
        async with aiohttp.ClientSession() as session:
            while loop.time() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"docker-registry exited: see {self.log_path}")
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with session.get(f"{self.url}/v2/", ssl=ssl_ctx) as resp:
                        if resp.status in (200, 401):
                            return
                await asyncio.sleep(0.05)
        raise RuntimeError(f"docker-registry did not answer on {self.host} within {within}s")

    async def _wait_ready_in_netns(self, deadline: float) -> None:
        # Our own sockets live in another namespace: probe from a thread that joined the registry's.
        assert self.netns is not None
        loop = asyncio.get_running_loop()
        while loop.time() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited: see {self.log_path}")
            if await http_status(self.netns, self.bind, self.port, "/v2/", within=1.0) in (200, 401):
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"docker-registry did not answer on {self.host} in netns {self.netns}")

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

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def __aenter__(self) -> DockerRegistry:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
