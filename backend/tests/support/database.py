"""Where the test suite's PostgreSQL comes from (conftest.py's ``postgres_container``).

- ``GLISK_TEST_DATABASE_URL``: an existing server; a throwaway database is created on it and
  dropped at the end.
- ``GLISK_TEST_PG=docker``: a testcontainers PostgreSQL (needs a Docker engine).
- default: a private embedded server (fsync off) on a free port in a fresh directory (in RAM
  when there is room), so two test runs on one machine never collide. Like every embedded server
  it requires its password; the URLs handed out carry it.

``GLISK_TEST_POOLER_URL`` (with ``GLISK_TEST_DATABASE_URL``): a pooler such as PgBouncer in front
of that server, routing every database name to it. The throwaway database is created and migrated
on the server directly; the tests connect through the pooler in the mode ``DB_POOLER`` names
(default transaction), which is exported for the session so processes the tests start read the
same setting through load_settings().

The databases themselves come from ``glisk.testing`` (the harness the benchmarks and the demo use
too); what is here is only the choice among them and the pooler in front.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy.engine import make_url

from glisk.core.config import PoolerMode, normalize_database_url
from glisk.testing import scratch_server, throwaway_database

STARTUP_LIMIT_SECONDS = 60.0
POOLER_URL_ENV = "GLISK_TEST_POOLER_URL"
PREFIX = "glisk_test"  # the session's database, told apart from other scratch databases


@dataclass(frozen=True)
class Database:
    url: str  # what the tests connect to: through the pooler when one is configured
    direct_url: str = ""  # the server itself (migrations)
    pooler: PoolerMode = "none"  # pass to setup_db_session(pooler=...) for connections to url


@contextmanager
def provide_database() -> Iterator[str]:
    """Yield the URL of an empty database for the test session, per the environment."""
    explicit = os.environ.get("GLISK_TEST_DATABASE_URL")
    if explicit:
        with throwaway_database(explicit, prefix=PREFIX) as url:
            yield url
        return
    if os.environ.get("GLISK_TEST_PG") == "docker":
        from testcontainers.postgres import PostgresContainer

        with (
            PostgresContainer("postgres:17", driver="psycopg") as container,
            throwaway_database(container.get_connection_url(), prefix=PREFIX) as url,
        ):
            yield url
        return
    with (
        scratch_server(max_connections=400, startup_timeout=STARTUP_LIMIT_SECONDS) as server,
        throwaway_database(server.url, prefix=PREFIX) as url,
    ):
        yield url


def pooler_for(database_url: str) -> tuple[str, PoolerMode]:
    """The URL tests connect to for ``database_url`` and the pooler mode to use: the same database
    through GLISK_TEST_POOLER_URL when that is set (mode from DB_POOLER, default transaction),
    else ``database_url`` itself and "none"."""
    pooler_url = os.environ.get(POOLER_URL_ENV)
    if not pooler_url:
        return database_url, "none"
    if not os.environ.get("GLISK_TEST_DATABASE_URL"):
        raise RuntimeError(
            f"{POOLER_URL_ENV} needs GLISK_TEST_DATABASE_URL, the server behind the pooler "
            "(the throwaway database is created there)"
        )
    mode = os.environ.get("DB_POOLER", "transaction").strip().lower()
    if mode not in ("session", "transaction"):
        raise RuntimeError(f"{POOLER_URL_ENV} is set: DB_POOLER must be session or transaction")
    database = make_url(database_url).database
    pooled = make_url(normalize_database_url(pooler_url)).set(database=database)
    return pooled.render_as_string(hide_password=False), mode  # type: ignore[return-value]
