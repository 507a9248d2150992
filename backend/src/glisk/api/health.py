import asyncio
import time

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from glisk.api.schemas import HealthDown, HealthOk, envelope

log = structlog.get_logger("glisk.health")
router = APIRouter()

# A probe must answer even when the database hangs; a load balancer gives up after a few seconds.
HEALTH_TIMEOUT_SECONDS = 1.0


async def check_database(engine: AsyncEngine, within: float = HEALTH_TIMEOUT_SECONDS) -> None:
    """Run ``SELECT 1`` on a pooled connection within ``within`` seconds; raises on failure
    (TimeoutError when the database does not answer in time)."""
    async with asyncio.timeout(within), engine.connect() as connection:
        await connection.execute(text("SELECT 1"))


@router.get(
    "/health",
    response_model=HealthOk,
    responses={503: {"model": HealthDown, "description": "The database is unreachable"}},
    summary="Liveness and database connectivity",
)
async def health(request: Request) -> JSONResponse:
    started = time.perf_counter()
    try:
        await check_database(request.app.state.engine)
    except Exception as exc:  # any failure to reach the database means unhealthy
        log.warning(
            "health.database_unreachable",
            error=type(exc).__name__,
            detail=str(exc).splitlines()[0] if str(exc) else "",
            elapsed_ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return JSONResponse(
            status_code=503,
            content=envelope(
                "DATABASE_CONNECTION_FAILED", "Unable to connect to database", status="unhealthy"
            ),
        )
    return JSONResponse(content={"status": "healthy"})
