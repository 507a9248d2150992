"""Where the test suite's PostgreSQL comes from (used by conftest.py and multi-process tests).

- ``GLISK_TEST_DATABASE_URL``: an existing server; a throwaway database is created on it and
  dropped at the end.
- ``GLISK_TEST_PG=docker``: a testcontainers PostgreSQL (needs a Docker engine).
- default: a private embedded server (fsync off) on a free port in a fresh directory (in RAM
  when there is room), so two test runs on one machine never collide. Like every embedded server
  it requires its password; the URLs handed out carry it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

from glisk.core.config import normalize_database_url
from glisk.embedded_pg import ephemeral_server

STARTUP_LIMIT_SECONDS = 60.0


def _libpq_kwargs(url: str) -> dict[str, object]:
    parsed = make_url(url)
    kwargs: dict[str, object] = {
        "host": parsed.host or "127.0.0.1",
        "port": parsed.port or 5432,
        "user": parsed.username,
        "dbname": parsed.database or "postgres",
    }
    if parsed.password:
        kwargs["password"] = parsed.password
    return kwargs


@contextmanager
def throwaway_database(server_url: str) -> Iterator[str]:
    """Create a uniquely named database on ``server_url``'s server, yield its URL, drop it."""
    name = f"glisk_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = _libpq_kwargs(server_url)
    with psycopg.connect(**admin, autocommit=True) as conn:  # type: ignore[arg-type]
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield (
            make_url(normalize_database_url(server_url))
            .set(database=name)
            .render_as_string(hide_password=False)
        )
    finally:
        with psycopg.connect(**admin, autocommit=True) as conn:  # type: ignore[arg-type]
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@contextmanager
def provide_database() -> Iterator[str]:
    """Yield the URL of an empty database for the test session, per the environment."""
    explicit = os.environ.get("GLISK_TEST_DATABASE_URL")
    if explicit:
        with throwaway_database(explicit) as url:
            yield url
        return
    if os.environ.get("GLISK_TEST_PG") == "docker":
        from testcontainers.postgres import PostgresContainer

        with (
            PostgresContainer("postgres:17", driver="psycopg") as container,
            throwaway_database(container.get_connection_url()) as url,
        ):
            yield url
        return
    server = ephemeral_server(max_connections=400, startup_timeout=STARTUP_LIMIT_SECONDS)
    try:
        with throwaway_database(server.url) as url:
            yield url
    finally:
        server.stop()
