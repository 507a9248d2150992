"""Claim throughput: tokens per second taken (and, for the whole-stage paths, completed) by N worker
processes, next to raw-SQL ceilings measured in the same run. Method notes: docs/benchmarks.md.

    cd backend && uv run python -m bench.claim_bench                 # ~2 min
    cd backend && uv run python -m bench.claim_bench --profile loop  # + a pyinstrument profile
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from collections.abc import Sequence

import psycopg

from bench._common import Cell, load_line, markdown_table, run_processes, workdir
from bench.claim_workers import timed
from bench.http_bench import start_database
from glisk.workers.connection import libpq_url

PATHS = ("spec", "raw_spec", "leased", "raw", "stage", "loop", "loop_c64")
ONE_PROCESS = {"loop_c64"}  # one process with concurrency=64, whatever the row says
CEILINGS = {"spec": "raw_spec", "leased": "raw", "loop": "stage", "loop_c64": "stage"}
SEED = """
INSERT INTO authors (id, wallet_address, prompt_text, created_at)
VALUES ('00000000-0000-0000-0000-000000000001', '0x' || repeat('ab', 20), 'a bench prompt', now());
INSERT INTO tokens_s0 (id, token_id, author_id, minter_address, status, mint_timestamp, created_at)
SELECT gen_random_uuid(), g, '00000000-0000-0000-0000-000000000001', '0x' || repeat('cd', 20),
       'detected', timestamp '2025-01-01' + g * interval '1 second', now()
FROM generate_series(1, {count}) AS g
"""
RESET = """
UPDATE tokens_s0 SET status = 'detected', claim_id = NULL, lease_expires_at = NULL,
       claimed_by = NULL, attempts = 0, deferrals = 0, not_before = NULL, image_path = NULL
WHERE status <> 'detected' OR claimed_by IS NOT NULL
"""


def reset(dsn: str) -> None:
    """Every cell starts from the same state: tokens reset, table vacuumed, a checkpoint taken
    (so none lands inside a cell)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(RESET)
        conn.execute("VACUUM ANALYZE tokens_s0")
        conn.execute("CHECKPOINT")


def server_line(dsn: str) -> str:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT current_setting('server_version'), current_setting('fsync'), "
            "current_setting('synchronous_commit')"
        ).fetchone()
    assert row is not None
    return f"PostgreSQL {row[0]}, fsync={row[1]}, synchronous_commit={row[2]}"


def _tables(
    results: dict[tuple[str, int, int], Cell],
    paths: list[str],
    batches: list[int],
    workers_list: list[int],
) -> str:
    ratios = [p for p in paths if CEILINGS.get(p) in paths]
    rows, cpu_rows = [], []
    for batch in batches:
        for workers in workers_list:
            cells = [results.get((p, batch, workers)) for p in paths]
            key = [str(batch), str(workers)]
            rows.append(
                key
                + [f"{c.rate:,.0f}" if c else "-" for c in cells]
                + [
                    f"{c.rate / results[(CEILINGS[p], batch, workers)].rate:.2f}"
                    if (c := results.get((p, batch, workers)))
                    else "-"
                    for p in ratios
                ]
            )
            cpu_rows.append(key + [f"{c.cpu_ms:.3f}" if c else "-" for c in cells])
    head = ["batch", "processes", *paths]
    return (
        "tokens/s (ratios: to the ceiling in the same row)\n\n"
        + markdown_table(head + [f"{p}/{CEILINGS[p]}" for p in ratios], rows)
        + "\n\nworker CPU per token, ms (user+sys of the worker processes / tokens)\n\n"
        + markdown_table(head, cpu_rows)
    )


def run(args: argparse.Namespace) -> int:
    workers_list = [int(n) for n in args.workers.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    paths = args.paths.split(",")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["bench.claim_workers"])
    with workdir("glisk-claim-bench-") as tmp:
        server, url = start_database(tmp, max_connections=100)
        try:
            dsn = libpq_url(url)
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(SEED.format(count=int(args.tokens)))  # type: ignore[arg-type]
            print(
                f"{server_line(dsn)}; {args.tokens} tokens; {args.seconds:g} s per cell; "
                f"{load_line()}",
                flush=True,
            )
            results: dict[tuple[str, int, int], Cell] = {}
            for batch in batches:
                for workers in workers_list:
                    for path in paths:
                        if path in ONE_PROCESS and workers != 1:
                            continue
                        reset(dsn)
                        job = (path, url, batch, args.seconds)
                        cell = run_processes(context, timed, [job] * workers)
                        results[(path, batch, workers)] = cell
                        if cell.moved >= args.tokens * 0.95:
                            raise RuntimeError(f"{path} b={batch} n={workers} ran out of tokens")
            print(f"\n{_tables(results, paths, batches, workers_list)}\n\n{load_line()}")
            if args.profile:
                from pyinstrument import Profiler

                reset(dsn)
                profiler = Profiler(async_mode="enabled")
                profiler.start()
                timed(args.profile, url, batches[-1], args.seconds, time.monotonic)
                profiler.stop()
                print(f"\npyinstrument: {args.profile}, 1 process, batch {batches[-1]}\n")
                print(profiler.output_text(unicode=False, color=False, show_all=False))
        finally:
            server.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.claim_bench")
    parser.add_argument("--seconds", type=float, default=2.0, help="per cell")
    parser.add_argument("--workers", default="1,4,8", help="processes per cell")
    parser.add_argument("--batches", default="10")
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--tokens", type=int, default=150_000)
    parser.add_argument("--profile", choices=PATHS, help="profile one path in one process")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
