"""Agent-to-agent security: the fleet CA, host/ops certificates, mutual TLS over loopback, ferryctl certs.

Every handshake here is real OpenSSL over 127.0.0.1. Refusals are asserted on the side that refuses,
by its verification error (the side that is refused only sees the connection drop).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import json
import os
import ssl
import stat
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.config import AgentConfig, TlsConfig, parse_config
from core.errors import ConfigError, InvalidRequest
from core.security import (
    HostCertPaths,
    HostId,
    PeerIdentityError,
    Role,
    client_context,
    init_ca,
    issue_client,
    issue_host,
    open_peer,
    peer_identity,
    peer_role,
    server_context,
)
from core.security.pki import CaAlreadyExists, CertAlreadyExists, InvalidIdentity, PkiError, validate_name
from core.security.tls import TlsConfigError, check_files, parse_peer_listen

REPO = Path(__file__).resolve().parent.parent
FERRYCTL = REPO / ".venv" / "bin" / "ferryctl"
IO_TIMEOUT = 10.0

# OpenSSL X509_V_ERR_* codes, as SSLCertVerificationError.verify_code reports them.
CERT_NOT_YET_VALID = 9
CERT_HAS_EXPIRED = 10
UNABLE_TO_GET_ISSUER_CERT_LOCALLY = 20
INVALID_PURPOSE = 26
HOSTNAME_MISMATCH = 62


@dataclass(frozen=True)
class Fleet:
    ca_dir: Path
    node1: HostCertPaths
    node2: HostCertPaths
    alice: HostCertPaths  # ops
    expired: HostCertPaths
    future: HostCertPaths
    rogue_node1: HostCertPaths  # another CA (same CA name!), same host name; trusts the fleet CA
    rogue_ca_file: Path


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    root = tmp_path_factory.mktemp("pki")
    ca = init_ca(root / "ca")
    now = dt.datetime.now(dt.UTC)
    node1 = issue_host(ca.directory, "node1", root / "node1", ["127.0.0.1", "::1"])
    node2 = issue_host(ca.directory, "node2", root / "node2", ["127.0.0.1"])
    alice = issue_client(ca.directory, "alice", root / "alice")
    expired = issue_host(ca.directory, "old", root / "old", not_after=now - dt.timedelta(days=1))
    future = issue_host(
        ca.directory,
        "early",
        root / "early",
        not_before=now + dt.timedelta(days=1),
        not_after=now + dt.timedelta(days=30),
    )
    # An impostor CA with the fleet CA's very name: only the key tells them apart.
    rogue_ca = init_ca(root / "rogue-ca")
    rogue = issue_host(rogue_ca.directory, "node1", root / "rogue", ["127.0.0.1"])
    rogue_node1 = HostCertPaths(ca_file=ca.cert_file, cert_file=rogue.cert_file, key_file=rogue.key_file)
    return Fleet(root / "ca", node1, node2, alice, expired, future, rogue_node1, rogue_ca.cert_file)


@dataclass(frozen=True)
class Accepted:
    identity: HostId
    role: Role
    version: str


class MtlsServer:
    """A loopback TCP server that upgrades each connection with `server_context` and records the
    outcome: the peer's verified identity, or the handshake's exception."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.outcomes: asyncio.Queue[Accepted | BaseException] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> MtlsServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        # Connection handlers are tasks of their own; the leak check wants them finished.
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            # The handshake is done here, not by start_server(ssl=...), so its failure is observable.
            await writer.start_tls(self.ctx, ssl_handshake_timeout=IO_TIMEOUT)
        except (ssl.SSLError, OSError) as exc:
            self.outcomes.put_nowait(exc)
            writer.close()
            return
        ssl_object = writer.get_extra_info("ssl_object")
        accepted = Accepted(peer_identity(ssl_object), peer_role(ssl_object), ssl_object.version())
        self.outcomes.put_nowait(accepted)
        writer.write(f"{accepted.identity} {accepted.role}\n".encode())
        with contextlib.suppress(OSError):
            await writer.drain()
            writer.close()
            await writer.wait_closed()

    async def outcome(self) -> Accepted | BaseException:
        async with asyncio.timeout(IO_TIMEOUT):
            return await self.outcomes.get()


@contextlib.asynccontextmanager
async def serving(files: HostCertPaths) -> AsyncIterator[MtlsServer]:
    async with MtlsServer(server_context(files)) as server:
        yield server


async def exchange(ctx: ssl.SSLContext, port: int, server_hostname: str) -> bytes:
    """Connect, handshake and read the server's one line; b'' when the server hangs up."""
    async with asyncio.timeout(IO_TIMEOUT):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=server_hostname)
        try:
            return await reader.readline()
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()


def without_client_cert(ca_file: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(ca_file))
    return ctx


def with_max_version(ctx: ssl.SSLContext, version: ssl.TLSVersion) -> ssl.SSLContext:
    ctx.maximum_version = version
    return ctx


TLS_VERSIONS = [
    pytest.param(ssl.TLSVersion.TLSv1_3, id="tls1.3"),
    pytest.param(ssl.TLSVersion.TLSv1_2, id="tls1.2"),
]


# --- mutual TLS: accepted ------------------------------------------------------------------------


async def test_mutual_tls_server_sees_client_identity(fleet: Fleet) -> None:
    async with serving(fleet.node1) as server:
        line = await exchange(client_context(fleet.node2), server.port, "node1")
        accepted = await server.outcome()
    assert line == b"node2 agent\n"
    assert accepted == Accepted(HostId("node2"), Role.AGENT, "TLSv1.3")


@pytest.mark.parametrize("version", TLS_VERSIONS)
async def test_tls12_still_works_and_13_is_preferred(fleet: Fleet, version: ssl.TLSVersion) -> None:
    async with serving(fleet.node1) as server:
        line = await exchange(with_max_version(client_context(fleet.node2), version), server.port, "node1")
        accepted = await server.outcome()
    assert line == b"node2 agent\n"
    assert isinstance(accepted, Accepted)
    assert accepted.version == {ssl.TLSVersion.TLSv1_3: "TLSv1.3", ssl.TLSVersion.TLSv1_2: "TLSv1.2"}[version]


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
async def test_tls11_client_refused(fleet: Fleet) -> None:
    ctx = client_context(fleet.node2)
    # SECLEVEL=0 so this client really offers TLS 1.1 and the *server's* minimum is what refuses.
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    async with serving(fleet.node1) as server:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await exchange(ctx, server.port, "node1")
        refused = await server.outcome()
    assert isinstance(refused, ssl.SSLError) and refused.reason == "UNSUPPORTED_PROTOCOL", refused


async def test_ops_client_accepted_with_ops_role(fleet: Fleet) -> None:
    async with serving(fleet.node1) as server:
        line = await exchange(client_context(fleet.alice), server.port, "node1")
        accepted = await server.outcome()
    assert line == b"alice ops\n"
    assert isinstance(accepted, Accepted) and accepted.role is Role.OPS


async def test_aiohttp_server_and_client(fleet: Fleet) -> None:
    async def whoami(request: web.Request) -> web.Response:
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        return web.json_response({"identity": peer_identity(ssl_object), "role": peer_role(ssl_object)})

    app = web.Application()
    app.router.add_get("/whoami", whoami)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context(fleet.node1))
        await site.start()
        port = runner.addresses[0][1]
        connector = aiohttp.TCPConnector(ssl=client_context(fleet.node2))
        async with aiohttp.ClientSession(connector=connector) as session:
            # Dial the address, verify the name: the identity is the host name, not the IP.
            async with session.get(f"https://127.0.0.1:{port}/whoami", server_hostname="node1") as resp:
                assert resp.status == 200
                assert await resp.json() == {"identity": "node2", "role": "agent"}
            # The same server is closed to a client without a certificate.
            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=without_client_cert(fleet.node1.ca_file))
            ) as anonymous:
                with pytest.raises(aiohttp.ClientError):
                    async with anonymous.get(f"https://127.0.0.1:{port}/whoami", server_hostname="node1") as resp:
                        await resp.read()
    finally:
        await runner.cleanup()


async def test_open_peer_checks_identity(fleet: Fleet) -> None:
    ctx = client_context(fleet.node2)
    async with serving(fleet.node1) as server:
        reader, writer = await open_peer(ctx, HostId("node1"), "127.0.0.1", server.port)
        try:
            assert await reader.readline() == b"node2 agent\n"
        finally:
            writer.close()
            await writer.wait_closed()
        assert isinstance(await server.outcome(), Accepted)
        # node1 answers at this address, but we asked for node2: the client refuses.
        with pytest.raises(ssl.SSLCertVerificationError) as info:
            await open_peer(ctx, HostId("node2"), "127.0.0.1", server.port)
        assert info.value.verify_code == HOSTNAME_MISMATCH
        await server.outcome()  # the server saw the client hang up mid-handshake


async def test_ip_san_verifies_when_dialling_by_address(fleet: Fleet) -> None:
    async with serving(fleet.node1) as server:
        assert await exchange(client_context(fleet.node2), server.port, "127.0.0.1") == b"node2 agent\n"
        await server.outcome()


# --- mutual TLS: the server refuses the client ---------------------------------------------------


@pytest.mark.parametrize("version", TLS_VERSIONS)
async def test_client_without_certificate_refused(fleet: Fleet, version: ssl.TLSVersion) -> None:
    ctx = with_max_version(without_client_cert(fleet.node1.ca_file), version)
    async with serving(fleet.node1) as server:
        with contextlib.suppress(ConnectionError):
            assert await exchange(ctx, server.port, "node1") == b""
        refused = await server.outcome()
    assert isinstance(refused, ssl.SSLError)
    assert refused.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE"


@pytest.mark.parametrize("version", TLS_VERSIONS)
@pytest.mark.parametrize(
    ("client", "verify_code"),
    [
        pytest.param("rogue_node1", UNABLE_TO_GET_ISSUER_CERT_LOCALLY, id="other-ca"),
        pytest.param("expired", CERT_HAS_EXPIRED, id="expired"),
        pytest.param("future", CERT_NOT_YET_VALID, id="not-yet-valid"),
    ],
)
async def test_bad_client_certificate_refused(
    fleet: Fleet, client: str, verify_code: int, version: ssl.TLSVersion
) -> None:
    files: HostCertPaths = getattr(fleet, client)
    ctx = with_max_version(client_context(files), version)
    async with serving(fleet.node1) as server:
        # The client learns nothing but a closed connection; it never gets the server's line.
        with contextlib.suppress(ConnectionError):
            assert await exchange(ctx, server.port, "node1") == b""
        refused = await server.outcome()
    assert isinstance(refused, ssl.SSLCertVerificationError), refused
    assert refused.verify_code == verify_code, refused.verify_message


# --- mutual TLS: the client refuses the server ---------------------------------------------------


@pytest.mark.parametrize(
    ("server_files", "hostname", "verify_code"),
    [
        pytest.param("rogue_node1", "node1", UNABLE_TO_GET_ISSUER_CERT_LOCALLY, id="other-ca"),
        pytest.param("node1", "node2", HOSTNAME_MISMATCH, id="wrong-name"),
        pytest.param("alice", "alice", INVALID_PURPOSE, id="ops-cert-cannot-serve"),
        pytest.param("expired", "old", CERT_HAS_EXPIRED, id="expired"),
        pytest.param("future", "early", CERT_NOT_YET_VALID, id="not-yet-valid"),
    ],
)
async def test_bad_server_refused_by_client(fleet: Fleet, server_files: str, hostname: str, verify_code: int) -> None:
    async with serving(getattr(fleet, server_files)) as server:
        with pytest.raises(ssl.SSLCertVerificationError) as info:
            await exchange(client_context(fleet.node2), server.port, hostname)
        # The server never accepted anyone: it saw the client abort the handshake.
        assert not isinstance(await server.outcome(), Accepted)
    assert info.value.verify_code == verify_code, info.value.verify_message


async def test_client_trusts_fleet_ca_only_not_system_roots(fleet: Fleet) -> None:
    ctx = client_context(fleet.node2)
    subjects = [c["subject"] for c in ctx.get_ca_certs()]
    assert subjects == [((("organizationName", "ferryman"),), (("commonName", "ferryman fleet CA"),))]
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    assert server_context(fleet.node1).verify_mode == ssl.CERT_REQUIRED
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


# --- peer identity -------------------------------------------------------------------------------


def _peercert(cn: str, ou: str | None = "agent", dns: tuple[str, ...] = ()) -> dict[str, object]:
    subject: list[tuple[tuple[str, str], ...]] = [(("organizationName", "ferryman"),)]
    if ou is not None:
        subject.append((("organizationalUnitName", ou),))
    subject.append((("commonName", cn),))
    return {"subject": tuple(subject), "subjectAltName": tuple(("DNS", d) for d in dns)}


def test_peer_identity_from_peercert_dict() -> None:
    assert peer_identity(_peercert("node7", dns=("node7",))) == HostId("node7")
    assert peer_role(_peercert("node7", dns=("node7",))) is Role.AGENT
    assert peer_role(_peercert("bob", ou="ops")) is Role.OPS


@pytest.mark.parametrize(
    "cert",
    [
        pytest.param({}, id="unverified"),  # what getpeercert() returns under CERT_NONE
        pytest.param(None, id="not-tls"),
        pytest.param(_peercert("node7", dns=("node8",)), id="cn-not-in-san"),
        pytest.param(_peercert("Node 7"), id="bad-name"),
    ],
)
def test_peer_identity_refuses(cert: dict[str, object] | None) -> None:
    with pytest.raises(PeerIdentityError):
        peer_identity(cert)


@pytest.mark.parametrize("ou", [None, "admin"])
def test_peer_role_refuses_missing_or_unknown(ou: str | None) -> None:
    with pytest.raises(PeerIdentityError):
        peer_role(_peercert("node7", ou=ou))


# --- the PKI -------------------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ca_files_and_refusal_to_overwrite(tmp_path: Path) -> None:
    ca = init_ca(tmp_path / "ca", name="test fleet", days=30)
    assert _mode(ca.key_file) == 0o600 and _mode(ca.directory) == 0o700
    cert = x509.load_pem_x509_certificate(ca.cert_file.read_bytes())
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert basic.ca and basic.path_length == 0
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "test fleet"
    before = ca.cert_file.read_bytes()
    with pytest.raises(CaAlreadyExists):
        init_ca(tmp_path / "ca")
    assert ca.cert_file.read_bytes() == before
    init_ca(tmp_path / "ca", force=True)
    assert ca.cert_file.read_bytes() != before


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o770, 0o722], ids=oct)
def test_ca_and_out_dirs_must_not_be_writable_by_others(tmp_path: Path, mode: int) -> None:
    # `certs init` into an existing 0777 directory left it 0777: anyone could swap the CA next to its key.
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    with pytest.raises(PkiError, match="group- or world-writable"):
        init_ca(shared)
    assert list(shared.iterdir()) == [] and _mode(shared) == mode
    ca = init_ca(tmp_path / "ca")
    with pytest.raises(PkiError, match="group- or world-writable"):
        issue_host(ca.directory, "node1", shared)
    assert list(shared.iterdir()) == []


def test_ca_dir_of_another_user_is_refused_and_own_dir_is_tightened(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(PkiError, match="owned by uid 65534"):
        init_ca(theirs)
    with pytest.raises(PkiError, match="not a directory"):
        init_ca(_file(tmp_path / "file"))
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o755)
    mine.chmod(0o755)
    ca = init_ca(mine)
    assert _mode(mine) == 0o700 and _mode(ca.key_file) == 0o600


def _file(path: Path) -> Path:
    path.write_text("")
    return path


def test_host_certificate_contents(fleet: Fleet) -> None:
    cert = x509.load_pem_x509_certificate(fleet.node1.cert_file.read_bytes())
    subject = {a.oid: a.value for a in cert.subject}
    assert subject == {
        NameOID.ORGANIZATION_NAME: "ferryman",
        NameOID.ORGANIZATIONAL_UNIT_NAME: "agent",
        NameOID.COMMON_NAME: "node1",
    }
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["node1"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    assert _mode(fleet.node1.key_file) == 0o600
    ca = x509.load_pem_x509_certificate(fleet.node1.ca_file.read_bytes())
    cert.verify_directly_issued_by(ca)


def test_ops_certificate_contents(fleet: Fleet) -> None:
    cert = x509.load_pem_x509_certificate(fleet.alice.cert_file.read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "ops"
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert fleet.alice.cert_file.name == "client.pem" and _mode(fleet.alice.key_file) == 0o600


@pytest.mark.parametrize("name", ["node1", "a", "n-1.rack-2.dc", "x" * 63])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "Node1", "node_1", "-a", "a-", "a..b", "a.", "10.0.0.1", "*.fleet", "x" * 64, "a b", "é"]
)
def test_invalid_names(fleet: Fleet, tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidIdentity):
        issue_host(fleet.ca_dir, name, tmp_path)
    assert not list(tmp_path.iterdir())  # nothing written


def test_invalid_address_refused(fleet: Fleet, tmp_path: Path) -> None:
    with pytest.raises(InvalidIdentity, match=r"300\.1\.1\.1"):
        issue_host(fleet.ca_dir, "node3", tmp_path, ["300.1.1.1"])


def test_issue_refuses_overwrite_unless_forced(fleet: Fleet, tmp_path: Path) -> None:
    first = issue_host(fleet.ca_dir, "node3", tmp_path)
    key = first.key_file.read_bytes()
    with pytest.raises(CertAlreadyExists):
        issue_host(fleet.ca_dir, "node3", tmp_path)
    assert first.key_file.read_bytes() == key
    issue_host(fleet.ca_dir, "node3", tmp_path, force=True)  # rotation
    assert first.key_file.read_bytes() != key and _mode(first.key_file) == 0o600


def test_issue_refuses_to_outlive_ca(tmp_path: Path) -> None:
    ca = init_ca(tmp_path / "ca", days=10)
    with pytest.raises(PkiError, match="after the CA expires"):
        issue_host(ca.directory, "node1", tmp_path / "out", days=11)
    with pytest.raises(InvalidRequest):
        issue_host(ca.directory, "node1", tmp_path / "out", days=0)


def test_issue_without_ca(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="certs init"):
        issue_host(tmp_path, "node1", tmp_path / "out")


def test_check_files(fleet: Fleet) -> None:
    assert check_files(fleet.node1, host="node1").subject.rfc4514_string() == "CN=node1,OU=agent,O=ferryman"
    with pytest.raises(TlsConfigError, match="this host is 'node2'"):
        check_files(fleet.node1, host="node2")
    with pytest.raises(TlsConfigError, match="not issued by"):
        check_files(fleet.rogue_node1)
    with pytest.raises(TlsConfigError, match="not now"):
        check_files(fleet.expired)
    with pytest.raises(TlsConfigError, match="not an agent"):
        check_files(fleet.alice)


async def test_ca_bundle_during_ca_rotation(fleet: Fleet, tmp_path: Path) -> None:
    # Old and new CA in one ca_file: a host re-issued from the new CA still talks to old-CA hosts.
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(fleet.rogue_ca_file.read_bytes() + fleet.node1.ca_file.read_bytes())
    new_host = HostCertPaths(bundle, fleet.rogue_node1.cert_file, fleet.rogue_node1.key_file)
    old_host = HostCertPaths(bundle, fleet.node2.cert_file, fleet.node2.key_file)
    assert check_files(new_host, host="node1") and check_files(old_host, host="node2")
    async with serving(new_host) as server:
        assert await exchange(client_context(old_host), server.port, "node1") == b"node2 agent\n"
        assert isinstance(await server.outcome(), Accepted)


def test_context_with_missing_files(tmp_path: Path) -> None:
    missing = HostCertPaths(tmp_path / "ca.pem", tmp_path / "host.pem", tmp_path / "host-key.pem")
    with pytest.raises(TlsConfigError, match="not found"):
        server_context(missing)
    with pytest.raises(TlsConfigError, match="not found"):
        check_files(missing)


# --- config --------------------------------------------------------------------------------------


def test_tls_config_defaults_and_parsing(fleet: Fleet) -> None:
    assert AgentConfig().tls == TlsConfig()
    assert TlsConfig().cert_file == "/etc/ferryman/pki/host.pem"
    assert AgentConfig().api.peer_listen == ""
    config = parse_config(
        {
            "api": {"peer_listen": "127.0.0.1:7443"},
            "tls": {
                "ca_file": str(fleet.node1.ca_file),
                "cert_file": str(fleet.node1.cert_file),
                "key_file": str(fleet.node1.key_file),
            },
        }
    )
    assert parse_peer_listen(config.api.peer_listen) == ("127.0.0.1", 7443)
    # TlsConfig is accepted wherever HostCertPaths is.
    assert server_context(config.tls).verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(ConfigError, match="unknown keys"):
        parse_config({"tls": {"cafile": "/x"}})


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", None), ("0.0.0.0:7443", ("0.0.0.0", 7443)), ("[::1]:7443", ("::1", 7443)), ("node1:1", ("node1", 1))],
)
def test_parse_peer_listen(text: str, expected: tuple[str, int] | None) -> None:
    assert parse_peer_listen(text) == expected


@pytest.mark.parametrize("text", ["7443", "host:", "host:0", "host:70000", "::1:7443", "host:port"])
def test_parse_peer_listen_refuses(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_peer_listen(text)


# --- ferryctl certs ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ferryctl() -> Iterator[Path]:
    if not os.access(FERRYCTL, os.X_OK):
        pytest.fail(f"{FERRYCTL} missing: run scripts/setup-host", pytrace=False)
    yield FERRYCTL


async def run_ferryctl(ferryctl: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        str(ferryctl),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        # No agent address: these commands must not need one.
        env={k: v for k, v in os.environ.items() if k != "FERRYMAN_AGENT"},
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_ferryctl_certs_end_to_end(ferryctl: Path, tmp_path: Path) -> None:
    ca_dir, a_dir, b_dir, ops_dir = tmp_path / "ca", tmp_path / "a", tmp_path / "b", tmp_path / "ops"
    rc, out, err = await run_ferryctl(ferryctl, "certs", "init", "--dir", str(ca_dir), "--name", "lab CA")
    assert (rc, err) == (0, ""), err
    assert _mode(ca_dir / "ca-key.pem") == 0o600 and _mode(ca_dir / "ca.pem") == 0o644

    rc, out, err = await run_ferryctl(
        ferryctl, "certs", "issue", "node-a", "--ca-dir", str(ca_dir), "--out", str(a_dir),
        "--address", "127.0.0.1", "--address", "fd00::1", "--days", "30",
    )  # fmt: skip
    assert (rc, err) == (0, ""), err
    assert str(a_dir / "host.pem") in out
    rc, _, err = await run_ferryctl(ferryctl, "certs", "issue", "node-b", "--ca-dir", str(ca_dir), "--out", str(b_dir))
    assert rc == 0, err
    rc, _, err = await run_ferryctl(
        ferryctl, "certs", "issue", "carol", "--role", "ops", "--ca-dir", str(ca_dir), "--out", str(ops_dir)
    )
    assert rc == 0, err
    for key in (a_dir / "host-key.pem", b_dir / "host-key.pem", ops_dir / "client-key.pem"):
        assert _mode(key) == 0o600, key

    cert = x509.load_pem_x509_certificate((a_dir / "host.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["node-a"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("fd00::1"),
    ]
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(days=30)

    rc, out, err = await run_ferryctl(ferryctl, "--json", "certs", "show", str(a_dir / "host.pem"))
    assert rc == 0, err
    shown = json.loads(out)
    assert shown["subject"] == "CN=node-a,OU=agent,O=ferryman"
    assert shown["issuer"] == "CN=lab CA,O=ferryman"
    assert shown["role"] == "agent"
    assert shown["dns_names"] == ["node-a"] and shown["ip_addresses"] == ["127.0.0.1", "fd00::1"]
    assert shown["extended_key_usage"] == ["serverAuth", "clientAuth"]
    assert shown["sha256_fingerprint"] == cert.fingerprint(hashes.SHA256()).hex(":").upper()
    assert shown["status"].startswith("valid")

    rc, out, err = await run_ferryctl(ferryctl, "certs", "show", str(ops_dir / "client.pem"))
    assert rc == 0, err
    assert "CN=carol,OU=ops,O=ferryman" in out and "clientAuth" in out and "serverAuth" not in out

    # The CLI's files are a working deployment: node-b dials node-a by name over mutual TLS.
    node_a = HostCertPaths(a_dir / "ca.pem", a_dir / "host.pem", a_dir / "host-key.pem")
    node_b = HostCertPaths(b_dir / "ca.pem", b_dir / "host.pem", b_dir / "host-key.pem")
    async with serving(node_a) as server:
        assert await exchange(client_context(node_b), server.port, "node-a") == b"node-b agent\n"
        assert await server.outcome() == Accepted(HostId("node-b"), Role.AGENT, "TLSv1.3")


async def test_ferryctl_certs_errors(ferryctl: Path, tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    assert (await run_ferryctl(ferryctl, "certs", "init", "--dir", str(ca_dir)))[0] == 0
    before = (ca_dir / "ca.pem").read_bytes()

    rc, _, err = await run_ferryctl(ferryctl, "certs", "init", "--dir", str(ca_dir))
    assert rc == 1 and err.startswith("error: ca_exists:"), err
    assert (ca_dir / "ca.pem").read_bytes() == before
    rc, _, err = await run_ferryctl(ferryctl, "certs", "init", "--dir", str(ca_dir), "--force")
    assert rc == 0 and (ca_dir / "ca.pem").read_bytes() != before

    rc, _, err = await run_ferryctl(ferryctl, "certs", "issue", "Bad_Name", "--ca-dir", str(ca_dir), "--out", "x")
    assert rc == 1 and err.startswith("error: invalid_identity:"), err
    rc, _, err = await run_ferryctl(
        ferryctl, "certs", "issue", "carol", "--role", "ops", "--address", "10.0.0.1",
        "--ca-dir", str(ca_dir), "--out", str(tmp_path / "o"),
    )  # fmt: skip
    assert rc == 2 and "--address" in err
    rc, _, err = await run_ferryctl(ferryctl, "certs", "issue", "n1", "--role", "root", "--ca-dir", "x", "--out", "y")
    assert rc == 2 and "invalid choice" in err
    rc, _, err = await run_ferryctl(ferryctl, "certs", "show", str(tmp_path / "nope.pem"))
    assert rc == 1 and err.startswith("error: pki_error:"), err

    # An existing world-writable directory: refused with a clear error, left as it was, nothing written.
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    rc, _, err = await run_ferryctl(ferryctl, "certs", "init", "--dir", str(shared))
    assert rc == 1 and err.startswith("error: pki_error: refusing to write keys to") and "world-writable" in err, err
    rc, _, err = await run_ferryctl(ferryctl, "certs", "issue", "n1", "--ca-dir", str(ca_dir), "--out", str(shared))
    assert rc == 1 and "world-writable" in err, err
    assert list(shared.iterdir()) == [] and stat.S_IMODE(shared.stat().st_mode) == 0o777


def test_no_agent_code_depends_on_the_test_harness() -> None:
    for path in (REPO / "agent").rglob("*.py"):
        assert "tests.harness" not in path.read_text(), path
