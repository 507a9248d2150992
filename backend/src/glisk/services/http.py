"""What the service clients share: reading ``Retry-After``, and a transport that turns every HTTP
429 into ``ServiceRateLimited`` before any client library retries it on its own."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping

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
