"""Async Alembic environment.

The URL comes from, in order: ``config.attributes["database_url"]`` (set by ``glisk db`` and the
test harness), then the application settings (``DATABASE_URL``). Migrations run on a NullPool
engine that is disposed at the end, so nothing lingers in the caller's process.
"""

import asyncio
from logging.config import fileConfig

import alembic_postgresql_enum  # noqa: F401  (registers enum autogenerate support)
from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from glisk.core.config import ConfigError, load_settings, normalize_database_url
from glisk.models import metadata

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = metadata


def database_url() -> str:
    url = config.attributes.get("database_url")
    if url:
        return normalize_database_url(url)
    settings = load_settings()
    if settings.database_url is None:
        raise ConfigError(
            "DATABASE_URL is not set. Set it to run alembic directly, or use "
            "`glisk db upgrade`, which starts the embedded database when it is unset."
        )
    return settings.database_url


def do_run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        compare_server_default=False,
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    engine = create_async_engine(database_url(), poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
            await connection.commit()
    finally:
        await engine.dispose()


def run_migrations_offline() -> None:
    context.configure(
        url=database_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    connection = config.attributes.get("connection")
    if connection is not None:
        do_run_migrations(connection)
    else:
        asyncio.run(run_async_migrations())
