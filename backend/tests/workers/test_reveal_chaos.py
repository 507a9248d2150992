"""Reveal chaos: reveal worker processes send to the chain stand-in while a killer SIGKILLs them
(some kill themselves between "sent" and "completed") and pauses others past their lease. Every
token must end revealed by exactly one mined transaction, with every pending reveal resolved."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import random
import signal
import threading
import time
from collections import Counter
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import psycopg
import pytest

from glisk.standins.chain_client import FakeChainControl, fake_chain_process
from glisk.testing import libpq_kwargs
from tests.support.database import Database
from tests.support.processes import stop_all
from tests.support.reveal_proc import run_reveal_worker

TOKENS = 600
WORKERS = 4
LEASE = 1.0
# Chaos lasts CHAOS_SECONDS and at least MIN_ACTIONS kills and pauses (however slow the machine),
# while tokens remain unrevealed. DEADLINE_SECONDS is a hang guard, not a speed.
CHAOS_SECONDS = 4.0
MIN_ACTIONS = 5
ACT_EVERY = 0.4
DEADLINE_SECONDS = 180.0

CONTEXT = multiprocessing.get_context("forkserver")
CONTEXT.set_forkserver_preload(["tests.support.reveal_proc"])

SEED = """
INSERT INTO authors (id, wallet_address, prompt_text, created_at)
VALUES (gen_random_uuid(), '0x' || repeat('ab', 20), 'a prompt for the chaos', now());
INSERT INTO tokens_s0 (id, token_id, author_id, minter_address, status, mint_timestamp,
                       image_path, metadata_cid, created_at)
SELECT gen_random_uuid(), g, (SELECT id FROM authors), '0x' || repeat('cd', 20), 'ready',
       timestamp '2025-01-01' + g * interval '1 second', '/img.png', 'bafy' || g, now()
FROM generate_series(1, {tokens}) AS g;
"""


def _start(url: str, chain_url: str, logs: Path, n: int) -> BaseProcess:
    # Every other worker sometimes dies right after a send, before its completion is written.
    die = 0.15 if n % 2 else 0.0
    process = CONTEXT.Process(
        target=run_reveal_worker,
        args=(url, chain_url, str(logs / f"reveal-{n}.log"), n, LEASE, die),
    )
    process.start()
    return process


def _unrevealed(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT count(*) FROM tokens_s0 WHERE status <> 'revealed'").fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.slow
def test_killed_and_paused_reveal_workers_reveal_every_token_with_exactly_one_transaction(
    postgres_container: Database, emptied_tables: None, tmp_path: Path
) -> None:
    rng = random.Random(20261127)
    url = postgres_container.url
    with fake_chain_process(block_time=0.25) as chain:
        with psycopg.connect(**libpq_kwargs(url), autocommit=True) as conn:  # type: ignore[arg-type]
            conn.execute(SEED.format(tokens=TOKENS))  # type: ignore[arg-type]
            workers = [_start(url, chain.url, tmp_path, n) for n in range(WORKERS)]
            started, kills, pauses = WORKERS, 0, 0
            try:
                until = time.monotonic() + CHAOS_SECONDS
                while (time.monotonic() < until or kills + pauses < MIN_ACTIONS) and _unrevealed(
                    conn
                ):
                    time.sleep(ACT_EVERY)
                    victim = rng.randrange(len(workers))
                    process = workers[victim]
                    actions = kills + pauses
                    if actions % 3 == 1 and process.pid is not None and process.is_alive():
                        # A pause past the lease (a GC stall, a frozen VM): it wakes up late.
                        os.kill(process.pid, signal.SIGSTOP)
                        threading.Timer(2.5 * LEASE, _resume, (process.pid,)).start()
                        pauses += 1
                        continue
                    process.kill()
                    process.join()
                    kills += 1
                    workers[victim] = _start(url, chain.url, tmp_path, started)
                    started += 1
                deadline = time.monotonic() + DEADLINE_SECONDS
                while time.monotonic() < deadline:
                    for i, process in enumerate(workers):  # self-killed ones are replaced too
                        if not process.is_alive():
                            workers[i] = _start(url, chain.url, tmp_path, started)
                            started += 1
                    if not _unrevealed(conn):
                        break
                    time.sleep(0.2)
                assert _unrevealed(conn) == 0, "tokens still unrevealed at the deadline"
            finally:
                time.sleep(2.5 * LEASE)  # paused workers have woken up
                stop_all(workers)

            pending = conn.execute(
                "SELECT count(*) FROM reveal_transactions WHERE status = 'pending'"
            ).fetchone()
            claimed = conn.execute(
                "SELECT count(*) FROM tokens_s0 WHERE claim_id IS NOT NULL"
            ).fetchone()
            stored = dict(conn.execute("SELECT token_id, reveal_tx_hash FROM tokens_s0").fetchall())
        report = asyncio.run(FakeChainControl(chain.url).report())

    assert kills + pauses >= MIN_ACTIONS, "the work finished before the chaos meant anything"
    assert pending == (0,), "a pending reveal transaction was left unresolved"
    assert claimed == (0,)
    per_token = Counter(token for tx in report.mined for token in tx.token_ids)
    assert set(per_token) == set(range(1, TOKENS + 1))
    assert max(per_token.values()) == 1, "a token was in two mined transactions"
    assert stored == report.revealed, "the database and the chain disagree on a reveal"
    rebroadcast = [tx for tx in report.transactions if tx.sends > 1]
    print(
        f"reveal chaos: {kills} kills, {pauses} pauses, {len(report.mined)} mined transactions, "
        f"{len(rebroadcast)} rebroadcast, {report.send_calls} sends for {TOKENS} tokens "
        f"({report.send_calls / TOKENS:.3f} per token)"
    )


def _resume(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)
