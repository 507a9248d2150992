"""A worker whose handler outlives its lease while nobody takes the token over: every write the
worker makes for that claim afterwards (result, failure, heartbeat, checkpoint, reveal record) is
refused by the live-lease condition alone, since the claim id still matches. The token stays as it
was and the next claim takes it over.

The handler blocks its event loop (a CPU-bound step, a synchronous call, a long GC pause) until
the database says its lease ran out: no heartbeat can run meanwhile, so the lease really runs out,
in a fraction of a second. One slot (``concurrency=1``) keeps the worker from taking its own token
back, and the handler sets ``stop`` as it starts, so the worker writes what it has and returns.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import text

from glisk.pipeline import STAGES, Stage, StageName
from glisk.testing import connect
from glisk.uow import UnitOfWorkFactory
from glisk.workers import Claim, Worker, WorkerStats, checkpoint, queries, record_reveal
from glisk.workers.run import connect_options_of, database_url_of
from tests.support.factories import make_ready, seed_tokens, tx_hash
from tests.support.waiting import eventually

IMAGE, REVEAL = STAGES[StageName.IMAGE], STAGES[StageName.REVEAL]
LEASE = 0.3  # seconds; the heartbeat runs every third of it
HOLDER = "paused"


def outlive_the_lease(url: str, claims: Sequence[Claim]) -> float:
    """Block the event loop (and with it the heartbeat) until the database says every one of
    ``claims`` has a lease that ran out; returns when that was (time.monotonic)."""
    deadline = time.monotonic() + 10
    time.sleep(LEASE)
    with connect(url) as conn:
        while True:
            row = conn.execute(
                f"SELECT bool_or(lease_expires_at > {queries.NOW}) FROM tokens_s0 "
                "WHERE claim_id = ANY(%s)",
                ([c.claim_id for c in claims],),
            ).fetchone()
            if row is not None and row[0] is False:
                return time.monotonic()
            if time.monotonic() > deadline:  # the test then fails on what the worker wrote
                raise AssertionError("the lease did not run out")
            time.sleep(0.02)


def _worker(uow_factory: UnitOfWorkFactory, stage: Stage, handler: Any, batch: int = 1) -> Worker:
    return Worker(
        stage,
        handler,
        connect_options_of(uow_factory),
        holder=HOLDER,
        concurrency=1,
        batch=batch,
        lease_seconds=LEASE,
        poll_interval=0.05,
        listen=False,
    )


async def _token(uow_factory: UnitOfWorkFactory, token: uuid.UUID) -> dict[str, Any]:
    async with uow_factory() as uow:
        row = (
            await uow.session.execute(
                text(
                    "SELECT status::text AS status, image_path, reveal_tx_hash, claim_id, "
                    "claimed_by, attempts, not_before, error_data, checkpoint, "
                    f"lease_expires_at > {queries.NOW} AS lease_live "
                    "FROM tokens_s0 WHERE id = :id"
                ),
                {"id": token},
            )
        ).one()
    return dict(row._mapping)


async def _untouched(uow_factory: UnitOfWorkFactory, stage: Stage, claims: list[Claim]) -> None:
    """The tokens are as the claims left them (no result, no failure, no checkpoint, the lease
    run out), and the next claim takes them over."""
    for claim in claims:
        row = await _token(uow_factory, claim.token_uuid)
        assert (row["claim_id"], row["claimed_by"], row["attempts"]) == (claim.claim_id, HOLDER, 1)
        assert (row[stage.result_column], row["checkpoint"]) == (None, None)
        assert (row["error_data"], row["not_before"], row["lease_live"]) == (None, None, False)
    async with uow_factory() as uow:
        batch = await uow.leases.claim(stage, "rescuer", batch=50, lease_seconds=60, max_attempts=3)
    rescued = sorted((c.token_uuid, c.rescued_from, c.attempt) for c in batch.claims)
    assert rescued == sorted((c.token_uuid, HOLDER, 2) for c in claims)


async def _run(worker: Worker, stop: asyncio.Event) -> WorkerStats:
    return await asyncio.wait_for(worker.run(stop), 10)


async def test_a_result_that_outlived_its_lease_is_refused_though_nobody_took_over(
    uow_factory: UnitOfWorkFactory,
) -> None:
    await seed_tokens(uow_factory, 1)
    url = database_url_of(uow_factory)
    stop = asyncio.Event()
    seen: list[Claim] = []

    async def late(claim: Claim) -> str:
        stop.set()
        seen.append(claim)
        outlive_the_lease(url, [claim])
        return "/late.png"

    stats = await _run(_worker(uow_factory, IMAGE, late), stop)
    assert (stats.completed, stats.refused) == (0, 1), "a result written after the lease ran out"
    await _untouched(uow_factory, IMAGE, seen)


async def test_a_failure_that_outlived_its_lease_is_refused_though_nobody_took_over(
    uow_factory: UnitOfWorkFactory,
) -> None:
    await seed_tokens(uow_factory, 1)
    url = database_url_of(uow_factory)
    stop = asyncio.Event()
    seen: list[Claim] = []

    async def late(claim: Claim) -> str:
        stop.set()
        seen.append(claim)
        outlive_the_lease(url, [claim])
        raise RuntimeError("the image service timed out")

    stats = await _run(_worker(uow_factory, IMAGE, late), stop)
    assert (stats.failed, stats.refused) == (0, 1), "a failure written after the lease ran out"
    await _untouched(uow_factory, IMAGE, seen)


async def test_a_heartbeat_after_the_lease_ran_out_does_not_extend_it(
    uow_factory: UnitOfWorkFactory,
) -> None:
    await seed_tokens(uow_factory, 1)
    url = database_url_of(uow_factory)
    stop = asyncio.Event()
    seen: list[Claim] = []
    heartbeats: list[float] = []  # when each heartbeat statement that has returned was sent
    leases: list[bool] = []  # whether the lease was live after that heartbeat

    async def late(claim: Claim) -> str:
        stop.set()
        seen.append(claim)
        resumed = outlive_the_lease(url, [claim])
        # The handler carries on; the worker's next heartbeat finds the lease run out.
        await eventually(
            lambda: any(sent >= resumed for sent in heartbeats), 5, "a heartbeat after the pause"
        )
        leases.append((await _token(uow_factory, claim.token_uuid))["lease_live"])
        return "/late.png"

    worker = _worker(uow_factory, IMAGE, late)
    fetch = worker._writes_db.fetch

    async def watched_fetch(query: str, params: dict[str, Any]) -> Sequence[tuple[Any, ...]]:
        sent = time.monotonic()
        rows = await fetch(query, params)
        if query is queries.HEARTBEAT:
            heartbeats.append(sent)
        return rows

    worker._writes_db.fetch = watched_fetch  # type: ignore[method-assign]
    stats = await _run(worker, stop)
    assert leases, "no heartbeat ran while the handler carried on after the pause"
    assert leases == [False], "a heartbeat extended a lease that had run out"
    assert (stats.completed, stats.refused) == (0, 1)
    await _untouched(uow_factory, IMAGE, seen)


async def test_a_checkpoint_after_the_lease_ran_out_is_refused_and_stops_the_handler(
    uow_factory: UnitOfWorkFactory,
) -> None:
    await seed_tokens(uow_factory, 1)
    url = database_url_of(uow_factory)
    stop = asyncio.Event()
    seen: list[Claim] = []
    effects: list[int] = []

    async def late(claim: Claim) -> str:
        stop.set()
        seen.append(claim)
        outlive_the_lease(url, [claim])
        await checkpoint(claim, {"about_to": "call the image service"})  # raises LeaseLost
        effects.append(claim.token_id)
        return "/late.png"

    stats = await _run(_worker(uow_factory, IMAGE, late), stop)
    assert effects == [], "the handler went on to its effect after its lease ran out"
    assert (stats.completed, stats.refused) == (0, 1)
    await _untouched(uow_factory, IMAGE, seen)


async def test_a_reveal_recorded_after_the_lease_ran_out_is_refused_and_nothing_is_sent(
    uow_factory: UnitOfWorkFactory,
) -> None:
    tokens = await seed_tokens(uow_factory, 2)
    await make_ready(uow_factory, tokens)
    url = database_url_of(uow_factory)
    stop = asyncio.Event()
    seen: list[Claim] = []
    sent: list[str] = []

    async def late(claims: Sequence[Claim]) -> str:
        stop.set()
        seen.extend(claims)
        outlive_the_lease(url, claims)
        tx = tx_hash()
        await record_reveal(claims, tx, {"nonce": 0})  # raises LeaseLost
        sent.append(tx)
        return tx

    stats = await _run(_worker(uow_factory, REVEAL, late, batch=2), stop)
    assert sent == [], "a reveal transaction was sent after the batch's leases ran out"
    assert (stats.completed, stats.refused) == (0, 2)
    async with uow_factory() as uow:
        rows = (await uow.session.execute(text("SELECT count(*) FROM reveal_transactions"))).one()
    assert rows[0] == 0, "a pending reveal was recorded for claims whose leases ran out"
    await _untouched(uow_factory, REVEAL, seen)
