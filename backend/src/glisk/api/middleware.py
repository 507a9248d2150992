"""Request middleware, three pieces placed around CORS:

- ``RequestContextMiddleware`` (outermost): request id, one log line per request (at
  REQUEST_LOG_LEVEL; probes at DEBUG; server errors and slow requests at WARNING), security
  headers on every response, CORS preflights and errors included.
- ``LifespanErrorMiddleware`` (lifespan messages only): a start-up failure explained by an
  ``OperatorError`` reaches the server as its one-line message instead of a traceback.
- ``UnhandledErrorMiddleware`` (innermost, inside CORS): an unexpected exception becomes the 500
  envelope there, so the response still passes through CORS and a browser can read it. The outer
  layer keeps the same safety net for anything that escapes the layers in between.

None lets a traceback reach the client. The operator gets it in the log, without local
variables (see ``plain_traceback``).
"""

import logging
import re
import sys
import time
import traceback
import uuid

import structlog
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from glisk.api.errors import internal_error_response
from glisk.errors import OperatorError

log = structlog.get_logger("glisk.request")

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_LOGGED = "_glisk_logged"
# Load balancers and scrapers call these every few seconds per instance: a line each would drown
# the log (243,000 lines in 70 s of /health load). Logged at DEBUG, unless failed or slow.
QUIET_PATHS = frozenset({"/health", "/metrics"})


def plain_traceback(exc: BaseException) -> str:
    """The traceback as the standard library prints it: frames and source lines, no local
    variables. (A renderer that shows locals would print whatever the frames held, such as the
    connection parameters, password included, of a failed database connect.)"""
    return "".join(traceback.format_exception(exc)).rstrip()


def _log_unhandled(scope: Scope, exc: Exception) -> None:
    if getattr(exc, _LOGGED, False):
        return
    log.error(
        "request.unhandled_error",
        method=scope["method"],
        path=scope["path"],
        exception=plain_traceback(exc),
    )
    setattr(exc, _LOGGED, True)


async def _answer_unhandled(
    exc: Exception, scope: Scope, receive: Receive, send: Send, response_started: bool
) -> None:
    """Log the exception once and answer 500, unless a response is already under way (then
    there is nothing to do but let the server drop the connection)."""
    _log_unhandled(scope, exc)
    if response_started:
        raise exc
    await internal_error_response()(scope, receive, send)


class UnhandledErrorMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        response_started = False

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            await _answer_unhandled(exc, scope, receive, send, response_started)


class RequestContextMiddleware:
    """``level``: the request line's level (REQUEST_LOG_LEVEL). Whatever it is, a request to
    QUIET_PATHS is logged at DEBUG, and one that fails with a 5xx or takes ``slow_seconds`` or
    more at WARNING (so it shows at the default LOG_LEVEL)."""

    def __init__(
        self, app: ASGIApp, *, level: int = logging.INFO, slow_seconds: float = 1.0
    ) -> None:
        self.app = app
        self.level = level
        self.slow_seconds = slow_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = time.perf_counter()
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        # A caller's id is kept for tracing across services, but only if it is harmless to log.
        request_id = incoming if _VALID_REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        status_code = 500
        response_started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal status_code, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status_code = message["status"]
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
                headers["X-Request-ID"] = request_id
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_headers)
            except Exception as exc:
                await _answer_unhandled(exc, scope, receive, send_with_headers, response_started)
            finally:
                seconds = time.perf_counter() - started
                slow = seconds >= self.slow_seconds
                if status_code >= 500 or slow:
                    level = logging.WARNING
                elif scope["path"] in QUIET_PATHS:
                    level = logging.DEBUG
                else:
                    level = self.level
                log.log(
                    level,
                    "request",
                    method=scope["method"],
                    path=scope["path"],
                    status_code=status_code,
                    duration_ms=round(seconds * 1000, 2),
                    **({"slow": True} if slow else {}),
                )


class LifespanErrorMiddleware:
    """Starlette reports a failed start-up (or shutdown) to the server as the full traceback,
    which uvicorn prints as the reason it exits. For an ``OperatorError`` the message alone is the
    reason: "Cannot connect to the database at postgresql+psycopg://glisk:***@db:5432/glisk:
    connection refused". Other failures are bugs and keep their traceback."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_plain_failure(message: Message) -> None:
            if message["type"] in ("lifespan.startup.failed", "lifespan.shutdown.failed"):
                # The router sends this from the `except` block that caught the failure.
                failure = sys.exc_info()[1]
                if isinstance(failure, OperatorError):
                    message = {**message, "message": str(failure)}
            await send(message)

        await self.app(scope, receive, send_plain_failure)
