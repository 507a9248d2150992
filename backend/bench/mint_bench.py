"""Mint logs/s through record_mint (new; ``again``: redelivered) next to the raw INSERT of the same
rows, 1 and 8 processes, a transaction per log; the gap query at 1M tokens next to an anti-join.
Embedded PostgreSQL, durable: cd backend && uv run python -m bench.mint_bench [SECONDS] (~1 min)"""

import asyncio
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, LiteralString

import psycopg
from sqlalchemy import text

from bench.http_bench import start_database
from glisk.core.database import engine_of, setup_db_session
from glisk.core.logs import configure_logging
from glisk.models import MintLog
from glisk.standins.mint_feed import MintFeed
from glisk.uow import create_uow_factory

RAW: list[LiteralString] = [
    """INSERT INTO mint_events (id, tx_hash, log_index, block_number, block_timestamp, token_id,
    quantity, detected_at) VALUES (gen_random_uuid(), %(tx_hash)s, %(log_index)s,
    %(block_number)s, %(block_timestamp)s, %(start_token_id)s, %(quantity)s, now())""",
    """INSERT INTO tokens_s0 (id, token_id, author_id, minter_address, mint_timestamp, created_at)
    SELECT gen_random_uuid(), n, (SELECT id FROM authors WHERE lower(wallet_address) =
    lower(%(author)s)), %(minter)s, %(block_timestamp)s, now()
    FROM generate_series(%(start_token_id)s, %(start_token_id)s + %(quantity)s - 1) AS n""",
]
AUTHORS = """INSERT INTO authors (id, wallet_address, prompt_text, created_at)
SELECT gen_random_uuid(), w, 'a bench prompt', now() FROM unnest(%(wallets)s::text[]) AS w"""
SEED_GAPS = """TRUNCATE mint_events, tokens_s0 CASCADE; INSERT INTO tokens_s0 (id, token_id,
author_id, minter_address, mint_timestamp) SELECT gen_random_uuid(), n, (SELECT id FROM authors
LIMIT 1), rpad('0x', 42, 'ab'), now() FROM generate_series(1, 1000000) AS n WHERE n % 10000 > 0"""
HEADER = "| processes | raw INSERT | record_mint | record/raw | again |\n|---:|---:|---:|---:|---:|"
ROW = "| {} | {raw:,.0f} | {record:,.0f} | {ratio:.2f} | {again:,.0f} |"
GAP = """SELECT n FROM generate_series(1, 1000000) AS n
WHERE NOT EXISTS (SELECT FROM tokens_s0 WHERE token_id = n) LIMIT 1000"""


async def _record(url: str, logs: list[MintLog], until: float, path: str) -> int:
    configure_logging("production", "WARNING")
    factory, done = setup_db_session(url, pool_size=1), 0
    uow_factory = create_uow_factory(factory)
    while logs and time.time() < until and (path == "again" or done < len(logs)):
        async with uow_factory() as uow:
            await uow.mint_events.record_mint(logs[done % len(logs)])
        done += 1
    await engine_of(factory).dispose()
    return done


def worker(path: str, url: str, logs: list[dict[str, Any]], start: float, seconds: float) -> int:
    time.sleep(max(0.0, start - time.time()))
    until = time.time() + seconds  # from its own start: a late process still works `seconds`
    if path != "raw":
        return asyncio.run(_record(url, [MintLog.from_json(r) for r in logs], until, path))
    done = 0
    with psycopg.connect(url.replace("+psycopg", "")) as conn:
        while time.time() < until and done < len(logs):
            with conn.transaction():
                for statement in RAW:
                    conn.execute(statement, vars(MintLog.from_json(logs[done])))
            done += 1
    return done


async def _gaps(url: str) -> None:
    factory = setup_db_session(url, pool_size=1)
    async with create_uow_factory(factory)() as uow:
        for name, query in (
            ("missing_token_ids", lambda: uow.tokens.missing_token_ids(10**6)),
            ("generate_series anti-join", lambda: uow.session.execute(text(GAP))),
        ):
            times = []
            for _ in range(5):
                started = time.perf_counter()
                assert len(list(await query())) == 100
                times.append(time.perf_counter() - started)
            print(f"| {name} | {sorted(times)[2] * 1000:.0f} |")  # the median
    await engine_of(factory).dispose()


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    feed = MintFeed.generate(tokens=150_000, seed=1, authors=50)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["bench.http_bench", "glisk.uow", "glisk.standins.mint_feed"])
    with tempfile.TemporaryDirectory(prefix="glisk-mint-bench-") as tmp:
        server, url = start_database(Path(tmp), max_connections=50)
        admin = psycopg.connect(url.replace("+psycopg", ""), autocommit=True)
        try:
            admin.execute(AUTHORS, {"wallets": sorted({g.author.lower() for g in feed.logs})})
            print(HEADER)
            for n in (1, 8):
                slices = [[g.to_json() for g in feed.logs[i::n]] for i in range(n)]
                rates: dict[str, float] = {}
                for path in ("raw", "record", "again"):  # again: redeliver what record recorded
                    if path != "again":
                        admin.execute("TRUNCATE mint_events, tokens_s0 CASCADE")
                    t0 = time.time() + 1.0  # all forked by then (once the forkserver runs)
                    with context.Pool(n) as pool:
                        counts = pool.starmap(worker, [(path, url, s, t0, seconds) for s in slices])
                    rates[path] = sum(counts) / seconds
                    slices = [s[:count] for s, count in zip(slices, counts, strict=True)]
                print(ROW.format(n, ratio=rates["record"] / rates["raw"], **rates), flush=True)
            admin.execute(SEED_GAPS)
            admin.execute("VACUUM ANALYZE tokens_s0")
            print("\n| gap query: 1,000,000 ids, 100 missing | median of 5, ms |\n|---|---:|")
            asyncio.run(_gaps(url))
        finally:
            admin.close()
            server.stop()


if __name__ == "__main__":
    main()
