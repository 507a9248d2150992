"""Side by side with a peer: the same number of no-op jobs drained through pgqueuer (psycopg
driver) and tokens through the image stage of the glisk worker runtime, on one PostgreSQL server,
interleaved. Method notes: docs/benchmarks.md.

    cd backend && uv run python -m bench.peer_bench                 # ~3 min
    cd backend && uv run python -m bench.peer_bench --statements    # + statements per token
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import sys
from collections.abc import Sequence
from typing import Any

import psycopg

from bench._common import Cell, load_line, markdown_table, run_processes, workdir
from bench.claim_bench import SEED, reset, server_line
from bench.claim_workers import drain
from bench.http_bench import start_database
from glisk.workers.connection import libpq_url

SYSTEMS = ("pgqueuer", "runtime")
PGQ_TABLES = ("pgqueuer", "pgqueuer_log", "pgqueuer_statistics")


async def _pgqueuer(dsn: str, action: str, jobs: int = 0) -> Any:
    from pgqueuer import Queries

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        q = Queries.from_psycopg_connection(conn)
        if action == "install":
            await q.install()
        elif action == "fill":
            await q.clear_queue()
            await q.clear_queue_log()
            await q.clear_statistics_log()
            await q.enqueue(["noop"] * jobs, [None] * jobs, [0] * jobs)
        else:
            return sum(s.count for s in await q.queue_size())
    return None


def prepare(system: str, dsn: str, jobs: int) -> None:
    if system == "runtime":
        reset(dsn)
        return
    asyncio.run(_pgqueuer(dsn, "fill", jobs))
    with psycopg.connect(dsn, autocommit=True) as conn:
        for table in PGQ_TABLES:
            conn.execute(f"VACUUM ANALYZE {table}")  # type: ignore[arg-type]
        conn.execute("CHECKPOINT")


def check(system: str, dsn: str, cell: Cell, jobs: int) -> None:
    """A drain must have moved every job exactly once and left nothing behind."""
    if system == "runtime":
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FILTER (WHERE image_path IS NULL OR claim_id IS NOT NULL) "
                "FROM tokens_s0"
            ).fetchone()
        left = row[0] if row else -1
    else:
        left = asyncio.run(_pgqueuer(dsn, "size"))
    if left or cell.moved != jobs:
        raise RuntimeError(f"{system}: moved {cell.moved} of {jobs}, {left} left behind")


def statements(context: Any, dsn: str, url: str, args: argparse.Namespace) -> str:
    """One drain per system with pg_stat_statements on: statements and transactions per job."""
    rows = []
    for system in SYSTEMS:
        prepare(system, dsn, args.jobs)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_stat_statements_reset()")
            before = conn.execute(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
            ).fetchone()
        cell = run_processes(context, drain, [(system, url, args.batch)])
        with psycopg.connect(dsn, autocommit=True) as conn:
            after = conn.execute(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
            ).fetchone()
            found = conn.execute(
                "SELECT calls, total_exec_time, query FROM pg_stat_statements "
                "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
                "AND query NOT LIKE '%pg_stat_%' ORDER BY calls DESC"
            ).fetchall()
        assert before is not None
        assert after is not None
        per = 1 / cell.moved
        rows.append(
            [
                system,
                "all statements",
                f"{sum(r[0] for r in found) * per:.3f}",
                f"{sum(r[1] for r in found) * per * 1000:.1f}",
            ]
        )
        rows.append(
            [system, "transactions (pg_stat_database)", f"{(after[0] - before[0]) * per:.3f}", ""]
        )
        for calls, ms, query in found[: args.top]:
            text = " ".join(line.split("--")[0] for line in query.split("\n")).split()
            rows.append(
                [system, f"`{' '.join(text)[:90]}`", f"{calls * per:.3f}", f"{ms * per * 1000:.1f}"]
            )
    return markdown_table(["system", "statement", "per job", "server µs per job"], rows, "llrr")


def run(args: argparse.Namespace) -> int:
    processes = [int(n) for n in args.processes.split(",")]
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["bench.claim_workers", "pgqueuer"])
    with workdir("glisk-peer-bench-") as tmp:
        server, url = start_database(tmp, max_connections=100)
        try:
            dsn = libpq_url(url)
            if args.statements:
                with psycopg.connect(dsn, autocommit=True) as conn:
                    conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
                server.stop()
                server.start()
                with psycopg.connect(dsn, autocommit=True) as conn:
                    conn.execute("CREATE EXTENSION pg_stat_statements")
            asyncio.run(_pgqueuer(dsn, "install"))
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(SEED.format(count=int(args.jobs)))  # type: ignore[arg-type]
                logged = conn.execute(
                    "SELECT string_agg(relname || '=' || relpersistence::text, ' ') "
                    "FROM pg_class WHERE relname IN ('tokens_s0', 'pgqueuer', 'pgqueuer_log')"
                ).fetchone()
            print(
                f"{server_line(dsn)}; tables {logged[0] if logged else '?'} (p = logged); "
                f"{args.jobs} jobs, batch {args.batch}; {load_line()}",
                flush=True,
            )
            cells: dict[tuple[str, int], list[Cell]] = {}
            for rep in range(args.repeat):
                for n in processes:
                    order = SYSTEMS if rep % 2 == 0 else SYSTEMS[::-1]
                    for system in order:
                        prepare(system, dsn, args.jobs)
                        cell = run_processes(context, drain, [(system, url, args.batch)] * n)
                        check(system, dsn, cell, args.jobs)
                        cells.setdefault((system, n), []).append(cell)
                        print(f"  rep {rep + 1} {system} x{n}: {cell.rate:,.0f}/s", flush=True)
            rows = []
            for n in processes:
                pgq, ours = (statistics.median(c.rate for c in cells[(s, n)]) for s in SYSTEMS)
                cpu = [statistics.median(c.cpu_ms for c in cells[(s, n)]) for s in SYSTEMS]
                rates = [[c.rate for c in cells[(s, n)]] for s in SYSTEMS]
                spread = [f"{min(r):,.0f}-{max(r):,.0f}" for r in rates]
                rows.append(
                    [
                        str(n),
                        f"{pgq:,.0f}",
                        spread[0],
                        f"{ours:,.0f}",
                        spread[1],
                        f"{ours / pgq:.2f}",
                        f"{cpu[0]:.3f}",
                        f"{cpu[1]:.3f}",
                    ]
                )
            print()
            print(
                markdown_table(
                    [
                        "processes",
                        "pgqueuer jobs/s",
                        "(min-max)",
                        "runtime tokens/s",
                        "(min-max)",
                        "runtime / pgqueuer",
                        "pgqueuer CPU ms/job",
                        "runtime CPU ms/token",
                    ],
                    rows,
                )
            )
            print(f"\nmedian of {args.repeat}; {load_line()}")
            if args.statements:
                print(f"\n{statements(context, dsn, url, args)}")
        finally:
            server.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peer_bench")
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--processes", default="1,4,8")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--statements", action="store_true", help="pg_stat_statements per job")
    parser.add_argument("--top", type=int, default=8, help="statements listed per system")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
