"""The worker side of bench.claim_bench: what each benchmark process runs (importable by a
forkserver, so the processes are forked from one that imported all of this once)."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import psycopg

from glisk.core.database import engine_of, setup_db_session
from glisk.core.logs import configure_logging
from glisk.core.timezone import enforce_utc
from glisk.models.stages import STAGES, StageName
from glisk.repositories.token_lease import Claim, _claim_sql
from glisk.uow import create_uow_factory
from glisk.workers.loop import run_worker

IMAGE = STAGES[StageName.IMAGE]


def _psycopg_sql(statement: Any) -> str:
    """The SQLAlchemy text() of the leased claim with :name turned into psycopg's %(name)s."""
    return re.sub(r"(?<!:):(\w+)", r"%(\1)s", str(statement.text))


async def _spec(url: str, batch: int, until: float) -> int:
    factory = setup_db_session(url, pool_size=1, max_overflow=0)
    uow_factory = create_uow_factory(factory)
    done = 0
    try:
        while time.time() < until:
            async with uow_factory() as uow:
                tokens = await uow.tokens.get_pending_for_generation(batch)
                for token in tokens:
                    token.mark_generating()
            done += len(tokens)
    finally:
        await engine_of(factory).dispose()
    return done


async def _leased(url: str, batch: int, until: float) -> int:
    factory = setup_db_session(url, pool_size=1, max_overflow=0)
    uow_factory = create_uow_factory(factory)
    done = 0
    try:
        while time.time() < until:
            async with uow_factory() as uow:
                result = await uow.leases.claim(
                    IMAGE, "bench", batch=batch, lease_seconds=600, max_attempts=3
                )
            done += len(result.claims)
    finally:
        await engine_of(factory).dispose()
    return done


def raw(url: str, batch: int, until: float) -> int:
    sql = _psycopg_sql(_claim_sql(IMAGE, batch))
    params = {
        "holder": "bench",
        "batch": batch,
        "lease_seconds": 600,
        "max_attempts": 3,
        "stage": "image",
    }
    done = 0
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.time() < until:
            done += len(conn.execute(sql, params).fetchall())  # type: ignore[arg-type]
    return done


# The spec path's SQL without the ORM: the same two statements get_pending_for_generation and
# the flush of mark_generating send, in one transaction.
RAW_SPEC_LOCK = (
    "SELECT id FROM tokens_s0 WHERE status = 'detected' AND claim_id IS NULL "
    "ORDER BY mint_timestamp, id LIMIT %(batch)s FOR UPDATE SKIP LOCKED"
)
RAW_SPEC_MARK = "UPDATE tokens_s0 SET status = 'generating' WHERE id = ANY(%(ids)s)"


def raw_spec(url: str, batch: int, until: float) -> int:
    done = 0
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as conn:
        while time.time() < until:
            with conn.transaction():
                ids = [row[0] for row in conn.execute(RAW_SPEC_LOCK, {"batch": batch})]
                if ids:
                    conn.execute(RAW_SPEC_MARK, {"ids": ids})
            done += len(ids)
    return done


async def _loop(url: str, batch: int, until: float) -> int:
    factory = setup_db_session(url, pool_size=2, max_overflow=0)
    uow_factory = create_uow_factory(factory)
    stop = asyncio.Event()

    async def noop(claim: Claim) -> str:
        return f"/images/{claim.token_id}.png"

    async def stopper() -> None:
        await asyncio.sleep(max(0.0, until - time.time()))
        stop.set()

    timer = asyncio.create_task(stopper())
    try:
        stats = await run_worker(
            IMAGE, noop, uow_factory, batch=batch, stop=stop, poll_interval=0.01
        )
    finally:
        timer.cancel()
        await engine_of(factory).dispose()
    return stats.completed


def worker(path: str, url: str, batch: int, start: float, seconds: float) -> int:
    enforce_utc()
    configure_logging("production", "WARNING")  # a log line per commit would be the benchmark
    time.sleep(max(0.0, start - time.time()))  # all processes start together
    until = start + seconds
    if path == "raw":
        return raw(url, batch, until)
    if path == "raw_spec":
        return raw_spec(url, batch, until)
    runner = RUNNERS[path]
    return asyncio.run(runner(url, batch, until))


RUNNERS = {"spec": _spec, "leased": _leased, "loop": _loop}
