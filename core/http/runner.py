"""Serving an API so that aiohttp's own refusals leave in the JSON error shape too.

Most errors pass the error middleware (core/http/errors.py). Some never reach it, because aiohttp
answers them from its connection handler (`web.RequestHandler`) before or around the application:

* the HTTP parser's refusals: a bad request line or method, a header line or header block too
  large, a malformed header (`RequestHandler.handle_error`, with a text/plain 400);
* an HTTPException raised outside the middlewares, such as the 417 for an unknown `Expect:`
  (`RequestHandler.finish_response` sends it as aiohttp's text body).

aiohttp 3.x has no hook for either (aio-libs/aiohttp#3287; 4.0 routes parser errors through the
middlewares). Its extension point is the connection handler class: `ApiRunner` is a
`web.AppRunner` whose server builds a `JsonErrorRequestHandler`, which overrides those two methods.
Everything else (startup, the access log, `handler_args` limits, shutdown) is aiohttp's own.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.web_request import BaseRequest

from core.http.errors import error_body, http_error_code, http_message

log = logging.getLogger(__name__)

_MAX_MESSAGE = 200
"""Characters of aiohttp's parser message kept: it may quote the offending bytes at length."""


def parser_error_body(status: int, message: str | None) -> dict[str, Any]:
    """The JSON error for a response aiohttp makes itself: a status and, for 4xx, its reason."""
    if status >= 500:
        # A 500 here is an exception that escaped the middleware: internals are not the caller's business.
        return error_body("internal", "internal server error")
    text = " ".join((message or "").split())  # one line: parser messages span several
    if len(text) > _MAX_MESSAGE:
        text = text[: _MAX_MESSAGE - 3] + "..."
    return error_body(http_error_code(status), text or _phrase(status))


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"


class JsonErrorRequestHandler(web.RequestHandler):
    """aiohttp's connection handler, answering the errors it makes itself in the API's JSON shape."""

    __slots__ = ()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # As aiohttp's: once bytes of a response are out, no other response can follow.
        if request.writer.output_size > 0:
            raise ConnectionError("response already started, cannot send the error")
        if status >= 500:
            log.error("request failed outside the application", exc_info=exc, extra={"status": status})
        else:
            # A malformed request is the client's problem: no traceback (aiohttp logs one at ERROR).
            log.info("malformed request refused", extra={"status": status, "error": message or repr(exc)})
        resp = web.json_response(parser_error_body(status, message), status=status)
        resp.force_close()  # the parser's state is unknown after an error: never reuse the connection
        return resp

    async def finish_response(
        self, request: BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        if isinstance(resp, web.HTTPException) and resp.status >= 400 and not resp.prepared:
            # Raised outside the middlewares (e.g. the Expect handler's 417): same JSON as inside.
            body = parser_error_body(resp.status, http_message(resp, request))
            json_resp = web.json_response(body, status=resp.status)
            for name in ("Allow", "Retry-After"):
                if name in resp.headers:
                    json_resp.headers[name] = resp.headers[name]
            resp = json_resp
        return await super().finish_response(request, resp, start_time)


class _JsonErrorServer(web.Server):
    def __call__(self) -> web.RequestHandler:
        # web.Server.__call__ builds a plain RequestHandler from these same arguments.
        return JsonErrorRequestHandler(self, loop=self._loop, **self._kwargs)


class ApiRunner(web.AppRunner):
    """A `web.AppRunner` (same arguments) whose connections answer aiohttp's own errors in JSON."""

    async def _make_server(self) -> web.Server:
        # aiohttp's own startup sequence and handler arguments; only the handler class differs.
        base = await super()._make_server()
        return _JsonErrorServer(
            base.request_handler,
            request_factory=base.request_factory,
            handler_cancellation=base.handler_cancellation,
            loop=base._loop,
            **base._kwargs,
        )
