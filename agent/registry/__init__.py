"""OCI distribution client: resolve references, stream blobs, push test images."""

from agent.registry.auth import Authenticator, Challenge, normalize_scope, parse_www_authenticate
from agent.registry.client import MANIFEST_ACCEPT, RegistryClient, ResolvedImage

__all__ = [
    "MANIFEST_ACCEPT",
    "Authenticator",
    "Challenge",
    "RegistryClient",
    "ResolvedImage",
    "normalize_scope",
    "parse_www_authenticate",
]
