"""The FastAPI application factory.

``create_app(settings)`` builds nothing that touches the network; the lifespan builds the engine,
session factory and unit-of-work factory, verifies the database once, publishes them on
``app.state`` and disposes of the engine at shutdown.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from glisk.api import health
from glisk.api.errors import OperatorError, install_error_handlers
from glisk.api.middleware import (
    LifespanErrorMiddleware,
    RequestContextMiddleware,
    UnhandledErrorMiddleware,
)
from glisk.core.config import Settings, load_settings
from glisk.core.database import engine_of, masked_url, setup_db_session
from glisk.core.logs import configure_logging
from glisk.core.timezone import enforce_utc
from glisk.ops.metrics import install_api_metrics
from glisk.uow import create_uow_factory

log = structlog.get_logger("glisk.app")


class DatabaseUnavailableError(OperatorError):
    """The database could not be reached at start-up. The message is one line for the operator."""


async def verify_database(db_url: str, connect_timeout: float) -> None:
    """Open one connection and run SELECT 1; raise DatabaseUnavailableError naming the cause and
    the password-masked URL. Used by the lifespan and by ``glisk serve`` before it starts."""
    from glisk.api.health import check_database
    from glisk.core.database import create_db_engine

    engine = create_db_engine(db_url, pool_size=1, max_overflow=0, connect_timeout=connect_timeout)
    try:
        await check_database(engine, within=connect_timeout + 1)
    except Exception as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        detail = reason[0] if reason else type(exc).__name__
        if isinstance(exc, TimeoutError):
            detail = f"no answer within {connect_timeout + 1:.0f} s"
        raise DatabaseUnavailableError(
            f"Cannot connect to the database at {masked_url(db_url)}: {detail}"
        ) from None
    finally:
        await engine.dispose()


def create_app(settings: Settings | None = None) -> FastAPI:
    enforce_utc()
    settings = settings or load_settings()
    configure_logging(settings.app_env, settings.log_level)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.database_url is None:
            raise DatabaseUnavailableError(
                "DATABASE_URL is not set. Use `glisk serve`, which starts the embedded "
                "database, or set DATABASE_URL."
            )
        await verify_database(settings.database_url, settings.db_connect_timeout)
        session_factory = setup_db_session(
            settings.database_url,
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_max_overflow,
            connect_timeout=settings.db_connect_timeout,
        )
        app.state.settings = settings
        app.state.session_factory = session_factory
        app.state.engine = engine_of(session_factory)
        app.state.uow_factory = create_uow_factory(session_factory)
        log.info("app.started", database=masked_url(settings.database_url), env=settings.app_env)
        try:
            yield
        finally:
            await app.state.engine.dispose()
            log.info("app.stopped")

    app = FastAPI(
        title="GLISK backend",
        version="0.1.0",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url="/redoc",
        openapi_url="/openapi.json",
    )
    install_error_handlers(app)
    app.include_router(health.router)
    # GET /metrics and the request counters; the innermost middleware, where the route is known.
    install_api_metrics(app)
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
    app.add_middleware(RequestContextMiddleware)
    # Lifespan only: a start-up failure the app explains in one line reaches the server as it.
    app.add_middleware(LifespanErrorMiddleware)
    return app
