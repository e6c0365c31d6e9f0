"""Who is calling: a client certificate from the fleet CA (role agent or ops) or an ops bearer token.

The TLS handshake already verified any certificate (core/security/tls.py); here we only read its
name and role. Bearer tokens are never stored: the config names a file of their SHA-256 hashes.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import ssl
from dataclasses import dataclass
from pathlib import Path

from coordinator.model import Forbidden, Unauthorized
from core.errors import ConfigError, FerrymanError
from core.security.pki import Role
from core.security.tls import peer_identity, peer_role

_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Principal:
    name: str
    role: Role
    via: str  # "certificate" | "token"


@dataclass(frozen=True)
class TokenHashes:
    """SHA-256 hashes (hex) of the accepted ops bearer tokens, each with an optional label."""

    hashes: tuple[tuple[bytes, str], ...] = ()

    @classmethod
    def load(cls, path: str) -> TokenHashes:
        if not path:
            return cls()
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read auth.token_hashes_file {path}: {exc}") from exc
        entries: list[tuple[bytes, str]] = []
        for number, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            digest, _, label = line.partition(" ")
            digest = digest.removeprefix("sha256:").lower()
            if not _HEX64.fullmatch(digest):
                raise ConfigError(f"{path}:{number}: expected a SHA-256 hex digest (64 hex digits), not a token")
            entries.append((bytes.fromhex(digest), label.strip() or f"token-{digest[:8]}"))
        return cls(tuple(entries))

    def match(self, token: str) -> str | None:
        """The label of `token` if its hash is listed; compares every entry in constant time."""
        digest = hashlib.sha256(token.encode()).digest()
        found: str | None = None
        for known, label in self.hashes:
            if hmac.compare_digest(known, digest):
                found = label
        return found


def hash_token(token: str) -> str:
    """The line to put in the token hashes file for `token`."""
    return hashlib.sha256(token.encode()).hexdigest()


def authenticate(authorization: str | None, ssl_object: ssl.SSLObject | None, tokens: TokenHashes) -> Principal | None:
    """The caller, or None when it presented nothing; Unauthorized for a bad token or header."""
    if authorization is not None:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("the Authorization header must be 'Bearer <token>'")
        label = tokens.match(token.strip())
        if label is None:
            raise Unauthorized("the bearer token is not valid")
        return Principal(name=label, role=Role.OPS, via="token")
    # Decoded once per request: getpeercert() parses the certificate again on every call.
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    if not cert:
        return None
    try:
        return Principal(name=peer_identity(cert), role=peer_role(cert), via="certificate")
    except FerrymanError as exc:
        raise Forbidden(exc.message) from exc


def require_ops(principal: Principal | None) -> Principal:
    if principal is None:
        raise Unauthorized("authenticate with an ops client certificate or a bearer token")
    if principal.role is not Role.OPS:
        raise Forbidden(f"{principal.name!r} is an {principal.role.value} identity; this needs an ops identity")
    return principal


def require_agent(principal: Principal | None, host: str) -> Principal:
    """Agents speak only for themselves: the certificate name must be the host in the message."""
    if principal is None:
        raise Unauthorized("authenticate with the agent's host certificate")
    if principal.role is not Role.AGENT:
        raise Forbidden(f"{principal.name!r} is not an agent identity")
    if principal.name != host:
        raise Forbidden(f"the certificate names {principal.name!r}, but the message is for host {host!r}")
    return principal
