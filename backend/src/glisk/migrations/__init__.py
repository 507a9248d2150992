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
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine

from glisk.core.config import normalize_database_url

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
