"""Latency against table size: repository calls through a unit of work; the database's time,
rows read and plans of the worker queries, claims and ``glisk status``'s statements; its reads."""

from __future__ import annotations

import asyncio
import hashlib
import random
import statistics
import subprocess
import sys
import time
from argparse import Namespace
from collections.abc import Callable
from functools import partial
from typing import Any
from uuid import UUID

import psycopg
from sqlalchemy import event, text

from bench.harness import database, percentile, query, quiet_env, say, table
from glisk.core.database import engine_of, setup_db_session
from glisk.core.logs import configure_logging
from glisk.ops.queries import FAILED_BY_REASON, STATUS_COUNTS, stage_counts
from glisk.ops.status import collect
from glisk.pipeline import STAGES, StageName
from glisk.testing import connect
from glisk.uow import UnitOfWork, create_uow_factory
from glisk.workers.connection import libpq_url

AUTHOR, STATE = UUID("00000000-0000-4000-8000-00000000a001"), "last_processed_block"
# Token g: status by g % 100 (0 detected; 1 generating, half of them with an image, one in ten
# of those leased, some of them uploading; 2 ready; 3 failed; the rest revealed), one mint event
# each; deterministic, so Python can name existing ids and transaction hashes.
SEED = (
    """INSERT INTO tokens_s0 (id, token_id, author_id, minter_address, status, mint_timestamp,
    image_path, image_cid, metadata_cid, reveal_tx_hash, error_data, created_at, claimed_by,
    claim_id, lease_expires_at, attempts)
SELECT md5('token-' || g)::uuid, g, %(author)s, '0x' || lpad(to_hex(g), 40, '0'),
    CAST(s.status AS token_status_enum), s.minted,
    CASE WHEN s.status IN ('detected', 'failed') OR (g %% 200 = 1 AND g %% 1000 <> 101)
         THEN NULL ELSE '/var/lib/glisk/images/' || g || '.png' END,
    CASE WHEN s.status IN ('ready', 'revealed') THEN 'bafkreiimage' || g END,
    CASE WHEN s.status IN ('ready', 'revealed') THEN 'bafkreimeta' || g END,
    CASE WHEN s.status = 'revealed' THEN '0x' || lpad(to_hex(g / 50), 64, '0') END,
    CASE WHEN s.status = 'failed' THEN
         '{"reason": "max_attempts_exceeded", "stage": "image", "attempts": 3}'::jsonb END,
    s.minted + interval '5 seconds', CASE WHEN s.leased THEN 'bench-worker-' || (g %% 4) END,
    CASE WHEN s.leased THEN md5('claim-' || g)::uuid END,
    CASE WHEN s.leased THEN (now() AT TIME ZONE 'utc') + interval '1 day' END,
    CASE WHEN s.leased THEN 1 WHEN s.status = 'failed' THEN 3 ELSE 0 END
FROM generate_series(%(lo)s::int, %(hi)s::int) AS g CROSS JOIN LATERAL (
    SELECT timestamp '2025-01-01' + g * interval '30 seconds' AS minted,
        g %% 1000 IN (1, 101) AS leased,
        CASE g %% 100 WHEN 0 THEN 'detected'
            WHEN 1 THEN CASE WHEN g %% 1000 = 101 THEN 'uploading' ELSE 'generating' END
            WHEN 2 THEN 'ready' WHEN 3 THEN 'failed' ELSE 'revealed' END AS status) AS s""",
    """INSERT INTO mint_events (id, tx_hash, log_index, block_number, block_timestamp, token_id,
    detected_at)
SELECT md5('event-' || g)::uuid, '0x' || md5('tx-' || g) || md5('tx2-' || g), g %% 3,
    20000000 + g / 4, timestamp '2025-01-01' + g * interval '30 seconds', g,
    timestamp '2025-01-01' + g * interval '30 seconds' + interval '2 seconds'
FROM generate_series(%(lo)s::int, %(hi)s::int) AS g""",
)
SEED_ONCE = (
    "INSERT INTO authors (id, wallet_address, prompt_text, created_at) "
    "VALUES (%(author)s, '0x' || repeat('ab', 20), 'a benchmark author prompt', now())",
    "INSERT INTO system_state (key, state_value, updated_at) VALUES "
    "('last_processed_block', '20000000', now()), ('reveal_worker_enabled', 'true', now())",
)


def md5(value: str) -> str:
    return hashlib.md5(value.encode()).hexdigest()  # noqa: S324 - the seed's ids, not security


def claim(stage: StageName, uow: UnitOfWork, _: object) -> Any:
    return uow.leases.claim(STAGES[stage], "bench", batch=10, lease_seconds=60, max_attempts=3)


def token(rng: random.Random, n: int) -> UUID:
    return UUID(md5(f"token-{rng.randint(1, n)}"))


def mint_event(rng: random.Random, n: int) -> tuple[str, int]:
    """Half recorded events (a hit), half new ones (the indexer's usual question)."""
    g = rng.randint(1, n) if rng.random() < 0.5 else n + rng.randint(1, 10 * n)
    return "0x" + md5(f"tx-{g}") + md5(f"tx2-{g}"), g % 3


def block(rng: random.Random, n: int) -> int:
    return 20000000 + rng.randint(0, n)


PENDING = ("get_pending_for_generation", "get_pending_for_upload", "get_ready_for_reveal")
SELECT_1 = text("SELECT 1")
# name: (the spec's target in ms, the call, its argument). The worker queries and the claims
# (target 20) ask for 10 tokens, are rolled back (their rows stay available) and EXPLAINed.
OPERATIONS: dict[str, tuple[float | None, Callable[..., Any], Callable[..., Any] | None]] = {
    "unit of work + SELECT 1 (baseline)": (None, lambda u, _: u.session.execute(SELECT_1), None),
    **{f"{n}(10)": (20, lambda u, _, n=n: getattr(u.tokens, n)(10), None) for n in PENDING},
    **{f"leases.claim({s.value})": (20, partial(claim, s), None) for s in StageName},
    "tokens.get_by_id": (5, lambda u, a: u.tokens.get_by_id(a), token),
    "mint_events.exists (50% hits)": (5, lambda u, a: u.mint_events.exists(*a), mint_event),
    "system_state.get_state": (10, lambda u, _: u.system_state.get_state(STATE), None),
    "system_state.set_state (commit)": (15, lambda u, a: u.system_state.set_state(STATE, a), block),
}
TABLE_SCANS = ("Index Scan", "Index Only Scan", "Bitmap Heap Scan", "Seq Scan")
EXPLAINED = [name for name, (target, *_) in OPERATIONS.items() if target == 20]


def vacuum(url: str) -> None:
    """Rolled-back claims leave dead rows at the head of their index; removed, untimed."""
    query(url, "VACUUM (INDEX_CLEANUP ON) tokens_s0")


async def client_side(url: str, size: int, args: Namespace) -> tuple[dict, dict]:
    """ms per operation, round-robin, after 20 warm-up rounds; what each EXPLAINed one sent.
    Rolled-back calls have a pool of their own, so the others keep their prepared statements."""
    steady, rolled = (setup_db_session(url, pool_size=2) for _ in range(2))
    sent: list[tuple[str, Any]] = []
    record = lambda *a: sent.append(a[2:4])  # noqa: E731 - (statement, parameters)
    event.listen(engine_of(rolled).sync_engine, "before_cursor_execute", record)
    rng, ms, statements = random.Random(size), {name: list[float]() for name in OPERATIONS}, {}
    for i in range(20 + args.iterations):
        for name, (_, call, argument) in OPERATIONS.items():
            explained, started = name in EXPLAINED, time.perf_counter()
            async with create_uow_factory(rolled if explained else steady)() as uow:
                found = await call(uow, argument and argument(rng, size))
                if explained:
                    await uow.rollback()
            ms[name].append((time.perf_counter() - started) * 1000)
            if explained and i == 0:
                if len(getattr(found, "claims", found)) != 10:
                    raise RuntimeError(f"{name} did not find 10 tokens: {found}")
                statements[name] = next(s for s in sent if "SKIP LOCKED" in s[0])
            sent.clear()
        if args.vacuum_every and (i + 1) % args.vacuum_every == 0:
            vacuum(url)
    for factory in (steady, rolled):
        await engine_of(factory).dispose()
    return {name: times[20:] for name, times in ms.items()}, statements


def outline(node: dict[str, Any], depth: int = 0, rows: bool = True) -> list[str]:
    """The plan's nodes and indexes, with the actual rows when analysed: a line each."""
    line = "  " * depth + node["Node Type"]
    line += f" using {node['Index Name']}" if "Index Name" in node else ""
    line += f" (actual rows={node['Actual Rows']})" if rows and "Actual Rows" in node else ""
    return [line, *(x for child in node.get("Plans", []) for x in outline(child, depth + 1, rows))]


def rows_read(node: dict[str, Any]) -> int:
    """Rows the scans returned or filtered out over all loops; of a claim, its candidate search."""
    if (name := node.get("Subplan Name", "")).startswith("CTE ") and name != "CTE candidates":
        return 0
    seen = node["Actual Rows"] + node.get("Rows Removed by Filter", 0)
    seen = round(seen * node.get("Actual Loops", 1)) if node["Node Type"] in TABLE_SCANS else 0
    return seen + sum(map(rows_read, node.get("Plans", [])))


def explain(url: str, sql: str, params: Any) -> tuple[str, list[str]]:
    """15 EXPLAIN ANALYZE, each rolled back: median ms, rows read, plan, and whether the generic
    plan (a prepared statement's from its 6th execution) has the same shape."""
    vacuum(url)
    with connect(url) as conn:
        plans = []
        for _ in range(15):
            with conn.transaction(force_rollback=True):
                found = conn.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}".encode(), params)
                plans.append(found.fetchall()[0][0][0])  # type: ignore[index]
    with psycopg.connect(libpq_url(url)) as conn, conn.transaction(force_rollback=True):
        conn.execute(sql.encode(), params, prepare=True)  # prepared, as a pooled connection does
        ((prepared,),) = conn.execute("SELECT statement FROM pg_prepared_statements").fetchall()
        generic = conn.execute(f"EXPLAIN (GENERIC_PLAN, FORMAT JSON) {prepared}".encode())
        generic_plan = generic.fetchall()[0][0][0]["Plan"]
    plan, exec_ms = plans[-1]["Plan"], statistics.median(p["Execution Time"] for p in plans)
    same = "same" if outline(generic_plan, rows=False) == outline(plan, rows=False) else "OTHER"
    return f"{exec_ms:.3f} / {rows_read(plan)} / {same}", outline(plan)


def timed(call: Callable[[], object], iterations: int) -> str:
    """p50 / p99 ms of ``iterations`` calls after an untimed one."""
    call()
    ms = []
    for _ in range(iterations):
        started = time.perf_counter()
        call()
        ms.append((time.perf_counter() - started) * 1000)
    return f"{percentile(ms, 50):.2f} / {percentile(ms, 99):.2f}"


def tables(args: Namespace) -> None:
    sizes = [int(s) for s in args.sizes.split(",")]
    if min(sizes) < 5000:
        raise SystemExit("--sizes: 5,000 at least (each worker query and claim must find 10)")
    configure_logging("development", "WARNING")
    client, server, reads = {}, {}, {}
    status = {f"status: stage {name}": stage_counts(name) for name in STAGES}
    status |= {"status: counts": STATUS_COUNTS, "status: failed by reason": FAILED_BY_REASON}
    with database(50) as (_, url):
        query(url, *SEED_ONCE, params={"author": AUTHOR})
        for previous, size in zip([0, *sizes], sizes, strict=False):  # grown in place
            started = time.perf_counter()
            query(url, *SEED, params={"author": AUTHOR, "lo": previous + 1, "hi": size})
            query(url, "VACUUM (ANALYZE) tokens_s0", "VACUUM (ANALYZE) mint_events", "CHECKPOINT")
            counts = query(url, "SELECT status::text, count(*) FROM tokens_s0 GROUP BY 1")
            say(f"{size:,} tokens in {time.perf_counter() - started:.0f} s: {dict(counts)}")
            client[size], sent = asyncio.run(client_side(url, size, args))
            sent |= {name: (sql, None) for name, sql in status.items()}
            server[size] = {name: explain(url, *statement) for name, statement in sent.items()}
            with psycopg.connect(libpq_url(url), autocommit=True) as conn:  # glisk status' reads
                calls = [partial(conn.execute, "SELECT 1"), partial(collect, conn)]
                calls.append(partial(collect, conn, exact=True))
                reads[size] = [timed(call, args.iterations) for call in calls]
        run = {"env": quiet_env(DATABASE_URL=url), "check": True, "capture_output": True}
        command = [sys.executable, "-m", "glisk.cli", "status", "--json"]
        process = timed(partial(subprocess.run, command, **run), 5).split(" / ")[0]  # median of 5
    rows = []
    for name, (target, *_) in OPERATIONS.items():
        row = [name, f"< {target:g}" if target else "-"]
        for p50, p99 in ((percentile(client[s][name], p) for p in (50, 99)) for s in sizes):
            mark = "-" if not target else "pass" if p99 < target else "OVER"
            row += [f"{p50:.2f} / {p99:.2f}", mark]
        rows.append(row)
    print(f"Client side, p50 / p99 ms of {args.iterations} calls; mark: p99 against the target\n")
    print(table(["operation", "target ms", *(x for s in sizes for x in (f"{s:,}", ""))], rows))
    print("\nDatabase side: execution ms (median of 15 EXPLAIN ANALYZE) / rows read / generic plan")
    print("the same (a prepared statement's plan from its 6th execution on)\n")
    rows = [[name, *(server[size][name][0] for size in sizes)] for name in server[sizes[0]]]
    print(table(["statement", *(f"{s:,}" for s in sizes)], rows))
    for name, (_, plan) in server[sizes[-1]].items():
        print(f"\n{name} at {sizes[-1]:,} tokens:\n\n```\n" + "\n".join(plan) + "\n```")
    names = ["`SELECT 1` round trip (baseline)", "status read", "status read, `--exact`"]
    rows = [[name, *(reads[size][i] for size in sizes)] for i, name in enumerate(names)]
    rows.append(["`glisk status --json` as a process (median of 5)", *["-"] * (len(sizes) - 1)])
    rows[-1].append(process)
    print(f"\n`glisk status`, p50 / p99 ms of {args.iterations} reads on a warm connection\n")
    print(table(["operation", *(f"{s:,}" for s in sizes)], rows))
