"""An app as the API tests build it: explicit settings, its logs in a buffer, its real lifespan
around an in-process client, and test-only routes (a typed query parameter, an unexpected error)."""

from __future__ import annotations

import io
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Annotated, Any

import httpx
import structlog
from fastapi import FastAPI, HTTPException, Query
from sqlalchemy import text
from sqlalchemy.engine import make_url

from glisk.api.deps import UowDep
from glisk.app import create_app
from glisk.core.config import Settings
from tests.support import factories

ALLOWED_ORIGIN = "http://localhost:3000"
SECURITY_HEADERS = {"x-content-type-options": "nosniff", "x-frame-options": "DENY"}
INTERNAL_MARKER = "kaboom-internal-detail-7f3a"
DUPLICATED_WALLET = "0x" + "ab" * 20  # written twice by /probe/duplicate-wallet


def with_password(url: str, password: str | None = None) -> tuple[str, str]:
    """``url`` with a password in it, and that password. A URL that already has one keeps it
    (an external test server needs its real password); otherwise a unique one is added, which a
    trust-auth test server ignores."""
    parsed = make_url(url)
    if parsed.password:
        return url, str(parsed.password)
    secret = password or f"pw-{uuid.uuid4().hex}"
    return parsed.set(password=secret).render_as_string(hide_password=False), secret


def api_settings(database_url: str, **overrides: Any) -> Settings:
    """Settings for a test app: everything that matters is explicit, so neither the environment
    nor a developer's .env changes what the tests see."""
    values: dict[str, Any] = {
        "database_url": database_url,
        "db_pool_size": 5,
        "db_max_overflow": 5,
        "db_connect_timeout": 2.0,
        "app_env": "development",
        "log_level": "INFO",
        "cors_origins": [ALLOWED_ORIGIN],
    }
    app_env = overrides.pop("app_env", "development")
    values.update(overrides)
    settings = Settings(**values)
    # Production's secret rules are tested with the configuration; here only its log format matters.
    return settings.model_copy(update={"app_env": app_env})


def create_logged_app(settings: Settings) -> tuple[FastAPI, io.StringIO]:
    """``create_app`` with its log handler writing to a buffer instead of stderr."""
    buffer = io.StringIO()
    return create_app(settings, log_stream=buffer), buffer


@contextmanager
def logging_restored() -> Iterator[None]:
    """create_app reconfigures logging globally; put the previous configuration back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    config = structlog.get_config()
    try:
        yield
    finally:
        root.handlers, root.level = handlers, level
        structlog.configure(**config)


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Run the app's real lifespan around an in-process client."""
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://testserver"
        ) as client,
    ):
        yield client


def assert_security_headers(response: httpx.Response) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, f"{name} on {response.status_code}"
    assert response.headers.get("x-request-id"), f"X-Request-ID on {response.status_code}"


def add_probe_routes(app: FastAPI) -> None:
    """Test-only routes: a typed query parameter (validation), an unexpected exception, and
    database failures through the request's unit of work (a duplicate, a statement the database
    refuses, a connection that dies)."""

    @app.get("/probe/items", summary="Test-only route with a typed, bounded query parameter")
    async def probe_items(limit: Annotated[int, Query(ge=1, le=100)]) -> dict[str, int]:
        return {"limit": limit}

    @app.get("/probe/unnamed-status", include_in_schema=False)
    async def probe_unnamed_status() -> None:
        raise HTTPException(status_code=499, detail="Client went away")

    @app.get("/probe/boom", include_in_schema=False)
    async def probe_boom() -> None:
        raise RuntimeError(f"{INTERNAL_MARKER}: internal state nobody should see")

    @app.post("/probe/duplicate-wallet", include_in_schema=False)
    async def probe_duplicate_wallet(uow: UowDep) -> None:
        await uow.authors.add(factories.author(wallet_address=DUPLICATED_WALLET))
        await uow.authors.add(factories.author(wallet_address="0x" + DUPLICATED_WALLET[2:].upper()))

    @app.get("/probe/division-by-zero", include_in_schema=False)
    async def probe_division_by_zero(uow: UowDep) -> None:
        await uow.session.execute(text("SELECT 1 / 0"))

    @app.get("/probe/connection-dies", include_in_schema=False)
    async def probe_connection_dies(uow: UowDep) -> None:
        await uow.session.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
