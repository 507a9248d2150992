"""The HTTP shell when its database goes away: at start-up, mid-run, or hangs.

Each test that stops a database stops its own embedded server, never the session's shared one.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import structlog
import uvicorn
from fastapi import FastAPI
from sqlalchemy import text
from uvicorn.lifespan.on import LifespanOn

from glisk.api.deps import UowDep
from glisk.api.health import HEALTH_TIMEOUT_SECONDS
from glisk.app import DatabaseUnavailableError, create_app
from glisk.core.config import BACKEND_DIR
from glisk.core.database import create_db_engine
from glisk.embedded import (
    EmbeddedPostgres,
    free_port,
    service_user,
)
from glisk.errors import EmbeddedPostgresError
from tests.support.api import (
    api_settings,
    assert_security_headers,
    create_logged_app,
    logging_restored,
    serving,
    with_password,
)

UNHEALTHY = {
    "status": "unhealthy",
    "error": {"code": "DATABASE_CONNECTION_FAILED", "message": "Unable to connect to database"},
}
# The health check gives up after HEALTH_TIMEOUT_SECONDS; the margin absorbs a slow machine.
HEALTH_BOUND_SECONDS = 3.0
CONNECT_TIMEOUT_SECONDS = 120


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    with logging_restored():
        yield


@pytest.fixture
def own_server() -> Iterator[EmbeddedPostgres]:
    """A private embedded PostgreSQL this test may stop and restart (same port, same data)."""
    base = Path(tempfile.mkdtemp(prefix="glisk-api-pg-"))
    if service_user() is not None:
        base.chmod(0o755)  # as root the server runs as an unprivileged user that must traverse it
    server: EmbeddedPostgres | None = None
    try:
        for _ in range(5):  # a free port can be taken by someone else before the server binds it
            candidate = EmbeddedPostgres(
                data_dir=base / "data", port=free_port(), max_connections=30, ephemeral=True
            )
            try:
                server = candidate.start()
                break
            except EmbeddedPostgresError:
                continue
        if server is None:
            pytest.fail("could not start a private embedded PostgreSQL")
        yield server
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(base, ignore_errors=True)


def add_uow_route(app: FastAPI) -> None:
    @app.get("/probe/uow")
    async def probe_uow(uow: UowDep) -> dict[str, int]:
        return {"one": (await uow.session.execute(text("SELECT 1"))).scalar_one()}


async def test_health_gives_503_within_the_bound_when_the_database_stops_and_200_after_restart(
    own_server: EmbeddedPostgres,
) -> None:
    url, secret = with_password(own_server.url)
    app, logs = create_logged_app(api_settings(url))
    add_uow_route(app)
    async with serving(app) as client:
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/probe/uow")).json() == {"one": 1}  # a pooled connection exists

        own_server.stop()
        started = time.monotonic()
        down = await client.get("/health")
        elapsed = time.monotonic() - started

        assert down.status_code == 503
        assert down.json() == UNHEALTHY
        assert_security_headers(down)
        assert elapsed < HEALTH_BOUND_SECONDS
        again = await client.get("/health")  # stays unhealthy, no stale state
        assert again.status_code == 503
        # A route that needs the database fails with the generic envelope, not the driver error.
        failed = await client.get("/probe/uow")
        assert failed.status_code == 500
        assert failed.json()["error"]["code"] == "INTERNAL_SERVER_ERROR"

        own_server.start()
        # The pool's dead connections cost a failed ping, not a failed request.
        up = await client.get("/health")
        assert up.status_code == 200
        assert up.json() == {"status": "healthy"}
        assert (await client.get("/probe/uow")).json() == {"one": 1}

    output = logs.getvalue()
    assert "health: database unreachable" in output
    for response in (down, again, failed, up):
        assert secret not in response.text
    assert secret not in output, "the database password reached the logs during the outage"


async def test_health_gives_503_within_the_bound_when_the_database_accepts_but_never_answers() -> (
    None
):
    # A listening socket nobody reads: the TCP handshake completes (the kernel's backlog), then
    # the client waits for PostgreSQL's answer forever. Only the health check's own bound helps.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(16)
        port = hole.getsockname()[1]
        url = f"postgresql+psycopg://glisk:{'x' * 12}@127.0.0.1:{port}/glisk"
        app, _ = create_logged_app(api_settings(url, db_connect_timeout=30.0))
        # The lifespan would refuse to start against this database, so publish an engine the
        # way it does and call the route directly.
        app.state.engine = create_db_engine(url, pool_size=1, max_overflow=0, connect_timeout=30)
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                started = time.monotonic()
                response = await client.get("/health")
                elapsed = time.monotonic() - started
        finally:
            await app.state.engine.dispose()

    assert response.status_code == 503
    assert response.json() == UNHEALTHY
    assert HEALTH_TIMEOUT_SECONDS * 0.9 <= elapsed < HEALTH_BOUND_SECONDS


def closed_port_url(password: str) -> tuple[str, int]:
    port = free_port()  # nothing listens there: connections are refused at once
    return f"postgresql+psycopg://glisk:{password}@127.0.0.1:{port}/glisk", port


async def test_app_startup_fails_with_one_line_naming_the_database_and_masking_the_password() -> (
    None
):
    password = "Startup-Secret-93bd"
    url, port = closed_port_url(password)
    app = create_app(api_settings(url))

    with pytest.raises(DatabaseUnavailableError) as caught:
        async with app.router.lifespan_context(app):
            pytest.fail("the app started without its database")

    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("Cannot connect to the database at ")
    assert f"postgresql+psycopg://glisk:***@127.0.0.1:{port}/glisk" in message
    assert "refused" in message.lower()
    assert password not in message
    assert caught.value.__cause__ is None  # raised `from None`: no chained driver traceback


async def test_uvicorn_reports_a_database_startup_failure_as_one_line_not_a_traceback() -> None:
    # The container runs `uvicorn glisk.app:create_app --factory`: the server's own lifespan
    # handling decides what the operator reads when the database is unreachable.
    password = "Uvicorn-Secret-c41d"
    url, port = closed_port_url(password)
    app, logs = create_logged_app(api_settings(url))
    config = uvicorn.Config(app, lifespan="on", log_config=None)
    config.load()
    lifespan = LifespanOn(config)

    await lifespan.startup()

    assert lifespan.should_exit  # uvicorn exits (status 3) instead of serving
    output = logs.getvalue()
    assert "Traceback" not in output
    assert password not in output
    [reason] = [line for line in output.splitlines() if "Cannot connect to the database" in line]
    assert f"postgresql+psycopg://glisk:***@127.0.0.1:{port}/glisk" in reason
    assert "Application startup failed" in output


def glisk_command() -> list[str]:
    script = Path(sys.executable).with_name("glisk")  # the console script `uv run glisk` runs
    return [str(script)] if script.is_file() else [sys.executable, "-m", "glisk.cli"]


@pytest.mark.slow
def test_glisk_serve_against_an_unreachable_database_exits_nonzero_with_one_clear_line(
    tmp_path: Path,
) -> None:
    password = "Serve-Secret-51c8"
    url, port = closed_port_url(password)
    env = {
        key: value
        for key, value in os.environ.items()
        if key.upper() not in {"APP_ENV", "LOG_LEVEL", "CORS_ORIGINS", "HOST", "PORT"}
        and not key.startswith(("DB_", "GLISK_", "POSTGRES_"))
    }
    env["DATABASE_URL"] = url
    env["GLISK_ENV_FILE"] = str(tmp_path / "no.env")  # not the developer's .env
    # A refused connection must end start-up at once, not after the connect timeout: make that
    # timeout long enough that waiting for it cannot pass for a slow start.
    env["DB_CONNECT_TIMEOUT"] = str(CONNECT_TIMEOUT_SECONDS)

    started = time.monotonic()
    result = subprocess.run(
        [*glisk_command(), "serve", "--host", "127.0.0.1", "--port", str(free_port())],
        capture_output=True,
        text=True,
        env=env,
        cwd=BACKEND_DIR,
        timeout=2 * CONNECT_TIMEOUT_SECONDS,
        check=False,
    )
    elapsed = time.monotonic() - started

    output = result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0
    assert elapsed < CONNECT_TIMEOUT_SECONDS / 2, (
        f"waited {elapsed:.0f} s: for the connect timeout?"
    )
    assert "Traceback" not in output
    assert password not in output
    assert len(lines) == 1, result.stderr
    assert "database" in lines[0].lower()
    assert f"postgresql+psycopg://glisk:***@127.0.0.1:{port}/glisk" in lines[0]
    assert "refused" in lines[0].lower()


async def test_a_failed_connect_logged_with_its_traceback_in_development_hides_password() -> None:
    # A traceback renderer that shows local variables would print the driver's connection
    # parameters, password included (glisk.core.logs renders plain tracebacks for that reason).
    password = "Traceback-Secret-2e07"
    url, _ = closed_port_url(password)
    _, logs = create_logged_app(api_settings(url))  # development: the human console renderer
    engine = create_db_engine(url, pool_size=1, max_overflow=0, connect_timeout=2)
    try:
        async with engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
    except Exception:
        structlog.get_logger("glisk.test").exception("database.call_failed")
    finally:
        await engine.dispose()

    output = logs.getvalue()
    assert "database.call_failed" in output
    assert password not in output
