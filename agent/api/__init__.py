"""The agent's local HTTP API (aiohttp)."""

from agent.api.server import ApiServer, build_app, parse_listen, serve

__all__ = ["ApiServer", "build_app", "parse_listen", "serve"]
