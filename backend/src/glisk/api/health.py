import asyncio
import contextlib
import time
from asyncio import FIRST_COMPLETED
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


# A SELECT 1 answers in milliseconds; one still unanswered after this long is slow, and the next
# probe sends another on a second connection rather than wait for it.
HEDGE_AFTER_SECONDS = 0.2
PROBE_CONNECTIONS = 2


class DatabaseProbe:
    """``SELECT 1`` on autocommit connections kept for probes: one round trip, no ORM.

    The application's pool would cost three or four round trips for the same answer (the
    checkout's pre-ping, BEGIN, the query, the ROLLBACK when the connection goes back) and
    ~0.5 ms of CPU. Here probes share their queries:

    - a probe is healthy as soon as any ``SELECT 1`` is answered after it arrived, so probes
      that arrive while one is in flight share its answer;
    - it is unhealthy only when a ``SELECT 1`` *sent after it arrived* fails (the database
      refused a new connection, or went away), or when nothing answered within its bound;
    - a ``SELECT 1`` sent before a probe arrived never fails it: when the one in flight is
      still unanswered after ``hedge_after`` seconds, or failed, the next probe sends another,
      on a second connection. One slow or failed query does not fail the probes behind it.

    So the process keeps at most ``connections`` (2) connections for probes however many come,
    one round trip answers every probe that arrived before it was answered, and a 503 means
    the database did not answer a fresh query. A query on a connection that worked before and
    fails (a restarted server leaves it dead) is retried at once on a new connection, so a
    restart costs no failed probe. Reachability is logged once per change: ``health: database
    unreachable: <reason>`` and ``health: database back after N s``.
    """

    def __init__(
        self,
        connect_kwargs: dict[str, Any],
        *,
        timeout: float = HEALTH_TIMEOUT_SECONDS,
        hedge_after: float = HEDGE_AFTER_SECONDS,
        connections: int = PROBE_CONNECTIONS,
    ) -> None:
        self._connect_kwargs = {**connect_kwargs, "autocommit": True}
        self._timeout = timeout  # bound of one SELECT 1, reconnection included
        self._hedge_after = hedge_after
        self._connections = max(1, connections)
        self._idle: list[psycopg.AsyncConnection[Any]] = []
        self._busy: set[psycopg.AsyncConnection[Any]] = set()
        # Each SELECT 1 in flight, shared by every probe waiting on it: when it was sent.
        self._inflight: dict[asyncio.Task[None], float] = {}
        self._answered_at = float("-inf")  # monotonic time of the last answer received
        self._down_since: float | None = None  # the first failed probe of an outage
        # Resolved (and replaced) whenever a SELECT 1 is sent: waiting probes look again.
        self._sent_more: asyncio.Future[None] | None = None
        self.sent = 0  # SELECT 1 statements sent so far (probes per round trip, for benchmarks)

    @classmethod
    def for_engine(cls, engine: AsyncEngine) -> "DatabaseProbe":
        """A probe on the engine's database with default connection options, for an app whose
        lifespan did not build one (the lifespan passes the configured options instead)."""
        from glisk.core.database import psycopg_connect_kwargs

        url = engine.url.render_as_string(hide_password=False)
        return cls(psycopg_connect_kwargs(url, application_name="glisk-api"))

    async def check(self, within: float = HEALTH_TIMEOUT_SECONDS) -> None:
        """Return once a ``SELECT 1`` is answered after this call began. Raises TimeoutError
        after ``within`` seconds, or the error (psycopg.Error, OSError) of a ``SELECT 1`` sent
        after this call began."""
        arrived = time.monotonic()
        try:
            async with asyncio.timeout(within):
                await self._answer_after(arrived)
        except Exception as exc:
            self._unreachable(exc)
            raise
        self._reachable()

    async def _answer_after(self, arrived: float) -> None:
        while self._answered_at < arrived:
            now = time.monotonic()
            fresh = any(sent >= arrived for sent in self._inflight.values())
            young = [sent for sent in self._inflight.values() if now - sent < self._hedge_after]
            if not fresh and not young and len(self._inflight) < self._connections:
                self._send()
                fresh = True
            # Wake when a query ends, or when the youngest older one turns slow (then this probe
            # may send its own).
            hedge = None if fresh or not young else self._hedge_after - (now - max(young))
            waiting = dict(self._inflight)
            # Also wake when another probe sends a query: its answer may come first.
            await asyncio.wait([*waiting, self._news()], timeout=hedge, return_when=FIRST_COMPLETED)
            if self._answered_at >= arrived:
                return
            for task, sent_at in waiting.items():
                error = None if not task.done() or task.cancelled() else task.exception()
                if error is not None and sent_at >= arrived:
                    raise error

    def _send(self) -> None:
        task = asyncio.create_task(self._run())
        self._inflight[task] = time.monotonic()
        # Retrieved here: every probe that waited on it may have given up already.
        task.add_done_callback(lambda done: done.cancelled() or done.exception())
        announced, self._sent_more = self._sent_more, None
        if announced is not None and not announced.done():
            announced.set_result(None)

    def _news(self) -> asyncio.Future[None]:
        """Resolved when the next SELECT 1 is sent."""
        if self._sent_more is None:
            self._sent_more = asyncio.get_running_loop().create_future()
        return self._sent_more

    async def _run(self) -> None:
        """One SELECT 1 within the query bound; records the time of its answer."""
        try:
            async with asyncio.timeout(self._timeout):
                await self._select_one()
            self._answered_at = time.monotonic()
        finally:
            self._inflight.pop(asyncio.current_task(), None)  # type: ignore[arg-type]

    async def _select_one(self) -> None:
        reused = bool(self._idle)
        for attempt in (1, 2):
            connection = self._idle.pop() if self._idle and attempt == 1 else None
            if connection is None:
                connection = await psycopg.AsyncConnection.connect(**self._connect_kwargs)
            self._busy.add(connection)
            try:
                self.sent += 1
                await connection.execute("SELECT 1")
            except psycopg.Error:
                await self._discard(connection)
                if not reused or attempt == 2:
                    raise
                continue
            except BaseException:  # cancelled or timed out mid-query: its state is unknown
                await self._discard(connection)
                raise
            self._busy.discard(connection)
            self._idle.append(connection)
            return

    async def _discard(self, connection: psycopg.AsyncConnection[Any]) -> None:
        self._busy.discard(connection)
        with contextlib.suppress(Exception):
            await connection.close()

    def _unreachable(self, exc: BaseException) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            reason = "no answer in time" if isinstance(exc, TimeoutError) else first_line(exc)
            log.warning(f"health: database unreachable: {reason}", reason=reason)

    def _reachable(self) -> None:
        if self._down_since is not None:
            seconds = time.monotonic() - self._down_since
            self._down_since = None
            log.info(f"health: database back after {seconds:.1f} s", seconds=round(seconds, 1))

    async def close(self) -> None:
        """Close the probe's idle connections (the next probe opens a new one)."""
        idle, self._idle = self._idle, []
        for connection in idle:
            with contextlib.suppress(Exception):
                await connection.close()

    async def aclose(self) -> None:
        """At shutdown: stop the SELECT 1 statements in flight and close every connection."""
        tasks = [task for task in self._inflight if not task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.close()
        for connection in list(self._busy):
            await self._discard(connection)


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
    try:
        await database_probe(request.app).check()
    except Exception:  # any failure to reach the database means unhealthy (logged by the probe)
        return JSONResponse(
            status_code=503,
            content=envelope(
                "DATABASE_CONNECTION_FAILED", "Unable to connect to database", status="unhealthy"
            ),
        )
    return JSONResponse(content={"status": "healthy"})
