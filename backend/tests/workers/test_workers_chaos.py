"""Chaos: eight worker processes run all three leased stages over 2,000 tokens while a killer
SIGKILLs random workers and starts replacements. Nothing may be lost, doubled or left claimed."""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import time
from collections import Counter
from collections.abc import Sequence
from datetime import timedelta
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import psycopg
import pytest

from glisk import migrations
from glisk.core.config import load_settings
from glisk.core.database import engine_of, setup_db_session
from glisk.testing import libpq_kwargs, throwaway_database
from glisk.uow import create_uow_factory
from tests.support import factories
from tests.support.chaos_proc import run_noop_worker
from tests.support.database import Database
from tests.support.processes import stop_all

TOKENS = 2000
WORKERS = 8
# Chaos lasts CHAOS_SECONDS and at least MIN_KILLS kills (however slow the machine), while work
# remains. DEADLINE_SECONDS is a hang guard, not a speed: a token lost would never finish.
CHAOS_SECONDS = 3.0
MIN_KILLS = 5
KILL_EVERY = 0.3
DEADLINE_SECONDS = 180.0
MAX_ATTEMPTS = 6

# Records every completion in the completing transaction itself, with the claim that made it, so
# a double completion cannot hide (a worker killed right after its commit still leaves a row).
AUDIT = """
CREATE TABLE chaos_log (token uuid, stage text, holder text, claim uuid, attempt int);
CREATE FUNCTION chaos_audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF OLD.image_path IS NULL AND NEW.image_path IS NOT NULL THEN
    INSERT INTO chaos_log VALUES (NEW.id, 'image', OLD.claimed_by, OLD.claim_id, OLD.attempts);
  ELSIF OLD.status = 'uploading' AND NEW.status = 'ready' THEN
    INSERT INTO chaos_log VALUES (NEW.id, 'upload', OLD.claimed_by, OLD.claim_id, OLD.attempts);
  ELSIF OLD.status = 'ready' AND NEW.status = 'revealed' THEN
    INSERT INTO chaos_log VALUES (NEW.id, 'reveal', OLD.claimed_by, OLD.claim_id, OLD.attempts);
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER chaos_audit AFTER UPDATE ON tokens_s0
  FOR EACH ROW EXECUTE FUNCTION chaos_audit();
"""


async def _seed(url: str) -> None:
    factory = setup_db_session(url, pool_size=2, pooler=load_settings().db_pooler)
    try:
        async with create_uow_factory(factory)() as uow:
            author = await uow.authors.add(factories.author())
            uow.session.add_all(
                factories.token(
                    author.id, mint_timestamp=factories.BASE_TIME + timedelta(seconds=i)
                )
                for i in range(TOKENS)
            )
    finally:
        await engine_of(factory).dispose()


# Workers are forked from a forkserver that imported the worker code once: real, separate,
# killable processes, without paying an interpreter start-up for each replacement.
CONTEXT = multiprocessing.get_context("forkserver")
CONTEXT.set_forkserver_preload(["tests.support.chaos_proc"])


def _start(url: str, logs: Path, n: int, extra: Sequence[str] = ()) -> BaseProcess:
    argv = [
        "--database-url",
        url,
        "--batch",
        "10",
        "--lease",
        "1.0",
        "--max-attempts",
        str(MAX_ATTEMPTS),
        "--poll",
        "0.05",
        "--log-level",
        "WARNING",
        # Every fourth worker is slow (0.1 s per token, a batch of 10 outlasting its 1 s lease),
        # so heartbeats, lost leases and late completions happen under the killing too.
        "--sleep",
        "0.1" if n % 4 == 0 else "0",
        *extra,
    ]
    process = CONTEXT.Process(target=run_noop_worker, args=(argv, str(logs / f"worker-{n}.log")))
    process.start()
    return process


def _victim(conn: psycopg.Connection[Any], workers: list[BaseProcess], rng: random.Random) -> int:
    """The index of the worker to kill: one that holds a live claim when any does (the holder
    name carries its pid), so the kill leaves tokens for another worker to rescue however fast
    the pipeline runs; a random one otherwise."""
    rows = conn.execute(
        "SELECT DISTINCT split_part(claimed_by, ':', 2) FROM tokens_s0 "
        "WHERE claim_id IS NOT NULL AND lease_expires_at > (now() AT TIME ZONE 'utc')"
    ).fetchall()
    holding = {str(pid) for (pid,) in rows}
    candidates = [i for i, w in enumerate(workers) if str(w.pid) in holding]
    return rng.choice(candidates) if candidates else rng.randrange(len(workers))


def _unfinished(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(
        "SELECT count(*) FROM tokens_s0 WHERE status NOT IN ('revealed', 'failed')"
    ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        pytest.param((), id="defaults"),
        # More handlers than a claim takes: several claims in flight per stage and process.
        pytest.param(("--concurrency", "16", "--batch", "4"), id="concurrency-16"),
    ],
)
def test_killed_workers_lose_nothing_double_nothing_and_leave_nothing_claimed(
    postgres_container: Database, tmp_path: Path, extra: Sequence[str]
) -> None:
    rng = random.Random(20261126)
    with throwaway_database(postgres_container.url) as url:
        migrations.upgrade(url)
        with psycopg.connect(**libpq_kwargs(url), autocommit=True) as conn:  # type: ignore[arg-type]
            conn.execute(AUDIT)  # type: ignore[arg-type]
            asyncio.run(_seed(url))

            started = 0
            workers = []
            numbers: list[int] = []  # each live worker's number (its log file's name)
            for _ in range(WORKERS):
                workers.append(_start(url, tmp_path, started, extra))
                numbers.append(started)
                started += 1
            kills = 0
            try:
                chaos_until = time.monotonic() + CHAOS_SECONDS
                while (time.monotonic() < chaos_until or kills < MIN_KILLS) and _unfinished(conn):
                    time.sleep(KILL_EVERY)
                    victim = _victim(conn, workers, rng)
                    workers[victim].kill()  # SIGKILL
                    workers[victim].join()
                    kills += 1
                    workers[victim] = _start(url, tmp_path, started, extra)
                    numbers[victim] = started
                    started += 1
                deadline = time.monotonic() + DEADLINE_SECONDS
                while _unfinished(conn) and time.monotonic() < deadline:
                    time.sleep(0.2)
                assert _unfinished(conn) == 0, "tokens still in flight at the deadline"
            finally:
                # A replacement started a moment ago may not have reached its entry point yet
                # (SIGTERM there would be the default: death). Its log file appears once it
                # handles SIGTERM itself.
                ready_by = time.monotonic() + 10
                while time.monotonic() < ready_by and not all(
                    (tmp_path / f"worker-{n}.log").exists() for n in numbers
                ):
                    time.sleep(0.01)
                stop_all(workers)  # SIGTERM: drain
            assert kills >= MIN_KILLS, "the work finished before the chaos meant anything"
            assert all(w.exitcode == 0 for w in workers), (
                f"a surviving worker did not drain cleanly: {[w.exitcode for w in workers]}"
            )

            statuses = dict(
                conn.execute("SELECT status::text, count(*) FROM tokens_s0 GROUP BY 1").fetchall()
            )
            failed = conn.execute(
                "SELECT error_data FROM tokens_s0 WHERE status = 'failed'"
            ).fetchall()
            claimed = conn.execute(
                "SELECT count(*) FROM tokens_s0 WHERE claim_id IS NOT NULL"
            ).fetchone()
            completions = conn.execute(
                "SELECT token, stage, holder, claim FROM chaos_log"
            ).fetchall()
            rescued = conn.execute("SELECT count(*) FROM chaos_log WHERE attempt > 1").fetchone()
            revealed = conn.execute("SELECT id FROM tokens_s0 WHERE status = 'revealed'").fetchall()

    assert statuses.get("revealed", 0) + statuses.get("failed", 0) == TOKENS, statuses
    for (error,) in failed:  # only a token killed MAX_ATTEMPTS times in one stage may fail
        assert error["reason"] == "max_attempts_exceeded"
        assert error["attempts"] == MAX_ATTEMPTS and error["last_holder"]
    assert claimed == (0,), "tokens left claimed after every worker stopped"

    per_stage = Counter((token, stage) for token, stage, _, _ in completions)
    assert max(per_stage.values()) == 1, "a token stage was completed twice"
    assert len({claim for *_, claim in completions}) == len(completions)
    assert all(holder for _, _, holder, _ in completions)
    # Killed holders' tokens were completed by someone else on a later attempt: rescue happened.
    assert rescued is not None and rescued[0] > 0
    for (token,) in revealed:
        assert all(per_stage[(token, s)] == 1 for s in ("image", "upload", "reveal"))

    lines = [
        line
        for path in tmp_path.glob("worker-*.log")
        for line in path.read_text(errors="replace").splitlines()
    ]
    for marker in ("InvalidStateTransition", "Traceback", "uow.database_error"):
        offending = [line for line in lines if marker in line]
        assert not offending, offending[:5]
    print(
        f"chaos: {kills} kills, {started} processes, {rescued[0]} rescued completions, {statuses}"
    )
