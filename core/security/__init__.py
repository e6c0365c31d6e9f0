"""Agent-to-agent security: the fleet CA (`pki`) and mutual-TLS contexts and peer identity (`tls`).

See docs/security.md for the trust model.
"""

from core.security.pki import (
    CaPaths,
    HostCertPaths,
    PkiError,
    Role,
    init_ca,
    issue_client,
    issue_host,
)
from core.security.tls import (
    HostId,
    PeerIdentityError,
    TlsConfigError,
    client_context,
    open_peer,
    peer_identity,
    peer_role,
    server_context,
)

__all__ = [
    "CaPaths",
    "HostCertPaths",
    "HostId",
    "PeerIdentityError",
    "PkiError",
    "Role",
    "TlsConfigError",
    "client_context",
    "init_ca",
    "issue_client",
    "issue_host",
    "open_peer",
    "peer_identity",
    "peer_role",
    "server_context",
]
