"""Repository latency against table size: 10k, 100k and 1M tokens, most of them revealed.

    cd backend && uv run python -m bench.latency_bench                      # ~2 min
    cd backend && uv run python -m bench.latency_bench --sizes 10000,50000  # quick check

What runs:

- one embedded PostgreSQL with the durable settings ``glisk serve`` uses (fsync on), in a temporary
  directory, migrated to head (bench.http_bench.start_database);
- a history seeded in SQL (generate_series) and grown in place, 10k -> 100k -> 1M, by inserting
  only the difference: one author; tokens whose status follows token_id % 100 (0 detected;
  1 generating, half of them with an image already, one in ten under a live lease, some of those
  uploading; 2 ready; 3 failed; the other 96 revealed, with metadata_cid, image and reveal
  transaction), so every pending token has finished ones all around it; one mint event per token;
  a few system_state keys. After each step: VACUUM (ANALYZE) and CHECKPOINT, so no checkpoint or
  stale statistics land inside a measurement;
- for each size, each operation through a unit of work (``async with uow_factory() as uow``, a
  warm pool, one call at a time), round-robin over the operations, after warm-up calls. Worker
  queries and leased claims ask for 10 tokens and are rolled back, so the same rows stay
  available. Each rolled-back claim still leaves a dead version of those same 10 rows at the head
  of the claim indexes, a pile-up no real workload makes on a handful of rows, so tokens_s0 is
  vacuumed, untimed, every 50 rounds, with INDEX_CLEANUP ON (with so few dead rows a plain VACUUM
  leaves the index entries in place); ``--vacuum-every 0`` shows the difference. The rolled-back
  calls use a pool of their own, because psycopg drops all of a connection's prepared statements
  when a transaction on it rolls back: the other calls (which commit, as production's do) keep
  theirs and run prepared, with generic plans, as they would in production. The time is the
  client's: pool checkout (with its pre-ping), the statement, ORM loading, commit or rollback,
  return to the pool;
- the database's own time for the worker queries and the leased claims: EXPLAIN (ANALYZE, BUFFERS)
  of the same SQL and parameters, median of several runs, each rolled back, on a freshly vacuumed
  table; again as a prepared statement forced to a generic plan (what a long-lived pooled
  connection runs once psycopg has prepared the statement); the plans at the largest size are
  printed at the end.

Targets are the spec's (section 5, "at the database"): get_by_id and exists < 5 ms, get_state
< 10 ms, set_state < 15 ms, worker queries < 20 ms. The leased claims have none in the spec; they
are held to the worker queries' 20 ms. The mark compares the client-side p99 with the target.
Logging runs at WARNING (the unit of work's INFO lines on commit/rollback are not written).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import re
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import psycopg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bench._common import load_line, markdown_table, percentile, workdir
from bench.http_bench import start_database
from glisk.core.database import engine_of, setup_db_session
from glisk.core.logs import configure_logging
from glisk.core.timezone import enforce_utc
from glisk.repositories.token import _LOCK_OLDEST
from glisk.uow import UnitOfWork, UnitOfWorkFactory, create_uow_factory
from glisk.workers import queries
from glisk.workers.stages import STAGES, StageName

AUTHOR_ID = UUID("00000000-0000-4000-8000-00000000a001")
BATCH = 10
MIN_SIZE = 5000
STATE_KEY = "last_processed_block"

# One row per token_id g. Deterministic values, so Python can name existing ids and tx hashes.
SEED_TOKENS = """
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
           CASE g %% 100
               WHEN 0 THEN 'detected'
               WHEN 1 THEN CASE WHEN g %% 1000 = 101 THEN 'uploading' ELSE 'generating' END
               WHEN 2 THEN 'ready'
               WHEN 3 THEN 'failed'
               ELSE 'revealed'
           END AS status
) AS s
"""

SEED_EVENTS = """
INSERT INTO mint_events (id, tx_hash, log_index, block_number, block_timestamp, token_id,
                         detected_at)
SELECT md5('event-' || g)::uuid, '0x' || md5('tx-' || g) || md5('tx2-' || g), g %% 3,
       20000000 + g / 4, timestamp '2025-01-01' + g * interval '30 seconds', g,
       timestamp '2025-01-01' + g * interval '30 seconds' + interval '2 seconds'
FROM generate_series(%(lo)s::int, %(hi)s::int) AS g
"""

SEED_ONCE = [
    (
        "INSERT INTO authors (id, wallet_address, prompt_text, created_at) VALUES "
        "(%(author)s, '0x' || repeat('ab', 20), 'a benchmark author prompt', "
        "now() AT TIME ZONE 'utc')"
    ),
    (
        "INSERT INTO system_state (key, state_value, updated_at) VALUES "
        "('last_processed_block', '20000000', now() AT TIME ZONE 'utc'), "
        "('reveal_worker_enabled', 'true', now() AT TIME ZONE 'utc'), "
        "('image_generation_service', '\"replicate\"', now() AT TIME ZONE 'utc')"
    ),
]


def token_uuid(g: int) -> UUID:
    return UUID(hashlib.md5(f"token-{g}".encode()).hexdigest())  # noqa: S324 - not security


def mint_tx_hash(g: int) -> str:
    halves = (hashlib.md5(f"{part}-{g}".encode()).hexdigest() for part in ("tx", "tx2"))  # noqa: S324
    return "0x" + "".join(halves)


# --- operations -------------------------------------------------------------------------------

Call = Callable[[UnitOfWork, Any], Awaitable[Any]]


@dataclass(frozen=True)
class Op:
    name: str
    target_ms: float | None
    call: Call
    argument: Callable[[random.Random, int], Any] = lambda rng, n: None
    rollback: bool = False  # roll back instead of committing (keeps worker rows available)
    expect: Callable[[Any], bool] = lambda result: True


def _claim(stage: StageName) -> Call:
    async def call(uow: UnitOfWork, _: Any) -> Any:
        batch = await uow.leases.claim(
            STAGES[stage], "bench", batch=BATCH, lease_seconds=60, max_attempts=3
        )
        return batch.claims

    return call


def _exists_argument(rng: random.Random, n: int) -> tuple[str, int]:
    # Half recorded events (a hit), half new ones (the indexer's usual question).
    g = rng.randint(1, n) if rng.random() < 0.5 else n + rng.randint(1, 10 * n)
    return mint_tx_hash(g), g % 3


OPERATIONS: list[Op] = [
    Op(
        "unit of work + SELECT 1 (fixed cost)",
        None,
        lambda uow, _: uow.session.execute(text("SELECT 1")),
    ),
    Op(
        "get_pending_for_generation(10)",
        20,
        lambda uow, _: uow.tokens.get_pending_for_generation(BATCH),
        rollback=True,
        expect=lambda rows: len(rows) == BATCH,
    ),
    Op(
        "get_pending_for_upload(10)",
        20,
        lambda uow, _: uow.tokens.get_pending_for_upload(BATCH),
        rollback=True,
        expect=lambda rows: len(rows) == BATCH,
    ),
    Op(
        "get_ready_for_reveal(10)",
        20,
        lambda uow, _: uow.tokens.get_ready_for_reveal(BATCH),
        rollback=True,
        expect=lambda rows: len(rows) == BATCH,
    ),
    *(
        Op(
            f"leases.claim({stage.value}, batch=10)",
            20,
            _claim(stage),
            rollback=True,
            expect=lambda claims: len(claims) == BATCH,
        )
        for stage in StageName
    ),
    Op(
        "tokens.get_by_id",
        5,
        lambda uow, uuid: uow.tokens.get_by_id(uuid),
        argument=lambda rng, n: token_uuid(rng.randint(1, n)),
        expect=lambda token: token is not None,
    ),
    Op(
        "mint_events.exists (50% hits)",
        5,
        lambda uow, arg: uow.mint_events.exists(*arg),
        argument=_exists_argument,
    ),
    Op(
        "system_state.get_state",
        10,
        lambda uow, _: uow.system_state.get_state(STATE_KEY),
        expect=lambda value: isinstance(value, int),
    ),
    Op(
        "system_state.set_state (commit)",
        15,
        lambda uow, value: uow.system_state.set_state(STATE_KEY, value),
        argument=lambda rng, n: 20000000 + rng.randint(0, n),
    ),
]


@dataclass
class Timing:
    samples_ms: list[float] = field(default_factory=list)

    @property
    def p50(self) -> float:
        return percentile(self.samples_ms, 50)

    @property
    def p99(self) -> float:
        return percentile(self.samples_ms, 99)


@dataclass(frozen=True)
class Pools:
    """Two engines on the same database. psycopg forgets every prepared statement of a connection
    when a transaction on it rolls back, so the rolled-back worker queries and claims get their own
    pool; the other calls keep their connection's prepared statements, as in production."""

    steady: UnitOfWorkFactory
    rollback: UnitOfWorkFactory


async def run_once(pools: Pools, op: Op, argument: Any) -> tuple[float, Any]:
    uow_factory = pools.rollback if op.rollback else pools.steady
    started = time.perf_counter()
    async with uow_factory() as uow:
        result = await op.call(uow, argument)
        if op.rollback:
            await uow.rollback()
    return (time.perf_counter() - started) * 1000, result


Cleanup = Callable[[], Awaitable[None]]


async def measure_client(
    pools: Pools,
    n: int,
    *,
    warmup: int,
    iterations: int,
    seed: int,
    cleanup: Cleanup,
    cleanup_every: int,
) -> dict[str, Timing]:
    """``cleanup`` (untimed) runs after every ``cleanup_every`` rounds: each rolled-back claim
    leaves a dead version of the same 10 rows at the head of its index, which no production
    workload piles up on a handful of rows."""
    rng = random.Random(seed)
    timings = {op.name: Timing() for op in OPERATIONS}
    for i in range(warmup + iterations):
        for op in OPERATIONS:  # round-robin: a burst from a neighbour hits every operation alike
            argument = op.argument(rng, n)
            elapsed, result = await run_once(pools, op, argument)
            if i == 0 and not op.expect(result):
                raise RuntimeError(f"{op.name} returned an unexpected result: {result!r}")
            if i >= warmup:
                timings[op.name].samples_ms.append(elapsed)
        if cleanup_every and (i + 1) % cleanup_every == 0:
            await cleanup()
    return timings


# --- the database's own time ------------------------------------------------------------------


@dataclass(frozen=True)
class Explained:
    sql: str
    params: dict[str, Any]


def explained_queries() -> dict[str, Explained]:
    """The SQL in psycopg's parameter style (``%(name)s``), as the worker runtime sends it."""
    lock_oldest = re.sub(r"(?<![:\w]):([a-z_]+)", r"%(\1)s", _LOCK_OLDEST.text)
    explained = {
        f"get_{name}(10)": Explained(lock_oldest, {"status": status, "limit": BATCH})
        for name, status in (
            ("pending_for_generation", "detected"),
            ("pending_for_upload", "generating"),
            ("ready_for_reveal", "ready"),
        )
    }
    for stage in StageName:
        explained[f"leases.claim({stage.value}, batch=10)"] = Explained(
            queries.claim(STAGES[stage], BATCH),
            {"holder": "bench", "lease_seconds": 60, "max_attempts": 3},
        )
    return explained


@dataclass
class Plans:
    """EXPLAIN (ANALYZE, BUFFERS) runs of one query: with its parameters bound (a custom plan, what
    a statement gets until psycopg prepares it on its 5th use on a connection) and as a prepared
    statement forced to a generic plan (what PostgreSQL may switch to from the 6th execution of a
    prepared statement on)."""

    execution_ms: list[float] = field(default_factory=list)
    planning_ms: list[float] = field(default_factory=list)
    generic_ms: list[float] = field(default_factory=list)
    buffers: int = 0  # shared blocks hit + read by the last custom run
    rows_read: int = 0  # rows the last custom run's search read (kept or filtered out)
    shape: tuple[str, ...] = ()
    generic_shape: tuple[str, ...] = ()
    text: str = ""
    generic_text: str = ""


def _shape(node: dict[str, Any]) -> tuple[str, ...]:
    """The plan's nodes and indexes, without costs or timings, to compare two plans."""
    own = node["Node Type"] + (f" using {node['Index Name']}" if "Index Name" in node else "")
    children = node.get("Plans", [])
    return (own, *(part for child in children for part in _shape(child)))


def _rows_read(node: dict[str, Any]) -> int:
    """Rows the table scans returned or filtered out, over all loops; for a claim only its
    candidate search counts (not the UPDATEs' primary-key look-ups)."""
    subplan = node.get("Subplan Name", "")
    if subplan.startswith("CTE ") and subplan != "CTE candidates":
        return 0
    total = 0
    if node["Node Type"] in ("Index Scan", "Index Only Scan", "Bitmap Heap Scan", "Seq Scan"):
        seen = (
            node.get("Actual Rows", 0)
            + node.get("Rows Removed by Filter", 0)
            + node.get("Rows Removed by Index Recheck", 0)
        )
        total += round(seen * node.get("Actual Loops", 1))
    return total + sum(_rows_read(child) for child in node.get("Plans", []))


def _literal(value: Any) -> str:
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


def _prepared(query: Explained) -> tuple[str, str]:
    """PREPARE and EXECUTE statements for ``query``: placeholders numbered, values as literals
    (our own constants)."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    body = re.sub(r"%\((\w+)\)s", number, query.sql)
    arguments = ", ".join(_literal(query.params[name]) for name in names)
    return f"PREPARE bench_generic AS {body}", f"EXECUTE bench_generic({arguments})"


async def _explain_generic(conn: AsyncConnection, query: Explained, fmt: str) -> Any:
    prepare, execute = _prepared(query)
    await conn.exec_driver_sql(prepare)
    await conn.exec_driver_sql("SET LOCAL plan_cache_mode = force_generic_plan")
    result = await conn.exec_driver_sql(f"EXPLAIN (ANALYZE, BUFFERS{fmt}) {execute}")
    rows = result.scalars().all()
    await conn.exec_driver_sql("DEALLOCATE bench_generic")
    await conn.rollback()
    return rows


async def measure_server(
    engine: AsyncEngine, runs: int, want_text: bool, cleanup: Cleanup
) -> dict[str, Plans]:
    """``cleanup`` runs before each query's runs, so each starts from a vacuumed table."""
    results: dict[str, Plans] = {}
    async with engine.connect() as conn:
        for name, query in explained_queries().items():
            await cleanup()
            result = results[name] = Plans()
            for _ in range(runs):
                explain = "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + query.sql
                plan = (await conn.exec_driver_sql(explain, query.params)).scalar_one()[0]
                await conn.rollback()
                result.execution_ms.append(plan["Execution Time"])
                result.planning_ms.append(plan["Planning Time"])
                top = plan["Plan"]
                result.buffers = top.get("Shared Hit Blocks", 0) + top.get("Shared Read Blocks", 0)
                result.shape = _shape(top)
                result.rows_read = _rows_read(top)
                generic = (await _explain_generic(conn, query, ", FORMAT JSON"))[0][0]
                result.generic_ms.append(generic["Execution Time"])
                result.generic_shape = _shape(generic["Plan"])
            if want_text:
                await cleanup()
                explain = "EXPLAIN (ANALYZE, BUFFERS) " + query.sql
                rows = (await conn.exec_driver_sql(explain, query.params)).scalars()
                result.text = "\n".join(rows)
                await conn.rollback()
                result.generic_text = "\n".join(await _explain_generic(conn, query, ""))
    return results


async def prepared_statements(uow_factory: UnitOfWorkFactory) -> list[tuple[str, int, int]]:
    """What the pooled connection has prepared (psycopg prepares a statement on its 5th use) and
    how often PostgreSQL planned each generically versus with the actual parameters."""
    async with uow_factory() as uow:
        rows = await uow.session.execute(
            text(
                "SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements "
                "ORDER BY generic_plans + custom_plans DESC"
            )
        )
        return [(" ".join(r[0].split())[:70], r[1], r[2]) for r in rows]


# --- seeding ----------------------------------------------------------------------------------


@dataclass
class Seeded:
    size: int
    seconds: float
    tokens_mb: float
    claim_indexes_kb: dict[str, float]
    counts: dict[str, int]


async def grow(dsn: str, previous: int, size: int) -> Seeded:
    started = time.perf_counter()
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        params = {"author": AUTHOR_ID, "lo": previous + 1, "hi": size}
        if previous == 0:
            for statement in SEED_ONCE:
                await conn.execute(statement, params)  # type: ignore[arg-type]
        async with conn.transaction():
            await conn.execute(SEED_TOKENS, params)  # type: ignore[arg-type]
            await conn.execute(SEED_EVENTS, params)  # type: ignore[arg-type]
        await conn.execute("VACUUM (ANALYZE) tokens_s0")
        await conn.execute("VACUUM (ANALYZE) mint_events")
        await conn.execute("CHECKPOINT")
        seconds = time.perf_counter() - started
        row = await (
            await conn.execute("SELECT pg_total_relation_size('tokens_s0') / 1048576.0")
        ).fetchone()
        assert row is not None
        indexes = await (
            await conn.execute(
                "SELECT relname, pg_relation_size(oid) / 1024.0 FROM pg_class "
                "WHERE relname LIKE 'ix_tokens_s0_claim_%' ORDER BY relname"
            )
        ).fetchall()
        counts = await (
            await conn.execute("SELECT status::text, count(*) FROM tokens_s0 GROUP BY 1 ORDER BY 1")
        ).fetchall()
    return Seeded(
        size,
        seconds,
        float(row[0]),
        {name.removeprefix("ix_tokens_s0_claim_"): float(kb) for name, kb in indexes},
        {status: int(count) for status, count in counts},
    )


# --- report -----------------------------------------------------------------------------------


def label(size: int) -> str:
    if size >= 1_000_000 and size % 1_000_000 == 0:
        return f"{size // 1_000_000}M"
    if size >= 1000 and size % 1000 == 0:
        return f"{size // 1000}k"
    return str(size)


def client_table(sizes: list[int], by_size: dict[int, dict[str, Timing]]) -> str:
    headers = ["operation", "target"]
    for size in sizes:
        headers += [f"{label(size)} p50", f"{label(size)} p99", ""]
    rows = []
    for op in OPERATIONS:
        row = [op.name, f"< {op.target_ms:g} ms" if op.target_ms else "-"]
        for size in sizes:
            t = by_size[size][op.name]
            mark = "-" if op.target_ms is None else ("pass" if t.p99 < op.target_ms else "OVER")
            row += [f"{t.p50:.2f}", f"{t.p99:.2f}", mark]
        rows.append(row)
    return markdown_table(headers, rows, "ll" + "rrl" * len(sizes))


def server_table(sizes: list[int], by_size: dict[int, dict[str, Plans]]) -> str:
    headers = ["query (EXPLAIN ANALYZE)"]
    for size in sizes:
        headers += [f"{label(size)} exec", "rows read", "buffers", "generic exec"]
    rows = []
    for name in explained_queries():
        row = [name]
        for size in sizes:
            s = by_size[size][name]
            same = "" if s.generic_shape == s.shape else " (other plan)"
            row += [
                f"{statistics.median(s.execution_ms):.3f}",
                f"{s.rows_read:,}",
                str(s.buffers),
                f"{statistics.median(s.generic_ms):.3f}{same}",
            ]
        rows.append(row)
    return markdown_table(headers, rows, "l" + "rrrr" * len(sizes))


def where_time_goes(
    size: int, timings: dict[str, Timing], server: dict[str, Plans]
) -> list[list[str]]:
    fixed = timings[OPERATIONS[0].name].p50
    rows = []
    for name in explained_queries():
        client = timings[name].p50
        database = statistics.median(server[name].execution_ms) + statistics.median(
            server[name].planning_ms
        )
        rows.append(
            [
                f"{name} @ {label(size)}",
                f"{client:.2f}",
                f"{database:.2f}",
                f"{fixed:.2f}",
                f"{max(0.0, client - database - fixed):.2f}",
            ]
        )
    return rows


async def run(args: argparse.Namespace, url: str) -> int:
    sizes = sorted(int(s) for s in args.sizes.split(",") if s.strip())
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    steady = setup_db_session(url, pool_size=2, application_name="glisk-latency-bench")
    rolled = setup_db_session(url, pool_size=2, application_name="glisk-latency-bench-rollback")
    pools = Pools(create_uow_factory(steady), create_uow_factory(rolled))
    seeded: list[Seeded] = []
    client: dict[int, dict[str, Timing]] = {}
    server: dict[int, dict[str, Plans]] = {}
    prepared: list[tuple[str, int, int]] = []
    vacuum_seconds: dict[int, float] = {}

    async def vacuum() -> None:
        started = time.perf_counter()
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute("VACUUM (INDEX_CLEANUP ON) tokens_s0")
        vacuum_seconds[size] = vacuum_seconds.get(size, 0.0) + time.perf_counter() - started

    try:
        previous = 0
        for size in sizes:
            seeded.append(await grow(dsn, previous, size))
            previous = size
            say(f"{label(size)} tokens seeded ({seeded[-1].seconds:.1f} s); measuring")
            started = time.perf_counter()
            client[size] = await measure_client(
                pools,
                size,
                warmup=args.warmup,
                iterations=args.iterations,
                seed=size,
                cleanup=vacuum,
                cleanup_every=args.vacuum_every,
            )
            if size == sizes[-1]:
                prepared = await prepared_statements(pools.steady)
            server[size] = await measure_server(
                engine_of(rolled), args.explain_runs, size == sizes[-1], vacuum
            )
            say(
                f"{label(size)} measured ({time.perf_counter() - started:.1f} s, of which "
                f"VACUUM {vacuum_seconds.get(size, 0.0):.1f} s)"
            )
    finally:
        await engine_of(steady).dispose()
        await engine_of(rolled).dispose()

    print()
    print("Data (tokens_s0 with its indexes; claim partial indexes in kB):")
    print()
    print(
        markdown_table(
            ["tokens", "seed + VACUUM ANALYZE s", "tokens_s0 MB", "claim indexes kB", "statuses"],
            [
                [
                    f"{s.size:,}",
                    f"{s.seconds:.1f}",
                    f"{s.tokens_mb:.0f}",
                    ", ".join(f"{k} {v:.0f}" for k, v in s.claim_indexes_kb.items()),
                    ", ".join(f"{k} {v:,}" for k, v in s.counts.items()),
                ]
                for s in seeded
            ],
            "lrrll",
        )
    )
    print()
    print(
        f"Client side, ms ({args.iterations} calls per cell after {args.warmup} warm-up, one at a "
        "time through a unit of work on a warm pool, round-robin over the operations, VACUUM "
        f"(INDEX_CLEANUP ON) tokens_s0 every {args.vacuum_every} rounds (0 = never); mark = p99 "
        "against the target):"
    )
    print()
    print(client_table(sizes, client))
    print()
    print(
        f"Database side (EXPLAIN (ANALYZE, BUFFERS) of the same SQL and parameters, each run "
        f"rolled back): exec = median execution ms of {args.explain_runs} runs; rows read = rows "
        "the search returned or filtered out (for a claim, its candidate search); buffers = "
        "shared blocks touched by the whole statement; generic exec = the same as a prepared "
        "statement forced to a generic plan, '(other plan)' when its shape differs:"
    )
    print()
    print(server_table(sizes, server))
    print()
    print("Where the time goes, p50 ms (python = client - database - fixed unit-of-work cost):")
    print()
    rows = [r for size in sizes for r in where_time_goes(size, client[size], server[size])]
    print(
        markdown_table(
            ["query", "client p50", "database (plan + exec)", "fixed uow cost", "python/ORM"],
            rows,
        )
    )
    if prepared:
        print()
        print(
            "Statements prepared on the steady pool's connection after the largest size "
            "(psycopg prepares on the 5th use; PostgreSQL then plans each execution generically "
            "or with its parameters):"
        )
        print()
        print(
            markdown_table(
                ["statement", "generic plans", "custom plans"],
                [[f"`{s}`", str(g), str(c)] for s, g, c in prepared],
                "lrr",
            )
        )
    print()
    print(f"Plans at {label(sizes[-1])} tokens (EXPLAIN (ANALYZE, BUFFERS), parameters bound):")
    for name, result in server[sizes[-1]].items():
        print()
        print(f"{name}:")
        print()
        print("```")
        print(result.text)
        print("```")
        if result.generic_shape != result.shape:
            print()
            print(f"{name}, generic plan (prepared statement, plan_cache_mode=force_generic_plan):")
            print()
            print("```")
            print(result.generic_text)
            print("```")
    return 0


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.latency_bench",
        description="Repository call latency against the number of tokens in the table.",
    )
    parser.add_argument("--sizes", default="10000,100000,1000000", help="token counts, ascending")
    parser.add_argument("--iterations", type=int, default=300, help="measured calls per cell")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured calls per cell first")
    parser.add_argument(
        "--vacuum-every",
        type=int,
        default=50,
        help="VACUUM tokens_s0 (untimed) after this many rounds; 0 never (default 50)",
    )
    parser.add_argument("--explain-runs", type=int, default=15, help="EXPLAIN ANALYZE runs")
    parser.add_argument(
        "--log-level", default="WARNING", help="glisk log level (INFO writes a line per commit)"
    )
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if not sizes or min(sizes) < MIN_SIZE:
        # Each worker query and claim must find 10 tokens (the upload claim has 4 per 1,000).
        parser.error(f"--sizes: each size must be at least {MIN_SIZE:,}")

    enforce_utc()
    configure_logging("development", args.log_level)
    started = time.monotonic()
    say(load_line())
    with workdir("glisk-latency-") as base:
        database, url = start_database(base, max_connections=50)
        try:
            code = asyncio.run(run(args, url))
        finally:
            database.stop()
    print()
    print(f"Total time {time.monotonic() - started:.0f} s; {load_line()} at the end.")
    return code


if __name__ == "__main__":
    sys.exit(main())
