"""What the service clients share: reading ``Retry-After``; a transport that turns every HTTP 429
into ``ServiceRateLimited`` before any client library retries it on its own; and a guard checked
on the wire, right before a request's first byte is written (``send_guard``)."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import httpx

from glisk.errors import ServiceRateLimited

# When a 429 carries no usable Retry-After.
DEFAULT_RETRY_AFTER = 5.0
# A Retry-After further away than this is taken as this: a token deferred for a day helps no one.
MAX_RETRY_AFTER = 3600.0


def retry_after(headers: Mapping[str, str], default: float = DEFAULT_RETRY_AFTER) -> float:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date (RFC 9110);
    ``default`` when absent or unreadable; never negative, at most MAX_RETRY_AFTER."""
    value = (headers.get("retry-after") or "").strip()
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return default
        seconds = when.timestamp() - time.time()
    if seconds != seconds:  # NaN
        return default
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


class RateLimitTransport(httpx.AsyncBaseTransport):
    """Wraps a transport; an HTTP 429 reply raises ``ServiceRateLimited(service, Retry-After)``.

    Replicate's client retries a GET that got a 429 by itself, sleeping inside the handler, and
    drops the header from the error it raises for a POST. Raised here, below it, the delay the
    service asked for reaches the handler either way, which gives the token back to the worker
    for that long (RetryLater) instead of holding a slot."""

    def __init__(self, service: str, wrapped: httpx.AsyncBaseTransport | None = None) -> None:
        self._service = service
        self._wrapped = wrapped or httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._wrapped.handle_async_request(request)
        if response.status_code == 429:
            await response.aclose()
            raise ServiceRateLimited(self._service, retry_after(response.headers))
        return response

    async def aclose(self) -> None:
        await self._wrapped.aclose()


# The check the calling task asked to run before each request it sends (see send_guard).
_guard: ContextVar[Callable[[], None] | None] = ContextVar("glisk_send_guard", default=None)
# httpcore's trace events fired right before a request's headers go on the wire.
_BEFORE_WRITE = frozenset(
    {"http11.send_request_headers.started", "http2.send_request_headers.started"}
)


@contextmanager
def send_guard(guard: Callable[[], None]) -> Iterator[None]:
    """Within the block, every request this task sends through a ``SendGuardTransport`` calls
    ``guard()`` once its connection is ready, right before the request's first byte is written;
    whatever ``guard`` raises propagates to the caller and nothing of the request is sent.

    Why on the wire and not before the call: a process paused (SIGSTOP, a frozen VM) after a
    check made at the start of the call but before the request is written sends it when it
    wakes, however stale the check; here the gap is the few microseconds between the trace
    event and the request's last write (headers, then a small body), instead of the whole
    connection set-up."""
    token = _guard.set(guard)
    try:
        yield
    finally:
        _guard.reset(token)


class SendGuardTransport(httpx.AsyncBaseTransport):
    """Wraps a transport built on httpcore (``httpx.AsyncHTTPTransport``); runs the calling
    task's ``send_guard`` right before each request is written (through httpcore's ``trace``
    extension, chained with any trace the request already carries)."""

    def __init__(self, wrapped: httpx.AsyncBaseTransport) -> None:
        self._wrapped = wrapped

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        guard = _guard.get()
        if guard is not None:
            request.extensions = {**request.extensions, "trace": _traced(guard, request)}
        return await self._wrapped.handle_async_request(request)

    async def aclose(self) -> None:
        await self._wrapped.aclose()


def _traced(
    guard: Callable[[], None], request: httpx.Request
) -> Callable[[str, dict[str, Any]], Awaitable[None]]:
    earlier = request.extensions.get("trace")

    async def trace(event: str, info: dict[str, Any]) -> None:
        if event in _BEFORE_WRITE:
            guard()
        if earlier is not None:
            await earlier(event, info)

    return trace
