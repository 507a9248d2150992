"""A Pinata-shaped HTTP service: files pinned to IPFS under the CIDs IPFS computes, faults on
demand, and a gateway to fetch them back.

Run it as its own process (``python -m glisk.standins.pinata --port 0``; it prints ``pinata
stand-in listening on http://127.0.0.1:PORT``). It needs Node.js: the CID of every file is
computed by Helia's UnixFS importer (``glisk.standins.helia``), never by glisk's own code.

- ``POST /pinning/pinFileToIPFS``: multipart ``file``, ``pinataMetadata`` (JSON: ``name``,
  ``keyvalues``), ``pinataOptions`` (JSON: ``cidVersion`` 0 or 1, default 0 as on Pinata). Pins
  the bytes under their CID (CIDv1: raw leaves, 256 KiB chunks, balanced DAG; CIDv0: dag-pb
  leaves) and answers ``{"IpfsHash", "PinSize", "Timestamp", "isDuplicate"}``; ``isDuplicate``
  is true when those bytes were pinned already.
- ``GET /data/testAuthentication``: the greeting Pinata answers a valid JWT with.
- ``GET /ipfs/{cid}``: the pinned bytes, as a gateway serves them (404 for an unknown CID).
- 401 ``{"error": {"reason": "INVALID_CREDENTIALS", ...}}`` without ``Authorization: Bearer
  <PINATA_JWT>`` (when that variable is set here).

Faults (``pin``): 429 (``Retry-After``), 500, 503 (nothing pinned), lost (pinned, reply cut),
wrong_cid (the reply names the bytes' CIDv0, as if the CID version had been ignored; pinned
under it). Knobs: ``retry_after``.

``GET /_standin/stats``: pin requests, distinct CIDs pinned, uploads per CID, duplicates,
replies lost, wrong CIDs answered, faults applied.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from glisk.standins.helia import HeliaImporter
from glisk.standins.http_service import Faults, LostReply, add_admin_routes, serve

NAME = "pinata stand-in"
FAULTS: dict[str, list[str]] = {"pin": ["429", "500", "503", "lost", "wrong_cid"]}
MAX_FILE_BYTES = 100 * 1024 * 1024


@dataclass
class Knobs:
    retry_after: float = 1.0


@dataclass
class Pin:
    cid: str
    data: bytes
    content_type: str
    name: str
    keyvalues: dict[str, Any]
    timestamp: str
    uploads: int = 1


@dataclass
class PinataStandin:
    token: str | None
    knobs: Knobs = field(default_factory=Knobs)
    faults: Faults = field(default_factory=Faults)
    pins: dict[str, Pin] = field(default_factory=dict[str, Pin])
    requests: int = 0
    duplicates: int = 0
    lost: int = 0
    wrong_cids: int = 0

    def reset(self) -> None:
        self.knobs, self.faults, self.pins = Knobs(), Faults(), {}
        self.requests = self.duplicates = self.lost = self.wrong_cids = 0

    def stats(self) -> dict[str, Any]:
        return {
            "pin_requests": self.requests,
            "pinned": len(self.pins),
            "uploads_by_cid": {cid: pin.uploads for cid, pin in self.pins.items()},
            "duplicates": self.duplicates,
            "lost_replies": self.lost,
            "wrong_cids": self.wrong_cids,
            "faults": dict(self.faults.applied),
        }


def _error(status: int, reason: str, details: str) -> JSONResponse:
    return JSONResponse({"error": {"reason": reason, "details": details}}, status_code=status)


def create_app(token: str | None = None) -> FastAPI:
    """The stand-in as an ASGI app; ``token``: the JWT requests must carry (None: any). The
    Helia importer process runs for the app's lifespan."""
    standin = PinataStandin(token)
    helia = HeliaImporter()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with helia:
            yield

    app = FastAPI(title=NAME, openapi_url=None, docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.standin = standin

    def refuse(request: Request) -> JSONResponse | None:
        if standin.token is None:
            return None
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and secrets.compare_digest(
            value.strip().encode(), standin.token.encode()
        ):
            return None
        return _error(401, "INVALID_CREDENTIALS", "Invalid/expired credentials")

    @app.get("/data/testAuthentication")
    async def test_authentication(request: Request) -> Any:
        if (denied := refuse(request)) is not None:
            return denied
        return {"message": "Congratulations! You are communicating with the Pinata API!"}

    @app.post("/pinning/pinFileToIPFS")
    async def pin_file(request: Request) -> Any:
        if (denied := refuse(request)) is not None:
            return denied
        standin.requests += 1
        fault = standin.faults.draw("pin")
        if fault == "429":
            response = _error(429, "RATE_LIMITED", "Rate limit exceeded")
            response.headers["Retry-After"] = f"{standin.knobs.retry_after:g}"
            return response
        if fault in ("500", "503"):
            return _error(int(fault), "INTERNAL_SERVER_ERROR", "the stand-in failed on purpose")
        form = await request.form(max_part_size=MAX_FILE_BYTES)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            return _error(400, "INVALID_REQUEST", "a file is required (multipart field 'file')")
        data = await upload.read()
        try:
            metadata = json.loads(str(form.get("pinataMetadata") or "{}"))
            options = json.loads(str(form.get("pinataOptions") or "{}"))
        except ValueError:
            return _error(400, "INVALID_REQUEST", "pinataMetadata and pinataOptions are JSON")
        version = int(options.get("cidVersion", 0))
        if version not in (0, 1):
            return _error(400, "INVALID_REQUEST", "cidVersion must be 0 or 1")
        if fault == "wrong_cid":
            version = 0  # as if the option had been dropped on the way
            standin.wrong_cids += 1
        cid = await helia.cid(data, cid_version=version)
        pin = standin.pins.get(cid)
        duplicate = pin is not None
        if pin is None:
            pin = standin.pins[cid] = Pin(
                cid=cid,
                data=data,
                content_type=upload.content_type or "application/octet-stream",
                name=str(metadata.get("name") or upload.filename or cid),
                keyvalues=dict(metadata.get("keyvalues") or {}),
                timestamp=datetime.now(UTC).isoformat(timespec="milliseconds"),
            )
        else:
            pin.uploads += 1
            standin.duplicates += 1
        body = {
            "IpfsHash": cid,
            "PinSize": len(data),
            "Timestamp": pin.timestamp,
            "isDuplicate": duplicate,
        }
        if fault == "lost":
            standin.lost += 1
            return LostReply(json.dumps(body).encode())
        return body

    @app.get("/ipfs/{cid}")
    async def gateway(cid: str) -> Any:
        pin = standin.pins.get(cid)
        if pin is None:
            return JSONResponse({"error": "not pinned here"}, status_code=404)
        return Response(pin.data, media_type=pin.content_type)

    add_admin_routes(app, standin, FAULTS)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m glisk.standins.pinata", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8101)
    args = parser.parse_args(argv)
    serve(create_app(os.environ.get("PINATA_JWT") or None), NAME, args.host, args.port)


if __name__ == "__main__":
    main()
