"""``glisk status`` at table size: the time of one status read (``glisk.ops.status.collect``) on a
seeded table, next to a ``SELECT 1`` round trip measured in the same run, with the revealed total
estimated (default) and counted (``--exact``), and the whole command as a process.

    cd backend && uv run python -m bench.status_bench --size 1000000 --iterations 50

Seed (SQL, generate_series): 97% revealed; 1% failed (three reasons, three stages); 1%
detected (a tenth in backoff); 0.6% generating (half leased over 8 holders, a fifth of those
expired); 0.2% uploading; 0.2% ready. A throwaway embedded server, migrated, VACUUM ANALYZEd
once after seeding.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import psycopg

from bench._common import percentile
from glisk import migrations
from glisk.embedded_pg import ephemeral_server
from glisk.ops.status import collect
from glisk.workers.connection import libpq_url

SEED = """
INSERT INTO authors (id, wallet_address, prompt_text, created_at)
VALUES ('00000000-0000-0000-0000-000000000001', '0x' || repeat('1', 40), 'a benchmark prompt',
        now());
INSERT INTO tokens_s0 (id, token_id, author_id, minter_address, status, mint_timestamp,
    image_path, metadata_cid, reveal_tx_hash, claimed_by, claim_id, lease_expires_at, not_before,
    attempts, error_data, created_at)
SELECT gen_random_uuid(), g, '00000000-0000-0000-0000-000000000001', '0x' || repeat('2', 40),
    CAST(s.status AS token_status_enum), timestamp '2025-01-01' + make_interval(secs => g),
    CASE WHEN s.status IN ('uploading', 'ready', 'revealed')
              OR (s.status = 'generating' AND g % 3 = 0)
         THEN '/images/' || g || '.png' END,
    CASE WHEN s.status IN ('ready', 'revealed') THEN 'bafy' || g END,
    CASE WHEN s.status = 'revealed' THEN '0x' || lpad(to_hex(g), 64, '0') END,
    CASE WHEN s.status IN ('generating', 'uploading') OR (s.status = 'ready' AND g % 10 = 0)
         THEN 'worker-' || (g % 8) END,
    CASE WHEN s.leased THEN gen_random_uuid() END,
    CASE WHEN s.leased THEN timezone('utc', now())
         + CASE WHEN g % 5 = 0 THEN interval '-1 minute' ELSE interval '5 minutes' END END,
    CASE WHEN s.status = 'detected' AND g % 20 = 0
         THEN timezone('utc', now()) + interval '1 hour' END,
    CASE WHEN s.status = 'failed' THEN 3 ELSE 0 END,
    CASE WHEN s.status = 'failed' THEN jsonb_build_object(
        'reason', (ARRAY['max_attempts_exceeded', 'permanent_error', 'gave_up'])[g % 3 + 1],
        'stage', (ARRAY['image', 'upload', 'reveal'])[g % 3 + 1]) END,
    now()
FROM generate_series(1, %(size)s) AS g,
LATERAL (SELECT CASE
    WHEN g % 1000 < 970 THEN 'revealed'
    WHEN g % 1000 < 980 THEN 'failed'
    WHEN g % 1000 < 990 THEN 'detected'
    WHEN g % 1000 < 996 THEN 'generating'
    WHEN g % 1000 < 998 THEN 'uploading'
    ELSE 'ready' END AS status) AS s0,
LATERAL (SELECT s0.status,
    s0.status IN ('generating', 'uploading') AND g % 2 = 0 AS leased) AS s;
"""


def plans() -> list[tuple[str, str]]:
    from glisk.ops.status import FAILED_BY_REASON, STAGE_NAMES, STATUS_COUNTS, stage_counts

    out = [(f"stage {name}", stage_counts(name)) for name in STAGE_NAMES]
    return [*out, ("status counts", STATUS_COUNTS), ("failed by reason", FAILED_BY_REASON)]


def timed(call: Callable[[], Any], iterations: int) -> tuple[float, float]:
    call()  # warm: plans cached, pages in shared buffers
    times: list[float] = []
    for _ in range(iterations):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return percentile(times, 50), percentile(times, 99)


def main() -> int:
    parser = argparse.ArgumentParser(description="glisk status at table size")
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--iterations", type=int, default=50)
    args = parser.parse_args()
    server = ephemeral_server()
    server.start()
    try:
        url = server.url_for("postgres")
        migrations.upgrade(url)
        dsn = libpq_url(url)
        started = time.perf_counter()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(SEED.replace("%(size)s", str(args.size)).encode())
            conn.execute(b"VACUUM (ANALYZE) tokens_s0")
        print(f"seeded {args.size:,} tokens in {time.perf_counter() - started:.0f} s")
        with psycopg.connect(dsn, autocommit=True) as conn:
            counts = collect(conn, exact=True).statuses
            print("statuses:", counts)
            for label, statement in plans():
                plan = conn.execute(f"EXPLAIN (ANALYZE, COSTS OFF) {statement}".encode()).fetchall()
                scans = [r[0].strip() for r in plan if "Scan" in r[0] or "Execution" in r[0]]
                print(f"{label}: " + " | ".join(scans))
            rows = [
                (
                    "SELECT 1 (round trip, baseline)",
                    timed(lambda: conn.execute(b"SELECT 1"), args.iterations),
                ),
                (
                    "glisk status read (revealed estimated)",
                    timed(lambda: collect(conn), args.iterations),
                ),
                (
                    "glisk status read --exact",
                    timed(lambda: collect(conn, exact=True), args.iterations),
                ),
            ]
        env = {
            **os.environ,
            "DATABASE_URL": url,
            "LOG_LEVEL": "WARNING",
            "GLISK_ENV_FILE": os.devnull,
        }
        command = [sys.executable, "-m", "glisk.cli", "status", "--json"]
        process_times: list[float] = []
        for _ in range(5):
            started = time.perf_counter()
            subprocess.run(command, env=env, check=True, capture_output=True)
            process_times.append((time.perf_counter() - started) * 1000)
        print(f"\n| operation at {args.size:,} tokens | p50 ms | p99 ms |\n|---|---|---|")
        for name, (p50, p99) in rows:
            print(f"| {name} | {p50:.2f} | {p99:.2f} |")
        print(
            f"| `glisk status --json` as a process (5 runs, median; start-up included) | "
            f"{sorted(process_times)[2]:.0f} | - |"
        )
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
