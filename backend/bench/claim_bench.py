"""Claim throughput: tokens per second taken and moved one stage (detected -> generating) by N
worker processes, by four paths, next to the SQL ceiling measured in the same run.

    cd backend && uv run python -m bench.claim_bench                 # ~2 min, 2 s per cell
    cd backend && uv run python -m bench.claim_bench --profile loop  # + a pyinstrument profile

Paths (each in N separate processes, forked from a forkserver that imported everything once):

- ``spec``:  the transactional pattern: a unit of work, ``get_pending_for_generation(batch)``
  (FOR UPDATE SKIP LOCKED), ``mark_generating()`` on each token, commit.
- ``leased``: ``uow.leases.claim(...)``: the one-statement leased claim through the unit of work
  (claim and mark in one UPDATE ... FROM (SELECT ... FOR UPDATE SKIP LOCKED) RETURNING), commit.
- ``raw``:   the very same claim statement sent by psycopg directly (autocommit, prepared after
  the fifth call): no ORM, no SQLAlchemy, no unit of work. The ceiling for ``leased``.
- ``raw_spec``: the two statements of the spec path (SELECT ... FOR UPDATE SKIP LOCKED, then
  UPDATE ... WHERE id = ANY) in one transaction by psycopg directly. The ceiling for ``spec``.
- ``loop``:  ``run_worker`` with a no-op handler: claim, then complete each token (a fenced
  SELECT ... FOR UPDATE and the state machine), i.e. the whole image stage per token.

The database is an embedded PostgreSQL with durable settings (fsync on, synchronous_commit on):
every commit waits for its WAL flush, as in production. Between cells the tokens are reset to
'detected' and the table vacuumed, so every cell starts from the same state.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg

from bench.claim_workers import RUNNERS, raw, worker
from bench.http_bench import start_database
from glisk.core.logs import configure_logging
from glisk.core.timezone import enforce_utc

PATHS = ("spec", "raw_spec", "leased", "raw", "loop")
# The loop completes every token too (a second, fenced transaction per token), so it is shown
# beside the claim paths but not as a ratio to the claim-only ceiling.
CEILINGS = {"spec": "raw_spec", "leased": "raw"}
SEED_AUTHOR = """
INSERT INTO authors (id, wallet_address, prompt_text, created_at)
VALUES ('00000000-0000-0000-0000-000000000001', '0x' || repeat('ab', 20), 'a bench prompt', now())
"""
SEED = """
INSERT INTO tokens_s0 (id, token_id, author_id, minter_address, status, mint_timestamp, created_at)
SELECT gen_random_uuid(), g, '00000000-0000-0000-0000-000000000001', '0x' || repeat('cd', 20),
       'detected', timestamp '2025-01-01' + g * interval '1 second', now()
FROM generate_series(1, %(count)s) AS g
"""
RESET = """
UPDATE tokens_s0 SET status = 'detected', claim_id = NULL, lease_expires_at = NULL,
       claimed_by = NULL, attempts = 0, image_path = NULL
WHERE status <> 'detected' OR image_path IS NOT NULL
"""


def _reset(url: str) -> None:
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(RESET)
        conn.execute("VACUUM ANALYZE tokens_s0")


def _cell(context: Any, path: str, url: str, workers: int, batch: int, seconds: float) -> float:
    _reset(url)
    start = time.time() + 0.5  # time for the processes to fork and connect
    with context.Pool(workers) as pool:
        counts = pool.starmap(worker, [(path, url, batch, start, seconds)] * workers)
    return sum(counts) / seconds


def _profile(url: str, path: str, batch: int, seconds: float) -> str:
    from pyinstrument import Profiler

    _reset(url)
    enforce_utc()
    configure_logging("production", "WARNING")
    profiler = Profiler(async_mode="enabled")
    profiler.start()
    if path == "raw":
        raw(url, batch, time.time() + seconds)
    else:
        asyncio.run(RUNNERS[path](url, batch, time.time() + seconds))
    profiler.stop()
    return profiler.output_text(unicode=False, color=False, show_all=False)


def _table(
    results: dict[tuple[str, int, int], float],
    paths: list[str],
    batches: list[int],
    workers_list: list[int],
) -> str:
    """Markdown: tokens/s per path, then each ORM path as a ratio to its raw-SQL ceiling."""
    ratio_paths = [p for p in paths if p in CEILINGS and CEILINGS[p] in paths]
    header = ["batch", "workers", *paths, *(f"{p}/{CEILINGS[p]}" for p in ratio_paths)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for batch in batches:
        for workers in workers_list:
            rates = [results[(p, batch, workers)] for p in paths]
            ratios = [
                results[(p, batch, workers)] / results[(CEILINGS[p], batch, workers)]
                if results[(CEILINGS[p], batch, workers)]
                else 0.0
                for p in ratio_paths
            ]
            cells = [str(batch), str(workers), *(f"{r:,.0f}" for r in rates)]
            cells += [f"{r:.2f}" for r in ratios]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    workers_list = [int(n) for n in args.workers.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    paths = args.paths.split(",")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["bench.claim_workers"])
    with tempfile.TemporaryDirectory(prefix="glisk-claim-bench-") as tmp:
        server, url = start_database(Path(tmp), max_connections=100)
        try:
            dsn = url.replace("postgresql+psycopg://", "postgresql://")
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(SEED_AUTHOR)
                conn.execute(SEED, {"count": args.tokens})  # type: ignore[arg-type]
                version, fsync, sync_commit = conn.execute(
                    "SELECT current_setting('server_version'), current_setting('fsync'), "
                    "current_setting('synchronous_commit')"
                ).fetchone() or ("?", "?", "?")
            print(
                f"PostgreSQL {version}, fsync={fsync}, synchronous_commit={sync_commit}; "
                f"{args.tokens} tokens; {args.seconds:g} s per cell; "
                "tokens/s moved detected -> generating",
                flush=True,
            )
            results: dict[tuple[str, int, int], float] = {}
            for batch in batches:
                for workers in workers_list:
                    for path in paths:
                        rate = _cell(context, path, url, workers, batch, args.seconds)
                        results[(path, batch, workers)] = rate
                        if rate * args.seconds >= args.tokens * 0.95:
                            print(
                                f"warning: {path} b={batch} n={workers} ran out of tokens",
                                flush=True,
                            )
            print()
            print(_table(results, paths, batches, workers_list))
            if args.profile:
                print(
                    f"\npyinstrument profile: path {args.profile}, 1 process, batch "
                    f"{batches[-1]}, {args.seconds:g} s\n"
                )
                print(_profile(url, args.profile, batches[-1], args.seconds))
        finally:
            server.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.claim_bench")
    parser.add_argument("--seconds", type=float, default=2.0, help="per cell")
    parser.add_argument("--workers", default="1,4,8,16")
    parser.add_argument("--batches", default="1,10")
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--tokens", type=int, default=150_000)
    parser.add_argument("--profile", choices=PATHS, help="profile one path in one process")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
