"""Error middleware: every failure leaves the API as `{"error": {"code", "message"}}` JSON."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler

from core.errors import Busy, FerrymanError

log = logging.getLogger(__name__)

# Codes for errors aiohttp raises itself (routing, body size); anything else becomes http_<status>.
_HTTP_CODES = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "invalid_request",
}


def http_error_code(status: int) -> str:
    """The stable code for an error status aiohttp produced rather than one of ours."""
    return _HTTP_CODES.get(status, f"http_{status}")


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def error_response(code: str, message: str, status: int) -> web.Response:
    return web.json_response(error_body(code, message), status=status)


def ferryman_error_response(exc: FerrymanError) -> web.Response:
    resp = error_response(exc.code, exc.message, exc.http_status)
    if isinstance(exc, Busy):
        resp.headers["Retry-After"] = str(exc.retry_after)
    return resp


def http_message(exc: web.HTTPException, request: web.BaseRequest) -> str:
    """What to tell the client about an HTTPException aiohttp (or a handler) raised."""
    if exc.status == 404:
        return f"no route for {request.method} {request.path}"
    if exc.status == 405:
        return f"method {request.method} is not allowed on {request.path}"
    # aiohttp puts "404: Not Found"-style text in the body; a raiser's own text is more useful.
    text = exc.text or ""
    return text if text and not text.startswith(f"{exc.status}:") else exc.reason


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except FerrymanError as exc:
        if exc.http_status >= 500:
            log.warning(
                "request failed",
                extra={"method": request.method, "path": request.path, "code": exc.code, "error": exc.message},
            )
        return ferryman_error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # redirects and the like are not errors
        resp = error_response(http_error_code(exc.status), http_message(exc, request), exc.status)
        # Keep headers such as Allow (405) that tell the client how to retry.
        for name in ("Allow", "Retry-After"):
            if name in exc.headers:
                resp.headers[name] = exc.headers[name]
        return resp
    except (HttpProcessingError, web.RequestPayloadError) as exc:
        # The body failed aiohttp's parser while the handler read it (bad chunked framing, a bad
        # Content-Encoding): the client's fault, not a 500.
        message = " ".join(str(exc).split()).removeprefix("400, message: ")
        return error_response("invalid_request", f"malformed request body: {message}"[:200], 400)
    except ConnectionResetError:
        if request.transport is None or request.transport.is_closing():
            # The client left mid-body: nobody to answer, and nothing worth a traceback.
            log.info("client disconnected", extra={"method": request.method, "path": request.path})
            return error_response("client_disconnected", "the client closed the connection", 400)
        return _internal(request)  # some other connection of the handler's
    except Exception:
        return _internal(request)


def _internal(request: web.Request) -> web.Response:
    # The traceback goes to the log only: internals are not the caller's business.
    log.exception("unhandled error", extra={"method": request.method, "path": request.path})
    return error_response("internal", "internal server error", 500)
