"""The worker runtime: claim throughput against raw-SQL ceilings (``claim``), drains side by side
with pgqueuer (``peer``), and the delay from insert to claim with and without LISTEN (``wake``)."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from argparse import Namespace
from datetime import datetime, timedelta
from typing import Any

import psycopg
from pgqueuer import PgQueuer, Queries
from pgqueuer.types import QueueExecutionMode

from bench.harness import (
    AUTHOR,
    Cell,
    Ready,
    database,
    percentile,
    query,
    reset,
    run_processes,
    say,
    seed,
    server_line,
    table,
    until,
    until_async,
)
from glisk.core.logs import configure_logging
from glisk.uow import UnitOfWork
from glisk.workers import queries
from glisk.workers.claims import Claim
from glisk.workers.connection import ConnectOptions, libpq_url
from glisk.workers.noop import handlers
from glisk.workers.stages import STAGES, StageName
from glisk.workers.worker import Worker

IMAGE, NOOP = STAGES[StageName.IMAGE], handlers()[StageName.IMAGE]
PATHS = ("spec", "raw_spec", "leased", "raw", "stage", "loop", "loop_c64")
CEILINGS = {"spec": "raw_spec", "leased": "raw", "loop": "stage", "loop_c64": "stage"}
CLAIM = {"holder": "bench", "lease_seconds": 600, "max_attempts": 3}
# The spec path's two statements (get_pending_for_generation, the flush of mark_generating)
# written out: its ceiling is the same SQL without the ORM.
LOCK_OLDEST = (
    "SELECT id FROM tokens_s0 WHERE status = 'detected' AND claimed_by IS NULL "
    "ORDER BY mint_timestamp, id LIMIT %(batch)s FOR UPDATE SKIP LOCKED"
)
MARK = "UPDATE tokens_s0 SET status = 'generating' WHERE id = ANY(%(ids)s)"


def timed(path: str, url: str, batch: int, seconds: float, ready: Ready) -> int:
    """One process of a ``claim`` cell: ``path`` for ``seconds``; the tokens it moved."""
    configure_logging("production", "WARNING")  # a log line per commit would be the benchmark

    async def spec(uow: UnitOfWork, _: int) -> int:
        tokens = await uow.tokens.get_pending_for_generation(batch)
        for token in tokens:
            token.mark_generating()
        return len(tokens)

    async def leased(uow: UnitOfWork, _: int) -> int:
        return len((await uow.leases.claim(IMAGE, batch=batch, **CLAIM)).claims)

    async def loop(concurrency: int | None) -> int:  # the runtime opens its connections lazily
        worker = Worker(IMAGE, NOOP, ConnectOptions(url), batch=batch, concurrency=concurrency)
        stop = asyncio.Event()
        ready()
        asyncio.get_running_loop().call_later(seconds, stop.set)
        return (await worker.run(stop)).completed

    if path in ("spec", "leased"):
        return asyncio.run(until_async(url, seconds, ready, spec if path == "spec" else leased))
    if path.startswith("loop"):
        return asyncio.run(loop(64 if path == "loop_c64" else None))
    claim, complete = queries.claim(IMAGE, batch).encode(), queries.complete(IMAGE).encode()
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:  # prepared from the 5th call

        def raw(_: int) -> int:
            if path == "raw_spec":
                with conn.transaction():
                    ids = [row[0] for row in conn.execute(LOCK_OLDEST, {"batch": batch})]
                    conn.execute(MARK, {"ids": ids})
                return len(ids)
            rows = conn.execute(claim, CLAIM).fetchall()
            if path == "raw" or not rows:
                return len(rows)
            done = {"claim_ids": [r[3] for r in rows], "results": [f"/{r[1]}.png" for r in rows]}
            return len(conn.execute(complete, done).fetchall())

        return until(seconds, ready, raw)


def claim(args: Namespace) -> None:
    workers, batches = ([int(n) for n in s.split(",")] for s in (args.workers, args.batches))
    grid = [(b, n) for b in batches for n in workers]
    cells: dict[tuple[str, int, int], Cell] = {}
    with database() as (_, url):
        seed(url, args.tokens)
        say(f"{server_line(url)}; {args.tokens} tokens; {args.seconds:g} s per cell")
        for (b, n), path in [(cell, path) for cell in grid for path in PATHS]:
            if path != "loop_c64" or n == 1:  # loop_c64: one process with concurrency 64
                reset(url)
                cell = run_processes(timed, [(path, url, b, args.seconds)] * n)
                cells[(path, b, n)] = cell
                say(f"  {path} batch {b} x{n}: {cell.rate:,.0f} tokens/s")
                if sum(cell.moved) >= args.tokens * 0.95:
                    raise RuntimeError(f"{path} ran out of tokens: raise --tokens")
    rates, cpu = [], []
    for b, n in grid:
        row = {p: cells.get((p, b, n)) for p in PATHS}
        ceilings = {p: cells[(c, b, n)].rate for p, c in CEILINGS.items()}
        ratios = [f"{c.rate / ceilings[p]:.2f}" if (c := row[p]) else "-" for p in CEILINGS]
        rates.append([b, n, *(f"{c.rate:,.0f}" if c else "-" for c in row.values()), *ratios])
        cpu.append([b, n, *(f"{c.cpu_ms:.3f}" if c else "-" for c in row.values())])
    print("tokens/s (ratios: to the ceiling measured in the same row)\n")
    print(table(["batch", "processes", *PATHS, *(f"{p}/{c}" for p, c in CEILINGS.items())], rates))
    print("\nworker CPU per token, ms (user + sys of the worker processes / tokens)\n")
    print(table(["batch", "processes", *PATHS], cpu))


# --- peer -------------------------------------------------------------------------------------

SYSTEMS = ("pgqueuer", "runtime")
COMMITS = "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
STATEMENTS = """SELECT calls, total_exec_time, query FROM pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND query NOT LIKE '%pg_stat_%' ORDER BY calls DESC"""


def drain(system: str, url: str, ready: Ready) -> tuple[int, float]:
    """One process of a ``peer`` cell: drain the queue. The clock stops at the last handler call:
    pgqueuer's drain mode idles about 4 s more before ``run()`` returns, not throughput."""
    configure_logging("production", "WARNING")
    done, last = 0, 0.0

    async def handler(job: Any) -> Any:
        nonlocal done, last
        done, last = done + 1, time.monotonic()
        return await NOOP(job) if isinstance(job, Claim) else None  # type: ignore[arg-type]

    async def run() -> None:
        if system == "runtime":
            worker = Worker(IMAGE, handler, ConnectOptions(url), batch=10)
            ready()
            await worker.run(exit_when_idle=True)
            return
        async with await psycopg.AsyncConnection.connect(libpq_url(url), autocommit=True) as conn:
            pgq = PgQueuer.from_psycopg_connection(conn)
            pgq.entrypoint("noop")(handler)
            ready()
            await pgq.run(batch_size=10, mode=QueueExecutionMode.drain)

    asyncio.run(run())
    return done, last


async def pgqueuer(url: str, action: str, jobs: int = 0) -> int:
    """``install`` pgqueuer's schema, or ``fill`` its queue with ``jobs`` no-op jobs; the jobs
    queued."""
    async with await psycopg.AsyncConnection.connect(libpq_url(url), autocommit=True) as conn:
        pgq = Queries.from_psycopg_connection(conn)
        if action == "install":
            await pgq.install()
        elif action == "fill":
            for clear in (pgq.clear_queue, pgq.clear_queue_log, pgq.clear_statistics_log):
                await clear()
            await pgq.enqueue(["noop"] * jobs, [None] * jobs, [0] * jobs)
        return sum(s.count for s in await pgq.queue_size())


def prepare(system: str, url: str, jobs: int) -> None:
    """Fill the queue (or reset the tokens), VACUUM ANALYZE, CHECKPOINT."""
    if system == "runtime":
        return reset(url)
    asyncio.run(pgqueuer(url, "fill", jobs))
    query(url, "VACUUM ANALYZE pgqueuer, pgqueuer_log, pgqueuer_statistics", "CHECKPOINT")
    return None


def check(system: str, url: str, cell: Cell, jobs: int) -> Cell:
    """Every job handled exactly once, none left behind."""
    left = asyncio.run(pgqueuer(url, "count"))
    if system == "runtime":
        sql = "SELECT count(*) FROM tokens_s0 WHERE image_path IS NULL OR claim_id IS NOT NULL"
        left = query(url, sql)[0][0]
    if left or sum(cell.moved) != jobs:
        raise RuntimeError(f"{system}: moved {sum(cell.moved)} of {jobs}, {left} left behind")
    return cell


def statements(system: str, url: str, jobs: int) -> list[list[object]]:
    """One drain by one process with pg_stat_statements on: statements and transactions per job
    (the transaction counter covers the whole database)."""
    prepare(system, url, jobs)
    ((before,),) = query(url, "SELECT pg_stat_statements_reset()", COMMITS)
    cell = run_processes(drain, [(system, url)])
    ((commits,),), found = query(url, COMMITS), query(url, STATEMENTS)
    per = 1 / sum(check(system, url, cell, jobs).moved)
    rows: list[list[object]] = [[system, "transactions", f"{(commits - before) * per:.3f}", ""]]
    every = (sum(r[0] for r in found), sum(r[1] for r in found), "all statements")
    for calls, ms, sql in [every, *found[:8]]:
        shown = " ".join(" ".join(line.split("--")[0] for line in sql.splitlines()).split())
        rows.append([system, shown[:90], f"{calls * per:.3f}", f"{ms * per * 1000:.1f}"])
    return rows


def peer(args: Namespace) -> None:
    processes = [int(n) for n in args.processes.split(",")]
    cells: dict[tuple[str, int], list[Cell]] = {}
    with database() as (server, url):
        if args.statements:  # the extension is loaded at server start
            query(url, "ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
            server.stop()
            server.start()
            query(url, "CREATE EXTENSION pg_stat_statements")
        asyncio.run(pgqueuer(url, "install"))
        seed(url, args.jobs)
        kinds = "SELECT string_agg(relname || '=' || relpersistence::text, ' ') FROM pg_class "
        kinds += "WHERE relname IN ('tokens_s0', 'pgqueuer', 'pgqueuer_log')"
        say(f"{server_line(url)}; tables {query(url, kinds)[0][0]} (p: logged)")
        for rep in range(args.repeat):
            for n in processes:
                for system in SYSTEMS if rep % 2 == 0 else SYSTEMS[::-1]:
                    prepare(system, url, args.jobs)
                    cell = check(system, url, run_processes(drain, [(system, url)] * n), args.jobs)
                    cells.setdefault((system, n), []).append(cell)
                    say(f"  rep {rep + 1} {system} x{n}: {cell.rate:,.0f}/s")
        found = [row for s in SYSTEMS if args.statements for row in statements(s, url, args.jobs)]
    rows = []
    for n in processes:
        pgq, ours = ([c.rate for c in cells[(s, n)]] for s in SYSTEMS)
        cpu = [f"{statistics.median(c.cpu_ms for c in cells[(s, n)]):.3f}" for s in SYSTEMS]
        rates = [
            (f"{statistics.median(r):,.0f}", f"{min(r):,.0f}-{max(r):,.0f}") for r in (pgq, ours)
        ]
        ratio = statistics.median(ours) / statistics.median(pgq)
        rows.append([n, *rates[0], *rates[1], f"{ratio:.2f}", *cpu])
    print(f"{args.jobs:,} jobs, batch 10, median of {args.repeat}\n")
    headers = ["processes", "pgqueuer jobs/s", "(min-max)", "runtime tokens/s", "(min-max)"]
    print(table([*headers, "runtime / pgqueuer", "pgqueuer CPU ms/job", "CPU ms/token"], rows))
    if found:
        print("\nStatements per job, one drain each, 1 process\n")
        print(table(["system", "statement", "per job", "server µs per job"], found))


# --- wake -------------------------------------------------------------------------------------

LEASE = 60.0
INSERT = """INSERT INTO tokens_s0 (id, token_id, author_id, minter_address, status, mint_timestamp,
    created_at) VALUES (gen_random_uuid(), %s, %s, '0x' || repeat('cd', 20), 'detected',
    now() AT TIME ZONE 'utc', now() AT TIME ZONE 'utc') RETURNING created_at"""


async def delays(url: str, listen: bool, token_ids: range, rng: random.Random) -> list[float]:
    """ms from each insert's now() to its claim's now() (the lease start): one database clock."""
    claimed: dict[int, datetime] = {}
    inserted: dict[int, datetime] = {}
    all_claimed = asyncio.Event()

    async def handler(claim: Claim) -> str:
        claimed[claim.token_id] = claim.lease_expires_at - timedelta(seconds=LEASE)
        if len(claimed) == len(token_ids):
            all_claimed.set()
        return f"/images/{claim.token_id}.png"

    options = {"batch": 10, "lease_seconds": LEASE, "poll_interval": 1.0, "listen": listen}
    worker = Worker(IMAGE, handler, ConnectOptions(url), **options)
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    if worker.listener is not None:
        await asyncio.wait_for(worker.listener.listening.wait(), 10)
    await asyncio.sleep(1.5)  # the worker has found nothing and sleeps: it is idle
    async with await psycopg.AsyncConnection.connect(libpq_url(url), autocommit=True) as conn:
        for token_id in token_ids:
            await asyncio.sleep(rng.uniform(0.05, 0.5))
            row = await (await conn.execute(INSERT, (token_id, AUTHOR))).fetchone()
            inserted[token_id] = row[0]  # type: ignore[index]
    await asyncio.wait_for(all_claimed.wait(), 10)
    stop.set()
    if (completed := (await running).completed) != len(token_ids):
        raise RuntimeError(f"{completed} of {len(token_ids)} tokens completed")
    return [(claimed[t] - inserted[t]).total_seconds() * 1000 for t in token_ids]


def wake(args: Namespace) -> None:
    configure_logging("production", "WARNING")
    rng, rows, n = random.Random(12), [], args.tokens
    with database(20) as (_, url):
        seed(url)
        say(server_line(url))
        for first, listen in ((1, True), (1 + n, False)):
            ms = asyncio.run(delays(url, listen, range(first, first + n), rng))
            mode = "LISTEN + poll every 1 s" if listen else "poll every 1 s (listen=False)"
            stats = [percentile(ms, 50), percentile(ms, 99), statistics.fmean(ms), max(ms)]
            rows.append([mode, len(ms), *(f"{x:,.1f}" for x in stats)])
    print("Delay from insert to claim, ms (database clock: the claim's now() - the insert's)\n")
    print(table(["worker", "tokens", "p50", "p99", "mean", "max"], rows))
