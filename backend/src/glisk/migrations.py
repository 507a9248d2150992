"""Alembic, driven from Python against an explicit URL (the CLI and the test harness use this).

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

from glisk.core.config import BACKEND_DIR, normalize_database_url

ALEMBIC_INI = BACKEND_DIR / "alembic.ini"


def alembic_config(database_url: str, *, ini: Path = ALEMBIC_INI, quiet: bool = False) -> Config:
    config = Config(str(ini), stdout=io.StringIO() if quiet else sys.stdout)
    config.attributes["database_url"] = normalize_database_url(database_url)
    # The CLI and the app configure logging themselves; alembic.ini's fileConfig would replace it.
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
    return ScriptDirectory.from_config(alembic_config("postgresql://x/y")).get_current_head()
