"""The worker's own database connections: few, long-lived, and never hung.

A worker holds at most three connections whatever its concurrency: one for claims, one for writes
(completions, failures, heartbeats, releases: serialised, so they never deadlock each other) and
one that LISTENs. They run in autocommit: every statement the runtime sends is a whole transaction
on its own (one round trip, no BEGIN/COMMIT).

Every call is bounded. A database that stops answering without closing the connection (a paused
server, a dropped network path) would otherwise block a worker forever: TCP keepalives notice a
dead peer host, but a server process that is alive yet silent is only caught by a client-side
time limit. On expiry the connection is closed on the spot (its state is unknown: the statement
may or may not have run) and ``DatabaseTimeout`` is raised; the next call connects again.

Driver errors are translated here, once: a failed statement raises a ``glisk.errors`` error
(``UniqueViolation``, ``CheckViolation``, ... naming the constraint; ``DatabaseError`` with its
SQLSTATE for the rest), raised from the psycopg error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import psycopg

from glisk.errors import DatabaseError, DatabaseTimeout, translate

# glisk's translations of driver errors (a timeout, a constraint violation, a lost connection),
# psycopg's own (the listener's notification stream) and a closed socket: every way a database
# call fails. Callers that retry treat a ConstraintViolation apart (the same statement
# would fail the same way).
DATABASE_ERRORS: tuple[type[BaseException], ...] = (psycopg.Error, DatabaseError, OSError)


def libpq_url(url: str) -> str:
    """A SQLAlchemy URL (``postgresql+psycopg://``) as the libpq URI psycopg connects with."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError("database url: must look like postgresql://user:password@host/db")
    return f"postgresql://{rest}" if scheme.startswith(("postgresql", "postgres")) else url


@dataclass(frozen=True)
class ConnectOptions:
    """How a worker reaches the database.

    ``timeout`` bounds every statement and ``connect_timeout`` every connection attempt, in
    seconds. ``pooler`` is DB_POOLER: behind a transaction-mode pooler (PgBouncer) nothing is
    prepared on the server (1.20 and older do not track prepared statements) and there is no
    LISTEN. Keepalives: a silent peer host is declared dead after
    ``keepalive_idle + 3 * keepalive_interval`` seconds.
    """

    url: str
    application_name: str = "glisk-worker"
    timeout: float = 10.0
    connect_timeout: float = 5.0
    pooler: str = "none"
    keepalive_idle: int = 10
    keepalive_interval: int = 5

    @property
    def prepare_statements(self) -> bool:
        return self.pooler != "transaction"

    @property
    def can_listen(self) -> bool:
        """LISTEN needs a session of its own, which a transaction-mode pooler does not keep."""
        return self.pooler != "transaction"

    def connect_kwargs(self) -> dict[str, Any]:
        return {
            "autocommit": True,
            "prepare_threshold": 5 if self.prepare_statements else None,
            "application_name": self.application_name,
            # libpq takes whole seconds, minimum 2.
            "connect_timeout": max(2, round(self.connect_timeout)),
            "keepalives": 1,
            "keepalives_idle": self.keepalive_idle,
            "keepalives_interval": self.keepalive_interval,
            "keepalives_count": 3,
            # Unacknowledged data (a dropped path while sending) also ends the connection.
            "tcp_user_timeout": int(1000 * (self.keepalive_idle + 3 * self.keepalive_interval)),
        }

    async def connect(self) -> psycopg.AsyncConnection[Any]:
        """A new autocommit connection; DatabaseTimeout, or DatabaseError when refused."""
        try:
            return await asyncio.wait_for(
                psycopg.AsyncConnection.connect(libpq_url(self.url), **self.connect_kwargs()),
                self.connect_timeout + 1,
            )
        except psycopg.Error as exc:
            raise translate(exc) from exc
        except TimeoutError:
            raise DatabaseTimeout(
                f"no connection within {self.connect_timeout:g} s (the database does not answer)"
            ) from None


class Link:
    """One lazily opened connection and a lock: calls on it run one at a time."""

    def __init__(self, options: ConnectOptions) -> None:
        self.options = options
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._lock = asyncio.Lock()

    @property
    def lock(self) -> asyncio.Lock:
        """Held by ``fetch``; callers that must run several calls back to back may hold it."""
        return self._lock

    async def fetch(self, query: str, params: dict[str, Any]) -> Sequence[tuple[Any, ...]]:
        async with self._lock:
            return await self.fetch_locked(query, params)

    async def fetch_locked(self, query: str, params: dict[str, Any]) -> Sequence[tuple[Any, ...]]:
        """Run one statement (the caller holds ``lock``) and return its rows. Raises a
        ConstraintViolation for a broken constraint, a DatabaseError for any other driver error,
        or DatabaseTimeout after ``options.timeout`` seconds (the connection is closed)."""
        conn = self._conn
        if conn is None or conn.closed:
            conn = self._conn = await self.options.connect()
        task = asyncio.ensure_future(_rows(conn, query, params))
        try:
            done, _ = await asyncio.wait((task,), timeout=self.options.timeout)
        except asyncio.CancelledError:
            self._abandon(conn, task)
            raise
        if not done:
            self._abandon(conn, task)
            with suppress(asyncio.CancelledError, Exception):
                await task
            raise DatabaseTimeout(
                f"no answer within {self.options.timeout:g} s; the connection was closed"
            )
        try:
            return task.result()
        except psycopg.Error as exc:
            if conn.broken or conn.closed:
                self._conn = None
            raise translate(exc) from exc

    def _abandon(self, conn: psycopg.AsyncConnection[Any], task: asyncio.Future[Any]) -> None:
        # Close the socket first: cancelling a query in flight would make psycopg send a cancel
        # request and wait for the server (up to 10 s), which is what does not answer here.
        conn.pgconn.finish()
        task.cancel()
        self._conn = None

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            with suppress(Exception):
                await asyncio.wait_for(conn.close(), self.options.timeout)


async def _rows(
    conn: psycopg.AsyncConnection[Any], query: str, params: dict[str, Any]
) -> list[tuple[Any, ...]]:
    cursor = await conn.execute(query.encode(), params)  # bytes: psycopg skips re-encoding
    return await cursor.fetchall() if cursor.description is not None else []
