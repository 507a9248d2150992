"""The schema's Alembic migrations, shipped inside the package, and Alembic driven from Python.

The scripts (``env.py``, ``versions/``) live in this package, so an installed wheel migrates as
well as a source checkout: ``glisk db upgrade`` needs no ``alembic.ini``. ``backend/alembic.ini``
points plain ``alembic`` (run from ``backend/``) at the same scripts, for ``alembic revision``.

Synchronous on purpose: env.py runs its own event loop, so call these before the application's
loop starts (or from a worker thread).
"""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, pool
from sqlalchemy.engine import Connection

from glisk.core.database_url import normalize_database_url

SCRIPT_LOCATION = Path(__file__).resolve().parent


def alembic_config(database_url: str, *, quiet: bool = False) -> Config:
    """An Alembic configuration for this package's scripts against ``database_url``."""
    config = Config(stdout=io.StringIO() if quiet else sys.stdout)
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    config.set_main_option("path_separator", "os")
    config.attributes["database_url"] = normalize_database_url(database_url)
    # The CLI and the app configure logging themselves.
    config.attributes["configure_logger"] = False
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    command.downgrade(alembic_config(database_url), revision)


@dataclass(frozen=True)
class DowngradePlan:
    """What a downgrade would drop, found by running it in a transaction that is rolled back."""

    current: str | None
    target: str | None
    tables: tuple[tuple[str, int], ...]  # (table, rows) dropped
    columns: tuple[tuple[str, str, int], ...]  # (table, column, rows with a value) dropped

    @property
    def drops_data(self) -> bool:
        """Whether a dropped table has a row or a dropped column a value."""
        return any(rows for _, rows in self.tables) or any(n for *_, n in self.columns)

    def describe(self) -> str:
        """One line for the operator: from where to where, and what goes."""
        going = [f"table {table} ({rows:,} rows)" for table, rows in self.tables]
        going += [f"column {t}.{c} ({n:,} values)" for t, c, n in self.columns]
        what = f"drops {', '.join(going)}" if going else "drops no table or column"
        return f"Downgrading from {self.current or 'base'} to {self.target or 'base'} {what}"


_COLUMNS = """
SELECT c.relname, a.attname
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') AND c.relname <> 'alembic_version'
"""


def _columns(connection: Connection) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for table, column in connection.exec_driver_sql(_COLUMNS).all():
        found.setdefault(str(table), set()).add(str(column))
    return found


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def downgrade_plan(database_url: str, revision: str, *, lock_timeout: float = 5.0) -> DowngradePlan:
    """What ``downgrade(database_url, revision)`` would drop: tables and columns, with their rows
    and values. Runs the downgrade inside a transaction and rolls it back, so it changes nothing;
    it takes the locks the downgrade takes, for at most ``lock_timeout`` seconds each (a busy
    table raises the database's lock timeout error rather than queueing traffic behind it).
    Raises what the downgrade would raise (an unknown revision, a migration that cannot run in
    a transaction)."""
    engine = create_engine(normalize_database_url(database_url), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            outer = connection.begin()
            try:
                connection.exec_driver_sql(
                    f"SET LOCAL lock_timeout = '{int(lock_timeout * 1000)}ms'"
                )
                before = _columns(connection)
                current = MigrationContext.configure(connection).get_current_revision()
                trial = connection.begin_nested()
                config = alembic_config(database_url, quiet=True)
                config.attributes["connection"] = connection
                command.downgrade(config, revision)
                after = _columns(connection)
                target = MigrationContext.configure(connection).get_current_revision()
                trial.rollback()
                tables = []
                for table in sorted(set(before) - set(after)):
                    rows = connection.exec_driver_sql(f"SELECT count(*) FROM {_quoted(table)}")
                    tables.append((table, int(rows.scalar_one())))
                columns = []
                for table in sorted(set(before) & set(after)):
                    for column in sorted(before[table] - after[table]):
                        values = connection.exec_driver_sql(
                            f"SELECT count({_quoted(column)}) FROM {_quoted(table)}"
                        )
                        columns.append((table, column, int(values.scalar_one())))
            finally:
                outer.rollback()
    finally:
        engine.dispose()
    return DowngradePlan(current, target, tuple(tables), tuple(columns))


def current_revision(database_url: str) -> str | None:
    """The revision the database is at (None for an empty database). Uses a short-lived sync
    connection: this is a diagnostic, not a hot path."""
    engine = create_engine(normalize_database_url(database_url))
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str | None:
    """The newest revision among the scripts (no database needed)."""
    return ScriptDirectory(str(SCRIPT_LOCATION)).get_current_head()
