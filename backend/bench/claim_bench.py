"""Claim throughput: tokens per second taken (and, for the whole-stage paths, completed) by N worker
processes, and their CPU per token, next to raw-SQL ceilings measured in the same run.

    cd backend && uv run python -m bench.claim_bench --seconds 3
"""

from __future__ import annotations

import argparse
import asyncio
import time

import psycopg
from sqlalchemy import text

from bench.harness import Cell, Ready, database, reset, run_processes, say, seed, server_line, table
from glisk.core.database import engine_of, setup_db_session
from glisk.core.logs import configure_logging
from glisk.uow import create_uow_factory
from glisk.workers import queries
from glisk.workers.connection import ConnectOptions, libpq_url
from glisk.workers.noop import handlers
from glisk.workers.stages import STAGES, StageName
from glisk.workers.worker import Worker

PATHS = ("spec", "raw_spec", "leased", "raw", "stage", "loop", "loop_c64")
CEILINGS = {"spec": "raw_spec", "leased": "raw", "loop": "stage", "loop_c64": "stage"}
IMAGE = STAGES[StageName.IMAGE]
# The spec path's two statements (get_pending_for_generation, then mark_generating's flush),
# written out: the ceiling for that path is the same SQL without the ORM.
LOCK_OLDEST = (
    "SELECT id FROM tokens_s0 WHERE status = 'detected' AND claimed_by IS NULL "
    "ORDER BY mint_timestamp, id LIMIT %(batch)s FOR UPDATE SKIP LOCKED"
)
MARK = "UPDATE tokens_s0 SET status = 'generating' WHERE id = ANY(%(ids)s)"
CLAIM = {"holder": "bench", "lease_seconds": 600, "max_attempts": 3}


async def unit_of_work(path: str, url: str, batch: int, seconds: float, ready: Ready) -> int:
    """``spec``: get_pending_for_generation + mark_generating; ``leased``: uow.leases.claim; a
    unit of work (and a commit) per batch."""
    factory = setup_db_session(url, pool_size=1, max_overflow=0)
    uow_factory, done = create_uow_factory(factory), 0
    async with uow_factory() as uow:  # the pool's connection opens before the clock
        await uow.session.execute(text("SELECT 1"))
    until = ready() + seconds
    while time.monotonic() < until:
        async with uow_factory() as uow:
            if path == "leased":
                done += len((await uow.leases.claim(IMAGE, batch=batch, **CLAIM)).claims)
            else:
                for token in await uow.tokens.get_pending_for_generation(batch):
                    token.mark_generating()
                    done += 1
    await engine_of(factory).dispose()
    return done


def raw_sql(path: str, url: str, batch: int, seconds: float, ready: Ready) -> int:
    """``raw``: the claim statement; ``stage``: the claim, then one fenced completion of the
    batch; ``raw_spec``: the spec path's SQL. psycopg, autocommit, prepared from the 5th call."""
    claim, complete, done = queries.claim(IMAGE, batch), queries.complete(IMAGE), 0
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        until = ready() + seconds
        while time.monotonic() < until:
            if path == "raw_spec":
                with conn.transaction():
                    ids = [row[0] for row in conn.execute(LOCK_OLDEST, {"batch": batch})]
                    done += len(ids)
                    conn.execute(MARK, {"ids": ids})
                continue
            rows = conn.execute(claim.encode(), CLAIM).fetchall()
            done += len(rows) if path == "raw" else 0
            if path == "stage" and rows:
                results = [f"/images/{row[1]}.png" for row in rows]
                params = {"claim_ids": [row[3] for row in rows], "results": results}
                done += len(conn.execute(complete.encode(), params).fetchall())
    return done


async def loop(concurrency: int | None, url: str, batch: int, seconds: float, ready: Ready) -> int:
    """The runtime: a Worker with the no-op image handler. It opens its connections lazily,
    inside the clock."""
    noop = handlers()[StageName.IMAGE]
    worker = Worker(IMAGE, noop, ConnectOptions(url), batch=batch, concurrency=concurrency)
    stop = asyncio.Event()
    ready()
    asyncio.get_running_loop().call_later(seconds, stop.set)
    return (await worker.run(stop)).completed


def timed(path: str, url: str, batch: int, seconds: float, ready: Ready) -> int:
    configure_logging("production", "WARNING")  # a log line per commit would be the benchmark
    if path in ("spec", "leased"):
        return asyncio.run(unit_of_work(path, url, batch, seconds, ready))
    if path.startswith("loop"):
        return asyncio.run(loop(64 if path == "loop_c64" else None, url, batch, seconds, ready))
    return raw_sql(path, url, batch, seconds, ready)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.claim_bench")
    parser.add_argument("--seconds", type=float, default=2.0, help="per cell")
    parser.add_argument("--workers", default="1,4,8", help="processes per cell")
    parser.add_argument("--batches", default="10")
    parser.add_argument("--tokens", type=int, default=150_000)
    args = parser.parse_args()
    workers, batches = (list(map(int, s.split(","))) for s in (args.workers, args.batches))
    cells: dict[tuple[str, int, int], Cell] = {}
    with database() as (_, url):
        seed(url, args.tokens)
        say(f"{server_line(url)}; {args.tokens} tokens; {args.seconds:g} s per cell")
        for key in [(p, b, n) for b in batches for n in workers for p in PATHS]:
            if key[0] == "loop_c64" and key[2] != 1:  # one process with concurrency 64
                continue
            reset(url)
            cell = cells[key] = run_processes(timed, [(key[0], url, key[1], args.seconds)] * key[2])
            if cell.moved >= args.tokens * 0.95:
                raise RuntimeError(f"{key} ran out of tokens: raise --tokens")
            say(f"  {key}: {cell.rate:,.0f} tokens/s")
    rates, cpu = [], []
    for b, n in [(b, n) for b in batches for n in workers]:
        row = {p: cells.get((p, b, n)) for p in PATHS}
        shown = [f"{c.rate:,.0f}" if c else "-" for c in row.values()]
        ceiling = [cells[(CEILINGS[p], b, n)].rate for p in CEILINGS]
        ratios = [
            f"{c.rate / r:.2f}" if (c := row[p]) else "-"
            for p, r in zip(CEILINGS, ceiling, strict=True)
        ]
        rates.append([b, n, *shown, *ratios])
        cpu.append([b, n, *(f"{c.cpu_ms:.3f}" if c else "-" for c in row.values())])
    print("tokens/s (ratios: to the ceiling measured in the same row)\n")
    print(table(["batch", "processes", *PATHS, *(f"{p}/{c}" for p, c in CEILINGS.items())], rates))
    print("\nworker CPU per token, ms (user + sys of the worker processes / tokens)\n")
    print(table(["batch", "processes", *PATHS], cpu))


if __name__ == "__main__":
    main()
