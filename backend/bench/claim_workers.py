"""What each process of bench.claim_bench and bench.peer_bench runs. Importable by a forkserver,
so the processes fork from one that imported all of this once. Every target opens its connections,
calls ``ready()`` (the clock starts when all processes are ready), works, and returns how many
tokens or jobs it moved."""

from __future__ import annotations

import asyncio
import time

import psycopg
from sqlalchemy import text

from bench._common import Ready
from glisk.core.database import engine_of, setup_db_session
from glisk.core.logs import configure_logging
from glisk.core.timezone import enforce_utc
from glisk.uow import create_uow_factory
from glisk.workers import queries
from glisk.workers.claims import Claim
from glisk.workers.connection import ConnectOptions, libpq_url
from glisk.workers.noop import handlers
from glisk.workers.stages import STAGES, StageName
from glisk.workers.worker import Worker

IMAGE = STAGES[StageName.IMAGE]
CLAIM_PARAMS = {"holder": "bench", "lease_seconds": 600, "max_attempts": 3}


def _setup() -> None:
    enforce_utc()
    configure_logging("production", "WARNING")  # a log line per commit would be the benchmark


async def _uow_path(url: str, batch: int, ready: Ready, seconds: float, leased: bool) -> int:
    """``spec``: get_pending_for_generation + mark_generating in a unit of work; ``leased``:
    uow.leases.claim. Both commit per batch."""
    factory = setup_db_session(url, pool_size=1, max_overflow=0)
    uow_factory = create_uow_factory(factory)
    done = 0
    try:
        async with uow_factory() as uow:  # open the pool's connection before the clock
            await uow.session.execute(text("SELECT 1"))
        until = ready() + seconds
        while time.monotonic() < until:
            async with uow_factory() as uow:
                if leased:
                    claimed = await uow.leases.claim(
                        IMAGE, "bench", batch=batch, lease_seconds=600, max_attempts=3
                    )
                    done += len(claimed.claims)
                else:
                    tokens = await uow.tokens.get_pending_for_generation(batch)
                    for token in tokens:
                        token.mark_generating()
                    done += len(tokens)
    finally:
        await engine_of(factory).dispose()
    return done


# The spec path's SQL without the ORM: the two statements get_pending_for_generation and the flush
# of mark_generating send, in one transaction.
RAW_SPEC_LOCK = (
    "SELECT id FROM tokens_s0 WHERE status = 'detected' AND claimed_by IS NULL "
    "ORDER BY mint_timestamp, id LIMIT %(batch)s FOR UPDATE SKIP LOCKED"
)
RAW_SPEC_MARK = "UPDATE tokens_s0 SET status = 'generating' WHERE id = ANY(%(ids)s)"


def _sql_path(path: str, url: str, batch: int, ready: Ready, seconds: float) -> int:
    """``raw``: the claim statement alone; ``stage``: the claim, then one fenced set-based
    completion of the batch (what a whole stage needs); ``raw_spec``: the spec path's SQL. All
    sent by psycopg (autocommit, prepared from the fifth call on), with no ORM."""
    claim, complete = queries.claim(IMAGE, batch).encode(), queries.complete(IMAGE).encode()
    done = 0
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        until = ready() + seconds
        while time.monotonic() < until:
            if path == "raw_spec":
                with conn.transaction():
                    ids = [row[0] for row in conn.execute(RAW_SPEC_LOCK, {"batch": batch})]
                    if ids:
                        conn.execute(RAW_SPEC_MARK, {"ids": ids})
                done += len(ids)
                continue
            rows = conn.execute(claim, CLAIM_PARAMS).fetchall()
            if path == "raw" or not rows:
                done += len(rows)
                continue
            results = {
                "claim_ids": [row[3] for row in rows],
                "results": [f"/images/{row[1]}.png" for row in rows],
            }
            done += len(conn.execute(complete, results).fetchall())
    return done


async def _loop(url: str, batch: int, ready: Ready, seconds: float, concurrency: int | None) -> int:
    """The runtime: a Worker with the no-op image handler until ``seconds`` have passed. Its
    connections open inside the clock (the Worker opens them lazily)."""
    worker = Worker(
        IMAGE,
        handlers()[StageName.IMAGE],
        ConnectOptions(url),
        batch=batch,
        concurrency=concurrency,
    )
    stop = asyncio.Event()
    ready()
    asyncio.get_running_loop().call_later(seconds, stop.set)
    return (await worker.run(stop)).completed


def timed(path: str, url: str, batch: int, seconds: float, ready: Ready) -> int:
    """One claim_bench process: ``path`` for ``seconds``."""
    _setup()
    if path in ("raw", "raw_spec", "stage"):
        return _sql_path(path, url, batch, ready, seconds)
    if path in ("spec", "leased"):
        return asyncio.run(_uow_path(url, batch, ready, seconds, leased=path == "leased"))
    concurrency = int(path.removeprefix("loop_c")) if path.startswith("loop_c") else None
    return asyncio.run(_loop(url, batch, ready, seconds, concurrency))


async def _drain_runtime(url: str, batch: int, ready: Ready) -> tuple[int, float]:
    noop, last = handlers()[StageName.IMAGE], [0.0]

    async def stamped(claim: Claim) -> str:
        last[0] = time.monotonic()
        return await noop(claim)  # type: ignore[arg-type]

    worker = Worker(IMAGE, stamped, ConnectOptions(url), batch=batch)
    ready()
    return (await worker.run(exit_when_idle=True)).completed, last[0]


async def _drain_pgqueuer(url: str, batch: int, ready: Ready) -> tuple[int, float]:
    from pgqueuer import PgQueuer
    from pgqueuer.models import Job
    from pgqueuer.types import QueueExecutionMode

    done, last = 0, 0.0
    async with await psycopg.AsyncConnection.connect(libpq_url(url), autocommit=True) as conn:
        pgq = PgQueuer.from_psycopg_connection(conn)

        @pgq.entrypoint("noop")
        async def noop(job: Job) -> None:
            nonlocal done, last
            done, last = done + 1, time.monotonic()

        ready()
        await pgq.run(batch_size=batch, mode=QueueExecutionMode.drain)
    return done, last


def drain(system: str, url: str, batch: int, ready: Ready) -> tuple[int, float]:
    """One peer_bench process: drain the queue through ``system`` ('runtime' or 'pgqueuer').
    The clock stops at its last handler call: pgqueuer's drain mode idles ~4 s more before it
    returns (its heartbeat buffer's timer), which is not throughput."""
    _setup()
    runner = _drain_runtime if system == "runtime" else _drain_pgqueuer
    return asyncio.run(runner(url, batch, ready))
