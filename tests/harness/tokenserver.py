"""A minimal Docker token-auth server (the `realm` of `auth: token`) for tests.

It checks HTTP basic credentials against an in-memory user table and answers with an ES256 JWT whose
`x5c` header carries the signing certificate, which docker-registry verifies against its
`rootcertbundle` (the test CA). Anonymous callers get a token with no access, the way public
registries behave, so a registry then refuses them with `insufficient_scope`.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from tests.harness.registry import free_port
from tests.harness.tls import CertPair

log = logging.getLogger(__name__)

_ALL_ACTIONS = ("pull", "push", "delete")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign_jwt(claims: Mapping[str, Any], signer: CertPair) -> str:
    """Compact-serialised ES256 JWT with the signer's certificate in `x5c`."""
    header = {
        "typ": "JWT",
        "alg": "ES256",
        # x5c is standard (not URL-safe) base64 of DER, per RFC 7515 section 4.1.6.
        "x5c": [base64.b64encode(signer.cert_der()).decode()],
    }
    signing_input = (
        _b64url(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + _b64url(json.dumps(claims, separators=(",", ":")).encode())
    )
    der = signer.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
    # JWS wants the raw r||s form, not the DER that cryptography produces.
    r, s = decode_dss_signature(der)
    raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return signing_input + "." + _b64url(raw)


@dataclass(frozen=True)
class TokenRequest:
    """One call to the token endpoint, recorded so tests can assert caching and scopes."""

    account: str | None
    scopes: tuple[str, ...]
    granted: tuple[dict[str, Any], ...]
    status: int


@dataclass
class TokenServer:
    """An aiohttp token endpoint at http://bind:port/token."""

    signer: CertPair
    users: Mapping[str, str]
    service: str = "ferryman-test-registry"
    issuer: str = "ferryman-test-issuer"
    readonly: frozenset[str] = frozenset()
    """Users granted only `pull`, whatever they ask for."""
    ttl: int = 300
    bind: str = "127.0.0.1"
    port: int = field(default=0)
    requests: list[TokenRequest] = field(default_factory=list)
    _runner: web.AppRunner | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.port:
            self.port = free_port(self.bind)

    @property
    def realm(self) -> str:
        return f"http://{self.bind}:{self.port}/token"

    @property
    def rootcertbundle(self) -> str:
        return str(self.signer.ca_path)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/token", self._token)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.bind, self.port)
        await site.start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _account(self, request: web.Request) -> tuple[str | None, bool]:
        """(account, ok): no header is anonymous and fine; a bad header or password is not."""
        header = request.headers.get("Authorization", "")
        if not header:
            return None, True
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return None, False
        try:
            user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None, False
        expected = self.users.get(user)
        ok = expected is not None and secrets.compare_digest(expected, password)
        return user, ok

    def _grant(self, account: str | None, scopes: list[str]) -> list[dict[str, Any]]:
        if account is None:
            return []
        allowed = {"pull"} if account in self.readonly else set(_ALL_ACTIONS)
        access: list[dict[str, Any]] = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if not kind or not name:
                continue
            wanted = [a for a in actions.split(",") if a in allowed]
            access.append({"type": kind, "name": name, "actions": wanted})
        return access

    async def _token(self, request: web.Request) -> web.Response:
        scopes = [s for raw in request.query.getall("scope", []) for s in raw.split()]
        account, ok = self._account(request)
        if not ok:
            self.requests.append(TokenRequest(account, tuple(scopes), (), 401))
            log.info("token refused", extra={"account": account, "scopes": scopes})
            return web.json_response(
                {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]},
                status=401,
                headers={"WWW-Authenticate": 'Basic realm="ferryman-test-token"'},
            )
        if request.query.get("service") != self.service:
            self.requests.append(TokenRequest(account, tuple(scopes), (), 400))
            return web.json_response({"errors": [{"code": "BAD_REQUEST", "message": "wrong service"}]}, status=400)
        access = self._grant(account, scopes)
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": account or "",
            "aud": self.service,
            "exp": now + self.ttl,
            "nbf": now - 1,
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": access,
        }
        token = sign_jwt(claims, self.signer)
        self.requests.append(TokenRequest(account, tuple(scopes), tuple(access), 200))
        log.info("token issued", extra={"account": account, "scopes": scopes})
        return web.json_response(
            {
                "token": token,
                "access_token": token,
                "expires_in": self.ttl,
                "issued_at": dt.datetime.fromtimestamp(now, dt.UTC).isoformat(),
            }
        )
