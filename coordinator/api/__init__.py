"""The coordinator's HTTP API over mutual TLS (see coordinator/api/openapi.yaml)."""

from coordinator.api.server import CoordinatorServer, build_app, serve

__all__ = ["CoordinatorServer", "build_app", "serve"]
