"""Engine and session factory. Built by the app's lifespan or the CLI, never at import."""

from __future__ import annotations

from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from glisk.core.config import normalize_database_url


def create_db_engine(
    db_url: str,
    *,
    pool_size: int = 200,
    max_overflow: int = 10,
    connect_timeout: float = 5.0,
    application_name: str = "glisk",
) -> AsyncEngine:
    """An async engine on psycopg 3.

    The pool opens connections lazily (nothing connects here) and pre-pings each checkout, so a
    database restart costs one failed ping, not a failed request. Every connection runs in UTC so
    ``now()`` agrees with the naive UTC columns.
    """
    return create_async_engine(
        normalize_database_url(db_url),
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_pre_ping=True,
        pool_recycle=1800,
        connect_args={
            # libpq takes whole seconds, minimum 2.
            "connect_timeout": max(2, round(connect_timeout)),
            "application_name": application_name,
            "options": "-c timezone=UTC",
        },
    )


def setup_db_session(
    db_url: str,
    pool_size: int = 200,
    *,
    max_overflow: int = 10,
    connect_timeout: float = 5.0,
    application_name: str = "glisk",
) -> async_sessionmaker[AsyncSession]:
    """The session factory every unit of work draws from (spec section 6).

    ``expire_on_commit=False`` so entities returned from a unit of work stay readable after it
    commits. Dispose of the engine with ``await engine_of(factory).dispose()``.
    """
    engine = create_db_engine(
        db_url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        connect_timeout=connect_timeout,
        application_name=application_name,
    )
    return async_sessionmaker(engine, expire_on_commit=False)


def engine_of(session_factory: async_sessionmaker[AsyncSession]) -> AsyncEngine:
    bind = session_factory.kw["bind"]
    assert isinstance(bind, AsyncEngine)
    return bind


def masked_url(db_url: str) -> str:
    """The URL with its password hidden, for logs and error messages."""
    return make_url(db_url).render_as_string(hide_password=True)
