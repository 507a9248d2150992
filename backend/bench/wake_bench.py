"""The delay from a token becoming claimable to its claim, with and without LISTEN: one idle worker
(poll interval 1 s), tokens inserted one at a time at random intervals. Method notes:
docs/benchmarks.md.

    cd backend && uv run python -m bench.wake_bench     # ~1 min
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
from collections.abc import Sequence
from datetime import datetime, timedelta

import psycopg

from bench._common import load_line, markdown_table, percentile, workdir
from bench.claim_bench import server_line
from bench.http_bench import start_database
from glisk.core.logs import configure_logging
from glisk.core.timezone import enforce_utc
from glisk.workers.claims import Claim
from glisk.workers.connection import ConnectOptions, libpq_url
from glisk.workers.stages import StageName
from glisk.workers.worker import Worker

LEASE = 60.0
AUTHOR = "00000000-0000-0000-0000-000000000001"
INSERT = """
INSERT INTO tokens_s0 (id, token_id, author_id, minter_address, status, mint_timestamp, created_at)
VALUES (gen_random_uuid(), %(token_id)s, %(author)s, '0x' || repeat('cd', 20), 'detected',
        now() AT TIME ZONE 'utc', now() AT TIME ZONE 'utc')
RETURNING created_at
"""


async def delays(
    url: str, listen: bool, tokens: int, first: int, rng: random.Random
) -> list[float]:
    """Seconds from each insert's now() to its claim's now(), both the database clock."""
    claimed: dict[int, datetime] = {}
    inserted: dict[int, datetime] = {}
    all_claimed = asyncio.Event()

    async def handler(claim: Claim) -> str:
        claimed[claim.token_id] = claim.lease_expires_at - timedelta(seconds=LEASE)
        if len(claimed) == tokens:
            all_claimed.set()
        return f"/images/{claim.token_id}.png"

    worker = Worker(
        StageName.IMAGE,
        handler,
        ConnectOptions(url),
        batch=10,
        lease_seconds=LEASE,
        poll_interval=1.0,
        listen=listen,
    )
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    if worker.listener is not None:
        await asyncio.wait_for(worker.listener.listening.wait(), 10)
    await asyncio.sleep(1.5)  # the worker has found nothing and sleeps: it is idle
    async with await psycopg.AsyncConnection.connect(libpq_url(url), autocommit=True) as conn:
        for token_id in range(first, first + tokens):
            await asyncio.sleep(rng.uniform(0.05, 0.5))
            cursor = await conn.execute(INSERT, {"token_id": token_id, "author": AUTHOR})
            row = await cursor.fetchone()
            assert row is not None
            inserted[token_id] = row[0]
    await asyncio.wait_for(all_claimed.wait(), 10)
    stop.set()
    stats = await running
    if stats.completed != tokens:
        raise RuntimeError(f"{stats.completed} of {tokens} tokens completed")
    return [(claimed[t] - inserted[t]).total_seconds() for t in inserted]


async def run(url: str, args: argparse.Namespace) -> list[list[str]]:
    rng = random.Random(args.seed)
    rows = []
    for n, listen in enumerate((True, False)):
        found = await delays(url, listen, args.tokens, 1 + n * args.tokens, rng)
        ms = [1000 * d for d in found]
        rows.append(
            [
                "LISTEN + poll every 1 s" if listen else "poll every 1 s (listen=False)",
                str(len(ms)),
                f"{percentile(ms, 50):.1f}",
                f"{percentile(ms, 99):.1f}",
                f"{statistics.fmean(ms):.1f}",
                f"{max(ms):.1f}",
            ]
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.wake_bench")
    parser.add_argument("--tokens", type=int, default=100, help="per mode")
    parser.add_argument("--seed", type=int, default=12)
    args = parser.parse_args(argv)
    enforce_utc()
    configure_logging("production", "WARNING")
    with workdir("glisk-wake-bench-") as tmp:
        server, url = start_database(tmp, max_connections=20)
        try:
            with psycopg.connect(libpq_url(url), autocommit=True) as conn:
                conn.execute(
                    "INSERT INTO authors (id, wallet_address, prompt_text, created_at) VALUES "
                    f"('{AUTHOR}', '0x' || repeat('ab', 20), 'a bench prompt', now())"
                )
            print(f"{server_line(libpq_url(url))}; {load_line()}", flush=True)
            rows = asyncio.run(run(url, args))
        finally:
            server.stop()
    print()
    print("Delay from insert to claim, ms (database clock: the claim's now() - the insert's)")
    print()
    print(markdown_table(["worker", "tokens", "p50", "p99", "mean", "max"], rows))
    print(f"\n{load_line()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
