"""aiohttp's access log as one structured record per request, for both daemons' APIs."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

_QUIET_PATHS = frozenset({"/healthz", "/metrics"})
"""Polled by machines every few seconds: logged at DEBUG so they do not drown the access log."""
_QUIET_WHEN_OK = frozenset({"/v1/telemetry"})
"""Every agent's push, every few seconds: at DEBUG when accepted (refusals stay at INFO, and
ferryman_coordinator_telemetry_samples counts what was accepted)."""


class JsonAccessLogger(AbstractAccessLogger):
    """One structured record per request (the JSON formatter turns the extras into fields)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        path = request.path
        quiet = path in _QUIET_PATHS or (path in _QUIET_WHEN_OK and response.status < 400)
        level = logging.DEBUG if quiet else logging.INFO
        if not self.logger.isEnabledFor(level):
            return
        self.logger.log(
            level,
            "request",
            extra={
                "method": request.method,
                "path": path,
                "status": response.status,
                "duration_ms": round(time * 1000, 2),
            },
        )
