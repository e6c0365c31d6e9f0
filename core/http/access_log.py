"""aiohttp's access log as one structured record per request, for both daemons' APIs."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

_QUIET_PATHS = frozenset({"/healthz", "/metrics"})
"""Polled by machines every few seconds: logged at DEBUG so they do not drown the access log."""


class JsonAccessLogger(AbstractAccessLogger):
    """One structured record per request (the JSON formatter turns the extras into fields)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        level = logging.DEBUG if request.path in _QUIET_PATHS else logging.INFO
        self.logger.log(
            level,
            "request",
            extra={
                "method": request.method,
                "path": request.path,
                "status": response.status,
                "duration_ms": round(time * 1000, 2),
            },
        )
