"""Which database a command works on, migrating it, and the embedded server's life.

DATABASE_URL when it is set; otherwise the embedded PostgreSQL (data kept between runs), started
for the command and stopped on exit, or, for a command other than ``glisk serve``, the one another
glisk command of the same data directory already runs. The command modules import this one;
it imports none of them. Connection problems end in one line: an OperatorError.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from glisk.core.embedded import EMBEDDED_DATABASE, embedded_server
from glisk.errors import OperatorError, first_line

if TYPE_CHECKING:
    from glisk.core.config import Settings
    from glisk.embedded import EmbeddedPostgres

# Alembic, SQLAlchemy and psycopg are imported on use: `glisk worker` and `glisk status` start
# faster without them.


def say(message: str) -> None:
    """One line for the operator, on stderr."""
    print(message, file=sys.stderr, flush=True)


def masked_url(db_url: str) -> str:
    """``db_url`` with its password hidden, as it may be printed."""
    from glisk.core.database import masked_url as mask

    return mask(db_url)


def _ensure_database(server: EmbeddedPostgres, name: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(server.conninfo(), autocommit=True) as conn:
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not found:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def _reachable(url: str, settings: Settings) -> str:
    """``url`` once it answered SELECT 1; DatabaseUnavailableError otherwise."""
    from glisk.app import verify_database

    asyncio.run(
        verify_database(
            url,
            settings.db_connect_timeout,
            application_name="glisk-cli",
            pooler=settings.db_pooler,
        )
    )
    return url


@contextmanager
def database(
    settings: Settings,
    *,
    api_processes: int = 1,
    attach: bool = True,
    on_failure: Callable[[str], None] | None = None,
) -> Iterator[str]:
    """Yield the URL of a database that answered SELECT 1: DATABASE_URL, or the embedded server.

    The embedded server is started for the duration of the block (sized for ``api_processes``
    API processes), or, with ``attach``, the one another glisk command already runs on the same
    data directory is used (and left running). With ``on_failure``, a server started here is
    supervised: restarted if it dies, ``on_failure`` called with one line if it cannot be.
    Raises an OperatorError (DatabaseUnavailableError, EmbeddedPostgresError: one line)
    otherwise."""
    if settings.database_url is not None:
        yield _reachable(settings.database_url, settings)
        return
    server = embedded_server(settings, api_processes=api_processes)
    server.start(attach=attach)
    try:
        where = f"{server.socket_dir} (Unix socket .s.PGSQL.{server.port}"
        where += f", and 127.0.0.1:{server.port})" if settings.glisk_pg_tcp else ")"
        if server.attached:
            where += f", already running (pid {server.pid})"
        say(
            f"Embedded PostgreSQL on {where}, data in {server.data_dir}, "
            f"password in {server.password_file} (glisk db psql opens psql on it)"
        )
        _ensure_database(server, EMBEDDED_DATABASE)
        if on_failure is not None and not server.attached:
            server.supervise(on_failure, say=say)
        yield _reachable(server.url_for(EMBEDDED_DATABASE), settings)
    finally:
        server.stop()


def migrate(url: str, action: Callable[[], None]) -> None:
    """Run a migration ``action`` on ``url``; its failure is an OperatorError in one line."""
    try:
        action()
    except Exception as exc:
        raise OperatorError(f"Migrations failed on {masked_url(url)}: {first_line(exc)}") from None


@contextmanager
def working_database(
    settings: Settings, *, on_failure: Callable[[str], None] | None = None
) -> Iterator[str]:
    """The database a long-running process (``glisk worker``, ``glisk ingest``) works on:
    DATABASE_URL as it is (the process checks it itself, and never migrates it), or in
    development the embedded server as ``database`` gives it, migrated to head."""
    if settings.database_url is not None:
        yield settings.database_url
        return
    from glisk import migrations

    with database(settings, on_failure=on_failure) as url:
        migrate(url, lambda: migrations.upgrade(url))
        yield url


class Supervision:
    """What ``glisk serve`` and ``glisk worker`` do when their embedded PostgreSQL dies and cannot
    be restarted: remember why and stop this process the way SIGTERM does, so that it exits
    non-zero (``raise_if_failed``) for a process supervisor to restart the whole thing."""

    def __init__(self) -> None:
        self.failure: str | None = None

    def __call__(self, reason: str) -> None:
        self.failure = reason
        os.kill(os.getpid(), signal.SIGTERM)

    def raise_if_failed(self) -> None:
        if self.failure is not None:
            raise OperatorError(self.failure)
