"""The application the HTTP benchmark serves: ``create_app(settings)`` (same lifespan, middleware,
error handlers and CORS as production) plus ``GET /bare``, which answers a constant JSON body
through the same stack without touching the database. ``/health`` minus ``/bare`` is then the cost
of the database round trip.

Run as its own process by bench.http_bench, the way ``glisk serve`` runs the real app:

    python -m bench.bench_app --database-url URL --port 8123 --log-level WARNING
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from glisk.app import create_app
from glisk.core.config import Settings

BARE_BODY = {"status": "healthy"}  # the same body /health sends, so only the work differs


def create_bench_app(settings: Settings) -> FastAPI:
    app = create_app(settings)

    @app.get("/bare", include_in_schema=False)
    async def bare() -> JSONResponse:
        # A JSONResponse, like /health: no response-model validation on either side.
        return JSONResponse(content=BARE_BODY)

    return app


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m bench.bench_app")
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--app-env", default="development", choices=["development", "production"])
    args = parser.parse_args(argv)

    # Every other setting is glisk serve's default (pool size, overflow, connect timeout, CORS).
    settings = Settings(
        database_url=args.database_url, log_level=args.log_level, app_env="development"
    ).model_copy(update={"app_env": args.app_env})  # production's secret rules are not the point
    app = create_bench_app(settings)
    # As glisk.cli.cmd_serve runs it.
    uvicorn.run(app, host=args.host, port=args.port, log_config=None, lifespan="on")
    return 0


if __name__ == "__main__":
    sys.exit(main())
