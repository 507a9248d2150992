import asyncio
import contextlib
import time
from typing import Any

import psycopg
import structlog
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from glisk.api.schemas import HealthDown, HealthOk, envelope
from glisk.errors import first_line

log = structlog.get_logger("glisk.health")
router = APIRouter()

# A probe must answer even when the database hangs; a load balancer gives up after a few seconds.
HEALTH_TIMEOUT_SECONDS = 1.0


async def check_database(engine: AsyncEngine, within: float = HEALTH_TIMEOUT_SECONDS) -> None:
    """Run ``SELECT 1`` on a pooled connection within ``within`` seconds; raises on failure
    (TimeoutError when the database does not answer in time)."""
    async with asyncio.timeout(within), engine.connect() as connection:
        await connection.execute(text("SELECT 1"))


class DatabaseProbe:
    """``SELECT 1`` on one autocommit connection kept for probes: one round trip, no ORM.

    The application's pool would cost three or four round trips for the same answer (the
    checkout's pre-ping, BEGIN, the query, the ROLLBACK when the connection goes back) and
    ~0.5 ms of CPU. Here every probe is answered by a ``SELECT 1`` *sent after the probe
    arrived*: probes that arrive while one is in flight wait for the next, and share it. So a
    probe costs at most one round trip, and the process one connection however many probes
    come at once. It answers whether the database is reachable, not whether the application's
    pool has a free connection.

    A failure closes the connection; the next ``SELECT 1`` opens a new one. When the failure
    was on a connection that had worked before (a restarted server leaves it dead), the same
    ``SELECT 1`` is retried at once on a new connection, so a restart costs no failed probe.
    """

    def __init__(
        self, connect_kwargs: dict[str, Any], *, timeout: float = HEALTH_TIMEOUT_SECONDS
    ) -> None:
        self._connect_kwargs = {**connect_kwargs, "autocommit": True}
        self._timeout = timeout  # bound of one SELECT 1, reconnection included
        self._connection: psycopg.AsyncConnection[Any] | None = None
        self._next: asyncio.Future[None] | None = None  # answered by the next SELECT 1 sent
        self._sender: asyncio.Task[None] | None = None
        self.sent = 0  # SELECT 1 statements sent so far (probes per round trip, for benchmarks)

    @classmethod
    def for_engine(cls, engine: AsyncEngine) -> "DatabaseProbe":
        """A probe on the engine's database with default connection options, for an app whose
        lifespan did not build one (the lifespan passes the configured options instead)."""
        from glisk.core.database import psycopg_connect_kwargs

        url = engine.url.render_as_string(hide_password=False)
        return cls(psycopg_connect_kwargs(url, application_name="glisk-api"))

    async def check(self, within: float = HEALTH_TIMEOUT_SECONDS) -> None:
        """Return once a ``SELECT 1`` sent after this call has been answered. Raises TimeoutError
        after ``within`` seconds, or the error of that ``SELECT 1`` (psycopg.Error)."""
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        answer = self._next
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send())
        async with asyncio.timeout(within):
            # shield: a probe that gives up does not cancel the answer others wait for.
            await asyncio.shield(answer)

    async def _send(self) -> None:
        """Send SELECT 1 for the probes waiting, one at a time, until none is."""
        while self._next is not None:
            answer, self._next = self._next, None
            try:
                async with asyncio.timeout(self._timeout):
                    await self._select_one()
            except asyncio.CancelledError:
                answer.cancel()
                raise
            except Exception as exc:
                answer.set_exception(exc)
                answer.exception()  # retrieved: every waiter may have given up already
            else:
                answer.set_result(None)

    async def _select_one(self) -> None:
        reused = self._connection is not None
        for attempt in (1, 2):
            if self._connection is None:
                self._connection = await psycopg.AsyncConnection.connect(**self._connect_kwargs)
            try:
                self.sent += 1
                await self._connection.execute("SELECT 1")
                return
            except psycopg.Error:
                await self.close()
                if not reused or attempt == 2:
                    raise
            except BaseException:  # cancelled mid-query: the connection's state is unknown
                await self.close()
                raise

    async def close(self) -> None:
        """Close the probe's connection (the next probe opens a new one)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()

    async def aclose(self) -> None:
        """At shutdown: stop a SELECT 1 in flight and close the connection."""
        if self._sender is not None and not self._sender.done():
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
        await self.close()


def database_probe(app: FastAPI) -> DatabaseProbe:
    """The app's probe: the one its lifespan built, else one made once for ``app.state.engine``."""
    probe = getattr(app.state, "database_probe", None)
    if probe is None:
        probe = app.state.database_probe = DatabaseProbe.for_engine(app.state.engine)
    return probe


@router.get(
    "/health",
    response_model=HealthOk,
    responses={503: {"model": HealthDown, "description": "The database is unreachable"}},
    summary="Liveness and database connectivity",
)
async def health(request: Request) -> JSONResponse:
    started = time.perf_counter()
    try:
        await database_probe(request.app).check()
    except Exception as exc:  # any failure to reach the database means unhealthy
        log.warning(
            "health.database_unreachable",
            error=type(exc).__name__,
            detail=first_line(exc),
            elapsed_ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return JSONResponse(
            status_code=503,
            content=envelope(
                "DATABASE_CONNECTION_FAILED", "Unable to connect to database", status="unhealthy"
            ),
        )
    return JSONResponse(content={"status": "healthy"})
