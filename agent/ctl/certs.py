"""`ferryctl certs`: create the fleet CA, issue host and operator certificates, inspect one.

These commands work offline, on files only; they never contact an agent. Run `init` and `issue`
on a trusted machine that keeps the CA key; ship each host its own output directory.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.ctl.args import positive_int
from core.errors import FerrymanError
from core.security.pki import (
    DEFAULT_CA_DAYS,
    DEFAULT_CLIENT_DAYS,
    DEFAULT_HOST_DAYS,
    HostCertPaths,
    Role,
    certificate_role,
    init_ca,
    issue_client,
    issue_host,
    load_certificate,
)

EXIT_OK = 0

_EKU_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
}
_KEY_USAGES = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
)


def add_parser(sub: Any) -> None:
    """Register `certs` and its subcommands on ferryctl's subparsers object."""
    certs = sub.add_parser("certs", help="manage the fleet CA and certificates (offline)")
    csub = certs.add_subparsers(dest="certs_command", required=True, metavar="SUBCOMMAND")

    p = csub.add_parser("init", help="create the fleet CA")
    p.add_argument("--dir", required=True, type=Path, metavar="DIR", help="directory for ca.pem and ca-key.pem")
    p.add_argument("--name", default="ferryman fleet CA", help="the CA's common name")
    p.add_argument("--days", type=positive_int, default=DEFAULT_CA_DAYS, metavar="N", help="CA lifetime in days")
    p.add_argument("--force", action="store_true", help="replace an existing CA (invalidates every certificate)")

    p = csub.add_parser("issue", help="issue a host (agent) or operator (ops) certificate")
    p.add_argument("host", metavar="HOST", help="host name (the identity) or, with --role ops, operator name")
    p.add_argument("--ca-dir", required=True, type=Path, metavar="DIR", help="directory holding the fleet CA")
    p.add_argument(
        "--out", required=True, type=Path, metavar="DIR", help="output directory (gets ca.pem, the cert and key)"
    )
    p.add_argument(
        "--address", action="append", default=[], metavar="IP", help="IP address SAN (repeatable; agents only)"
    )
    days_help = f"lifetime in days (default {DEFAULT_HOST_DAYS} agent, {DEFAULT_CLIENT_DAYS} ops)"
    p.add_argument("--days", type=positive_int, metavar="N", help=days_help)
    p.add_argument(
        "--role",
        choices=[r.value for r in Role],
        default=Role.AGENT.value,
        help="agent: a host, server and client (default); ops: an operator, client only",
    )
    p.add_argument("--force", action="store_true", help="replace existing files in --out (rotation)")

    p = csub.add_parser("show", help="print a certificate's subject, names, validity and fingerprint")
    p.add_argument("file", metavar="FILE", type=Path)


def _fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def _extension(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> Any:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def describe(cert: x509.Certificate, now: dt.datetime | None = None) -> dict[str, Any]:
    """A certificate as plain data, for `certs show` (and its --json form)."""
    now = now or dt.datetime.now(dt.UTC)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < start:
        status = "not yet valid"
    elif now > end:
        status = "expired"
    else:
        status = f"valid ({(end - now).days} days left)"
    san = _extension(cert, x509.SubjectAlternativeName)
    usage = _extension(cert, x509.KeyUsage)
    eku = _extension(cert, x509.ExtendedKeyUsage)
    basic = _extension(cert, x509.BasicConstraints)
    role = certificate_role(cert)
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "role": role.value if role else None,
        "serial": format(cert.serial_number, "x"),
        "not_before": start.isoformat(),
        "not_after": end.isoformat(),
        "status": status,
        "dns_names": list(san.get_values_for_type(x509.DNSName)) if san else [],
        "ip_addresses": [str(a) for a in san.get_values_for_type(x509.IPAddress)] if san else [],
        "key_usage": [name for name in _KEY_USAGES if usage is not None and getattr(usage, name)],
        "extended_key_usage": [_EKU_NAMES.get(oid, oid.dotted_string) for oid in eku] if eku else [],
        "ca": bool(basic and basic.ca),
        "sha256_fingerprint": _fingerprint(cert),
    }


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")


def _show(path: Path, as_json: bool) -> None:
    info = describe(load_certificate(path))
    if as_json:
        sys.stdout.write(json.dumps(info, indent=2, sort_keys=True) + "\n")
        return
    rows = [
        ("subject", info["subject"]),
        ("issuer", info["issuer"]),
        ("role", info["role"] or "-"),
        ("serial", info["serial"]),
        ("not before", info["not_before"]),
        ("not after", info["not_after"]),
        ("status", info["status"]),
        ("dns names", ", ".join(info["dns_names"]) or "-"),
        ("ip addresses", ", ".join(info["ip_addresses"]) or "-"),
        ("key usage", ", ".join(info["key_usage"]) or "-"),
        ("ext key usage", ", ".join(info["extended_key_usage"]) or "-"),
        ("ca", "yes" if info["ca"] else "no"),
        ("sha256", info["sha256_fingerprint"]),
    ]
    width = max(len(k) for k, _ in rows) + 1
    for key, value in rows:
        # Plain lines, not rich: fingerprints must not wrap or be re-styled.
        _say(f"{key + ':':<{width}} {value}")


def _report(paths: HostCertPaths, as_json: bool) -> None:
    if as_json:
        data = {k: str(v) for k, v in vars(paths).items()}
        sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        return
    _say(f"certificate: {paths.cert_file}")
    _say(f"key:         {paths.key_file} (0600)")
    _say(f"fleet CA:    {paths.ca_file}")


def run(args: argparse.Namespace) -> int:
    """Run one `ferryctl certs` subcommand. Failures raise CertsError (or CertsUsageError) for
    ferryctl's usual reporting: `error: <code>: <message>`, and the JSON error with --json."""
    as_json = bool(getattr(args, "json", False))
    try:
        match args.certs_command:
            case "init":
                ca = init_ca(args.dir, name=args.name, days=args.days, force=args.force)
                if as_json:
                    data = {"cert_file": str(ca.cert_file), "key_file": str(ca.key_file)}
                    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
                else:
                    _say(f"fleet CA:    {ca.cert_file}")
                    _say(f"CA key:      {ca.key_file} (0600; keep it off the fleet)")
            case "issue":
                if args.role == Role.OPS.value:
                    if args.address:
                        raise CertsUsageError("--address applies to agent certificates only")
                    days = args.days or DEFAULT_CLIENT_DAYS
                    paths = issue_client(args.ca_dir, args.host, args.out, days, force=args.force)
                else:
                    days = args.days or DEFAULT_HOST_DAYS
                    paths = issue_host(args.ca_dir, args.host, args.out, args.address, days, force=args.force)
                _report(paths, as_json)
            case "show":
                _show(args.file, as_json)
            case _:  # pragma: no cover - argparse rejects unknown subcommands
                raise CertsUsageError(f"unknown certs command {args.certs_command!r}")
    except FerrymanError as exc:
        raise CertsError(exc.code, exc.message) from exc
    except OSError as exc:
        # Permissions, read-only filesystems, a file where a directory should be.
        raise CertsError("io_error", str(exc)) from exc
    return EXIT_OK


class CertsError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class CertsUsageError(Exception):
    """Options that do not go together."""
