"""Scratch PostgreSQL for the test suite, the benchmarks and ``glisk demo``: one harness.

- ``throwaway_database(server_url)``: a uniquely named database on an existing server, dropped
  (with its connections) when the block ends.
- ``scratch_database(server_url=None, migrate=True)``: an empty database, migrated to head unless
  told otherwise, on ``server_url``'s server or, without one, on a private embedded server (fsync
  off, a free port, a fresh directory) stopped when the block ends.

Nothing here reads DATABASE_URL: a scratch database is never the one the application uses.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from psycopg import sql
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.engine import make_url

from glisk.core.database_url import normalize_database_url
from glisk.embedded import EmbeddedPostgres, ephemeral_server


def libpq_kwargs(url: str) -> dict[str, object]:
    """psycopg.connect() keywords for ``url`` (any accepted scheme), read as SQLAlchemy's psycopg
    dialect reads it: host and port, or the socket directory in ``?host=``, and the other query
    parameters (``require_auth``, ``sslmode``...). Nothing is prepared on the server: the same
    URL may point at a transaction-mode pooler, where the next statement can run on another
    server connection."""
    _, kwargs = PGDialect_psycopg().create_connect_args(make_url(normalize_database_url(url)))
    kwargs.setdefault("dbname", "postgres")
    return {**kwargs, "prepare_threshold": None}


def connect(url: str) -> psycopg.Connection[tuple[object, ...]]:
    """An autocommit psycopg connection to ``url`` (for seeding, inspecting, server admin)."""
    return psycopg.connect(**libpq_kwargs(url), autocommit=True)  # type: ignore[arg-type]


@contextmanager
def throwaway_database(server_url: str, *, prefix: str = "glisk_scratch") -> Iterator[str]:
    """Create a uniquely named database on ``server_url``'s server, yield its SQLAlchemy URL
    (password included), then drop it, forcing out connections left open."""
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with connect(server_url) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield (
            make_url(normalize_database_url(server_url))
            .set(database=name)
            .render_as_string(hide_password=False)
        )
    finally:
        with connect(server_url) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@contextmanager
def scratch_server(
    *,
    max_connections: int = 300,
    bindir: Path | None = None,
    startup_timeout: float = 30.0,
) -> Iterator[EmbeddedPostgres]:
    """A private embedded PostgreSQL (fsync off, free port, fresh directory), stopped and
    removed when the block ends."""
    server = ephemeral_server(
        max_connections=max_connections, bindir=bindir, startup_timeout=startup_timeout
    )
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def scratch_database(
    server_url: str | None = None,
    *,
    migrate: bool = True,
    max_connections: int = 300,
    bindir: Path | None = None,
    startup_timeout: float = 30.0,
    prefix: str = "glisk_scratch",
) -> Iterator[str]:
    """Yield the URL of an empty database, migrated to head when ``migrate``: a throwaway
    database on ``server_url``'s server, or on a private embedded server when it is None."""
    from glisk import migrations

    if server_url is not None:
        with throwaway_database(server_url, prefix=prefix) as url:
            if migrate:
                migrations.upgrade(url)
            yield url
        return
    with (
        scratch_server(
            max_connections=max_connections, bindir=bindir, startup_timeout=startup_timeout
        ) as server,
        throwaway_database(server.url, prefix=prefix) as url,
    ):
        if migrate:
            migrations.upgrade(url)
        yield url
