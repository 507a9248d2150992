"""A Replicate-shaped HTTP service: predictions of an image model, with faults on demand.

Run it as its own process (``python -m glisk.standins.replicate --port 0``; it prints
``replicate stand-in listening on http://127.0.0.1:PORT``). It speaks the parts of Replicate's
HTTP API an image stage uses, with their paths, payloads, statuses and headers:

- ``POST /v1/models/{owner}/{name}/predictions`` (``{"input": {...}}``) and ``POST
  /v1/predictions`` (``{"version": "<64 hex>", "input": {...}}``): 201 and the prediction
  (``id``, ``model``, ``version``, ``input``, ``status: starting``, ``output: null``, ``urls``,
  ``created_at``...). ``Prefer: wait`` / ``Prefer: wait=N`` holds the reply until the
  prediction finishes or N seconds (at most 60) pass. An input without a non-empty string
  ``prompt`` is refused with 422 (``title: Input validation failed``, ``invalid_fields``).
- ``GET /v1/predictions/{id}``: the prediction; it is ``processing`` until ``prediction_seconds``
  after its creation, then ``succeeded`` with ``output: ["<base>/files/<id>/out-0.png"]`` (a PNG
  drawn from the prompt and seed), or ``failed`` with ``error``: "NSFW content detected..." when
  the prompt holds one of ``refuse_words``, or a model error under the ``fail`` fault.
- ``POST /v1/predictions/{id}/cancel``: a prediction not finished becomes ``canceled``.
- ``GET /v1/predictions``: the account's predictions, newest first, 100 a page, ``next`` a URL
  with a ``cursor``.
- 401 without ``Authorization: Bearer <REPLICATE_API_TOKEN>`` (when that variable is set here);
  429 ``Request was throttled`` with ``Retry-After`` under the ``429`` fault.

Faults (see ``glisk.standins.http_service``): ``create``: 429, 500, 503 (nothing created), lost
(created, reply cut), slow (this prediction takes ``slow_seconds``), fail (the prediction
fails), nsfw (refused as NSFW); ``get``: 429, 500, lost; ``cancel``: 500; ``list``: 429, 500;
``file``: 500. Knobs, with the faults: ``prediction_seconds``, ``slow_seconds``,
``retry_after``, ``refuse_words``, ``image_size``.

``GET /_standin/stats``: predictions created (in all and per distinct input), by status, in
flight now, canceled, replies lost, faults applied, requests per operation.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from glisk.standins.http_service import Faults, LostReply, add_admin_routes, serve
from glisk.standins.png import render_png

NAME = "replicate stand-in"
FAULTS: dict[str, list[str]] = {
    "create": ["429", "500", "503", "lost", "slow", "fail", "nsfw"],
    "get": ["429", "500", "lost"],
    "cancel": ["500"],
    "list": ["429", "500"],
    "file": ["500"],
}
PAGE = 100
DEFAULT_VERSION = "5599ed30703defd1d160a25a63321b4dec97101d98b4674bcc56e41f62f35637"
NSFW_ERROR = "NSFW content detected. Try running it again, or try a different prompt."
MODEL_ERROR = "CUDA error: out of memory (the model failed; running it again may work)"


@dataclass
class Knobs:
    prediction_seconds: float = 0.0
    slow_seconds: float = 30.0
    retry_after: float = 1.0
    refuse_words: list[str] = field(default_factory=lambda: ["forbidden-for-demo"])
    image_size: int = 64


@dataclass
class Record:
    id: str
    model: str
    version: str
    input: dict[str, Any]
    created_wall: datetime
    created: float  # monotonic
    duration: float
    outcome: str  # succeeded, failed
    error: str | None
    canceled_at: float | None = None

    def status(self, now: float) -> str:
        if self.canceled_at is not None and self.canceled_at < self.created + self.duration:
            return "canceled"
        if now >= self.created + self.duration:
            return self.outcome
        return "processing" if now >= self.created + min(0.05, self.duration / 2) else "starting"

    def finished_at(self) -> float:
        end = self.created + self.duration
        return min(end, self.canceled_at) if self.canceled_at is not None else end


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ReplicateStandin:
    """The state behind the app: predictions in creation order, faults, counters. Every
    handler runs on the server's one event loop and never awaits while changing state."""

    def __init__(self, token: str | None) -> None:
        self.token = token
        self.reset()

    def reset(self) -> None:
        self.knobs = Knobs()
        self.faults = Faults()
        self.records: dict[str, Record] = {}
        self.order: list[str] = []
        self.requests: dict[str, int] = {}
        self.lost = 0

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        by_status: dict[str, int] = {}
        by_input: dict[str, int] = {}
        for record in self.records.values():
            status = record.status(now)
            by_status[status] = by_status.get(status, 0) + 1
            key = json.dumps(record.input, sort_keys=True, separators=(",", ":"))
            by_input[key] = by_input.get(key, 0) + 1
        return {
            "created": len(self.records),
            "distinct_inputs": len(by_input),
            "by_input": by_input,
            "by_status": by_status,
            "in_flight": by_status.get("starting", 0) + by_status.get("processing", 0),
            "lost_replies": self.lost,
            "faults": dict(self.faults.applied),
            "requests": dict(self.requests),
        }

    def body(self, record: Record, base: str) -> dict[str, Any]:
        now = time.monotonic()
        status = record.status(now)
        done = status in ("succeeded", "failed", "canceled")
        url = f"{base}v1/predictions/{record.id}"
        return {
            "id": record.id,
            "model": record.model,
            "version": record.version,
            "input": record.input,
            "logs": "",
            "output": [f"{base}files/{record.id}/out-0.png"] if status == "succeeded" else None,
            "data_removed": False,
            "error": record.error if status == "failed" else None,
            "status": status,
            "source": "api",
            "created_at": _iso(record.created_wall),
            "started_at": _iso(record.created_wall),
            "completed_at": (
                _iso(
                    datetime.fromtimestamp(
                        record.created_wall.timestamp() + record.finished_at() - record.created,
                        UTC,
                    )
                )
                if done
                else None
            ),
            "urls": {"get": url, "cancel": f"{url}/cancel", "stream": f"{url}/stream"},
            "metrics": {"predict_time": round(record.duration, 3)} if done else {},
        }


def _problem(status: int, title: str, detail: str, **extra: Any) -> JSONResponse:
    return JSONResponse(
        {"title": title, "detail": detail, "status": status, **extra},
        status_code=status,
        media_type="application/problem+json",
    )


def create_app(token: str | None = None) -> FastAPI:
    """The stand-in as an ASGI app; ``token``: the bearer token requests must carry (None:
    any)."""
    standin = ReplicateStandin(token)
    app = FastAPI(title=NAME, openapi_url=None, docs_url=None, redoc_url=None)
    app.state.standin = standin

    def counted(operation: str) -> str | None:
        standin.requests[operation] = standin.requests.get(operation, 0) + 1
        return standin.faults.draw(operation)

    def refuse(request: Request) -> JSONResponse | None:
        if standin.token is None:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() in ("bearer", "token") and secrets.compare_digest(
            value.strip().encode(), standin.token.encode()
        ):
            return None
        return _problem(401, "Unauthenticated", "You did not pass a valid authentication token")

    def fault_reply(fault: str | None) -> Response | None:
        if fault == "429":
            seconds = f"{standin.knobs.retry_after:g}"
            response = _problem(
                429,
                "Request was throttled.",
                f"Request was throttled. Your rate limit resets in ~{seconds}s.",
            )
            response.headers["Retry-After"] = f"{standin.knobs.retry_after:g}"
            return response
        if fault in ("500", "503"):
            return _problem(int(fault), "Internal Server Error", "the stand-in failed on purpose")
        return None

    async def create(request: Request, model: str, version: str) -> Any:
        if (denied := refuse(request)) is not None:
            return denied
        fault = counted("create")
        if (reply := fault_reply(fault)) is not None:
            return reply
        try:
            payload = await request.json()
        except ValueError:
            return _problem(400, "Bad request", "the body is not JSON")
        body_input = payload.get("input") if isinstance(payload, dict) else None
        prompt = body_input.get("prompt") if isinstance(body_input, dict) else None
        if not isinstance(body_input, dict) or not isinstance(prompt, str) or not prompt.strip():
            return _problem(
                422,
                "Input validation failed",
                "- input.prompt: a non-empty string is required",
                invalid_fields=[
                    {"type": "required", "field": "input.prompt", "description": "required"}
                ],
            )
        knobs = standin.knobs
        refused = fault == "nsfw" or any(w in prompt.lower() for w in knobs.refuse_words)
        failed = fault == "fail"
        record = Record(
            id=base64.b32encode(secrets.token_bytes(16)).decode().lower().rstrip("="),
            model=model,
            version=version,
            input=dict(body_input),  # pyright: ignore[reportUnknownArgumentType]
            created_wall=datetime.now(UTC),
            created=time.monotonic(),
            duration=knobs.slow_seconds if fault == "slow" else knobs.prediction_seconds,
            outcome="failed" if refused or failed else "succeeded",
            error=NSFW_ERROR if refused else MODEL_ERROR if failed else None,
        )
        standin.records[record.id] = record
        standin.order.append(record.id)
        base = str(request.base_url)
        if fault == "lost":
            standin.lost += 1
            return LostReply(json.dumps(standin.body(record, base)).encode())
        wait = _prefer_wait(request.headers.get("prefer", ""))
        if wait:
            deadline = time.monotonic() + wait
            while record.status(time.monotonic()) in ("starting", "processing"):
                if time.monotonic() >= deadline:
                    break
                await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        return JSONResponse(standin.body(record, base), status_code=201)

    @app.post("/v1/models/{owner}/{name}/predictions")
    async def create_on_model(request: Request, owner: str, name: str) -> Any:
        return await create(request, f"{owner}/{name}", DEFAULT_VERSION)

    @app.post("/v1/predictions")
    async def create_on_version(request: Request) -> Any:
        try:
            payload = await request.json()
        except ValueError:
            payload = {}
        version = payload.get("version") if isinstance(payload, dict) else None
        if not isinstance(version, str) or len(version) != 64:
            if (denied := refuse(request)) is not None:
                return denied
            return _problem(422, "Invalid version or not permitted", "version: 64 hex expected")
        return await create(request, "stand-in/model", version)

    @app.get("/v1/predictions/{prediction_id}")
    async def get(request: Request, prediction_id: str) -> Any:
        if (denied := refuse(request)) is not None:
            return denied
        fault = counted("get")
        if (reply := fault_reply(fault)) is not None:
            return reply
        record = standin.records.get(prediction_id)
        if record is None:
            return JSONResponse({"detail": "Not found."}, status_code=404)
        body = standin.body(record, str(request.base_url))
        if fault == "lost":
            standin.lost += 1
            return LostReply(json.dumps(body).encode())
        return body

    @app.post("/v1/predictions/{prediction_id}/cancel")
    async def cancel(request: Request, prediction_id: str) -> Any:
        if (denied := refuse(request)) is not None:
            return denied
        if (reply := fault_reply(counted("cancel"))) is not None:
            return reply
        record = standin.records.get(prediction_id)
        if record is None:
            return JSONResponse({"detail": "Not found."}, status_code=404)
        now = time.monotonic()
        if record.status(now) in ("starting", "processing"):
            record.canceled_at = now
        return standin.body(record, str(request.base_url))

    @app.get("/v1/predictions")
    async def list_predictions(request: Request, cursor: int = 0) -> Any:
        if (denied := refuse(request)) is not None:
            return denied
        if (reply := fault_reply(counted("list"))) is not None:
            return reply
        base = str(request.base_url)
        newest_first = standin.order[::-1]
        page = newest_first[cursor : cursor + PAGE]
        more = cursor + PAGE < len(newest_first)
        return {
            "next": f"{base}v1/predictions?cursor={cursor + PAGE}" if more else None,
            "previous": f"{base}v1/predictions?cursor={max(0, cursor - PAGE)}" if cursor else None,
            "results": [standin.body(standin.records[i], base) for i in page],
        }

    @app.get("/files/{prediction_id}/{filename}")
    async def output_file(prediction_id: str, filename: str) -> Any:
        if (reply := fault_reply(counted("file"))) is not None:
            return reply
        record = standin.records.get(prediction_id)
        if record is None or record.status(time.monotonic()) != "succeeded":
            return JSONResponse({"detail": "Not found."}, status_code=404)
        seed = json.dumps(record.input, sort_keys=True).encode()
        return Response(render_png(seed, standin.knobs.image_size), media_type="image/png")

    add_admin_routes(app, standin, FAULTS)
    return app


def _prefer_wait(header: str) -> float:
    """Seconds ``Prefer: wait`` / ``Prefer: wait=N`` asks to hold the reply (0: not asked)."""
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key.strip().lower() == "wait":
            try:
                return min(60.0, max(1.0, float(value))) if value else 60.0
            except ValueError:
                return 60.0
    return 0.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m glisk.standins.replicate", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args(argv)
    serve(create_app(os.environ.get("REPLICATE_API_TOKEN") or None), NAME, args.host, args.port)


if __name__ == "__main__":
    main()
