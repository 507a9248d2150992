"""Concurrent workers never receive the same token (FOR UPDATE SKIP LOCKED), on real
connections and in separate OS processes; a dead transaction gives its tokens back."""

from __future__ import annotations

import asyncio
import multiprocessing
import uuid
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from datetime import timedelta

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col

from glisk.models import Token, TokenStatus
from glisk.uow import UnitOfWork, UnitOfWorkFactory
from tests.support import factories
from tests.support.database import Database
from tests.support.factories import BASE_TIME
from tests.support.locking import never_waiting_for_a_lock
from tests.support.pipeline_proc import run_pipeline_worker

S = TokenStatus
QUERIES = {
    "get_pending_for_generation": S.DETECTED,
    "get_pending_for_upload": S.GENERATING,
    "get_ready_for_reveal": S.READY,
}


async def _seed(uow_factory: UnitOfWorkFactory, count: int, status: TokenStatus) -> list[uuid.UUID]:
    """``count`` tokens in ``status``, returned oldest mint first."""
    async with uow_factory() as uow:
        author = await uow.authors.add(factories.author())
        tokens = [
            factories.token(
                author.id, status=status, mint_timestamp=BASE_TIME + timedelta(seconds=i)
            )
            for i in range(count)
        ]
        uow.session.add_all(tokens)
    return [t.id for t in tokens]


@pytest.mark.parametrize("workers", [2, 16])
@pytest.mark.parametrize("query", list(QUERIES))
async def test_concurrent_workers_get_disjoint_tokens_that_together_are_the_oldest(
    uow_factory: UnitOfWorkFactory, workers: int, query: str
) -> None:
    per_worker = 5
    seeded = await _seed(uow_factory, 100, QUERIES[query])
    barrier = asyncio.Barrier(workers)

    async def worker() -> list[uuid.UUID]:
        async with uow_factory() as uow:  # its own session, connection and transaction
            tokens = await getattr(uow.tokens, query)(limit=per_worker)
            # Hold the transaction (and its row locks) open until every worker has its batch.
            await asyncio.wait_for(barrier.wait(), 20)
            return [t.id for t in tokens]

    results = await asyncio.gather(*(worker() for _ in range(workers)))
    claimed = [token_id for batch in results for token_id in batch]
    assert all(len(batch) == per_worker for batch in results)
    assert len(claimed) == len(set(claimed)), "a token was handed to two workers"
    # Rows are taken in mint order and only skipped when someone else holds them,
    # so together the workers hold exactly the oldest workers * per_worker tokens.
    assert set(claimed) == set(seeded[: workers * per_worker])


@pytest.mark.parametrize("query", list(QUERIES))
async def test_two_workers_skip_a_locked_row_and_take_disjoint_rows_without_waiting(
    uow_factory: UnitOfWorkFactory, query: str
) -> None:
    seeded = await _seed(uow_factory, 4, QUERIES[query])
    async with uow_factory() as locker:
        # Another transaction holds the oldest token's row lock.
        await locker.session.execute(
            text("SELECT 1 FROM tokens_s0 WHERE id = :id FOR UPDATE"), {"id": seeded[0]}
        )
        # Two workers, each transaction left open while the next one asks.
        async with uow_factory() as first, uow_factory() as second:
            taken = []
            for uow, name in ((first, "first"), (second, "second")):
                async with never_waiting_for_a_lock(uow, f"the {name} worker's {query}"):
                    tokens = await getattr(uow.tokens, query)(limit=1)
                taken.append([t.id for t in tokens])
    assert taken == [[seeded[1]], [seeded[2]]]
    async with uow_factory() as uow:  # the locked token was skipped, not lost
        assert [t.id for t in await getattr(uow.tokens, query)(limit=1)] == [seeded[0]]


async def test_more_workers_than_tokens_leaves_the_rest_with_empty_lists(
    uow_factory: UnitOfWorkFactory,
) -> None:
    seeded = await _seed(uow_factory, 3, S.DETECTED)
    barrier = asyncio.Barrier(6)

    async def worker() -> list[uuid.UUID]:
        async with uow_factory() as uow:
            tokens = await uow.tokens.get_pending_for_generation(limit=2)
            await asyncio.wait_for(barrier.wait(), 20)
            return [t.id for t in tokens]

    results = await asyncio.gather(*(worker() for _ in range(6)))
    claimed = [t for batch in results for t in batch]
    assert sorted(claimed) == sorted(seeded)
    assert sum(1 for batch in results if not batch) >= 3


async def test_an_exception_mid_transaction_returns_the_tokens_to_the_next_worker(
    uow_factory: UnitOfWorkFactory,
) -> None:
    seeded = await _seed(uow_factory, 4, S.DETECTED)

    class HandlerCrashed(Exception):
        pass

    with pytest.raises(HandlerCrashed):
        async with uow_factory() as uow:
            for token in await uow.tokens.get_pending_for_generation(limit=4):
                token.mark_generating()
            await uow.session.flush()
            raise HandlerCrashed
    async with uow_factory() as uow:
        again = await uow.tokens.get_pending_for_generation(limit=10)
        assert [t.id for t in again] == seeded
        assert all(t.status == S.DETECTED for t in again)


async def test_a_killed_connection_releases_its_locks_and_its_work_is_lost_not_half_applied(
    uow_factory: UnitOfWorkFactory, session_factory: async_sessionmaker[AsyncSession]
) -> None:
    seeded = await _seed(uow_factory, 4, S.DETECTED)
    victim = uow_factory()
    await victim.__aenter__()
    try:
        for token in await victim.tokens.get_pending_for_generation(limit=4):
            token.mark_generating()
        await victim.session.flush()
        pid = (await victim.session.execute(text("SELECT pg_backend_pid()"))).scalar_one()

        async with uow_factory() as other:
            assert await other.tokens.get_pending_for_generation(limit=4) == []
        async with session_factory() as admin:
            await admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})

        async def next_worker_gets_them() -> list[uuid.UUID]:
            for _ in range(100):
                async with uow_factory() as uow:
                    tokens = await uow.tokens.get_pending_for_generation(limit=4)
                    if tokens:
                        return [t.id for t in tokens]
                await asyncio.sleep(0.05)
            return []

        assert await next_worker_gets_them() == seeded
        with pytest.raises(DBAPIError):
            await victim.commit()
    finally:
        await victim.__aexit__(None, None, None)  # closes the session; nothing left to commit


async def _status_counts(uow: UnitOfWork) -> Counter[str]:
    rows = await uow.session.execute(select(col(Token.status), func.count()).group_by(Token.status))
    return Counter({str(row[0]): row[1] for row in rows.all()})


@pytest.mark.slow
async def test_eight_processes_push_2000_tokens_through_the_pipeline_exactly_once(
    uow_factory: UnitOfWorkFactory, postgres_container: Database
) -> None:
    seeded = await _seed(uow_factory, 2000, S.DETECTED)
    # forkserver: children fork from a clean server that imported the worker module once, instead
    # of forking this process (threads, event loop) or paying 8 cold interpreter start-ups.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["tests.support.pipeline_proc"])
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(max_workers=8, mp_context=context) as pool:
        futures = [
            # 180 s: a hang guard (a lost token never finishes), not a speed.
            loop.run_in_executor(pool, run_pipeline_worker, postgres_container.url, 180.0)
            for _ in range(8)
        ]
        reports = await asyncio.gather(*futures)

    assert [e for r in reports for e in r["errors"]] == []
    transitions = Counter(pair for r in reports for pair in r["done"])
    for stage in ("generating", "uploading", "ready", "revealed"):
        made = {token for token, s in transitions if s == stage}
        assert made == {str(t) for t in seeded}, f"{stage}: skipped or unknown tokens"
    assert max(transitions.values()) == 1, "a transition was made twice"
    assert sum(1 for r in reports if r["done"]) >= 2, "work was not actually shared"
    async with uow_factory() as uow:
        assert await _status_counts(uow) == Counter({"revealed": 2000})
