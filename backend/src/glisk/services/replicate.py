"""Image predictions on Replicate's HTTP API, through Replicate's official client.

The calls a stage needs, each one request:

- ``create(input)``: ``POST /v1/models/{owner}/{name}/predictions`` (the model's latest version)
  or ``POST /v1/predictions`` with ``version``; asynchronous (no ``Prefer: wait``), so the
  prediction's id comes back at once and can be recorded before waiting for the image.
- ``get(id)``: ``GET /v1/predictions/{id}``; ``cancel(id)``: ``POST /v1/predictions/{id}/cancel``.
- ``find(input, since)``: the account's predictions, newest first (``GET /v1/predictions``,
  100 a page, cursor pagination), back to ``since``: the one created with exactly ``input``. A
  create whose reply was lost is found this way instead of being paid for again.
- ``download(url)``: the output file, fetched without the API token (it lives on a CDN).

Errors (``glisk.errors``): ``ServiceRateLimited`` (HTTP 429, with ``Retry-After``),
``ServiceRefused`` (400, 404, 409, 413, 422: the input as sent cannot run), ``ServiceUnavailable``
(5xx, a connection refused or cut, a timeout: for a create, the prediction may exist), and
``ServiceError`` for the rest (401, 402, 403: the account, not the token).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import httpx

from glisk.errors import ServiceError, ServiceRefused, ServiceUnavailable, first_line
from glisk.services.http import RateLimitTransport, SendGuardTransport

if TYPE_CHECKING:
    from replicate.client import Client

SERVICE = "replicate"
TERMINAL = frozenset({"succeeded", "failed", "canceled"})
REFUSED_STATUSES = frozenset({400, 404, 409, 413, 422})
# The largest image accepted from a prediction's output.
MAX_IMAGE_BYTES = 64 * 1024 * 1024
# Pages of the prediction list read at most when looking for a lost create (100 a page).
MAX_LIST_PAGES = 50


@dataclass(frozen=True)
class Prediction:
    id: str
    status: str  # starting, processing, succeeded, failed, canceled
    input: dict[str, Any]
    output: Any
    error: str | None
    created_at: datetime | None

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    def output_urls(self) -> list[str]:
        """The output as a list of URLs (a model returns one URL or a list of them)."""
        if isinstance(self.output, str):
            return [self.output]
        if isinstance(self.output, list):
            return [item for item in self.output if isinstance(item, str)]  # pyright: ignore[reportUnknownVariableType]
        return []


def _timestamp(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _prediction(raw: Any) -> Prediction:
    return Prediction(
        id=raw.id,
        status=raw.status,
        input=dict(raw.input or {}),
        output=raw.output,
        error=raw.error,
        created_at=_timestamp(raw.created_at),
    )


def canonical(input: Mapping[str, Any]) -> str:
    """``input`` as one string, for comparing a listed prediction's input with ours."""
    return json.dumps(input, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class ReplicateService:
    """One client per process: connections are pooled and reused by every handler call.

    ``model`` is ``owner/name``; with ``version`` (a version id) predictions are created on that
    version, else on the model's latest. ``timeout`` bounds each request, ``base_url`` points
    at Replicate or at a stand-in; ``transport`` (httpcore-based, default
    ``httpx.AsyncHTTPTransport``) carries the API's requests, under the 429 and send-guard
    layers (see ``glisk.services.http``). Building one does no I/O."""

    def __init__(
        self,
        *,
        api_token: str,
        model: str,
        version: str | None = None,
        base_url: str = "https://api.replicate.com",
        timeout: float = 30.0,
        max_connections: int = 100,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        from replicate.client import Client

        self.model = model
        self.version = version
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=20)
        self._client: Client = Client(
            api_token=api_token,
            base_url=base_url,
            timeout=httpx.Timeout(timeout),
            transport=RateLimitTransport(
                SERVICE,
                SendGuardTransport(transport or httpx.AsyncHTTPTransport(limits=limits)),
            ),
        )
        # Output files live elsewhere (a CDN): fetched by a client that carries no token.
        self._downloads = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout), limits=limits, follow_redirects=True
        )

    async def aclose(self) -> None:
        await self._client._async_client.aclose()  # pyright: ignore[reportPrivateUsage]
        await self._downloads.aclose()

    async def create(self, input: Mapping[str, Any]) -> Prediction:
        """Start a prediction; returns at once (status ``starting``). On ServiceUnavailable the
        prediction may exist all the same: look for it with ``find`` before creating another."""
        predictions = self._client.predictions
        if self.version is not None:
            call = predictions.async_create(version=self.version, input=dict(input))
        else:
            call = predictions.async_create(model=self.model, input=dict(input))
        return _prediction(await self._call("create", call))

    async def get(self, prediction_id: str) -> Prediction:
        return _prediction(
            await self._call("get", self._client.predictions.async_get(prediction_id))
        )

    async def cancel(self, prediction_id: str) -> Prediction:
        call = self._client.predictions.async_cancel(prediction_id)
        return _prediction(await self._call("cancel", call))

    async def find(self, input: Mapping[str, Any], since: datetime) -> Prediction | None:
        """The newest prediction of the account created with exactly ``input`` at or after
        ``since`` (timezone-aware), or None. Reads the list newest first and stops at ``since``
        (at most MAX_LIST_PAGES pages)."""
        wanted = canonical(input)
        cursor: Any = ...
        for _ in range(MAX_LIST_PAGES):
            page = await self._call("list", self._client.predictions.async_list(cursor))
            for raw in page.results:
                prediction = _prediction(raw)
                if prediction.created_at is not None and prediction.created_at < since:
                    return None
                if canonical(prediction.input) == wanted:
                    return prediction
            if not page.next:
                return None
            cursor = page.next
        return None

    async def download(self, url: str) -> tuple[bytes, str]:
        """The file at ``url`` and its content type. ServiceUnavailable when it cannot be read,
        ServiceRefused when it is gone (404, 410) or larger than MAX_IMAGE_BYTES."""
        try:
            async with self._downloads.stream("GET", url) as response:
                if response.status_code in (404, 410):
                    raise ServiceRefused(SERVICE, f"output file gone (HTTP {response.status_code})")
                if response.status_code != 200:
                    raise ServiceUnavailable(
                        SERVICE,
                        f"output file: HTTP {response.status_code}",
                        status=response.status_code,
                    )
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_IMAGE_BYTES:
                        raise ServiceRefused(SERVICE, f"output file over {MAX_IMAGE_BYTES} bytes")
                kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
                return bytes(body), kind
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(SERVICE, f"output file: {type(exc).__name__}") from exc

    async def _call(self, what: str, call: Any) -> Any:
        from replicate.exceptions import ReplicateError

        try:
            return await call
        except ReplicateError as exc:
            status = exc.status or 0
            reason = (exc.detail or exc.title or "").strip().splitlines()
            message = f"{what}: HTTP {status}" + (f": {reason[0][:300]}" if reason else "")
            if status >= 500:
                raise ServiceUnavailable(SERVICE, message, status=status) from None
            if status in REFUSED_STATUSES:
                raise ServiceRefused(SERVICE, message, status=status) from None
            raise ServiceError(SERVICE, message, status=status) from None
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(SERVICE, f"{what}: {type(exc).__name__}") from None
        except ValueError as exc:  # a reply that is not the JSON a prediction should be
            reason = first_line(exc)[:200]
            raise ServiceUnavailable(SERVICE, f"{what}: malformed reply ({reason})") from None
