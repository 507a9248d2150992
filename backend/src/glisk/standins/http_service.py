"""What the HTTP stand-ins of paid services share (``replicate``, ``pinata``): faults on demand,
a reply lost after the work was done, the admin endpoints, the process and its launcher.

Faults are asked for per operation (``create``, ``get``, ``pin``...), two ways at once:
- scripted: the next requests of an operation get these faults, in order
  (``{"script": {"create": ["429", "lost"]}}``);
- random: each request of an operation gets a fault with a probability, from a seeded generator
  (``{"rates": {"create": {"429": 0.05, "lost": 0.02}}, "seed": 7}``).
The stand-in decides what each fault means for an operation (``429``: Too Many Requests with
``Retry-After``; ``500``/``503``: a server error before any work; ``lost``: the work is done, then
the connection is cut in the middle of the reply). ``POST /_standin/faults`` sets them (the body
also carries the stand-in's own knobs), ``GET /_standin/stats`` reads the counters,
``POST /_standin/reset`` forgets everything. Nothing of this exists on the real services.

A stand-in runs as its own process, shared by every worker and outliving any of them:
``python -m glisk.standins.replicate --port 0`` prints ``... listening on http://127.0.0.1:PORT``.
Expected credentials come from the environment (``REPLICATE_API_TOKEN``, ``PINATA_JWT``), never
from the command line.
"""

from __future__ import annotations

import contextlib
import random
import selectors
import socket
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from glisk.core import processes
from glisk.errors import GliskError


class StandinError(GliskError):
    """A stand-in did not start, or its admin endpoint refused a request."""


class Faults:
    """Scripted and random faults per operation. Thread-safe; ``draw`` is called once per
    request of an operation and returns the fault to apply, or None."""

    def __init__(self, seed: int = 0) -> None:
        self._lock = threading.Lock()
        self._scripts: dict[str, deque[str]] = {}
        self._rates: dict[str, dict[str, float]] = {}
        self._rng = random.Random(seed)  # noqa: S311 - faults, not secrets
        self.applied: dict[str, int] = {}

    def configure(
        self,
        *,
        script: Mapping[str, Sequence[str]] | None = None,
        rates: Mapping[str, Mapping[str, float]] | None = None,
        seed: int | None = None,
        known: Mapping[str, Sequence[str]],
    ) -> None:
        """Append ``script`` to each operation's queue; replace the ``rates`` given. ``known``
        maps each operation to the faults it understands; anything else raises ValueError."""
        for operation, faults in {**(script or {}), **(rates or {})}.items():
            allowed = known.get(operation)
            if allowed is None:
                raise ValueError(f"unknown operation {operation!r} (known: {sorted(known)})")
            for fault in faults:
                if fault not in allowed:
                    raise ValueError(f"{operation}: unknown fault {fault!r} (known: {allowed})")
        with self._lock:
            if seed is not None:
                self._rng.seed(seed)
            for operation, faults in (script or {}).items():
                self._scripts.setdefault(operation, deque()).extend(faults)
            for operation, table in (rates or {}).items():
                self._rates[operation] = {k: float(p) for k, p in table.items() if p > 0}

    def draw(self, operation: str) -> str | None:
        with self._lock:
            queue = self._scripts.get(operation)
            fault: str | None = None
            if queue:
                fault = queue.popleft()
            else:
                roll = self._rng.random()
                for name, probability in self._rates.get(operation, {}).items():
                    if roll < probability:
                        fault = name
                        break
                    roll -= probability
            if fault is not None:
                key = f"{operation}:{fault}"
                self.applied[key] = self.applied.get(key, 0) + 1
            return fault


class LostReply(Response):
    """A reply cut off after its headers and part of its body: the client sees the connection
    close mid-reply (httpx: RemoteProtocolError), as when a proxy or the network drops it after
    the server did the work."""

    def __init__(self, body: bytes) -> None:
        super().__init__(body, media_type="application/json")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(self.body) + 64).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": self.body[:10], "more_body": True})
        # Returning without the rest: the server closes the connection.


class Administered(Protocol):
    """A stand-in's state as its admin endpoints see it: faults, knobs (a dataclass whose fields
    ``POST /_standin/faults`` may set), counters, and a way to forget everything."""

    @property
    def faults(self) -> Faults: ...

    @property
    def knobs(self) -> object: ...

    def stats(self) -> dict[str, Any]: ...

    def reset(self) -> None: ...


def add_admin_routes(
    app: FastAPI, standin: Administered, known: Mapping[str, Sequence[str]]
) -> None:
    """The admin endpoints on ``app``: ``POST /_standin/faults`` (``script``, ``rates`` and
    ``seed`` for ``standin.faults``, checked against ``known``; any other key sets the knob of
    that name; an unknown operation, fault or knob is a 400 naming it), ``GET /_standin/stats``
    and ``POST /_standin/reset``. Each reads ``standin`` when called (a reset replaces its
    faults and knobs)."""

    @app.post("/_standin/faults")
    async def set_faults(request: Request) -> Any:
        settings = await request.json()
        try:
            standin.faults.configure(
                script=settings.pop("script", None),
                rates=settings.pop("rates", None),
                seed=settings.pop("seed", None),
                known=known,
            )
            for key, value in settings.items():
                if not hasattr(standin.knobs, key):
                    raise ValueError(f"unknown setting {key!r}")
                setattr(standin.knobs, key, value)
        except (ValueError, TypeError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return vars(standin.knobs)

    @app.get("/_standin/stats")
    async def stats() -> Any:
        return standin.stats()

    @app.post("/_standin/reset")
    async def reset() -> Any:
        standin.reset()
        return {"reset": True}


def serve(app: Any, name: str, host: str, port: int) -> None:
    """Serve ``app`` with uvicorn on ``host:port`` (0: a free port), after printing
    ``<name> listening on http://HOST:PORT``; until SIGTERM or SIGINT."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)  # connections made before uvicorn runs wait in the backlog
    bound_host, bound_port = sock.getsockname()[:2]
    # "critical": a LostReply is an error to uvicorn, logged on every cut reply otherwise.
    config = uvicorn.Config(
        app, log_level="critical", access_log=False, lifespan="on", timeout_keep_alive=30
    )
    server = uvicorn.Server(config)
    print(f"{name} listening on http://{bound_host}:{bound_port}", flush=True)
    server.run(sockets=[sock])


@dataclass(frozen=True)
class RunningStandin:
    url: str
    process: subprocess.Popen[str]


@contextlib.contextmanager
def standin_process(
    module: str,
    *args: str,
    env: Mapping[str, str] | None = None,
    startup_timeout: float = 30.0,
) -> Iterator[RunningStandin]:
    """Start ``python -m <module> --port 0 ARGS`` (with ``env``: its whole environment); yield its
    URL once it listens; stop it on exit."""
    process = subprocess.Popen(
        [sys.executable, "-m", module, "--port", "0", *args],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(env) if env is not None else None,
    )
    try:
        assert process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            ready = selector.select(startup_timeout)
        line = process.stdout.readline() if ready else ""
        if " listening on " not in line:
            raise StandinError(
                f"{module} did not start within {startup_timeout:.0f} s "
                f"(exit code {process.poll()}, said {line.strip()!r})"
            )
        url = line.rsplit(" ", 1)[1].strip()
        httpx.get(f"{url}/_standin/stats", timeout=startup_timeout).raise_for_status()
        yield RunningStandin(url=url, process=process)
    finally:
        processes.stop(process, 10)


class StandinControl:
    """The admin side of a running stand-in, for tests, the demo and benchmarks (blocking)."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def configure(self, **settings: Any) -> dict[str, Any]:
        """POST /_standin/faults: ``script``, ``rates``, ``seed`` and the stand-in's knobs."""
        response = httpx.post(f"{self.url}/_standin/faults", json=settings, timeout=self.timeout)
        if response.status_code != 200:
            raise StandinError(f"faults refused: {response.text[:300]}")
        return response.json()

    def stats(self) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/_standin/stats", timeout=self.timeout)
        response.raise_for_status()
        return response.json()

    def reset(self) -> None:
        httpx.post(f"{self.url}/_standin/reset", timeout=self.timeout).raise_for_status()
