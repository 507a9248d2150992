"""Files pinned to IPFS through Pinata's pinning API (httpx).

``pin_file`` is ``POST /pinning/pinFileToIPFS``: a multipart upload of one file (field ``file``)
with ``pinataMetadata`` (a name and key-values, Pinata's bookkeeping only) and ``pinataOptions``
``{"cidVersion": 1}``, authenticated by a JWT (``Authorization: Bearer``). The reply is
``{"IpfsHash", "PinSize", "Timestamp", "isDuplicate"}``: the CID Pinata gave the bytes, and
whether the account had them pinned already, which makes pinning the same bytes again harmless.

This is Pinata's legacy pinning API rather than the v3 Files API (``POST /v3/files`` on
uploads.pinata.cloud): it states ``isDuplicate`` in its reply and takes the CID version as an
option, and one host serves it. The bytes, and so the CID, are the same either way.

Errors (``glisk.errors``): ``ServiceRateLimited`` (429, ``Retry-After``), ``ServiceUnavailable``
(5xx, a connection refused or cut, a timeout: the file may be pinned all the same),
``ServiceRefused`` (400, 413, 422: this file as sent), ``ServiceError`` for the rest (401, 403:
the JWT or the account).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import httpx

from glisk.errors import ServiceError, ServiceRefused, ServiceUnavailable, first_line
from glisk.services.http import RateLimitTransport

SERVICE = "pinata"
REFUSED_STATUSES = frozenset({400, 413, 422})


@dataclass(frozen=True)
class Pinned:
    cid: str  # IpfsHash
    size: int  # PinSize
    timestamp: str
    duplicate: bool  # isDuplicate: the account had these bytes pinned already


class PinataService:
    """One client per process (pooled connections). Building one does no I/O."""

    def __init__(
        self,
        *,
        jwt: str,
        api_url: str = "https://api.pinata.cloud",
        timeout: float = 60.0,
        max_connections: int = 100,
    ) -> None:
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=20)
        self._client = httpx.AsyncClient(
            base_url=api_url,
            headers={"Authorization": f"Bearer {jwt}"},
            timeout=httpx.Timeout(timeout),
            transport=RateLimitTransport(SERVICE, httpx.AsyncHTTPTransport(limits=limits)),
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def pin_file(
        self,
        data: bytes,
        *,
        name: str,
        content_type: str,
        keyvalues: Mapping[str, str] | None = None,
    ) -> Pinned:
        """Pin ``data`` as one file named ``name``; returns what Pinata says it pinned."""
        metadata = {"name": name, "keyvalues": dict(keyvalues or {})}
        try:
            response = await self._client.post(
                "/pinning/pinFileToIPFS",
                files={"file": (name, data, content_type)},
                data={
                    "pinataMetadata": json.dumps(metadata),
                    "pinataOptions": json.dumps({"cidVersion": 1}),
                },
            )
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(SERVICE, f"pin: {type(exc).__name__}") from None
        status = response.status_code
        if status != 200:
            message = f"pin: HTTP {status}" + _reason(response)
            if status >= 500:
                raise ServiceUnavailable(SERVICE, message, status=status)
            if status in REFUSED_STATUSES:
                raise ServiceRefused(SERVICE, message, status=status)
            raise ServiceError(SERVICE, message, status=status)
        try:
            body = response.json()
            return Pinned(
                cid=str(body["IpfsHash"]),
                size=int(body.get("PinSize") or 0),
                timestamp=str(body.get("Timestamp") or ""),
                duplicate=bool(body.get("isDuplicate", False)),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ServiceUnavailable(SERVICE, f"pin: malformed reply ({first_line(exc)})") from None


def _reason(response: httpx.Response) -> str:
    """The error's reason as Pinata states it (``{"error": {"reason", "details"}}`` or a
    string), first line, bounded."""
    try:
        body = response.json()
    except ValueError:
        return ""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        text = str(error.get("details") or error.get("reason") or "")  # pyright: ignore[reportUnknownMemberType, reportUnknownArgumentType]
    else:
        text = str(error or "")
    lines = text.strip().splitlines()
    return f": {lines[0][:300]}" if lines else ""
