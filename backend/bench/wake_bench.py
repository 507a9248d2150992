"""The delay from a token becoming claimable to its claim, with and without LISTEN: one idle worker
(poll interval 1 s), tokens inserted one at a time at random intervals.

    cd backend && uv run python -m bench.wake_bench
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
from datetime import datetime, timedelta

import psycopg

from bench.harness import AUTHOR, database, percentile, say, seed, server_line, table
from glisk.core.logs import configure_logging
from glisk.workers.claims import Claim
from glisk.workers.connection import ConnectOptions, libpq_url
from glisk.workers.stages import StageName
from glisk.workers.worker import Worker

LEASE = 60.0
INSERT = """INSERT INTO tokens_s0 (id, token_id, author_id, minter_address, status, mint_timestamp,
    created_at) VALUES (gen_random_uuid(), %s, %s, '0x' || repeat('cd', 20), 'detected',
    now() AT TIME ZONE 'utc', now() AT TIME ZONE 'utc') RETURNING created_at"""


async def delays(url: str, listen: bool, token_ids: range, rng: random.Random) -> list[float]:
    """Seconds from each insert's now() to its claim's now() (the lease start): both the
    database clock."""
    claimed: dict[int, datetime] = {}
    inserted: dict[int, datetime] = {}
    all_claimed = asyncio.Event()

    async def handler(claim: Claim) -> str:
        claimed[claim.token_id] = claim.lease_expires_at - timedelta(seconds=LEASE)
        if len(claimed) == len(token_ids):
            all_claimed.set()
        return f"/images/{claim.token_id}.png"

    options = {"batch": 10, "lease_seconds": LEASE, "poll_interval": 1.0, "listen": listen}
    worker = Worker(StageName.IMAGE, handler, ConnectOptions(url), **options)
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
    return [(claimed[t] - inserted[t]).total_seconds() for t in token_ids]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.wake_bench")
    parser.add_argument("--tokens", type=int, default=100, help="per mode")
    args = parser.parse_args()
    configure_logging("production", "WARNING")
    rng, rows, n = random.Random(12), [], args.tokens
    with database(20) as (_, url):
        seed(url)
        say(server_line(url))
        for first, listen in ((1, True), (1 + n, False)):
            ms = [1000 * d for d in asyncio.run(delays(url, listen, range(first, first + n), rng))]
            mode = "LISTEN + poll every 1 s" if listen else "poll every 1 s (listen=False)"
            stats = [percentile(ms, 50), percentile(ms, 99), statistics.fmean(ms), max(ms)]
            rows.append([mode, len(ms), *(f"{x:,.1f}" for x in stats)])
    print("Delay from insert to claim, ms (database clock: the claim's now() - the insert's)\n")
    print(table(["worker", "tokens", "p50", "p99", "mean", "max"], rows))


if __name__ == "__main__":
    main()
