"""TLS contexts for agent-to-agent traffic, and who the verified peer is.

Both ends trust the fleet CA and nothing else (no system roots): a certificate from a public CA,
or from another fleet, is as foreign as none at all. Every refusal (no certificate, wrong CA,
expired, not yet valid, wrong name, wrong key usage) happens inside the OpenSSL handshake, so no
application code runs for an unauthenticated peer.

The identity of a peer is the name in its certificate (`HostId`), never the address it connects
from; its role (agent or ops) is the certificate's subject OU.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import ssl
from collections.abc import Mapping
from typing import Any, NewType, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import NameOID

from core.errors import ConfigError, FerrymanError
from core.security.pki import PkiError, Role, load_certificate, load_certificates, validate_name

HostId = NewType("HostId", str)
"""A verified peer's identity: the CN (and, for agents, the DNS SAN) of its certificate."""

StrPath = str | os.PathLike[str]

# TLS 1.2 only with forward-secret AEAD suites; TLS 1.3 suites are all fine and set separately.
_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


class TlsFiles(Protocol):
    """Anything naming the three PEM files: `TlsConfig`, `HostCertPaths`."""

    @property
    def ca_file(self) -> StrPath: ...

    @property
    def cert_file(self) -> StrPath: ...

    @property
    def key_file(self) -> StrPath: ...


class TlsConfigError(ConfigError):
    """The configured CA, certificate or key cannot be loaded or does not fit together."""

    code = "tls_config_invalid"


class PeerIdentityError(FerrymanError):
    """The peer has no verified certificate, or its certificate carries no usable identity."""

    code = "peer_identity"
    http_status = 403


def _base_context(protocol: int, files: TlsFiles, cls: type[ssl.SSLContext]) -> ssl.SSLContext:
    ctx = cls(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # No maximum: OpenSSL picks the highest both sides speak, i.e. TLS 1.3 between agents.
    ctx.set_ciphers(_TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.verify_mode = ssl.CERT_REQUIRED
    # Strict RFC 5280 checks; our issuer writes conforming certificates, anything else is suspect.
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    try:
        # Only the fleet CA: load_default_certs() is deliberately never called.
        ctx.load_verify_locations(cafile=os.fspath(files.ca_file))
        ctx.load_cert_chain(certfile=os.fspath(files.cert_file), keyfile=os.fspath(files.key_file))
    except FileNotFoundError as exc:
        raise TlsConfigError(f"TLS file not found: {exc.filename}") from exc
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(
            f"cannot load TLS files (ca {files.ca_file}, cert {files.cert_file}, key {files.key_file}): {exc}"
        ) from exc
    return ctx


def server_context(paths: TlsFiles, cls: type[ssl.SSLContext] = ssl.SSLContext) -> ssl.SSLContext:
    """A server context that demands a client certificate signed by the fleet CA.

    OpenSSL checks the client certificate's purpose (clientAuth), dates and chain during the
    handshake; a failing client never reaches the application.
    """
    return _base_context(ssl.PROTOCOL_TLS_SERVER, paths, cls)


def client_context(paths: TlsFiles, cls: type[ssl.SSLContext] = ssl.SSLContext) -> ssl.SSLContext:
    """A client context presenting our certificate and verifying the server against the fleet CA.

    Hostname checking is on: connect with `server_hostname=<peer's HostId>` (see `open_peer`), so
    a valid certificate for a *different* host is refused too.
    """
    ctx = _base_context(ssl.PROTOCOL_TLS_CLIENT, paths, cls)
    ctx.check_hostname = True  # PROTOCOL_TLS_CLIENT's default; stated because it is the point
    return ctx


def _peercert(peer: ssl.SSLObject | ssl.SSLSocket | Mapping[str, Any] | None) -> Mapping[str, Any]:
    if peer is None:
        raise PeerIdentityError("the connection is not TLS")
    cert: Mapping[str, Any] | None = peer.getpeercert() if isinstance(peer, ssl.SSLObject | ssl.SSLSocket) else peer
    # getpeercert() is {} for an unverified certificate and None when there is none.
    if not cert:
        raise PeerIdentityError("the peer presented no verified certificate")
    return cert


def _subject_values(cert: Mapping[str, Any], key: str) -> list[str]:
    # The decoded subject is a tuple of RDNs, each a tuple of (name, value) pairs.
    return [str(value) for rdn in cert.get("subject", ()) for name, value in rdn if name == key]


def peer_identity(peer: ssl.SSLObject | ssl.SSLSocket | Mapping[str, Any] | None) -> HostId:
    """The verified peer's identity, from an SSL object/socket or its `getpeercert()` dict.

    The identity is the subject CN; when the certificate has DNS SANs (agents always do) the CN
    must be one of them, so the name OpenSSL matched for hostname checks and the name we report
    cannot disagree. Only pass objects from contexts that verify (CERT_REQUIRED).
    """
    cert = _peercert(peer)
    names = _subject_values(cert, "commonName")
    if len(names) != 1:
        raise PeerIdentityError(f"the peer certificate has {len(names)} common names, expected exactly one")
    name = names[0]
    dns = [str(value) for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"]
    if dns and name not in dns:
        raise PeerIdentityError(f"the peer certificate's CN {name!r} is not among its DNS names {dns}")
    try:
        validate_name(name)
    except FerrymanError as exc:
        raise PeerIdentityError(f"the peer certificate names no valid identity: {exc.message}") from exc
    return HostId(name)


def peer_role(peer: ssl.SSLObject | ssl.SSLSocket | Mapping[str, Any] | None) -> Role:
    """The verified peer's role (agent or ops), from its subject OU."""
    cert = _peercert(peer)
    units = _subject_values(cert, "organizationalUnitName")
    if len(units) != 1:
        raise PeerIdentityError(f"the peer certificate has {len(units)} OU values, expected exactly one role")
    try:
        return Role(units[0])
    except ValueError:
        raise PeerIdentityError(f"the peer certificate has an unknown role {units[0]!r}") from None


async def open_peer(
    ctx: ssl.SSLContext,
    peer: HostId | str,
    host: str,
    port: int,
    *,
    handshake_timeout: float = 10.0,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Dial `host:port` over mutual TLS, accepting only the agent whose identity is `peer`.

    The address is where to connect; `peer` is who must answer (it is the server_hostname the
    certificate is checked against), so a re-pointed address cannot impersonate another host.
    """
    # The TCP connect is bounded by the caller (asyncio.timeout); the handshake by us.
    reader, writer = await asyncio.open_connection(
        host, port, ssl=ctx, server_hostname=peer, ssl_handshake_timeout=handshake_timeout
    )
    try:
        # OpenSSL already matched the name; this also insists the server is an agent, not ops.
        ssl_object = writer.get_extra_info("ssl_object")
        if peer_identity(ssl_object) != peer or peer_role(ssl_object) is not Role.AGENT:
            raise PeerIdentityError(f"{host}:{port} is not the agent {peer!r}")
    except BaseException:
        writer.close()
        raise
    return reader, writer


def parse_peer_listen(text: str) -> tuple[str, int] | None:
    """`ApiConfig.peer_listen` as (host, port); None when empty (the peer listener is disabled).

    IPv6 literals go in brackets: `[::1]:7443`.
    """
    if not text:
        return None
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"api.peer_listen {text!r}: expected host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(f"api.peer_listen {text!r}: put an IPv6 address in brackets, e.g. [::1]:7443")
    return host, int(port_text)


def check_files(paths: TlsFiles, host: str | None = None, role: Role = Role.AGENT) -> x509.Certificate:
    """Fail fast at start-up when our own TLS files cannot work, instead of at every handshake.

    Checks that the certificate was issued by the configured CA, is valid now, has `role` (an
    agent certificate by default) and, when `host` is given, names that host. Returns the certificate.
    """
    try:
        cas = load_certificates(paths.ca_file)
        cert = load_certificate(paths.cert_file)
    except PkiError as exc:
        raise TlsConfigError(exc.message) from exc
    check_certificate(cas, cert, host=host, role=role, cert_name=str(paths.cert_file), ca_name=str(paths.ca_file))
    return cert


def check_certificate(
    cas: list[x509.Certificate],
    cert: x509.Certificate,
    *,
    host: str | None = None,
    role: Role = Role.AGENT,
    cert_name: str = "the certificate",
    ca_name: str = "the CA file",
) -> None:
    """`check_files` on parsed certificates: TlsConfigError naming `cert_name` when it cannot serve."""
    # ca_file may be a bundle (old + new CA during a CA rotation): any one of them may be the issuer.
    for ca in cas:
        try:
            cert.verify_directly_issued_by(ca)
            break
        except (ValueError, TypeError, InvalidSignature):
            # ValueError: issuer name mismatch; InvalidSignature: same name, different key.
            continue
    else:
        raise TlsConfigError(f"{cert_name} was not issued by the CA in {ca_name}")
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise TlsConfigError(
            f"{cert_name} is valid from {cert.not_valid_before_utc} to {cert.not_valid_after_utc}, "
            f"not now ({now:%Y-%m-%d %H:%M:%S}Z)"
        )
    units = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    if units != [role.value]:
        raise TlsConfigError(f"{cert_name} is not an {role.value} certificate (OU {units})")
    if host is not None:
        names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if names != [host]:
            raise TlsConfigError(f"{cert_name} names {names}, but this host is {host!r}")
