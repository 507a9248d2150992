"""Latency against table size (10k, 100k, 1M tokens, most of them revealed): each repository
call through a unit of work, next to a unit of work sending ``SELECT 1``; the database's own time,
rows read and plan of the worker queries and the claims; and ``glisk status``."""

from __future__ import annotations

import asyncio
import hashlib
import random
import statistics
import subprocess
import sys
import time
from argparse import Namespace
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import psycopg
from sqlalchemy import event, text

from bench.harness import database, percentile, query, quiet_env, say, server_line, table
from glisk.core.database import engine_of, setup_db_session
from glisk.core.logs import configure_logging
from glisk.ops.status import FAILED_BY_REASON, STAGE_NAMES, STATUS_COUNTS, collect, stage_counts
from glisk.testing import connect
from glisk.uow import UnitOfWork, create_uow_factory
from glisk.workers.connection import libpq_url
from glisk.workers.stages import STAGES, StageName

BATCH, WARMUP, EXPLAIN_RUNS = 10, 20, 15
# One row per token_id g, status by g % 100: 0 detected; 1 generating (half with an image, one in
# ten of those leased, some of them uploading); 2 ready; 3 failed; the rest revealed. Values are
# deterministic, so Python can name existing ids and transaction hashes.
SEED = (
    """
INSERT INTO tokens_s0 (id, token_id, author_id, minter_address, status, mint_timestamp,
                       image_path, image_cid, metadata_cid, reveal_tx_hash, error_data,
                       created_at, claimed_by, claim_id, lease_expires_at, attempts)
SELECT md5('token-' || g)::uuid, g, %(author)s, '0x' || lpad(to_hex(g), 40, '0'),
       CAST(s.status AS token_status_enum), s.minted,
       CASE WHEN s.status IN ('detected', 'failed') OR (g %% 200 = 1 AND g %% 1000 <> 101)
            THEN NULL ELSE '/var/lib/glisk/images/' || g || '.png' END,
       CASE WHEN s.status IN ('ready', 'revealed') THEN 'bafkreiimage' || g END,
       CASE WHEN s.status IN ('ready', 'revealed') THEN 'bafkreimeta' || g END,
       CASE WHEN s.status = 'revealed' THEN '0x' || lpad(to_hex(g / 50), 64, '0') END,
       CASE WHEN s.status = 'failed' THEN
            '{"reason": "max_attempts_exceeded", "stage": "image", "attempts": 3}'::jsonb END,
       s.minted + interval '5 seconds',
       CASE WHEN s.leased THEN 'bench-worker-' || (g %% 4) END,
       CASE WHEN s.leased THEN md5('claim-' || g)::uuid END,
       CASE WHEN s.leased THEN (now() AT TIME ZONE 'utc') + interval '1 day' END,
       CASE WHEN s.leased THEN 1 WHEN s.status = 'failed' THEN 3 ELSE 0 END
FROM generate_series(%(lo)s::int, %(hi)s::int) AS g
CROSS JOIN LATERAL (
    SELECT timestamp '2025-01-01' + g * interval '30 seconds' AS minted,
           g %% 1000 IN (1, 101) AS leased,
           CASE g %% 100 WHEN 0 THEN 'detected'
               WHEN 1 THEN CASE WHEN g %% 1000 = 101 THEN 'uploading' ELSE 'generating' END
               WHEN 2 THEN 'ready' WHEN 3 THEN 'failed' ELSE 'revealed' END AS status
) AS s""",
    """
INSERT INTO mint_events (id, tx_hash, log_index, block_number, block_timestamp, token_id,
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
AUTHOR = UUID("00000000-0000-4000-8000-00000000a001")
STATE = "last_processed_block"


def md5(value: str) -> str:
    return hashlib.md5(value.encode()).hexdigest()  # noqa: S324 - the seed's ids, not security


@dataclass(frozen=True)
class Op:
    name: str
    target_ms: float | None
    call: Callable[[UnitOfWork, Any], Awaitable[Any]]
    argument: Callable[[random.Random, int], Any] = lambda rng, n: None
    rollback: bool = False  # worker queries and claims: rolled back, and EXPLAINed


def claim(stage: StageName) -> Op:
    async def call(uow: UnitOfWork, _: object) -> Any:
        options = {"batch": BATCH, "lease_seconds": 60, "max_attempts": 3}
        return (await uow.leases.claim(STAGES[stage], "bench", **options)).claims

    return Op(f"leases.claim({stage.value})", 20, call, rollback=True)


def pending(name: str) -> Op:
    return Op(f"{name}(10)", 20, lambda u, _: getattr(u.tokens, name)(BATCH), rollback=True)


def token_id(rng: random.Random, n: int) -> UUID:
    return UUID(md5(f"token-{rng.randint(1, n)}"))


def mint_event(rng: random.Random, n: int) -> tuple[str, int]:
    # Half recorded events (a hit), half new ones (the indexer's usual question).
    g = rng.randint(1, n) if rng.random() < 0.5 else n + rng.randint(1, 10 * n)
    return "0x" + md5(f"tx-{g}") + md5(f"tx2-{g}"), g % 3


OPERATIONS = [
    Op(
        "unit of work + SELECT 1 (baseline)", None, lambda u, _: u.session.execute(text("SELECT 1"))
    ),
    *map(pending, ("get_pending_for_generation", "get_pending_for_upload", "get_ready_for_reveal")),
    *map(claim, StageName),
    Op("tokens.get_by_id", 5, lambda u, a: u.tokens.get_by_id(a), token_id),
    Op("mint_events.exists (50% hits)", 5, lambda u, a: u.mint_events.exists(*a), mint_event),
    Op("system_state.get_state", 10, lambda u, _: u.system_state.get_state(STATE)),
    Op(
        "system_state.set_state (commit)",
        15,
        lambda u, a: u.system_state.set_state(STATE, a),
        lambda rng, n: 20000000 + rng.randint(0, n),
    ),
]


def vacuum(url: str) -> None:
    """Each rolled-back claim leaves a dead version of the same 10 rows at the head of its
    index, a pile-up no real workload makes: cleaned up, untimed. With so few dead rows a plain
    VACUUM would leave the index entries in place."""
    query(url, "VACUUM (INDEX_CLEANUP ON) tokens_s0")


Sent = tuple[str, Any]  # a statement and its parameters


async def client_side(
    url: str, size: int, args: Namespace
) -> tuple[dict[str, list[float]], dict[str, Sent]]:
    """Client ms per operation, and the statement (with parameters) each EXPLAINed one sent.
    Rolled-back calls get a pool of their own: psycopg forgets a connection's prepared
    statements when a transaction on it rolls back, and the others keep theirs, as in
    production."""
    steady, rolled = (setup_db_session(url, pool_size=2) for _ in range(2))
    sent: list[Sent] = []
    event.listen(
        engine_of(rolled).sync_engine, "before_cursor_execute", lambda *a: sent.append(a[2:4])
    )
    factories = create_uow_factory(steady), create_uow_factory(rolled)
    rng, samples = random.Random(size), {op.name: list[float]() for op in OPERATIONS}
    statements: dict[str, Sent] = {}
    for i in range(WARMUP + args.iterations):
        for op in OPERATIONS:  # round-robin: a neighbour's burst hits every operation alike
            argument, started = op.argument(rng, size), time.perf_counter()
            async with factories[op.rollback]() as uow:
                result = await op.call(uow, argument)
                if op.rollback:
                    await uow.rollback()
            samples[op.name].append((time.perf_counter() - started) * 1000)
            if op.rollback and i == 0:
                if len(result) != BATCH:
                    raise RuntimeError(f"{op.name} found {len(result)} tokens, not {BATCH}")
                statements[op.name] = next(s for s in sent if "SKIP LOCKED" in s[0])
            sent.clear()
        if args.vacuum_every and (i + 1) % args.vacuum_every == 0:
            vacuum(url)
    for factory in (steady, rolled):
        await engine_of(factory).dispose()
    return {name: ms[len(ms) - args.iterations :] for name, ms in samples.items()}, statements


def outline(node: dict[str, Any], depth: int = 0, rows: bool = True) -> list[str]:
    """The plan's nodes and indexes, with actual rows when analysed: one line each."""
    line = "  " * depth + node["Node Type"]
    line += f" using {node['Index Name']}" if "Index Name" in node else ""
    line += f" (actual rows={node['Actual Rows']})" if rows and "Actual Rows" in node else ""
    return [line, *(x for child in node.get("Plans", []) for x in outline(child, depth + 1, rows))]


def rows_read(node: dict[str, Any]) -> int:
    """Rows the scans returned or filtered out, all loops; of a claim, its candidate search only
    (not the UPDATEs' primary-key look-ups)."""
    name = node.get("Subplan Name", "")
    if name.startswith("CTE ") and name != "CTE candidates":
        return 0
    seen = 0
    if node["Node Type"] in ("Index Scan", "Index Only Scan", "Bitmap Heap Scan", "Seq Scan"):
        found = node["Actual Rows"] + node.get("Rows Removed by Filter", 0)
        seen = round(found * node.get("Actual Loops", 1))
    return seen + sum(rows_read(child) for child in node.get("Plans", []))


def explain(url: str, sql: str, params: Any, runs: int) -> tuple[float, int, list[str], bool]:
    """EXPLAIN ANALYZE of what an operation sent, ``runs`` times, each rolled back: median
    execution ms, rows read, the plan, and whether the generic plan has the same shape (the plan
    a prepared statement may switch to from its 6th execution)."""
    vacuum(url)
    plans = []
    with connect(url) as conn:
        for _ in range(runs):
            with conn.transaction(force_rollback=True):
                cursor = conn.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}".encode(), params)
                plans.append(cursor.fetchall()[0][0][0])  # type: ignore[index]
    with psycopg.connect(libpq_url(url)) as conn:  # prepares, as a pooled connection does
        conn.execute(sql.encode(), params, prepare=True)
        ((prepared,),) = conn.execute("SELECT statement FROM pg_prepared_statements").fetchall()
        plan = conn.execute(f"EXPLAIN (GENERIC_PLAN, FORMAT JSON) {prepared}".encode()).fetchall()
        conn.rollback()
    last = plans[-1]["Plan"]
    same = outline(plan[0][0][0]["Plan"], rows=False) == outline(last, rows=False)
    exec_ms = statistics.median(p["Execution Time"] for p in plans)
    return exec_ms, rows_read(last), outline(last), same


def timed(call: Callable[[], object], iterations: int) -> list[float]:
    """ms of ``iterations`` calls, after an untimed one (plans cached, pages in memory)."""
    call()
    times = []
    for _ in range(iterations):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return times


def spread(ms: list[float]) -> str:
    return f"{percentile(ms, 50):.2f} / {percentile(ms, 99):.2f}"


def status(url: str, iterations: int, plans: bool) -> list[str]:
    """``glisk status``'s read (every statement the command sends, one REPEATABLE READ
    transaction) with the revealed total estimated and counted, next to a ``SELECT 1``; with
    ``plans``, what each statement reads."""
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        statements = [(f"stage {name}", stage_counts(name)) for name in STAGE_NAMES]
        statements += [("status counts", STATUS_COUNTS), ("failed by reason", FAILED_BY_REASON)]
        for name, sql in statements if plans else ():
            plan = conn.execute(f"EXPLAIN (ANALYZE, COSTS OFF) {sql}".encode()).fetchall()
            reads = [r[0].strip() for r in plan if "Scan" in r[0] or "Execution" in r[0]]
            say(f"{name}: " + " | ".join(reads))
        reads = (
            lambda: conn.execute("SELECT 1"),
            lambda: collect(conn),
            lambda: collect(conn, exact=True),
        )
        return [spread(timed(read, iterations)) for read in reads]


def tables(args: Namespace) -> None:
    sizes = [int(s) for s in args.sizes.split(",")]
    if min(sizes) < 5000:
        raise SystemExit("--sizes: 5,000 at least (each worker query and claim must find 10)")
    configure_logging("development", "WARNING")
    client, server, reads = {}, {}, {}
    with database(50) as (_, url):
        say(server_line(url))
        query(url, *SEED_ONCE, params={"author": AUTHOR})
        for previous, size in zip([0, *sizes], sizes, strict=False):  # grown in place
            started = time.perf_counter()
            query(url, *SEED, params={"author": AUTHOR, "lo": previous + 1, "hi": size})
            query(url, "VACUUM (ANALYZE) tokens_s0", "VACUUM (ANALYZE) mint_events", "CHECKPOINT")
            counts = query(url, "SELECT status::text, count(*) FROM tokens_s0 GROUP BY 1")
            say(f"{size:,} tokens in {time.perf_counter() - started:.0f} s: {dict(counts)}")
            client[size], sent = asyncio.run(client_side(url, size, args))
            server[size] = {name: explain(url, *s, EXPLAIN_RUNS) for name, s in sent.items()}
            reads[size] = status(url, args.iterations, plans=size == sizes[-1])
        command = [sys.executable, "-m", "glisk.cli", "status", "--json"]
        run = {"env": quiet_env(DATABASE_URL=url), "check": True, "capture_output": True}
        process = statistics.median(timed(lambda: subprocess.run(command, **run), 5))
    rows = []
    for op in OPERATIONS:
        row: list[object] = [op.name, f"< {op.target_ms:g}" if op.target_ms else "-"]
        for ms in (client[size][op.name] for size in sizes):
            over = op.target_ms and ("pass" if percentile(ms, 99) < op.target_ms else "OVER")
            row += [spread(ms), over or "-"]
        rows.append(row)
    print(f"Client side, p50 / p99 ms of {args.iterations} calls; mark: p99 against the target\n")
    print(table(["operation", "target ms", *(x for s in sizes for x in (f"{s:,}", ""))], rows))
    rows = []
    for name in server[sizes[0]]:
        cells = [server[size][name] for size in sizes]
        rows.append(
            [name, *(f"{c[0]:.3f} / {c[1]} / {'same' if c[3] else 'OTHER'}" for c in cells)]
        )
    print(f"\nDatabase side: execution ms (median of {EXPLAIN_RUNS} EXPLAIN ANALYZE) / rows read")
    print("/ the generic plan the same as this one\n")
    print(table(["query", *(f"{s:,}" for s in sizes)], rows))
    for name, (_, _, plan, _) in server[sizes[-1]].items():
        print(f"\n{name} at {sizes[-1]:,} tokens:\n\n```\n" + "\n".join(plan) + "\n```")
    names = ["`SELECT 1` round trip (baseline)", "status read", "status read, `--exact`"]
    rows = [[name, *(reads[size][i] for size in sizes)] for i, name in enumerate(names)]
    rows.append(["`glisk status --json` as a process, median of 5", *["-"] * (len(sizes) - 1)])
    rows[-1].append(f"{process:.0f}")
    print(f"\n`glisk status`, p50 / p99 ms of {args.iterations} reads on a warm connection\n")
    print(table(["operation", *(f"{s:,}" for s in sizes)], rows))
