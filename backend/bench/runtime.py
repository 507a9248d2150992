"""Writers in parallel processes: claim throughput against raw-SQL ceilings (``claim``), drains
side by side with pgqueuer (``peer``), the delay from insert to claim with and without LISTEN
(``wake``), mints through ``record_mint`` against the raw INSERT and the gap query (``mint``)."""

from __future__ import annotations

import asyncio
import random
import time
from argparse import Namespace
from datetime import datetime, timedelta
from statistics import fmean, median
from typing import TYPE_CHECKING, Any

import psycopg
from pgqueuer import PgQueuer, Queries
from pgqueuer.types import QueueExecutionMode
from sqlalchemy import text

from bench.harness import database, percentile, query, reset, run_processes, say, seed, table, until
from glisk.core.database import engine_of, setup_db_session
from glisk.core.logs import configure_logging
from glisk.models import MintLog
from glisk.pipeline import STAGES, StageName
from glisk.standins.mint_feed import MintFeed
from glisk.uow import UnitOfWork, create_uow_factory
from glisk.workers import queries
from glisk.workers.claims import Claim
from glisk.workers.connection import ConnectOptions, libpq_url
from glisk.workers.noop import handlers
from glisk.workers.worker import Worker

if TYPE_CHECKING:
    from bench.harness import Ready

IMAGE, NOOP = STAGES[StageName.IMAGE], handlers()[StageName.IMAGE]
PATHS = ("spec", "raw_spec", "leased", "raw", "stage", "loop", "loop_c64")
RATIOS = [("spec", "raw_spec"), ("leased", "raw"), ("loop", "stage"), ("loop_c64", "stage")]
CLAIM = {"holder": "bench", "lease_seconds": 600, "max_attempts": 3}
# The spec path's two statements (get_pending_for_generation, the flush of mark_generating)
# written out: its ceiling is the same SQL without the ORM.
LOCK_OLDEST = "SELECT id FROM tokens_s0 WHERE status = 'detected' AND claimed_by IS NULL "
LOCK_OLDEST += "ORDER BY mint_timestamp, id LIMIT %(batch)s FOR UPDATE SKIP LOCKED"
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
        return asyncio.run(until(url, seconds, ready, spec if path == "spec" else leased))
    if path.startswith("loop"):
        return asyncio.run(loop(64 if path == "loop_c64" else None))
    claim, complete = queries.claim(IMAGE, batch).encode(), queries.complete(IMAGE).encode()
    done = 0
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:  # prepared from the 5th call
        end = ready() + seconds
        while time.monotonic() < end:
            if path == "raw_spec":
                with conn.transaction():
                    ids = [row[0] for row in conn.execute(LOCK_OLDEST, {"batch": batch})]
                    conn.execute(MARK, {"ids": ids})
                done += len(ids)
                continue
            rows = conn.execute(claim, CLAIM).fetchall()
            if path == "raw" or not rows:
                done += len(rows)
                continue
            results = {"claim_ids": [r[3] for r in rows], "results": [f"{r[1]}.png" for r in rows]}
            done += len(conn.execute(complete, results).fetchall())
    return done


def claim(args: Namespace) -> None:
    workers, batches = ([int(n) for n in s.split(",")] for s in (args.workers, args.batches))
    grid, cells = [(b, n) for b in batches for n in workers], {}
    with database() as (_, url):
        seed(url, args.tokens)
        for (b, n), path in [(cell, path) for cell in grid for path in PATHS]:
            if path != "loop_c64" or n == 1:  # loop_c64: one process with concurrency 64
                reset(url)
                cell = run_processes(timed, [(path, url, b, args.seconds)] * n)
                cells.setdefault((b, n), {})[path] = cell
                say(f"  {path} batch {b} x{n}: {cell.rate:,.0f} tokens/s")
                if sum(cell.moved) >= args.tokens * 0.95:
                    raise RuntimeError(f"{path} ran out of tokens: raise --tokens")
    rates, cpu = [], []
    for (b, n), row in cells.items():
        ratios = [f"{row[p].rate / row[c].rate:.2f}" if p in row else "-" for p, c in RATIOS]
        rates.append([b, n, *(f"{row[p].rate:,.0f}" if p in row else "-" for p in PATHS), *ratios])
        cpu.append([b, n, *(f"{row[p].cpu_ms:.3f}" if p in row else "-" for p in PATHS)])
    print(f"tokens/s, {args.seconds:g} s per cell; ratios: to the ceiling in the same row\n")
    print(table(["batch", "processes", *PATHS, *(f"{p}/{c}" for p, c in RATIOS)], rates))
    print("\nworker CPU per token, ms (user + sys of the worker processes / tokens)\n")
    print(table(["batch", "processes", *PATHS], cpu))


# --- peer -------------------------------------------------------------------------------------

SYSTEMS = ("pgqueuer", "runtime")
COMMITS = "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
STATEMENTS = """SELECT calls, total_exec_time, query FROM pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND query NOT LIKE '%pg_stat_%' ORDER BY calls DESC"""


def drain(system: str, url: str, ready: Ready) -> tuple[int, float]:
    """One process of a ``peer`` cell: drain the queue; the clock stops at the last handler call."""
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
    """``install`` pgqueuer's schema, or ``fill`` its queue with no-op jobs; the jobs queued."""
    async with await psycopg.AsyncConnection.connect(libpq_url(url), autocommit=True) as conn:
        pgq = Queries.from_psycopg_connection(conn)
        if action == "install":
            await pgq.install()
        elif action == "fill":
            for clear in (pgq.clear_queue, pgq.clear_queue_log, pgq.clear_statistics_log):
                await clear()
            await pgq.enqueue(["noop"] * jobs, [None] * jobs, [0] * jobs)
        return sum(s.count for s in await pgq.queue_size())


def peer_drain(system: str, url: str, jobs: int, processes: int, stats: bool = False) -> tuple:
    """Fill the queue (or reset the tokens); drain; check every job was handled once. With
    ``stats``: the drain's transactions and statements, as (calls, ms, what)."""
    if system == "runtime":
        reset(url)
    else:
        asyncio.run(pgqueuer(url, "fill", jobs))
        query(url, "VACUUM ANALYZE pgqueuer, pgqueuer_log, pgqueuer_statistics", "CHECKPOINT")
    before = query(url, "SELECT pg_stat_statements_reset()", COMMITS) if stats else [(0,)]
    cell = run_processes(drain, [(system, url)] * processes)
    commits = query(url, COMMITS)[0][0] - before[0][0]
    found = [(commits, None, "transactions"), *query(url, STATEMENTS)] if stats else []
    left = asyncio.run(pgqueuer(url, "count"))
    if system == "runtime":
        sql = "SELECT count(*) FROM tokens_s0 WHERE image_path IS NULL OR claim_id IS NOT NULL"
        left = query(url, sql)[0][0]
    if left or sum(cell.moved) != jobs:
        raise RuntimeError(f"{system}: moved {sum(cell.moved)} of {jobs}, {left} left behind")
    return cell, found


def peer(args: Namespace) -> None:
    processes, cells, found = [int(n) for n in args.processes.split(",")], {}, []
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
        say(f"tables (p: logged): {query(url, kinds)[0][0]}")
        for rep in range(args.repeat):
            for n in processes:
                for system in SYSTEMS if rep % 2 == 0 else SYSTEMS[::-1]:
                    cell = peer_drain(system, url, args.jobs, n)[0]
                    cells.setdefault((system, n), []).append(cell)
                    say(f"  rep {rep + 1} {system} x{n}: {cell.rate:,.0f}/s")
        for system in SYSTEMS if args.statements else ():  # one drain each, 1 process
            cell, stats = peer_drain(system, url, args.jobs, 1, stats=True)
            total = (sum(r[0] for r in stats[1:]), sum(r[1] for r in stats[1:]), "all statements")
            for calls, ms, sql in [total, *stats[:9]]:
                shown = " ".join(" ".join(line.split("--")[0] for line in sql.splitlines()).split())
                per_job = [f"{calls / args.jobs:.3f}", f"{ms * 1000 / args.jobs:.1f}" if ms else ""]
                found.append([system, shown[:90], *per_job])
    rows = []
    for n in processes:
        pgq, ours = ([c.rate for c in cells[(s, n)]] for s in SYSTEMS)
        cpu = [f"{median(c.cpu_ms for c in cells[(s, n)]):.3f}" for s in SYSTEMS]
        spread = [(f"{median(r):,.0f}", f"{min(r):,.0f}-{max(r):,.0f}") for r in (pgq, ours)]
        rows.append([n, *spread[0], *spread[1], f"{median(ours) / median(pgq):.2f}", *cpu])
    print(f"{args.jobs:,} jobs, batch 10, median of {args.repeat}\n")
    headers = ["processes", "pgqueuer jobs/s", "(min-max)", "runtime tokens/s", "(min-max)"]
    print(table([*headers, "runtime / pgqueuer", "pgqueuer CPU ms/job", "CPU ms/token"], rows))
    if found:
        print("\nStatements per job, one drain each, 1 process\n")
        print(table(["system", "statement", "per job", "server µs per job"], found))


# --- wake -------------------------------------------------------------------------------------

INSERT = """INSERT INTO tokens_s0 (id, token_id, author_id, minter_address, status, mint_timestamp,
    created_at) SELECT gen_random_uuid(), %s, id, '0x' || repeat('cd', 20), 'detected',
    now() AT TIME ZONE 'utc', now() AT TIME ZONE 'utc' FROM authors RETURNING created_at"""


async def delays(url: str, listen: bool, token_ids: range, rng: random.Random) -> list[float]:
    """ms from each insert's now() to its claim's now() (the lease start): one database clock."""
    claimed: dict[int, datetime] = {}
    inserted: dict[int, datetime] = {}
    all_claimed = asyncio.Event()

    async def handler(claim: Claim) -> str:
        claimed[claim.token_id] = claim.lease_expires_at - timedelta(seconds=60)
        if len(claimed) == len(token_ids):
            all_claimed.set()
        return f"/images/{claim.token_id}.png"

    options = {"batch": 10, "lease_seconds": 60, "poll_interval": 1.0, "listen": listen}
    worker = Worker(IMAGE, handler, ConnectOptions(url), **options)
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    if worker.listener is not None:
        await asyncio.wait_for(worker.listener.listening.wait(), 10)
    await asyncio.sleep(1.5)  # the worker has found nothing and sleeps: it is idle
    async with await psycopg.AsyncConnection.connect(libpq_url(url), autocommit=True) as conn:
        for token_id in token_ids:
            await asyncio.sleep(rng.uniform(0.05, 0.5))
            row = await (await conn.execute(INSERT, (token_id,))).fetchone()
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
        for first, listen in ((1, True), (1 + n, False)):
            ms = asyncio.run(delays(url, listen, range(first, first + n), rng))
            mode = "LISTEN + poll every 1 s" if listen else "poll every 1 s (listen=False)"
            stats = [percentile(ms, 50), percentile(ms, 99), fmean(ms), max(ms)]
            rows.append([mode, len(ms), *(f"{x:,.1f}" for x in stats)])
    print("Delay from insert to claim, ms (database clock: the claim's now() - the insert's)\n")
    print(table(["worker", "tokens", "p50", "p99", "mean", "max"], rows))


# --- mint -------------------------------------------------------------------------------------

# The ceiling: the mint_events row and its tokens, nothing checked.
RAW = (
    """INSERT INTO mint_events (id, tx_hash, log_index, block_number, block_timestamp, token_id,
    quantity, detected_at) VALUES (gen_random_uuid(), %(tx_hash)s, %(log_index)s,
    %(block_number)s, %(block_timestamp)s, %(start_token_id)s, %(quantity)s, now())""",
    """INSERT INTO tokens_s0 (id, token_id, author_id, minter_address, mint_timestamp, created_at)
    SELECT gen_random_uuid(), n, (SELECT id FROM authors WHERE lower(wallet_address) =
    lower(%(author)s)), %(minter)s, %(block_timestamp)s, now()
    FROM generate_series(%(start_token_id)s, %(start_token_id)s + %(quantity)s - 1) AS n""",
)
AUTHORS = """INSERT INTO authors (id, wallet_address, prompt_text, created_at)
SELECT gen_random_uuid(), w, 'a bench prompt', now() FROM unnest(%s::text[]) AS w"""
GAPS = """INSERT INTO tokens_s0 (id, token_id, author_id, minter_address, mint_timestamp)
SELECT gen_random_uuid(), n, (SELECT id FROM authors LIMIT 1), rpad('0x', 42, 'ab'), now()
FROM generate_series(1, 1000000) AS n WHERE n % 10000 > 0"""
ANTI_JOIN = text("""SELECT n FROM generate_series(1, 1000000) AS n
WHERE NOT EXISTS (SELECT FROM tokens_s0 WHERE token_id = n) LIMIT 1000""")


def record(path: str, url: str, logs: list[MintLog], seconds: float, ready: Ready) -> int:
    """One process of a ``mint`` cell: ``raw`` INSERTs, or record_mint, ``again`` and again."""
    configure_logging("production", "WARNING")

    async def record_mint(uow: UnitOfWork, done: int) -> int:
        if path == "record" and done == len(logs):
            return 0
        await uow.mint_events.record_mint(logs[done % len(logs)])
        return 1

    if path != "raw":
        return asyncio.run(until(url, seconds, ready, record_mint))
    with psycopg.connect(libpq_url(url)) as conn:
        done, end = 0, ready() + seconds
        while time.monotonic() < end and done < len(logs):
            with conn.transaction():
                for statement in RAW:
                    conn.execute(statement, vars(logs[done]))
            done += 1
    return done


async def gap_queries(url: str) -> list[list[object]]:
    """The gap query and the anti-join, each 5 times on a warm connection: the median ms."""
    factory, rows = setup_db_session(url, pool_size=1), []
    async with create_uow_factory(factory)() as uow:
        for name, call in (
            ("`tokens.missing_token_ids(1_000_000)`", lambda: uow.tokens.missing_token_ids(10**6)),
            ("`generate_series` anti-join (`NOT EXISTS`)", lambda: uow.session.execute(ANTI_JOIN)),
        ):
            ms = []
            for _ in range(5):
                started = time.perf_counter()
                if len(list(await call())) != 100:
                    raise RuntimeError(f"{name} did not find the 100 missing ids")
                ms.append((time.perf_counter() - started) * 1000)
            rows.append([name, f"{median(ms):,.0f}"])
    await engine_of(factory).dispose()
    return rows


def mint(args: Namespace) -> None:
    configure_logging("production", "WARNING")  # the gap queries' units of work log at INFO
    logs, rows = MintFeed.generate(tokens=150_000, seed=1, authors=50).logs, []
    with database(50) as (_, url):
        query(url, AUTHORS, params=(sorted({log.author.lower() for log in logs}),))
        for n in (1, 8):
            slices, rates = [list(logs[i::n]) for i in range(n)], {}
            for path in ("raw", "record", "again"):
                if path == "again":  # redeliveries of what record recorded
                    done = set(query(url, "SELECT tx_hash, log_index FROM mint_events"))
                    slices = [[g for g in s if (g.tx_hash, g.log_index) in done] for s in slices]
                else:
                    query(url, "TRUNCATE mint_events, tokens_s0 CASCADE")
                jobs = [(path, url, part, args.seconds) for part in slices]
                rates[path] = run_processes(record, jobs).rate
            shown = [f"{rates[path]:,.0f}" for path in ("raw", "record", "again")]
            rows.append([n, *shown[:2], f"{rates['record'] / rates['raw']:.2f}", shown[2]])
        query(url, "TRUNCATE mint_events, tokens_s0 CASCADE", GAPS, "VACUUM ANALYZE tokens_s0")
        gaps = asyncio.run(gap_queries(url))
    print(f"Mint logs per second, {args.seconds:g} s per cell\n")
    print(table(["processes", "raw INSERT", "record_mint", "record/raw", "again"], rows), "\n")
    print(table(["gap query: 1,000,000 ids, 100 missing, vacuumed", "ms, median of 5"], gaps))
