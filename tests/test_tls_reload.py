"""Reloading certificates in place (core/security/reload.py, SIGHUP in both daemons).

Real OpenSSL handshakes over 127.0.0.1: a live server keeps its listener and its open connections
while a reload changes the certificate new handshakes see; bad files are refused and change nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from core.lifecycle import reload_on_hangup
from core.security import HostCertPaths, client_context, init_ca, issue_client, issue_host, server_context
from core.security.reload import TlsContexts
from core.security.tls import TlsConfigError

REPO = Path(__file__).resolve().parent.parent
IO_TIMEOUT = 10.0


@dataclass(frozen=True)
class Pki:
    root: Path
    ca_dir: Path
    served: HostCertPaths  # the files the server under test loads (and reloads) from
    client: HostCertPaths


def serial_of(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = init_ca(tmp_path / "ca")
    served = issue_host(ca.directory, "node1", tmp_path / "node1", ["127.0.0.1"])
    client = issue_host(ca.directory, "node2", tmp_path / "node2", ["127.0.0.1"])
    return Pki(tmp_path, ca.directory, served, client)


def reissue(pki: Pki, name: str = "node1") -> int:
    """A new certificate and key for `name` in the served files (what `ferryctl certs issue --force` does)."""
    issue_host(pki.ca_dir, name, pki.served.cert_file.parent, ["127.0.0.1"], force=True)
    return serial_of(pki.served.cert_file)


class EchoServer:
    """Answers each connection with the client's certificate serial, then echoes lines."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.port = 0

    async def __aenter__(self) -> EchoServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.ctx)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._handlers:
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            peer = writer.get_extra_info("peercert")
            writer.write(f"{peer['serialNumber']}\n".encode())
            while line := await reader.readline():
                writer.write(line)
                await writer.drain()
        except (OSError, ssl.SSLError):
            pass
        finally:
            writer.close()


@dataclass
class Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    server_serial: int
    client_serial_seen: int  # the serial of our certificate, as the server saw it

    async def echo(self, text: str) -> str:
        async with asyncio.timeout(IO_TIMEOUT):
            self.writer.write(f"{text}\n".encode())
            await self.writer.drain()
            return (await self.reader.readline()).decode().strip()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await self.writer.wait_closed()


async def connect(ctx: ssl.SSLContext, port: int, name: str = "node1") -> Connection:
    async with asyncio.timeout(IO_TIMEOUT):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=name)
        served = x509.load_der_x509_certificate(writer.get_extra_info("ssl_object").getpeercert(binary_form=True))
        seen = int((await reader.readline()).decode().strip(), 16)
    return Connection(reader, writer, served.serial_number, seen)


async def served_serial(ctx: ssl.SSLContext, port: int, name: str = "node1") -> int:
    """The serial of the certificate a TLS server presents (any protocol above TLS)."""
    async with asyncio.timeout(IO_TIMEOUT):
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=name)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der).serial_number
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


async def until_served(ctx: ssl.SSLContext, port: int, serial: int) -> None:
    """Wait until the server at `port` presents the certificate `serial` (a reload is asynchronous)."""
    deadline = asyncio.get_running_loop().time() + IO_TIMEOUT
    while (served := await served_serial(ctx, port)) != serial:
        assert asyncio.get_running_loop().time() < deadline, f"still serving {served:x}, not {serial:x}"
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def connected(ctx: ssl.SSLContext, port: int, name: str = "node1") -> AsyncIterator[Connection]:
    conn = await connect(ctx, port, name)
    try:
        yield conn
    finally:
        await conn.close()


async def test_reload_swaps_the_served_certificate_and_open_connections_carry_on(pki: Pki) -> None:
    contexts = TlsContexts()
    old_serial = serial_of(pki.served.cert_file)
    async with EchoServer(contexts.server(pki.served)) as server:
        before = await connect(client_context(pki.client), server.port)
        try:
            assert before.server_serial == old_serial
            assert await before.echo("one") == "one"

            new_serial = reissue(pki)
            assert new_serial != old_serial
            loaded = contexts.reload()
            assert loaded[str(pki.served.cert_file)].serial_number == new_serial

            async with connected(client_context(pki.client), server.port) as after:
                assert after.server_serial == new_serial
                assert await after.echo("two") == "two"
            # The connection from before the reload keeps its session and its certificate.
            assert await before.echo("three") == "three"
            assert before.server_serial == old_serial
        finally:
            await before.close()


async def test_reload_swaps_the_certificate_a_client_presents(pki: Pki) -> None:
    """Client contexts (peer dials, the coordinator's calls to agents) change as well."""
    contexts = TlsContexts()
    client = contexts.client(pki.served)  # node1 dials node2
    server_ctx = TlsContexts().server(pki.client)
    async with EchoServer(server_ctx) as server:
        async with connected(client, server.port, "node2") as conn:
            assert conn.client_serial_seen == serial_of(pki.served.cert_file)
        new_serial = reissue(pki)
        contexts.reload()
        async with connected(client, server.port, "node2") as conn:
            assert conn.client_serial_seen == new_serial


def _garbage_cert(pki: Pki) -> str:
    pki.served.cert_file.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    return "holds no readable PEM certificate"


def _key_of_another_certificate(pki: Pki) -> str:
    shutil.copyfile(pki.client.key_file, pki.served.key_file)
    return "does not fit"


def _certificate_from_another_ca(pki: Pki) -> str:
    other = init_ca(pki.root / "other-ca")
    issue_host(other.directory, "node1", pki.root / "other", ["127.0.0.1"])
    for name in ("host.pem", "host-key.pem"):
        shutil.copyfile(pki.root / "other" / name, pki.served.cert_file.parent / name)
    return "was not issued by the CA"


def _expired_certificate(pki: Pki) -> str:
    now = dt.datetime.now(dt.UTC)
    out = pki.served.cert_file.parent
    issue_host(pki.ca_dir, "node1", out, ["127.0.0.1"], not_after=now - dt.timedelta(days=1), force=True)
    return "not now"


def _ops_certificate(pki: Pki) -> str:
    issue_client(pki.ca_dir, "alice", pki.root / "alice")
    shutil.copyfile(pki.root / "alice" / "client.pem", pki.served.cert_file)
    shutil.copyfile(pki.root / "alice" / "client-key.pem", pki.served.key_file)
    return "is not an agent certificate"


def _missing_key(pki: Pki) -> str:
    pki.served.key_file.unlink()
    return "cannot read the key"


def _empty_ca_file(pki: Pki) -> str:
    reissue(pki)  # a good certificate, but the CA file is broken: still refused as a whole
    pki.served.ca_file.write_text("")
    return "holds no readable PEM certificate"


BAD_FILES: list[Callable[[Pki], str]] = [
    _garbage_cert,
    _key_of_another_certificate,
    _certificate_from_another_ca,
    _expired_certificate,
    _ops_certificate,
    _missing_key,
    _empty_ca_file,
]


@pytest.mark.parametrize("spoil", BAD_FILES, ids=lambda f: f.__name__.strip("_"))
async def test_bad_files_are_refused_and_the_old_certificate_stays(
    pki: Pki, spoil: Callable[[Pki], str], caplog: pytest.LogCaptureFixture
) -> None:
    contexts = TlsContexts()
    old_serial = serial_of(pki.served.cert_file)
    async with EchoServer(contexts.server(pki.served)) as server:
        expected = spoil(pki)
        with pytest.raises(TlsConfigError, match=expected):
            contexts.reload()
        assert not contexts.reload_logged()
        refusals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("tls reload refused")]
        assert refusals and expected in refusals[-1] and "keeping the current certificates" in refusals[-1]
        async with connected(client_context(pki.client), server.port) as conn:
            assert conn.server_serial == old_serial
            assert await conn.echo("still") == "still"
        # Once the files are good again, the next reload takes them.
        new_serial = reissue(pki)
        shutil.copyfile(pki.ca_dir / "ca.pem", pki.served.ca_file)
        assert contexts.reload_logged()
        async with connected(client_context(pki.client), server.port) as conn:
            assert conn.server_serial == new_serial


async def test_sighup_reloads_on_the_event_loop(pki: Pki) -> None:
    contexts = TlsContexts()
    async with EchoServer(contexts.server(pki.served)) as server:
        new_serial = reissue(pki)
        with reload_on_hangup(contexts.reload_logged):
            os.kill(os.getpid(), signal.SIGHUP)
            await until_served(client_context(pki.client), server.port, new_serial)


async def test_ca_rotation_through_a_bundle(pki: Pki) -> None:
    """The CA rotation of docs/security.md: trust old and new CA, move the hosts, drop the old CA."""
    old_ca = pki.ca_dir / "ca.pem"
    new_ca = init_ca(pki.root / "new-ca")
    moved = issue_host(new_ca.directory, "node2", pki.root / "node2-new", ["127.0.0.1"])
    contexts = TlsContexts()
    async with EchoServer(contexts.server(pki.served)) as server:
        # Before: a host already on the new CA is refused (the server trusts only the old one).
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError, ValueError)):
            await connect(client_context(moved), server.port)

        # Step 1: every host's CA file becomes the bundle old + new, reloaded in place.
        bundle = old_ca.read_bytes() + new_ca.cert_file.read_bytes()
        pki.served.ca_file.write_bytes(bundle)
        contexts.reload()
        moved_bundle = HostCertPaths(pki.root / "bundle.pem", moved.cert_file, moved.key_file)
        moved_bundle.ca_file.write_bytes(bundle)
        async with connected(client_context(moved_bundle), server.port) as conn:  # new-CA client in
            assert conn.client_serial_seen == serial_of(moved.cert_file)
        async with connected(client_context(pki.client), server.port) as conn:  # old-CA client still in
            assert await conn.echo("old") == "old"

        # Step 2: the server moves to a certificate from the new CA, still with the bundle.
        issue_host(new_ca.directory, "node1", pki.served.cert_file.parent, ["127.0.0.1"], force=True)
        pki.served.ca_file.write_bytes(bundle)  # issue_host wrote the new CA alone
        contexts.reload()
        async with connected(client_context(moved_bundle), server.port) as conn:
            assert conn.server_serial == serial_of(pki.served.cert_file)
        # A client that still trusts only the old CA no longer accepts the server: why the bundle
        # goes to every host before any host moves.
        with pytest.raises(ssl.SSLCertVerificationError):
            await connect(client_context(pki.client), server.port)

        # A certificate from a CA outside the bundle is refused at reload, as at start.
        stranger = init_ca(pki.root / "stranger-ca")
        issue_host(stranger.directory, "node1", pki.root / "stranger", ["127.0.0.1"])
        shutil.copyfile(pki.root / "stranger" / "host.pem", pki.served.cert_file)
        shutil.copyfile(pki.root / "stranger" / "host-key.pem", pki.served.key_file)
        with pytest.raises(TlsConfigError, match="was not issued by the CA"):
            contexts.reload()


_AGENT_SCRIPT = """
import sys
from agent import daemon
from agent.metrics import AgentMetrics
from core.security.reload import TlsContexts

class FakeAgent:
    def __init__(self):
        self.metrics = AgentMetrics()
        self.images = self.containers = self
        self.tls_contexts = TlsContexts()
    async def list(self):
        return []
    async def close(self):
        pass

async def open_agent(config):
    return FakeAgent()

daemon._open_real_agent = open_agent  # the real one needs containerd
sys.exit(daemon.main(sys.argv[1:]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_agent_daemon_reloads_its_ops_listener_on_sighup(pki: Pki, short_dir: Path) -> None:
    """`systemctl reload` sends SIGHUP: the agent daemon's TLS listener serves the new certificate,
    the process stays the same, and a bad file is refused with a log line while the old one stays."""
    port = _free_port()
    config = short_dir / "agent.toml"
    config.write_text(
        f'[api]\nlisten = "unix://{short_dir}/agent.sock"\ntls_listen = "127.0.0.1:{port}"\n'
        f'[tls]\nca_file = "{pki.served.ca_file}"\ncert_file = "{pki.served.cert_file}"\n'
        f'key_file = "{pki.served.key_file}"\n'
    )
    script = short_dir / "fake_agent.py"
    script.write_text(_AGENT_SCRIPT)
    ops = issue_client(pki.ca_dir, "alice", pki.root / "alice")
    notify_path = short_dir / "notify.sock"
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify_sock:
        notify_sock.bind(str(notify_path))
        notify_sock.setblocking(False)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            "--config",
            str(config),
            cwd=REPO,
            env={**os.environ, "NOTIFY_SOCKET": str(notify_path), "PYTHONPATH": str(REPO)},
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert await asyncio.wait_for(loop.sock_recv(notify_sock, 4096), 30) == b"READY=1"
            assert await served_serial(client_context(ops), port) == serial_of(pki.served.cert_file)

            new_serial = reissue(pki)
            proc.send_signal(signal.SIGHUP)
            await until_served(client_context(ops), port, new_serial)

            pki.served.key_file.write_text("garbage\n")
            proc.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.5)
            assert await served_serial(client_context(ops), port) == new_serial
            assert proc.returncode is None  # the same process throughout
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(30):
                _, err = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.returncode == 0, err
    records = [json.loads(line) for line in err.decode().splitlines() if line.strip()]
    reloaded = [r for r in records if r["msg"] == "tls certificates reloaded"]
    assert [r["serial"] for r in reloaded] == [f"{new_serial:x}"]
    refused = [r["msg"] for r in records if r["msg"].startswith("tls reload refused")]
    assert len(refused) == 1 and str(pki.served.key_file) in refused[0], refused


async def test_renewed_contexts_are_replaced_not_changed(pki: Pki) -> None:
    """The peer port's contexts (handshakes in worker threads): a reload makes a new one, and the
    one a running handshake holds is left as it was; a refused reload keeps the current one."""
    contexts = TlsContexts()
    renewed = contexts.renewed(pki.served, lambda: TlsContexts().server(pki.served))
    first = renewed.get()
    assert renewed.get() is first
    async with EchoServer(first) as old_server:
        new_serial = reissue(pki)
        contexts.reload()
        second = renewed.get()
        assert second is not first
        async with EchoServer(second) as new_server, connected(client_context(pki.client), new_server.port) as conn:
            assert conn.server_serial == new_serial
        async with connected(client_context(pki.client), old_server.port) as conn:
            assert conn.server_serial != new_serial  # the old context was not touched
    pki.served.key_file.write_text("garbage\n")
    assert not contexts.reload_logged()
    assert renewed.get() is second


@dataclass(frozen=True)
class TwoCas:
    """Hosts on CA1 (the pki fixture's) and on CA2, all trusting the bundle CA1 + CA2 at first."""

    ca1: Path
    ca2: Path
    files: dict[str, HostCertPaths]  # by "<name>-ca<n>": trusting the bundle, each its own CA file

    def drop_ca1(self, name: str) -> None:
        self.files[name].ca_file.write_bytes(self.ca2.read_bytes())


def _two_cas(pki: Pki) -> TwoCas:
    ca2 = init_ca(pki.root / "ca2")
    bundle = pki.ca_dir.joinpath("ca.pem").read_bytes() + ca2.cert_file.read_bytes()
    files: dict[str, HostCertPaths] = {}
    for n, ca_dir in ((1, pki.ca_dir), (2, ca2.directory)):
        for host in ("node1", "node2"):
            key = f"{host}-ca{n}"
            issued = issue_host(ca_dir, host, pki.root / key, ["127.0.0.1"])
            files[key] = HostCertPaths(pki.root / key / "bundle.pem", issued.cert_file, issued.key_file)
            files[key].ca_file.write_bytes(bundle)
    return TwoCas(pki.ca_dir / "ca.pem", ca2.cert_file, files)


REFUSED = (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError, ValueError)


async def test_a_reloaded_server_refuses_clients_of_a_removed_ca(pki: Pki) -> None:
    """CA rotation's finish: the CA file no longer holds CA1, and a reload (no restart) makes the
    listener refuse client certificates from CA1, with and without SNI; CA2's still get in."""
    cas = _two_cas(pki)
    contexts = TlsContexts()
    async with EchoServer(contexts.server(cas.files["node1-ca2"])) as server:
        for client, name in [("node2-ca1", "node1"), ("node2-ca2", "node1"), ("node2-ca1", "127.0.0.1")]:
            async with connected(client_context(cas.files[client]), server.port, name) as conn:
                assert conn.client_serial_seen == serial_of(cas.files[client].cert_file)
        open_before = await connect(client_context(cas.files["node2-ca1"]), server.port)
        try:
            cas.drop_ca1("node1-ca2")
            contexts.reload()
            # "127.0.0.1": Python sends no SNI for an IP address; the refusal does not depend on it.
            for name in ("node1", "127.0.0.1"):
                with pytest.raises(REFUSED):
                    await connect(client_context(cas.files["node2-ca1"]), server.port, name)
                async with connected(client_context(cas.files["node2-ca2"]), server.port, name) as conn:
                    assert conn.client_serial_seen == serial_of(cas.files["node2-ca2"].cert_file)
            # A connection made before the reload carries on.
            assert await open_before.echo("still") == "still"
        finally:
            await open_before.close()


async def test_a_reloaded_client_refuses_servers_of_a_removed_ca(pki: Pki) -> None:
    cas = _two_cas(pki)
    contexts = TlsContexts()
    client = contexts.client(cas.files["node2-ca2"])
    async with (
        EchoServer(TlsContexts().server(cas.files["node1-ca1"])) as old_server,
        EchoServer(TlsContexts().server(cas.files["node1-ca2"])) as new_server,
    ):
        for server in (old_server, new_server):
            async with connected(client, server.port) as conn:
                assert await conn.echo("before") == "before"
        cas.drop_ca1("node2-ca2")
        contexts.reload()
        with pytest.raises(ssl.SSLCertVerificationError):
            await connect(client, old_server.port)
        async with connected(client, new_server.port) as conn:
            assert conn.server_serial == serial_of(cas.files["node1-ca2"].cert_file)


async def test_a_refused_reload_keeps_trusting_the_old_ca(pki: Pki) -> None:
    cas = _two_cas(pki)
    contexts = TlsContexts()
    async with EchoServer(contexts.server(cas.files["node1-ca2"])) as server:
        cas.files["node1-ca2"].ca_file.write_bytes(cas.ca1.read_bytes())  # no longer holds the cert's CA
        with pytest.raises(TlsConfigError, match="was not issued by the CA"):
            contexts.reload()
        async with connected(client_context(cas.files["node2-ca1"]), server.port) as conn:
            assert await conn.echo("kept") == "kept"


async def test_renewed_peer_contexts_refuse_a_removed_ca(pki: Pki) -> None:
    """The peer port's contexts (`renewed`, made again from the files) drop CA1 as well."""
    cas = _two_cas(pki)
    contexts = TlsContexts()
    files = cas.files["node1-ca2"]
    server = contexts.renewed(files, lambda: server_context(files))
    client = contexts.renewed(files, lambda: client_context(files))
    cas.drop_ca1("node1-ca2")
    contexts.reload()
    async with EchoServer(server.get()) as listener:
        with pytest.raises(REFUSED):
            await connect(client_context(cas.files["node2-ca1"]), listener.port)
        async with connected(client_context(cas.files["node2-ca2"]), listener.port) as conn:
            assert await conn.echo("in") == "in"
    async with EchoServer(TlsContexts().server(cas.files["node2-ca1"])) as old_server:
        with pytest.raises(ssl.SSLCertVerificationError):
            await connect(client.get(), old_server.port, "node2")


async def test_a_reload_keeps_what_the_caller_set_on_the_context(pki: Pki) -> None:
    """The coordinator's listener takes connections without a client certificate (CERT_OPTIONAL,
    set after the context is made): the contexts a reload makes keep that."""
    contexts = TlsContexts()
    ctx = contexts.server(pki.served)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    reissue(pki)
    contexts.reload()
    conn = ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)
    assert conn.context is not ctx  # made from the reload's context
    assert conn.context.verify_mode == ssl.CERT_OPTIONAL
