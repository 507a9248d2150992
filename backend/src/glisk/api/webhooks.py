"""``POST /webhooks/alchemy``: mint logs pushed by an Alchemy custom webhook.

Contract:
- **401, nothing read or written** without a valid ``X-Alchemy-Signature`` (hex HMAC-SHA256 of
  the raw body under ALCHEMY_WEBHOOK_SIGNING_KEY, compared in constant time). With no signing
  key configured the route still exists and refuses every request: secure by default.
- **413** for a body over MAX_BODY_BYTES, **400** for a signed body that is not a custom-webhook
  payload, or whose ``event.network`` is another chain than CHAIN_ID's (one line naming the
  field), **503** when GLISK_CONTRACT_ADDRESS is unset or the
  database cannot take it (Alchemy delivers again later).
- **200** otherwise, with one answer per mint log (``glisk.ingest.delivery``): new, duplicate,
  conflict, orphaned, rolled_back, removed; and the count of other logs ignored. A duplicate or a
  conflict never stops the rest, and redelivery or reordering changes nothing.
- Fast: one read of the cursor and one statement for the payload's logs (``record_mints``), in
  one transaction; a deadlock or serialization failure is retried there, up to 3 times.

Never logged: the key, the signature, the body.
"""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from glisk.api.schemas import envelope
from glisk.errors import DatabaseError, FieldValidationError, first_line
from glisk.ingest.alchemy import SIGNATURE_HEADER, check_network, parse, signature_valid
from glisk.ingest.delivery import deliver

log = structlog.get_logger("glisk.webhook")
router = APIRouter()

MAX_BODY_BYTES = 4 * 1024 * 1024  # Alchemy's per-block payloads, filtered to one contract
ATTEMPTS = 3


def _refuse(status: int, code: str, message: str, request: Request, outcome: str) -> JSONResponse:
    _count(request, outcome)
    return JSONResponse(status_code=status, content=envelope(code, message))


def _count(request: Request, outcome: str, answers: dict[str, int] | None = None) -> None:
    metrics = getattr(request.app.state, "api_metrics", None)
    if metrics is None:
        return
    metrics.webhook_requests.labels(outcome).inc()
    for answer, n in (answers or {}).items():
        if n:
            metrics.webhook_logs.labels(answer).inc(n)


async def _body(request: Request) -> bytes | None:
    """The raw body, or None when it is larger than MAX_BODY_BYTES (read no further)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


@router.post(
    "/webhooks/alchemy",
    summary="Mint logs from an Alchemy custom webhook (signed)",
    responses={401: {"description": "missing or invalid X-Alchemy-Signature"}},
)
async def alchemy_webhook(request: Request) -> Any:
    settings = request.app.state.settings
    key = settings.alchemy_webhook_signing_key
    body = await _body(request)
    if body is None:
        return _refuse(413, "PAYLOAD_TOO_LARGE", "body too large", request, "too_large")
    secret = key.get_secret_value() if key is not None else None
    if not signature_valid(secret, body, request.headers.get(SIGNATURE_HEADER)):
        log.warning(
            "webhook.refused",
            reason="no signing key configured" if secret is None else "bad or missing signature",
        )
        return _refuse(401, "UNAUTHORIZED", "invalid signature", request, "unauthorized")
    contract = settings.glisk_contract_address
    if contract is None:
        log.error("webhook.unconfigured", reason="GLISK_CONTRACT_ADDRESS is not set")
        return _refuse(
            503, "UNAVAILABLE", "GLISK_CONTRACT_ADDRESS is not set", request, "unavailable"
        )
    try:
        payload = parse(body, contract=contract)
        check_network(payload, settings.chain_id)
    except FieldValidationError as exc:
        log.warning("webhook.invalid", error=str(exc))
        return _refuse(400, "BAD_REQUEST", str(exc), request, "invalid")
    attempt = 1
    while True:
        try:
            report = await deliver(request.app.state.uow_factory, payload)
            break
        except DatabaseError as exc:
            if exc.transient and attempt < ATTEMPTS:
                attempt += 1
                continue
            log.error("webhook.database_error", error=first_line(exc))
            return _refuse(503, "UNAVAILABLE", "database unavailable", request, "unavailable")
    counts = report.counts()
    _count(request, "accepted", counts)
    log.info("webhook.delivery", delivery=payload.event_id, **counts)
    return report.as_json()
