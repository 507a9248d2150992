"""Engine and session factory. Built by the app's lifespan or the CLI, never at import."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypedDict, Unpack
from urllib.parse import quote
from weakref import WeakKeyDictionary

import psycopg
from sqlalchemy import event
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from glisk.core import db_errors
from glisk.core.database_url import PoolerMode, normalize_database_url

UTC_OPTIONS = "-c timezone=UTC"


def connect_args(
    *,
    connect_timeout: float = 5.0,
    application_name: str = "glisk",
    pooler: PoolerMode = "none",
) -> dict[str, Any]:
    """psycopg connection keywords every GLISK connection uses (the engine's and the health
    probe's).

    Behind a pooler (``pooler`` other than "none") two things change:
    - no ``options`` start-up parameter: PgBouncer before 1.20 refuses the connection
      ("unsupported startup parameter: options"). The engine sets UTC with ``SET TIME ZONE``
      instead; PgBouncer tracks TimeZone per client and restores it on every server connection
      it hands out, in transaction mode too.
    - in transaction mode, ``prepare_threshold=None``: psycopg never prepares statements on the
      server, since the next transaction may run on a server connection that has not seen them
      (PgBouncer before 1.21 does not track them: "prepared statement ... does not exist").
    """
    args: dict[str, Any] = {
        # libpq takes whole seconds, minimum 2.
        "connect_timeout": max(2, round(connect_timeout)),
        "application_name": application_name,
    }
    if pooler == "none":
        args["options"] = UTC_OPTIONS
    if pooler == "transaction":
        args["prepare_threshold"] = None
    return args


def psycopg_connect_kwargs(db_url: str, **options: Any) -> dict[str, Any]:
    """Everything ``psycopg.connect`` / ``AsyncConnection.connect`` needs for ``db_url``: the URL
    read the way SQLAlchemy's psycopg dialect reads it (host, port, query parameters such as
    sslmode), plus ``connect_args(**options)``."""
    _, from_url = PGDialect_psycopg().create_connect_args(make_url(normalize_database_url(db_url)))
    return {**from_url, **connect_args(**options)}


def _set_utc(dbapi_connection: Any, _record: Any) -> None:
    # Runs once per new connection, before the pool hands it out.
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("SET TIME ZONE 'UTC'")
    finally:
        cursor.close()
    dbapi_connection.commit()


class EngineKeywords(TypedDict, total=False):
    """create_db_engine's keyword options besides pool_size (each has its default there)."""

    max_overflow: int
    connect_timeout: float
    application_name: str
    pooler: PoolerMode


def create_db_engine(
    db_url: str,
    *,
    pool_size: int = 200,
    max_overflow: int = 10,
    connect_timeout: float = 5.0,
    application_name: str = "glisk",
    pooler: PoolerMode = "none",
) -> AsyncEngine:
    """An async engine on psycopg 3.

    The pool opens connections lazily (nothing connects here) and pre-pings each checkout, so a
    database restart costs one failed ping, not a failed request. Every connection runs in UTC so
    ``now()`` agrees with the naive UTC columns. ``pooler`` says what DATABASE_URL points at
    (DB_POOLER; see ``connect_args``). Constraint violations raise glisk's named errors
    (``glisk.core.db_errors``).
    """
    engine = create_async_engine(
        normalize_database_url(db_url),
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_pre_ping=True,
        pool_recycle=1800,
        connect_args=connect_args(
            connect_timeout=connect_timeout, application_name=application_name, pooler=pooler
        ),
    )
    if pooler != "none":
        event.listen(engine.sync_engine, "connect", _set_utc)
    db_errors.install(engine.sync_engine)
    _POOLERS[engine.sync_engine] = pooler
    return engine


# What each engine built here points at, so code handed only an engine (or a unit-of-work
# factory), like the worker runtime opening its own connections, can follow the same rules.
_POOLERS: WeakKeyDictionary[Engine, PoolerMode] = WeakKeyDictionary()


def pooler_of(engine: AsyncEngine) -> PoolerMode:
    """The DB_POOLER mode ``engine`` was created with ("none" for engines built elsewhere)."""
    return _POOLERS.get(engine.sync_engine, "none")


def setup_db_session(
    db_url: str, pool_size: int = 200, **options: Unpack[EngineKeywords]
) -> async_sessionmaker[AsyncSession]:
    """The session factory every unit of work draws from, on ``create_db_engine(db_url,
    pool_size=pool_size, **options)``.

    ``expire_on_commit=False`` so entities returned from a unit of work stay readable after it
    commits. Dispose of the engine with ``await engine_of(factory).dispose()``.
    ``setup_db_session(url, **settings.engine_options("worker", concurrency=4))`` sizes and
    names the pool for a role.
    """
    engine = create_db_engine(db_url, pool_size=pool_size, **options)
    return async_sessionmaker(engine, expire_on_commit=False)


def engine_of(session_factory: async_sessionmaker[AsyncSession]) -> AsyncEngine:
    bind = session_factory.kw["bind"]
    assert isinstance(bind, AsyncEngine)
    return bind


# libpq parameters that carry a secret when given in a URL's query.
SECRET_PARAMETERS = frozenset({"password", "sslpassword"})


def masked_url(db_url: str) -> str:
    """The URL with every credential hidden, for logs and error messages: the password of the
    user part and the query's ``password`` and ``sslpassword`` become ``***``. A URL that does
    not parse is shown as its scheme alone."""
    try:
        url = make_url(db_url)
    except Exception:  # any parse failure: show nothing of it but a scheme
        scheme, sep, _ = db_url.partition("://")
        plain = sep and scheme[:1].isalpha() and all(c.isalnum() or c in "+.-" for c in scheme)
        return f"{scheme}://***" if plain else "***"
    shown = url.set(query={}).render_as_string(hide_password=True)
    pairs = []
    for key, values in url.query.items():
        for value in (values,) if isinstance(values, str) else values:
            masked = "***" if key.lower() in SECRET_PARAMETERS else quote(value, safe="/")
            pairs.append(f"{quote(key)}={masked}")
    return f"{shown}?{'&'.join(pairs)}" if pairs else shown


# --- the connection budget ------------------------------------------------------------------


@dataclass(frozen=True)
class RoleUsage:
    application_name: str  # "" for clients that set none
    connections: int
    active: int
    idle_in_transaction: int


@dataclass(frozen=True)
class ConnectionUsage:
    """Client connections on the server, per application_name, and the server's limits."""

    roles: tuple[RoleUsage, ...]  # most connections first
    max_connections: int
    superuser_reserved: int
    reserved: int  # reserved_connections (PostgreSQL 16+), 0 before

    @property
    def in_use(self) -> int:
        return sum(role.connections for role in self.roles)

    @property
    def usable(self) -> int:
        """Connections an ordinary (non-superuser) role can open in all."""
        return self.max_connections - self.superuser_reserved - self.reserved

    @property
    def share(self) -> float:
        return self.in_use / self.usable if self.usable > 0 else 1.0

    def report(self, *, api_pool: int) -> list[str]:
        """Lines for an operator: one per application_name, then the totals and the room left
        for API processes that may each open ``api_pool`` connections."""
        lines = [f"{'application_name':<24} {'connections':>11} {'active':>7} {'idle in tx':>10}"]
        for role in self.roles:
            name = role.application_name or "(none)"
            lines.append(
                f"{name:<24} {role.connections:>11} {role.active:>7} {role.idle_in_transaction:>10}"
            )
        reserved = f"{self.superuser_reserved} reserved for superusers" + (
            f", {self.reserved} by reserved_connections" if self.reserved else ""
        )
        left = self.usable - self.in_use
        lines.append(
            f"in use {self.in_use} of {self.usable} usable ({self.share:.0%}; "
            f"max_connections {self.max_connections}, {reserved})"
        )
        lines.append(
            f"room for {max(0, left) // api_pool} more API processes at {api_pool} connections "
            f"each ({left} left)"
        )
        return lines

    def problems(self, warn_at: float, *, api_pool: int | None) -> list[str]:
        """What deserves a warning: connections at ``warn_at`` percent of the usable ones or
        more; one API process whose pool (``api_pool``, None to skip) exceeds them all."""
        found = []
        if self.share * 100 >= warn_at:
            found.append(
                f"{self.in_use} connections in use, {self.share:.0%} of the usable {self.usable}"
            )
        if api_pool is not None and api_pool > self.usable:
            found.append(
                f"one API process may open DB_POOL_SIZE + DB_MAX_OVERFLOW = {api_pool} "
                f"connections, more than the {self.usable} the server allows"
            )
        return found


USAGE_QUERY = """
SELECT coalesce(application_name, ''),
       count(*),
       count(*) FILTER (WHERE state = 'active'),
       count(*) FILTER (WHERE state IN ('idle in transaction', 'idle in transaction (aborted)'))
FROM pg_stat_activity
WHERE backend_type = 'client backend'
GROUP BY 1
ORDER BY 2 DESC, 1
"""
LIMITS_QUERY = """
SELECT current_setting('max_connections')::int,
       current_setting('superuser_reserved_connections')::int,
       coalesce(current_setting('reserved_connections', true), '0')::int
"""


def read_connection_usage(
    db_url: str,
    *,
    connect_timeout: float = 5.0,
    application_name: str = "glisk-cli",
    pooler: PoolerMode = "none",
) -> ConnectionUsage:
    """One short connection reading pg_stat_activity and the connection limits. Counts only
    client backends (autovacuum, WAL senders and background workers have slots of their own);
    this connection is one of them. Raises psycopg.Error when the database cannot answer.

    Behind a pooler the figures are the server's side: the pooler's server connections, each
    named after the last client that used it."""
    kwargs = psycopg_connect_kwargs(
        db_url, connect_timeout=connect_timeout, application_name=application_name, pooler=pooler
    )
    with psycopg.connect(**kwargs, autocommit=True) as conn:
        rows = conn.execute(USAGE_QUERY).fetchall()
        limits = conn.execute(LIMITS_QUERY).fetchone()
    assert limits is not None
    return ConnectionUsage(
        roles=tuple(RoleUsage(str(r[0]), int(r[1]), int(r[2]), int(r[3])) for r in rows),
        max_connections=int(limits[0]),
        superuser_reserved=int(limits[1]),
        reserved=int(limits[2]),
    )
