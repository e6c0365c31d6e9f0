"""The ops listener: the API over mutual TLS, for holders of an ops certificate only.

The coordinator (with its ops certificate) and operators reach agents here. The handshake already
refuses clients without a certificate from the fleet CA; this middleware then refuses verified
clients whose role is not ops (another agent's host certificate), so an agent cannot drive its peers.
Requests that did not come over TLS (the unix socket, a plain tcp:// listen) are not affected.
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from core.errors import ConfigError
from core.security.pki import Role
from core.security.tls import PeerIdentityError, peer_identity, peer_role

log = logging.getLogger(__name__)


@web.middleware
async def ops_only_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport is not None else None
    if ssl_object is not None:
        role = peer_role(ssl_object)  # PeerIdentityError (403) without a usable certificate
        if role is not Role.OPS:
            who = peer_identity(ssl_object)
            log.warning("refused a non-ops client on the ops listener", extra={"peer": who, "role": role.value})
            raise PeerIdentityError(f"{who} has role {role.value}; this listener serves ops certificates only")
    return await handler(request)


def parse_tls_listen(text: str) -> tuple[str, int] | None:
    """`api.tls_listen` as (host, port); None when empty. IPv6 literals go in brackets: `[::1]:7444`."""
    if not text:
        return None
    host, sep, port_text = text.rpartition(":")
    # Port 0 (any free port) is for tests; a fleet config names a real port (checked in agent.config).
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise ConfigError(f"api.tls_listen {text!r}: expected host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(f"api.tls_listen {text!r}: put an IPv6 address in brackets, e.g. [::1]:7444")
    return host, int(port_text)
