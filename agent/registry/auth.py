"""The distribution auth dance: parse WWW-Authenticate, answer Basic or Bearer challenges.

A registry answers 401 with a challenge; for `Basic` we send the configured credentials, for
`Bearer` we fetch a token from the challenge's realm (with basic credentials when configured,
anonymously otherwise) and cache it per (host, scope) until it expires. The client retries the
original request once with the header this module produces.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from agent.config import AgentConfig
from agent.errors import RegistryAuthError, RegistryError, RegistryUnavailable

log = logging.getLogger(__name__)

# RFC 7230 tchar: the characters a scheme name or an unquoted parameter may contain.
_TCHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
# Token68 (RFC 7235) adds these, e.g. base64 padding in `Negotiate abc==`.
_TOKEN68_EXTRA = frozenset("/=")

# Tokens without expires_in live 60 s (distribution's token spec default).
DEFAULT_TOKEN_TTL = 60.0
# Refresh a little early so a token does not expire between cache lookup and the registry's check.
_EXPIRY_MARGIN = 5.0


@dataclass(frozen=True)
class Challenge:
    """One challenge from a WWW-Authenticate header; `params` keys are lower-case."""

    scheme: str
    params: dict[str, str]

    @property
    def scheme_lower(self) -> str:
        return self.scheme.lower()


def parse_www_authenticate(header: str) -> list[Challenge]:
    """Parse one or more challenges, e.g. `Bearer realm="https://a/t",scope="repository:x:pull,push"`.

    Quoted values may contain commas, spaces and backslash escapes; a comma separates both
    parameters and challenges, so a bare token not followed by '=' starts the next challenge.
    """
    out: list[Challenge] = []
    i, n = 0, len(header)

    def skip(chars: str) -> None:
        nonlocal i
        while i < n and header[i] in chars:
            i += 1

    def token() -> str:
        nonlocal i
        start = i
        while i < n and header[i] in _TCHARS:
            i += 1
        return header[start:i]

    def bare() -> str:
        # Lenient: servers send unquoted URLs (realm=https://a/t) that are not RFC tokens.
        nonlocal i
        start = i
        while i < n and header[i] not in ", \t":
            i += 1
        return header[start:i]

    def quoted() -> str:
        nonlocal i
        i += 1  # opening quote
        buf: list[str] = []
        while i < n:
            ch = header[i]
            if ch == "\\" and i + 1 < n:
                buf.append(header[i + 1])
                i += 2
                continue
            if ch == '"':
                i += 1
                break
            buf.append(ch)
            i += 1
        return "".join(buf)

    while i < n:
        skip(" \t,")
        scheme = token()
        if not scheme:
            # Garbage we cannot tokenise: skip one character rather than loop forever.
            i += 1
            continue
        params: dict[str, str] = {}
        # Only a token directly after the scheme (no comma between) can be a token68 credential.
        first = True
        while True:
            skip(" \t")
            if i < n and header[i] == ",":
                i += 1
                first = False
                continue
            mark = i
            name = token()
            if not name:
                break
            after_name = i
            skip(" \t")
            if i < n and header[i] == "=":
                i += 1
                skip(" \t")
                if first and (i >= n or header[i] in ",="):
                    # token68 with padding, e.g. `Negotiate abc==`.
                    i = after_name
                    while i < n and (header[i] in _TCHARS or header[i] in _TOKEN68_EXTRA):
                        i += 1
                    params["token68"] = header[mark:i]
                else:
                    params[name.lower()] = quoted() if i < n and header[i] == '"' else bare()
                first = False
                continue
            if first and (i >= n or header[i] == ","):
                params["token68"] = name
                first = False
                continue
            # A bare token after a comma is the next challenge's scheme.
            i = mark
            break
        out.append(Challenge(scheme=scheme, params=params))
    return out


def normalize_scope(scope: str) -> str:
    """Canonical form for cache keys: registries list actions in random order (Go map iteration)."""
    parts: list[str] = []
    for item in scope.split():
        prefix, sep, actions = item.rpartition(":")
        if not sep:
            parts.append(item)
            continue
        parts.append(f"{prefix}:{','.join(sorted(set(actions.split(','))))}")
    return " ".join(sorted(set(parts)))


def basic_header(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


@dataclass
class _Token:
    header: str
    expires_at: float


SslFor = Callable[[str], Any]
"""Maps a URL's scheme+authority to the `ssl=` argument aiohttp takes for it."""


class Authenticator:
    """Holds per-host credentials state: which hosts use Basic, and cached bearer tokens."""

    def __init__(self, config: AgentConfig, ssl_for_url: SslFor) -> None:
        self._config = config
        self._ssl_for_url = ssl_for_url
        self._basic: dict[str, str] = {}
        self._tokens: dict[tuple[str, str], _Token] = {}
        # One token fetch per (host, scope) at a time: parallel layer downloads share it.
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    def cached_header(self, host: str, scope: str) -> str | None:
        """An Authorization value to send up front, saving the 401 round trip when we can."""
        if host in self._basic:
            return self._basic[host]
        token = self._tokens.get((host, normalize_scope(scope)))
        if token is not None and token.expires_at > time.monotonic():
            return token.header
        return None

    def invalidate(self, host: str, scope: str) -> None:
        """Forget what was sent, after the registry refused it."""
        self._basic.pop(host, None)
        self._tokens.pop((host, normalize_scope(scope)), None)

    def has_credentials(self, host: str) -> bool:
        return self._config.registry(host).username is not None

    def _credentials(self, host: str) -> tuple[str, str] | None:
        reg = self._config.registry(host)
        if reg.username is None:
            return None
        return reg.username, reg.secret() or ""

    async def authorize(self, session: aiohttp.ClientSession, host: str, www_authenticate: str, scope: str) -> str:
        """Answer a 401's challenges with an Authorization header value, or raise RegistryAuthError."""
        challenges = parse_www_authenticate(www_authenticate)
        by_scheme = {c.scheme_lower: c for c in challenges}
        if "bearer" in by_scheme and "realm" in by_scheme["bearer"].params:
            return await self._bearer(session, host, by_scheme["bearer"], scope)
        if "basic" in by_scheme:
            creds = self._credentials(host)
            if creds is None:
                raise RegistryAuthError(
                    f"registry {host} requires basic auth but no username/password is configured for it"
                )
            header = basic_header(*creds)
            self._basic[host] = header
            log.debug("using basic auth", extra={"registry": host, "username": creds[0]})
            return header
        raise RegistryAuthError(
            f"registry {host} sent an authentication challenge we cannot answer: {www_authenticate!r}"
        )

    async def _bearer(self, session: aiohttp.ClientSession, host: str, challenge: Challenge, scope_hint: str) -> str:
        # The challenge's own scope is authoritative; our hint covers challenges without one.
        scope = challenge.params.get("scope", scope_hint)
        key = (host, normalize_scope(scope))
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            cached = self._tokens.get(key)
            if cached is not None and cached.expires_at > time.monotonic():
                return cached.header
            token, ttl = await self._fetch_token(session, host, challenge, scope)
            header = f"Bearer {token}"
            expires_at = time.monotonic() + max(ttl - min(_EXPIRY_MARGIN, ttl / 10), 0.0)
            self._tokens[key] = _Token(header, expires_at)
            # Also file it under the scope we would compute ourselves, so the next request sends it
            # up front even if the registry phrased the scope differently.
            if scope_hint and normalize_scope(scope_hint) != key[1]:
                self._tokens[(host, normalize_scope(scope_hint))] = _Token(header, expires_at)
            return header

    async def _fetch_token(
        self, session: aiohttp.ClientSession, host: str, challenge: Challenge, scope: str
    ) -> tuple[str, float]:
        realm = challenge.params["realm"]
        params: list[tuple[str, str]] = []
        if "service" in challenge.params:
            params.append(("service", challenge.params["service"]))
        # The token spec takes one `scope` parameter per scope; a challenge joins them with spaces.
        params.extend(("scope", s) for s in scope.split())
        headers = {"Accept": "application/json"}
        creds = self._credentials(host)
        if creds is not None:
            headers["Authorization"] = basic_header(*creds)
            params.append(("account", creds[0]))
        who = creds[0] if creds else "anonymous"
        extra = {"registry": host, "realm": realm, "scope": scope, "account": who}
        log.info("fetching registry token", extra=extra)
        try:
            async with session.get(realm, params=params, headers=headers, ssl=self._ssl_for_url(realm)) as resp:
                body = await resp.read()
                status = resp.status
        except aiohttp.ClientSSLError as exc:
            raise RegistryError(f"TLS failure talking to token server {realm} for {host}: {exc}") from exc
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise RegistryUnavailable(
                f"token server {realm} for registry {host} is unreachable: {exc or type(exc).__name__}"
            ) from exc
        if status in (401, 403):
            raise RegistryAuthError(f"token server {realm} refused {who} for registry {host} (HTTP {status})")
        if status >= 500:
            raise RegistryUnavailable(f"token server {realm} for registry {host} failed with HTTP {status}")
        if status != 200:
            raise RegistryAuthError(f"token server {realm} answered HTTP {status} for registry {host}: {body[:200]!r}")
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise RegistryAuthError(f"token server {realm} returned invalid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise RegistryAuthError(f"token server {realm} returned {type(data).__name__}, not an object")
        token = data.get("token") or data.get("access_token")
        if not isinstance(token, str) or not token:
            raise RegistryAuthError(f"token server {realm} returned no token for {host}")
        ttl_raw = data.get("expires_in", DEFAULT_TOKEN_TTL)
        ttl = float(ttl_raw) if isinstance(ttl_raw, int | float) and ttl_raw > 0 else DEFAULT_TOKEN_TTL
        log.debug("registry token issued", extra={**extra, "expires_in": ttl})
        return token, ttl
