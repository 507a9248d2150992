"""``glisk status`` at table size: one status read (``glisk.ops.status.collect``, every statement
the command sends) on a seeded table, with the revealed total estimated and counted, next to a
``SELECT 1`` round trip; the command as a process; and what each statement reads.

    cd backend && uv run python -m bench.status_bench --size 1000000 --iterations 50
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable

import psycopg

from bench.harness import AUTHOR, database, percentile, query, quiet_env, say, seed, table
from glisk.ops.status import FAILED_BY_REASON, STAGE_NAMES, STATUS_COUNTS, collect, stage_counts
from glisk.workers.connection import libpq_url

# 97% revealed, 1% failed (three reasons and stages), 1% detected (a tenth in backoff), 0.6%
# generating (half of them leased over 8 holders, a fifth of the leases expired), 0.2% uploading,
# 0.2% ready.
SEED = """
INSERT INTO tokens_s0 (id, token_id, author_id, minter_address, status, mint_timestamp,
    image_path, metadata_cid, reveal_tx_hash, claimed_by, claim_id, lease_expires_at, not_before,
    attempts, error_data, created_at)
SELECT gen_random_uuid(), g, %(author)s, '0x' || repeat('2', 40),
    CAST(s.status AS token_status_enum), timestamp '2025-01-01' + make_interval(secs => g),
    CASE WHEN s.status IN ('uploading', 'ready', 'revealed')
              OR (s.status = 'generating' AND g %% 3 = 0)
         THEN '/images/' || g || '.png' END,
    CASE WHEN s.status IN ('ready', 'revealed') THEN 'bafy' || g END,
    CASE WHEN s.status = 'revealed' THEN '0x' || lpad(to_hex(g), 64, '0') END,
    CASE WHEN s.status IN ('generating', 'uploading') OR (s.status = 'ready' AND g %% 10 = 0)
         THEN 'worker-' || (g %% 8) END,
    CASE WHEN s.leased THEN gen_random_uuid() END,
    CASE WHEN s.leased THEN timezone('utc', now())
         + CASE WHEN g %% 5 = 0 THEN interval '-1 minute' ELSE interval '5 minutes' END END,
    CASE WHEN s.status = 'detected' AND g %% 20 = 0
         THEN timezone('utc', now()) + interval '1 hour' END,
    CASE WHEN s.status = 'failed' THEN 3 ELSE 0 END,
    CASE WHEN s.status = 'failed' THEN jsonb_build_object(
        'reason', (ARRAY['max_attempts_exceeded', 'permanent_error', 'gave_up'])[g %% 3 + 1],
        'stage', (ARRAY['image', 'upload', 'reveal'])[g %% 3 + 1]) END,
    now()
FROM generate_series(1, %(size)s) AS g,
LATERAL (SELECT CASE
    WHEN g %% 1000 < 970 THEN 'revealed'
    WHEN g %% 1000 < 980 THEN 'failed'
    WHEN g %% 1000 < 990 THEN 'detected'
    WHEN g %% 1000 < 996 THEN 'generating'
    WHEN g %% 1000 < 998 THEN 'uploading'
    ELSE 'ready' END AS status) AS s0,
LATERAL (SELECT s0.status,
    s0.status IN ('generating', 'uploading') AND g %% 2 = 0 AS leased) AS s"""


def timed(call: Callable[[], object], iterations: int) -> list[str]:
    """p50 and p99 ms of ``iterations`` calls after a warm one (plans cached, pages in memory)."""
    call()
    times = []
    for _ in range(iterations):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return [f"{percentile(times, 50):.2f}", f"{percentile(times, 99):.2f}"]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.status_bench")
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--iterations", type=int, default=50)
    args = parser.parse_args()
    n = args.iterations
    with database() as (_, url):
        started = time.perf_counter()
        seed(url)
        query(url, SEED, params={"author": AUTHOR, "size": args.size})
        query(url, "VACUUM (ANALYZE) tokens_s0")
        say(f"seeded {args.size:,} tokens in {time.perf_counter() - started:.0f} s")
        with psycopg.connect(libpq_url(url), autocommit=True) as conn:
            say(f"statuses: {collect(conn, exact=True).statuses}")
            statements = [(f"stage {name}", stage_counts(name)) for name in STAGE_NAMES]
            statements += [("status counts", STATUS_COUNTS), ("failed by reason", FAILED_BY_REASON)]
            for name, sql in statements:
                plan = conn.execute(f"EXPLAIN (ANALYZE, COSTS OFF) {sql}".encode()).fetchall()
                reads = [r[0].strip() for r in plan if "Scan" in r[0] or "Execution" in r[0]]
                say(f"{name}: " + " | ".join(reads))
            rows = [
                ["`SELECT 1` round trip (baseline)", *timed(lambda: conn.execute("SELECT 1"), n)],
                ["status read, revealed total estimated", *timed(lambda: collect(conn), n)],
                ["status read, `--exact`", *timed(lambda: collect(conn, exact=True), n)],
            ]
        command = [sys.executable, "-m", "glisk.cli", "status", "--json"]
        run = {"env": quiet_env(DATABASE_URL=url), "check": True, "capture_output": True}
        (p50, _) = timed(lambda: subprocess.run(command, **run), 5)  # the median of 5
        rows.append(["`glisk status --json` as a process, start-up included", p50, "-"])
    print(table([f"operation at {args.size:,} tokens", "p50 ms", "p99 ms"], rows))


if __name__ == "__main__":
    main()
