"""The application the HTTP benchmark serves: ``create_app(settings)`` (same lifespan, middleware,
error handlers and CORS as production) plus ``GET /bare``, which answers a constant JSON body
through the same stack without touching the database. ``/health`` minus ``/bare`` is then the cost
of the database round trip.

Run as its own process by bench.http_bench, the way ``glisk serve`` runs the real app:

    python -m bench.bench_app --database-url URL --port 8123 --log-level WARNING [--workers 2]

With ``--workers N`` (N > 1) uvicorn runs N processes from the import string
``bench.bench_app:create_served_bench_app``, as ``glisk serve --workers N`` runs
``glisk.app:create_served_app``; the settings reach them through the environment.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any, cast

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from glisk.app import SERVE_PARENT_ENV, create_app, stop_with_parent
from glisk.core.config import Settings

BARE_BODY = {"status": "healthy"}  # the same body /health sends, so only the work differs
# How --workers hands the settings to the processes uvicorn starts.
ENV_PREFIX = "GLISK_BENCH_"


def create_bench_app(settings: Settings) -> FastAPI:
    app = create_app(settings)

    @app.get("/bare", include_in_schema=False)
    async def bare() -> JSONResponse:
        # A JSONResponse, like /health: no response-model validation on either side.
        return JSONResponse(content=BARE_BODY)

    @app.get("/pid", include_in_schema=False)
    async def pid() -> JSONResponse:
        # Which process answered (the benchmark waits until every worker process has), and how
        # many SELECT 1 its /health probe has sent.
        probe = getattr(app.state, "database_probe", None)
        return JSONResponse(content={"pid": os.getpid(), "selects": probe.sent if probe else 0})

    return app


def bench_settings(database_url: str, log_level: str, app_env: str) -> Settings:
    # Every other setting is glisk serve's default (pool size, overflow, connect timeout, CORS);
    # production's secret rules are not the point, so APP_ENV is applied after validation.
    return Settings(
        database_url=database_url, log_level=cast(Any, log_level), app_env="development"
    ).model_copy(update={"app_env": app_env})


def create_served_bench_app() -> FastAPI:
    """The factory uvicorn's worker processes call (``--workers`` > 1)."""
    stop_with_parent()
    return create_bench_app(
        bench_settings(
            os.environ[f"{ENV_PREFIX}DATABASE_URL"],
            os.environ[f"{ENV_PREFIX}LOG_LEVEL"],
            os.environ[f"{ENV_PREFIX}APP_ENV"],
        )
    )


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m bench.bench_app")
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--app-env", default="development", choices=["development", "production"])
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    args = parser.parse_args(argv)

    if args.workers > 1:  # as glisk.cli._serve_processes runs them
        os.environ.update(
            {
                f"{ENV_PREFIX}DATABASE_URL": args.database_url,
                f"{ENV_PREFIX}LOG_LEVEL": args.log_level,
                f"{ENV_PREFIX}APP_ENV": args.app_env,
                SERVE_PARENT_ENV: str(os.getpid()),
            }
        )
        uvicorn.run(
            "bench.bench_app:create_served_bench_app",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            log_config=None,
            lifespan="on",
        )
        return 0
    app = create_bench_app(bench_settings(args.database_url, args.log_level, args.app_env))
    # As glisk.cli.cmd_serve runs it.
    uvicorn.run(app, host=args.host, port=args.port, log_config=None, lifespan="on")
    return 0


if __name__ == "__main__":
    sys.exit(main())
