"""The FastAPI application factory.

``create_app(settings)`` builds nothing that touches the network; the lifespan builds the engine,
session factory and unit-of-work factory, verifies the database once, publishes them on
``app.state`` and disposes of the engine at shutdown.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TextIO

import structlog
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from glisk.api import health, webhooks
from glisk.api.docs import OPENAPI_URL, install_docs
from glisk.api.errors import install_error_handlers
from glisk.api.metrics import install_api_metrics
from glisk.api.middleware import (
    LifespanErrorMiddleware,
    RequestContextMiddleware,
    UnhandledErrorMiddleware,
)
from glisk.core import processes
from glisk.core.config import PoolerMode, Settings, load_settings
from glisk.core.database import engine_of, masked_url, psycopg_connect_kwargs, setup_db_session
from glisk.core.logs import configure_logging
from glisk.core.timezone import enforce_utc
from glisk.errors import DatabaseUnavailableError, first_line
from glisk.uow import create_uow_factory

__all__ = ["DatabaseUnavailableError", "create_app", "create_served_app", "verify_database"]

log = structlog.get_logger("glisk.app")

# Set by `glisk serve --workers N` for its API processes: the pid of the serving parent.
SERVE_PARENT_ENV = "GLISK_SERVE_PARENT_PID"


async def verify_database(
    db_url: str,
    connect_timeout: float,
    *,
    application_name: str = "glisk",
    pooler: PoolerMode = "none",
) -> None:
    """Open one connection and run SELECT 1; raise DatabaseUnavailableError naming the cause and
    the password-masked URL. Used by the lifespan and by ``glisk serve`` before it starts."""
    from glisk.api.health import check_database
    from glisk.core.database import create_db_engine

    engine = create_db_engine(
        db_url,
        pool_size=1,
        max_overflow=0,
        connect_timeout=connect_timeout,
        application_name=application_name,
        pooler=pooler,
    )
    try:
        await check_database(engine, within=connect_timeout + 1)
    except Exception as exc:
        detail = first_line(exc)
        if isinstance(exc, TimeoutError):
            detail = f"no answer within {connect_timeout + 1:.0f} s"
        if pooler == "none" and "unsupported startup parameter: options" in detail:
            # PgBouncer before 1.20 answers the direct mode's `options` parameter this way.
            detail += " (DATABASE_URL points at a pooler: set DB_POOLER=transaction or session)"
        raise DatabaseUnavailableError(
            f"Cannot connect to the database at {masked_url(db_url)}: {detail}"
        ) from None
    finally:
        await engine.dispose()


def create_app(settings: Settings | None = None, *, log_stream: TextIO | None = None) -> FastAPI:
    """The API for ``settings`` (the environment and .env when None), logging to ``log_stream``
    (standard error by default)."""
    enforce_utc()
    settings = settings or load_settings()
    configure_logging(settings.app_env, settings.log_level, stream=log_stream)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.database_url is None:
            raise DatabaseUnavailableError(
                "DATABASE_URL is not set. Use `glisk serve`, which starts the embedded "
                "database, or set DATABASE_URL."
            )
        options = settings.engine_options("api")
        await verify_database(
            settings.database_url,
            settings.db_connect_timeout,
            application_name=options["application_name"],
            pooler=settings.db_pooler,
        )
        session_factory = setup_db_session(settings.database_url, **options)
        app.state.settings = settings
        app.state.session_factory = session_factory
        app.state.engine = engine_of(session_factory)
        app.state.uow_factory = create_uow_factory(session_factory)
        app.state.database_probe = health.DatabaseProbe(
            psycopg_connect_kwargs(
                settings.database_url,
                connect_timeout=settings.db_connect_timeout,
                application_name=options["application_name"],
                pooler=settings.db_pooler,
            )
        )
        log.info("app.started", database=masked_url(settings.database_url), env=settings.app_env)
        try:
            yield
        finally:
            await app.state.database_probe.aclose()
            await app.state.engine.dispose()
            log.info("app.stopped")

    docs = settings.api_docs_enabled
    app = FastAPI(
        title="GLISK backend",
        version="0.1.0",
        lifespan=lifespan,
        # FastAPI's own /docs and /redoc load their assets from a CDN: ours serve them locally.
        docs_url=None,
        redoc_url=None,
        openapi_url=OPENAPI_URL if docs else None,
    )
    if docs:
        install_docs(app)
    install_error_handlers(app)
    app.include_router(health.router)
    # POST /webhooks/alchemy: refuses everything (401) until ALCHEMY_WEBHOOK_SIGNING_KEY is set.
    app.include_router(webhooks.router)
    # GET /metrics and the request counters; the innermost middleware, where the route is known.
    app.state.api_metrics = install_api_metrics(app)
    # add_middleware wraps what is there, so the last one added is the outermost.
    # Innermost: an unexpected exception becomes the 500 envelope inside CORS, which then adds
    # its headers so a browser can read the error.
    app.add_middleware(UnhandledErrorMiddleware)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_credentials="*" not in settings.cors_origins,
        allow_methods=["*"],
        allow_headers=["*"],
        expose_headers=["X-Request-ID"],
    )
    # Outermost: it sees every response, CORS preflights and errors included.
    app.add_middleware(
        RequestContextMiddleware,
        level=logging.getLevelNamesMapping()[settings.request_log_level],
        slow_seconds=settings.request_slow_seconds,
    )
    # Lifespan only: a start-up failure the app explains in one line reaches the server as it.
    app.add_middleware(LifespanErrorMiddleware)
    return app


def stop_with_parent() -> None:
    """In an API process started by ``glisk serve --workers N``: ask the kernel for SIGTERM when
    the serving parent dies, even by SIGKILL, so no API process outlives it (uvicorn then shuts
    down gracefully). Does nothing outside such a process or off Linux."""
    expected = os.environ.get(SERVE_PARENT_ENV)
    if not expected:
        return
    if not processes.signal_on_parent_death(signal.SIGTERM, int(expected)):
        os.kill(os.getpid(), signal.SIGTERM)  # the parent died first: stop as the signal would


def create_served_app() -> FastAPI:
    """The factory ``glisk serve --workers N`` hands uvicorn (``glisk.app:create_served_app``):
    each API process reads the settings from its environment, where the parent has put the
    database it started and migrated (DATABASE_URL)."""
    stop_with_parent()
    return create_app(load_settings())
