"""Mint logs per second recorded through ``record_mint`` (new, and redelivered: ``again``) next to
the raw INSERT of the same rows, by 1 and 8 processes, a transaction per log; and the gap query at
1,000,000 tokens next to a generate_series anti-join."""

from __future__ import annotations

import asyncio
import time
from argparse import Namespace

import psycopg
from sqlalchemy import text

from bench.harness import (
    Ready,
    database,
    query,
    run_processes,
    say,
    server_line,
    table,
    until,
    until_async,
)
from glisk.core.database import engine_of, setup_db_session
from glisk.core.logs import configure_logging
from glisk.models import MintLog
from glisk.standins.mint_feed import MintFeed
from glisk.uow import UnitOfWork, create_uow_factory
from glisk.workers.connection import libpq_url

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


def worker(path: str, url: str, logs: list[MintLog], seconds: float, ready: Ready) -> int:
    """One process of a cell: ``raw`` INSERTs, ``record`` (each log once) or ``again`` (the logs
    over and over) through record_mint; the logs it recorded."""
    configure_logging("production", "WARNING")

    async def record(uow: UnitOfWork, done: int) -> int:
        if path == "record" and done == len(logs):
            return 0
        await uow.mint_events.record_mint(logs[done % len(logs)])
        return 1

    if path != "raw":
        return asyncio.run(until_async(url, seconds, ready, record))
    with psycopg.connect(libpq_url(url)) as conn:

        def insert(done: int) -> int:
            if done == len(logs):
                return 0
            with conn.transaction():
                for statement in RAW:
                    conn.execute(statement, vars(logs[done]))
            return 1

        return until(seconds, ready, insert)


async def gap_queries(url: str) -> list[list[object]]:
    """Each query 5 times on a warm connection: the median ms."""
    factory = setup_db_session(url, pool_size=1)
    rows: list[list[object]] = []
    async with create_uow_factory(factory)() as uow:
        for name, call in (
            ("`tokens.missing_token_ids(1_000_000)`", lambda: uow.tokens.missing_token_ids(10**6)),
            ("`generate_series` anti-join (`NOT EXISTS`)", lambda: uow.session.execute(ANTI_JOIN)),
        ):
            times = []
            for _ in range(5):
                started = time.perf_counter()
                if len(list(await call())) != 100:
                    raise RuntimeError(f"{name} did not find the 100 missing ids")
                times.append((time.perf_counter() - started) * 1000)
            rows.append([name, f"{sorted(times)[2]:,.0f}"])
    await engine_of(factory).dispose()
    return rows


def mint(args: Namespace) -> None:
    seconds = args.seconds
    configure_logging("production", "WARNING")  # the gap queries' units of work log at INFO
    logs = MintFeed.generate(tokens=150_000, seed=1, authors=50).logs
    rows = []
    with database(50) as (_, url):
        query(url, AUTHORS, params=(sorted({log.author.lower() for log in logs}),))
        say(server_line(url))
        for n in (1, 8):
            slices, rates = [list(logs[i::n]) for i in range(n)], {}
            for path in ("raw", "record", "again"):
                if path == "again":  # redeliveries of what record recorded
                    done = set(query(url, "SELECT tx_hash, log_index FROM mint_events"))
                    slices = [[g for g in s if (g.tx_hash, g.log_index) in done] for s in slices]
                else:
                    query(url, "TRUNCATE mint_events, tokens_s0 CASCADE")
                jobs = [(path, url, part, seconds) for part in slices]
                rates[path] = run_processes(worker, jobs).rate
            shown = [f"{rates[path]:,.0f}" for path in ("raw", "record", "again")]
            rows.append([n, *shown[:2], f"{rates['record'] / rates['raw']:.2f}", shown[2]])
        query(url, "TRUNCATE mint_events, tokens_s0 CASCADE", GAPS, "VACUUM ANALYZE tokens_s0")
        gaps = asyncio.run(gap_queries(url))
    print(f"Mint logs per second, {seconds:g} s per cell\n")
    print(table(["processes", "raw INSERT", "record_mint", "record/raw", "again"], rows))
    print(
        "\n"
        + table(["gap query: 1,000,000 token ids, 100 missing, vacuumed", "ms, median of 5"], gaps)
    )
