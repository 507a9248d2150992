"""Side by side with a peer: the same number of no-op jobs drained by pgqueuer (psycopg driver)
and tokens by the image stage of the glisk worker runtime, on one PostgreSQL server, interleaved;
with ``--statements``, the statements and transactions each sends per job.

    cd backend && uv run python -m bench.peer_bench --statements
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import psycopg
from pgqueuer import PgQueuer, Queries
from pgqueuer.models import Job
from pgqueuer.types import QueueExecutionMode

from bench.harness import (
    Cell,
    Ready,
    database,
    query,
    reset,
    run_processes,
    say,
    seed,
    server_line,
    table,
)
from glisk.core.logs import configure_logging
from glisk.workers.claims import Claim
from glisk.workers.connection import ConnectOptions, libpq_url
from glisk.workers.noop import handlers
from glisk.workers.stages import StageName
from glisk.workers.worker import Worker

SYSTEMS = ("pgqueuer", "runtime")
COMMITS = "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
STATEMENTS = """SELECT calls, total_exec_time, query FROM pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND query NOT LIKE '%%pg_stat_%%' ORDER BY calls DESC"""


async def drain_async(system: str, url: str, ready: Ready) -> tuple[int, float]:
    """Drain the queue; the clock stops at the last handler call (pgqueuer's drain mode idles
    about 4 s more before ``run()`` returns, which is not throughput)."""
    done, last, noop = 0, 0.0, handlers()[StageName.IMAGE]

    async def handler(job: Job | Claim) -> Any:
        nonlocal done, last
        done, last = done + 1, time.monotonic()
        return await noop(job) if isinstance(job, Claim) else None  # type: ignore[arg-type]

    if system == "runtime":
        worker = Worker(StageName.IMAGE, handler, ConnectOptions(url), batch=10)
        ready()
        return (await worker.run(exit_when_idle=True)).completed, last
    async with await psycopg.AsyncConnection.connect(libpq_url(url), autocommit=True) as conn:
        pgq = PgQueuer.from_psycopg_connection(conn)
        pgq.entrypoint("noop")(handler)
        ready()
        await pgq.run(batch_size=10, mode=QueueExecutionMode.drain)
    return done, last


def drain(system: str, url: str, ready: Ready) -> tuple[int, float]:
    configure_logging("production", "WARNING")
    return asyncio.run(drain_async(system, url, ready))


async def pgqueuer(url: str, action: str, jobs: int = 0) -> int:
    async with await psycopg.AsyncConnection.connect(libpq_url(url), autocommit=True) as conn:
        queries = Queries.from_psycopg_connection(conn)
        if action == "install":
            await queries.install()
        elif action == "fill":
            await queries.clear_queue()
            await queries.clear_queue_log()
            await queries.clear_statistics_log()
            await queries.enqueue(["noop"] * jobs, [None] * jobs, [0] * jobs)
        return sum(s.count for s in await queries.queue_size())


def prepare(system: str, url: str, jobs: int) -> None:
    """Fill the queue (or reset the tokens), VACUUM ANALYZE, CHECKPOINT."""
    if system == "runtime":
        reset(url)
    else:
        asyncio.run(pgqueuer(url, "fill", jobs))
        query(url, "VACUUM ANALYZE pgqueuer, pgqueuer_log, pgqueuer_statistics", "CHECKPOINT")


def check(system: str, url: str, cell: Cell, jobs: int) -> None:
    """Every job handled exactly once, none left behind."""
    left = asyncio.run(pgqueuer(url, "size"))
    if system == "runtime":
        sql = "SELECT count(*) FROM tokens_s0 WHERE image_path IS NULL OR claim_id IS NOT NULL"
        left = query(url, sql)[0][0]
    if left or cell.moved != jobs:
        raise RuntimeError(f"{system}: moved {cell.moved} of {jobs}, {left} left behind")


def statements(url: str, jobs: int) -> list[list[object]]:
    """One drain per system with pg_stat_statements on: statements, transactions per job."""
    rows: list[list[object]] = []
    for system in SYSTEMS:
        prepare(system, url, jobs)
        ((before,),) = query(url, "SELECT pg_stat_statements_reset()", COMMITS)
        cell = run_processes(drain, [(system, url)])
        ((after,),), found = query(url, COMMITS), query(url, STATEMENTS)
        check(system, url, cell, jobs)
        per = 1 / cell.moved
        total = (sum(r[0] for r in found), sum(r[1] for r in found), "all statements")
        for calls, ms, text in [total, *found[:8]]:
            shown = " ".join(" ".join(line.split("--")[0] for line in text.splitlines()).split())
            rows.append([system, shown[:90], f"{calls * per:.3f}", f"{ms * per * 1000:.1f}"])
        rows.append([system, "transactions (xact_commit)", f"{(after - before) * per:.3f}", ""])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peer_bench")
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--processes", default="1,4,8")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--statements", action="store_true", help="pg_stat_statements per job")
    args = parser.parse_args()
    processes = [int(n) for n in args.processes.split(",")]
    cells: dict[tuple[str, int], list[Cell]] = {}
    with database() as (server, url):
        if args.statements:  # the extension must be loaded at server start
            query(url, "ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
            server.stop()
            server.start()
            query(url, "CREATE EXTENSION pg_stat_statements")
        asyncio.run(pgqueuer(url, "install"))
        seed(url, args.jobs)
        ((logged,),) = query(
            url,
            "SELECT string_agg(relname || '=' || relpersistence::text, ' ') FROM pg_class "
            "WHERE relname IN ('tokens_s0', 'pgqueuer', 'pgqueuer_log')",
        )
        say(f"{server_line(url)}; tables {logged} (p = logged)")
        for rep in range(args.repeat):
            for n in processes:
                for system in SYSTEMS if rep % 2 == 0 else SYSTEMS[::-1]:
                    prepare(system, url, args.jobs)
                    cell = run_processes(drain, [(system, url)] * n)
                    check(system, url, cell, args.jobs)
                    cells.setdefault((system, n), []).append(cell)
                    say(f"  rep {rep + 1} {system} x{n}: {cell.rate:,.0f}/s")
        rows = []
        for n in processes:
            by_system = [cells[(s, n)] for s in SYSTEMS]
            rates = [[c.rate for c in cs] for cs in by_system]
            pgq, ours = (statistics.median(r) for r in rates)
            spread = [f"{min(r):,.0f}-{max(r):,.0f}" for r in rates]
            cpu = [f"{statistics.median(c.cpu_ms for c in cs):.3f}" for cs in by_system]
            ratio = f"{ours / pgq:.2f}"
            rows.append([n, f"{pgq:,.0f}", spread[0], f"{ours:,.0f}", spread[1], ratio, *cpu])
        print(f"{args.jobs:,} jobs, batch 10, median of {args.repeat}\n")
        headers = ["processes", "pgqueuer jobs/s", "(min-max)", "runtime tokens/s", "(min-max)"]
        headers += ["runtime / pgqueuer", "pgqueuer CPU ms/job", "runtime CPU ms/token"]
        print(table(headers, rows))
        if args.statements:
            print("\nStatements per job, one drain each, 1 process\n")
            headers = ["system", "statement", "per job", "server µs per job"]
            print(table(headers, statements(url, args.jobs)))


if __name__ == "__main__":
    main()
