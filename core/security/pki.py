"""The fleet's private certificate authority and the certificates it issues.

One self-signed EC P-256 root (the fleet CA) signs every certificate the fleet trusts:

* host certificates (role `agent`): subject `O=ferryman, OU=agent, CN=<host>`, a DNS SAN `<host>`
  plus IP SANs for the host's addresses, extended key usage serverAuth *and* clientAuth, because
  every agent both serves and dials its peers;
* operator certificates (role `ops`): subject `O=ferryman, OU=ops, CN=<name>`, no SANs, clientAuth
  only, so an operator identity can never pose as an agent's server end.

The subject OU is the role marker; `core.security.tls.peer_role` reads it back after a handshake.
Private keys are written 0600 (created that way, never chmod-ed down after the fact) and files are
replaced atomically, so a reader never sees half a key.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from core.errors import AlreadyExists, FerrymanError, InvalidRequest
from core.files import atomic_write

ORGANIZATION = "ferryman"

CA_CERT_NAME = "ca.pem"
CA_KEY_NAME = "ca-key.pem"
HOST_CERT_NAME = "host.pem"
HOST_KEY_NAME = "host-key.pem"
CLIENT_CERT_NAME = "client.pem"
CLIENT_KEY_NAME = "client-key.pem"

DEFAULT_CA_DAYS = 3650
DEFAULT_HOST_DAYS = 365
# Operator keys travel to laptops; they get a shorter life than host keys.
DEFAULT_CLIENT_DAYS = 90

# Certificates start a little in the past so a peer whose clock lags ours still accepts them.
CLOCK_SKEW = dt.timedelta(minutes=5)

# RFC 1123 label: letters, digits, inner hyphens, 1-63 characters. Lowercase only, so the identity
# in a certificate compares equal, byte for byte, to the one in a config file.
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


class Role(StrEnum):
    """What a certificate holder is, carried in the subject OU."""

    AGENT = "agent"
    OPS = "ops"


class PkiError(FerrymanError):
    """The CA or a certificate could not be created, read or used."""

    code = "pki_error"
    http_status = 500


class CaAlreadyExists(PkiError, AlreadyExists):
    code = "ca_exists"
    http_status = 409


class CertAlreadyExists(PkiError, AlreadyExists):
    code = "cert_exists"
    http_status = 409


class InvalidIdentity(PkiError, InvalidRequest):
    """A host name, operator name or address that cannot go into a certificate."""

    code = "invalid_identity"
    http_status = 400


@dataclass(frozen=True)
class CaPaths:
    """Where a fleet CA lives: its certificate (public, shipped to every host) and its key."""

    directory: Path
    cert_file: Path
    key_file: Path


@dataclass(frozen=True)
class HostCertPaths:
    """The three files one TLS endpoint loads: the fleet CA, its own certificate and its key.

    Field names match `agent.config.TlsConfig`, so either can be handed to `core.security.tls`.
    Operator (ops) certificates use the same shape.
    """

    ca_file: Path
    cert_file: Path
    key_file: Path


def validate_name(name: str) -> str:
    """Return `name` if it is a usable identity: a lowercase DNS name (RFC 1123), else raise.

    IP literals and wildcards are refused: an identity names a host, not an address or a pattern.
    """
    if not name or len(name) > 253:
        raise InvalidIdentity(f"invalid name {name!r}: must be 1-253 characters")
    if name != name.lower():
        raise InvalidIdentity(f"invalid name {name!r}: must be lowercase")
    labels = name.split(".")
    for label in labels:
        if not _LABEL.fullmatch(label):
            raise InvalidIdentity(f"invalid name {name!r}: label {label!r} must be 1-63 of a-z, 0-9 and inner '-'")
    # An all-numeric last label would read as an IPv4 address to TLS hostname matching.
    if labels[-1].isdigit():
        raise InvalidIdentity(f"invalid name {name!r}: looks like an IP address, not a host name")
    return name


def parse_addresses(addresses: Sequence[str]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    out: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for text in addresses:
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            raise InvalidIdentity(f"invalid address {text!r}: expected an IPv4 or IPv6 literal") from None
        if addr not in out:
            out.append(addr)
    return out


def directory_problem(st_mode: int, st_uid: int, euid: int) -> str | None:
    """Why a directory must not hold keys (None when it may): someone else could swap what we write.

    A group- or world-writable directory lets others replace or pre-plant files in it (a CA
    certificate of their own, a symlink, a key they keep a copy of), and so does one owned by
    another user, who can chmod it at will. Tightening the mode afterwards would not undo what
    was done before, so such a directory is refused, not repaired.
    """
    if not stat.S_ISDIR(st_mode):
        return "it is not a directory"
    if st_uid != euid:
        return f"it is owned by uid {st_uid}, not by the user running this (uid {euid})"
    if st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"it is group- or world-writable (mode {stat.S_IMODE(st_mode):04o})"
    return None


def prepare_directory(path: Path, mode: int, *, exact: bool) -> None:
    """Create `path` with `mode`, or check an existing one (`directory_problem`); PkiError when unsafe.

    With `exact`, the directory ends with exactly `mode`, existing or not (the CA's: 0700).
    """
    with contextlib.suppress(FileExistsError):  # an existing one is checked below, like a new one
        path.mkdir(mode=mode, parents=True)
    st = path.stat()
    problem = directory_problem(st.st_mode, st.st_uid, os.geteuid())
    if problem is not None:
        raise PkiError(
            f"refusing to write keys to {path}: {problem}; use a directory only you can write to "
            f"(chmod go-w, chown) or a new path"
        )
    if exact:
        # mkdir's mode is cut by the umask, and an existing directory keeps whatever it had.
        path.chmod(mode)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    atomic_write(path, pem, mode=0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    atomic_write(path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


def _subject(common_name: str, role: Role | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION)]
    if role is not None:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role.value))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


def _key_usage(*, signing: bool, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=signing,
        content_commitment=False,
        key_encipherment=False,  # EC keys do not encrypt; ECDHE does the key exchange
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def init_ca(
    directory: str | os.PathLike[str],
    name: str = "ferryman fleet CA",
    days: int = DEFAULT_CA_DAYS,
    *,
    force: bool = False,
) -> CaPaths:
    """Create a fleet CA (EC P-256, self-signed) in `directory`: ca.pem and ca-key.pem (0600).

    Refuses to replace an existing CA unless `force`: a new CA silently invalidates every
    certificate the fleet holds.
    """
    if days <= 0:
        raise InvalidRequest(f"days must be positive, got {days}")
    if not name.strip():
        raise InvalidRequest("the CA name must not be empty")
    root = Path(directory)
    paths = CaPaths(directory=root, cert_file=root / CA_CERT_NAME, key_file=root / CA_KEY_NAME)
    if not force and (paths.cert_file.exists() or paths.key_file.exists()):
        raise CaAlreadyExists(f"a CA already exists in {root} (force / --force replaces it)")
    # 0700: the directory holds the key that can mint any identity in the fleet.
    prepare_directory(root, 0o700, exact=True)

    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    now = _now()
    subject = _subject(name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        # path_length=0: the fleet CA signs leaves only, never an intermediate.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signing=True, ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    # Key first: a cert without its key is useless, a key without its cert is just garbage.
    _write_key(paths.key_file, key)
    _write_cert(paths.cert_file, cert)
    return paths


def load_ca(ca_dir: str | os.PathLike[str]) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA certificate and key from `ca_dir`, checked to belong together."""
    root = Path(ca_dir)
    cert_file, key_file = root / CA_CERT_NAME, root / CA_KEY_NAME
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise PkiError(f"no CA in {root}: {exc.filename} is missing (run `ferryctl certs init`)") from exc
    except (OSError, ValueError, TypeError) as exc:
        raise PkiError(f"cannot load the CA in {root}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{key_file}: expected an EC private key, got {type(key).__name__}")
    if cert.public_key() != key.public_key():
        raise PkiError(f"{cert_file} and {key_file} do not belong together")
    return cert, key


def _validity(
    ca_cert: x509.Certificate,
    days: int,
    not_before: dt.datetime | None,
    not_after: dt.datetime | None,
) -> tuple[dt.datetime, dt.datetime]:
    if days <= 0:
        raise InvalidRequest(f"days must be positive, got {days}")
    length = dt.timedelta(days=days)
    if not_before is None:
        not_before = _now() - CLOCK_SKEW
        # An explicit end before "now" (an already expired certificate) gets a window `days` long.
        if not_after is not None and not_after <= not_before:
            not_before = not_after - length
    if not_after is None:
        not_after = not_before + length
    if not_before.tzinfo is None or not_after.tzinfo is None:
        raise InvalidRequest("not_before/not_after must be timezone-aware datetimes")
    if not_after <= not_before:
        raise InvalidRequest(f"not_after ({not_after}) must be later than not_before ({not_before})")
    if not_after > ca_cert.not_valid_after_utc:
        # A leaf outliving its CA would fail verification at the CA's expiry anyway; say so now.
        raise PkiError(
            f"the certificate would end {not_after:%Y-%m-%d}, after the CA expires "
            f"({ca_cert.not_valid_after_utc:%Y-%m-%d}); issue for fewer days or rotate the CA"
        )
    return not_before, not_after


def _issue(
    ca_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    common_name: str,
    role: Role,
    sans: list[x509.GeneralName],
    usages: list[x509.ObjectIdentifier],
    cert_name: str,
    key_name: str,
    days: int,
    not_before: dt.datetime | None,
    not_after: dt.datetime | None,
    force: bool,
) -> HostCertPaths:
    ca_cert, ca_key = load_ca(ca_dir)
    start, end = _validity(ca_cert, days, not_before, not_after)
    out = Path(out_dir)
    paths = HostCertPaths(ca_file=out / CA_CERT_NAME, cert_file=out / cert_name, key_file=out / key_name)
    if not force and (paths.cert_file.exists() or paths.key_file.exists()):
        raise CertAlreadyExists(f"{paths.cert_file} or {paths.key_file} already exists (force / --force replaces them)")
    prepare_directory(out, 0o755, exact=False)

    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_subject(common_name, role))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signing=True, ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())

    _write_key(paths.key_file, key)
    _write_cert(paths.cert_file, cert)
    # Ship the CA certificate alongside, so the output directory is a complete deployment unit.
    ca_src = Path(ca_dir) / CA_CERT_NAME
    if ca_src.resolve() != paths.ca_file.resolve():
        _write_cert(paths.ca_file, ca_cert)
    return paths


def issue_host(
    ca_dir: str | os.PathLike[str],
    host: str,
    out_dir: str | os.PathLike[str],
    addresses: Sequence[str] = (),
    days: int = DEFAULT_HOST_DAYS,
    *,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    force: bool = False,
) -> HostCertPaths:
    """Issue an agent certificate for `host` into `out_dir` (ca.pem, host.pem, host-key.pem).

    The host name is the identity: subject CN and the one DNS SAN. `addresses` become IP SANs so
    peers dialling by address can still verify. Usable as TLS server and client (serverAuth and
    clientAuth). `not_before`/`not_after` override the window (tests use them for expired and
    not-yet-valid certificates); an explicit `not_after` without `not_before` gets a window `days`
    long ending there when that end is already past.
    """
    validate_name(host)
    sans: list[x509.GeneralName] = [x509.DNSName(host)]
    sans.extend(x509.IPAddress(a) for a in parse_addresses(addresses))
    return _issue(
        ca_dir,
        out_dir,
        common_name=host,
        role=Role.AGENT,
        sans=sans,
        usages=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        cert_name=HOST_CERT_NAME,
        key_name=HOST_KEY_NAME,
        days=days,
        not_before=not_before,
        not_after=not_after,
        force=force,
    )


def issue_client(
    ca_dir: str | os.PathLike[str],
    name: str,
    out_dir: str | os.PathLike[str],
    days: int = DEFAULT_CLIENT_DAYS,
    *,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    force: bool = False,
) -> HostCertPaths:
    """Issue an operator (role `ops`) certificate into `out_dir` (ca.pem, client.pem, client-key.pem).

    clientAuth only and no SANs: it authenticates a person or tool to agents and can never serve.
    """
    validate_name(name)
    return _issue(
        ca_dir,
        out_dir,
        common_name=name,
        role=Role.OPS,
        sans=[],
        usages=[ExtendedKeyUsageOID.CLIENT_AUTH],
        cert_name=CLIENT_CERT_NAME,
        key_name=CLIENT_KEY_NAME,
        days=days,
        not_before=not_before,
        not_after=not_after,
        force=force,
    )


def load_certificates(path: str | os.PathLike[str]) -> list[x509.Certificate]:
    """Every certificate in a PEM file (a CA bundle holds more than one during a CA rotation)."""
    try:
        certs = x509.load_pem_x509_certificates(Path(path).read_bytes())
    except FileNotFoundError as exc:
        raise PkiError(f"certificate file not found: {path}") from exc
    except (OSError, ValueError) as exc:
        raise PkiError(f"cannot read a PEM certificate from {path}: {exc}") from exc
    if not certs:  # pragma: no cover - cryptography raises ValueError for a file without any
        raise PkiError(f"no certificate in {path}")
    return certs


def load_certificate(path: str | os.PathLike[str]) -> x509.Certificate:
    """The first certificate in a PEM file."""
    return load_certificates(path)[0]


def certificate_role(cert: x509.Certificate) -> Role | None:
    """The role in the subject OU, or None for certificates without one (e.g. the CA)."""
    values = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    for attr in values:
        try:
            return Role(str(attr.value))
        except ValueError:
            continue
    return None
