"""The worker runtime (glisk.workers.Worker): concurrent handlers within a connection budget,
batched fenced completion, backoff and RetryLater, wake-up by NOTIFY, and a database that stops
answering."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import time
import uuid
from collections.abc import Sequence
from typing import Any

import psycopg
import pytest
from sqlalchemy import text

from glisk import migrations
from glisk.embedded import ephemeral_server
from glisk.models import TokenStatus
from glisk.pipeline import STAGES, StageName
from glisk.testing import libpq_kwargs
from glisk.uow import UnitOfWorkFactory
from glisk.workers import Claim, ConnectOptions, PermanentError, RetryLater, Worker, queries
from glisk.workers.run import connect_options_of
from tests.support import factories
from tests.support.factories import BASE_TIME, expire_leases, seed_tokens
from tests.support.waiting import eventually

S = TokenStatus
IMAGE, UPLOAD, REVEAL = STAGES[StageName.IMAGE], STAGES[StageName.UPLOAD], STAGES[StageName.REVEAL]


async def _scalar(uow_factory: UnitOfWorkFactory, sql: str, **params: Any) -> Any:
    async with uow_factory() as uow:
        return (await uow.session.execute(text(sql), params)).scalar_one()


def _connect(uow_factory: UnitOfWorkFactory, **kwargs: Any) -> ConnectOptions:
    return connect_options_of(uow_factory, **kwargs)


class _Gate:
    """Handlers wait here until the test opens it; ``all_started`` is set once ``count`` are in."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.started: list[Claim] = []
        self.all_started = asyncio.Event()
        self.go = asyncio.Event()

    async def pass_(self, claim: Claim) -> None:
        self.started.append(claim)
        if len(self.started) == self.count:
            self.all_started.set()
        await self.go.wait()


@pytest.mark.slow
async def test_twenty_handlers_run_at_once_in_one_process_within_a_three_connection_budget(
    uow_factory: UnitOfWorkFactory,
) -> None:
    ids = await seed_tokens(uow_factory, 200)
    running: set[uuid.UUID] = set()
    handled: list[uuid.UUID] = []
    peak = 0
    app_name = f"glisk-test-{uuid.uuid4().hex[:8]}"

    async def slow(claim: Claim) -> str:
        nonlocal peak
        assert claim.token_uuid not in running, "a token handled by two live claims at once"
        running.add(claim.token_uuid)
        peak = max(peak, len(running))
        handled.append(claim.token_uuid)
        await asyncio.sleep(0.5)
        running.discard(claim.token_uuid)
        return f"/img/{claim.token_id}.png"

    worker = Worker(
        IMAGE,
        slow,
        _connect(uow_factory, application_name=app_name),
        concurrency=20,
        batch=20,
        poll_interval=0.05,
    )
    connections: list[int] = []
    task = asyncio.create_task(worker.run(exit_when_idle=True))
    while not task.done():
        connections.append(
            await _scalar(
                uow_factory,
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = :name",
                name=app_name,
            )
        )
        await asyncio.sleep(0.1)
    stats = await task

    assert sorted(handled) == sorted(ids), "every token handled exactly once"
    assert peak >= 15, f"only {peak} handlers ran at once"
    assert max(connections) <= 3, f"the worker opened {max(connections)} connections"
    assert (stats.claimed, stats.completed, stats.refused) == (200, 200, 0)
    done = await _scalar(uow_factory, "SELECT count(*) FROM tokens_s0 WHERE image_path IS NOT NULL")
    assert done == 200


async def test_a_claim_asks_only_for_free_slots(uow_factory: UnitOfWorkFactory) -> None:
    await seed_tokens(uow_factory, 30)
    release = asyncio.Event()

    async def stuck(claim: Claim) -> str:
        await release.wait()
        return "/img.png"

    worker = Worker(
        IMAGE, stuck, _connect(uow_factory), concurrency=4, batch=10, poll_interval=0.05
    )
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    await asyncio.sleep(0.5)  # several claim rounds' worth of time
    claimed = await _scalar(
        uow_factory, "SELECT count(*) FROM tokens_s0 WHERE claim_id IS NOT NULL"
    )
    assert claimed == 4, "tokens waited behind busy handlers while holding a lease"
    stop.set()
    release.set()
    stats = await asyncio.wait_for(task, 10)
    assert stats.completed == 4


async def test_results_finishing_together_are_written_in_one_statement_and_a_lost_claim_is_refused_alone(
    uow_factory: UnitOfWorkFactory,
) -> None:
    ids = await seed_tokens(uow_factory, 3)
    gate = _Gate(3)

    async def handler(claim: Claim) -> str:
        await gate.pass_(claim)
        return f"/img/{claim.token_id}.png"

    worker = Worker(
        IMAGE, handler, _connect(uow_factory), concurrency=3, batch=3, completion_window=0.2
    )
    writes: list[str] = []
    fetch = worker._writes_db.fetch

    async def counting_fetch(query: str, params: dict[str, Any]) -> Sequence[tuple[Any, ...]]:
        writes.append(query.split("\n")[1])  # the statement's name line
        return await fetch(query, params)

    worker._writes_db.fetch = counting_fetch  # type: ignore[method-assign]
    task = asyncio.create_task(worker.run(exit_when_idle=True))
    await asyncio.wait_for(gate.all_started.wait(), 10)
    # The middle token's lease runs out and another worker takes it over.
    await expire_leases(uow_factory, ids[1])
    async with uow_factory() as uow:
        (rescue,) = (
            await uow.leases.claim(IMAGE, "rescuer", batch=1, lease_seconds=60, max_attempts=3)
        ).claims
    assert rescue.token_uuid == ids[1]
    gate.go.set()
    stats = await asyncio.wait_for(task, 10)

    assert len([w for w in writes if "complete_image" in w]) == 1, writes
    assert (stats.completed, stats.refused) == (2, 1)
    async with uow_factory() as uow:
        tokens = {i: await uow.tokens.get_by_id(i) for i in ids}
    assert tokens[ids[0]].image_path and tokens[ids[2]].image_path  # type: ignore[union-attr]
    lost = tokens[ids[1]]
    assert lost is not None
    assert (lost.image_path, lost.claimed_by, lost.claim_id) == (None, "rescuer", rescue.claim_id)


async def test_failures_finishing_together_are_written_in_one_statement_and_a_lost_claim_is_refused_alone(
    uow_factory: UnitOfWorkFactory,
) -> None:
    ids = await seed_tokens(uow_factory, 3)
    gate = _Gate(3)

    async def handler(claim: Claim) -> str:
        await gate.pass_(claim)
        raise PermanentError("refused")

    worker = Worker(
        IMAGE, handler, _connect(uow_factory), concurrency=3, batch=3, completion_window=0.2
    )
    task = asyncio.create_task(worker.run(exit_when_idle=True))
    await asyncio.wait_for(gate.all_started.wait(), 10)
    await expire_leases(uow_factory, ids[0])
    async with uow_factory() as uow:  # another worker takes it over
        await uow.leases.claim(IMAGE, "rescuer", batch=1, lease_seconds=60, max_attempts=3)
    gate.go.set()
    stats = await asyncio.wait_for(task, 10)
    assert (stats.failed, stats.refused) == (2, 1)
    statuses = {
        i: await _scalar(uow_factory, "SELECT status::text FROM tokens_s0 WHERE id = :id", id=i)
        for i in ids
    }
    assert statuses == {ids[0]: "generating", ids[1]: "failed", ids[2]: "failed"}


def test_backoff_is_full_jitter_under_an_exponential_cap() -> None:
    async def never(claim: Claim) -> str:
        raise AssertionError

    worker = Worker(
        IMAGE,
        never,
        ConnectOptions("postgresql://x@127.0.0.1/x"),
        backoff_base=1.0,
        backoff_cap=10.0,
        rng=random.Random(1),
    )
    for attempt in range(1, 8):
        claim = Claim(
            uuid.uuid4(), 1, uuid.uuid4(), uuid.uuid4(), "w", attempt, BASE_TIME, BASE_TIME,
            None, None, None,
        )  # fmt: skip
        delays = [worker._retry.failure(claim, RuntimeError("x")).delay for _ in range(300)]
        bound = min(10.0, 2.0 ** (attempt - 1))
        assert all(0 <= d <= bound for d in delays)
        assert max(delays) > 0.8 * bound, "the jitter does not cover its range"


def test_worker_id_is_a_deprecated_name_of_holder() -> None:
    async def never(claim: Claim) -> str:
        raise AssertionError

    connect = ConnectOptions("postgresql://x@127.0.0.1/x")
    with pytest.warns(DeprecationWarning, match="holder="):
        assert Worker(IMAGE, never, connect, worker_id="old-name").holder == "old-name"
    assert Worker(IMAGE, never, connect, holder="new-name").holder == "new-name"
    with pytest.raises(TypeError, match="not both"):
        Worker(IMAGE, never, connect, holder="a", worker_id="b")


async def test_a_failed_token_is_not_claimed_again_before_its_backoff_delay(
    uow_factory: UnitOfWorkFactory,
) -> None:
    await seed_tokens(uow_factory, 1)
    calls: list[float] = []

    async def flaky(claim: Claim) -> str:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise RuntimeError("service timeout")
        return "/img.png"

    # The delay the worker will draw for attempt 1, from the same seeded generator.
    expected = random.Random(42).uniform(0, 0.8)
    worker = Worker(
        IMAGE,
        flaky,
        _connect(uow_factory),
        backoff_base=0.8,
        backoff_cap=0.8,
        poll_interval=0.02,
        rng=random.Random(42),
    )
    stats = await asyncio.wait_for(worker.run(exit_when_idle=True), 10)
    assert (stats.failed, stats.completed) == (1, 1)
    assert calls[1] - calls[0] >= expected - 0.02


async def test_a_backoff_keeps_the_token_from_every_claimer_until_it_passes(
    uow_factory: UnitOfWorkFactory,
) -> None:
    (token_uuid,) = await seed_tokens(uow_factory, 1)
    async with uow_factory() as uow:
        (claim,) = (
            await uow.leases.claim(IMAGE, "w", batch=1, lease_seconds=60, max_attempts=3)
        ).claims
    async with uow_factory() as uow:
        token = await uow.leases.fail(IMAGE, claim, {"m": "x"}, max_attempts=3, retry_in=30)
    assert token is not None and token.not_before is not None
    wait = await _scalar(
        uow_factory,
        "SELECT extract(epoch FROM not_before - (now() AT TIME ZONE 'utc')) FROM tokens_s0",
    )
    assert 28 < wait <= 30
    async with uow_factory() as uow:
        batch = await uow.leases.claim(IMAGE, "other", batch=1, lease_seconds=60, max_attempts=3)
    assert batch.claims == []
    async with uow_factory() as uow:
        await uow.session.execute(
            text("UPDATE tokens_s0 SET not_before = not_before - interval '31 seconds'")
        )
    async with uow_factory() as uow:
        (again,) = (
            await uow.leases.claim(IMAGE, "other", batch=1, lease_seconds=60, max_attempts=3)
        ).claims
    assert (again.token_uuid, again.attempt) == (token_uuid, 2)


async def test_retry_later_brings_the_token_back_after_exactly_its_delay_without_spending_an_attempt(
    uow_factory: UnitOfWorkFactory,
) -> None:
    await seed_tokens(uow_factory, 1)
    calls: list[tuple[float, Claim]] = []

    async def rate_limited(claim: Claim) -> str:
        calls.append((time.monotonic(), claim))
        if len(calls) < 3:
            raise RetryLater(0.3, "HTTP 429")
        return "/img.png"

    worker = Worker(IMAGE, rate_limited, _connect(uow_factory), max_attempts=1, poll_interval=0.02)
    stats = await asyncio.wait_for(worker.run(exit_when_idle=True), 10)
    assert (stats.deferred, stats.failed, stats.completed) == (2, 0, 1)
    assert [c.attempt for _, c in calls] == [1, 1, 1], "a deferral spent an attempt"
    assert [c.deferrals for _, c in calls] == [0, 1, 2]
    assert all(b - a >= 0.29 for (a, _), (b, _) in itertools.pairwise(calls))


async def test_deferrals_are_bounded_and_then_count_as_attempts(
    uow_factory: UnitOfWorkFactory,
) -> None:
    (token_uuid,) = await seed_tokens(uow_factory, 1)
    calls = 0

    async def always_429(claim: Claim) -> str:
        nonlocal calls
        calls += 1
        raise RetryLater(0.01)

    worker = Worker(
        IMAGE,
        always_429,
        _connect(uow_factory),
        max_attempts=2,
        max_deferrals=3,
        backoff_base=0.01,
        poll_interval=0.02,
    )
    stats = await asyncio.wait_for(worker.run(exit_when_idle=True), 10)
    assert calls == 3 + 2  # three deferrals, then two attempts
    assert (stats.deferred, stats.failed) == (3, 2)
    async with uow_factory() as uow:
        token = await uow.tokens.get_by_id(token_uuid)
    assert token is not None and token.status == S.FAILED
    assert token.error_data is not None
    assert token.error_data["reason"] == "max_attempts_exceeded"
    assert token.error_data["last_error"]["type"] == "RetryLater"


@pytest.mark.listen
async def test_an_idle_worker_wakes_on_notify_long_before_its_next_poll(
    uow_factory: UnitOfWorkFactory,
) -> None:
    async def image(claim: Claim) -> str:
        return f"/img/{claim.token_id}.png"

    async def upload(claim: Claim) -> str:
        return f"bafy{claim.token_id}"

    connect = _connect(uow_factory)
    stop = asyncio.Event()
    workers = [
        Worker(IMAGE, image, connect, poll_interval=60),
        Worker(UPLOAD, upload, connect, poll_interval=60),
    ]
    tasks = [asyncio.create_task(w.run(stop)) for w in workers]
    try:
        for w in workers:
            assert w.listener is not None
            await asyncio.wait_for(w.listener.listening.wait(), 10)
        await asyncio.sleep(0.1)  # both have polled once, found nothing, and sleep for 60 s
        await seed_tokens(uow_factory, 1)  # the insert trigger wakes the image worker ...

        async def ready() -> bool:
            n = await _scalar(uow_factory, "SELECT count(*) FROM tokens_s0 WHERE status = 'ready'")
            return n == 1

        # ... whose completion wakes the upload worker.
        await eventually(ready, 10, "the token went through image and upload")
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def test_without_listen_an_idle_worker_finds_new_tokens_by_polling(
    uow_factory: UnitOfWorkFactory,
) -> None:
    async def image(claim: Claim) -> str:
        return "/img.png"

    stop = asyncio.Event()
    worker = Worker(IMAGE, image, _connect(uow_factory), poll_interval=0.1, listen=False)
    task = asyncio.create_task(worker.run(stop))
    await asyncio.sleep(0.2)
    await seed_tokens(uow_factory, 1)

    async def done() -> bool:
        return worker.stats.completed == 1

    try:
        await eventually(done, 10, "polling found the token")
    finally:
        stop.set()
        await task
    assert worker.listener is None


async def test_the_reveal_stage_calls_its_handler_once_per_batch_with_batches_running_at_once(
    uow_factory: UnitOfWorkFactory,
) -> None:
    await seed_tokens(uow_factory, 100, S.READY, metadata_cid="bafy")
    sizes: list[int] = []
    running = 0
    peak = 0

    async def reveal(claims: Sequence[Claim]) -> str:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        sizes.append(len(claims))
        await asyncio.sleep(0.2)
        running -= 1
        return "0x" + f"{len(sizes):064x}"

    worker = Worker(REVEAL, reveal, _connect(uow_factory), batch=25, concurrency=2)
    stats = await asyncio.wait_for(worker.run(exit_when_idle=True), 20)
    assert sorted(sizes) == [25, 25, 25, 25]
    assert peak == 2
    assert stats.completed == 100


async def test_a_worker_stopped_mid_batch_lets_handlers_finish_and_writes_their_results(
    uow_factory: UnitOfWorkFactory,
) -> None:
    await seed_tokens(uow_factory, 6)
    stop = asyncio.Event()

    async def slow(claim: Claim) -> str:
        stop.set()  # SIGTERM arrives while every handler is running
        await asyncio.sleep(0.3)
        return "/img.png"

    worker = Worker(IMAGE, slow, _connect(uow_factory), concurrency=3, batch=3)
    stats = await asyncio.wait_for(worker.run(stop), 10)
    assert (stats.claimed, stats.completed) == (3, 3)
    assert (
        await _scalar(uow_factory, "SELECT count(*) FROM tokens_s0 WHERE claim_id IS NOT NULL") == 0
    )


async def test_handlers_that_outlast_the_drain_timeout_are_cancelled_and_their_tokens_given_back(
    uow_factory: UnitOfWorkFactory,
) -> None:
    await seed_tokens(uow_factory, 2)
    stop = asyncio.Event()

    async def hung(claim: Claim) -> str:
        stop.set()
        await asyncio.sleep(3600)
        return "/never.png"

    worker = Worker(IMAGE, hung, _connect(uow_factory), concurrency=2, batch=2, drain_timeout=0.2)
    stats = await asyncio.wait_for(worker.run(stop), 10)
    assert (stats.claimed, stats.completed, stats.released) == (2, 0, 2)
    rows = await _scalar(
        uow_factory,
        "SELECT count(*) FROM tokens_s0 WHERE claim_id IS NULL AND attempts = 0 "
        "AND status = 'generating'",
    )
    assert rows == 2, "released tokens must be claimable at once, their attempt given back"


def _server_pids(postmaster: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == postmaster:
                children.append(int(entry))
    return [postmaster, *children]


@pytest.mark.slow
async def test_a_database_that_stops_answering_surfaces_within_the_timeout_and_the_worker_carries_on() -> (
    None
):
    server = await asyncio.to_thread(ephemeral_server, 50)
    try:
        url = server.url_for("postgres")
        await asyncio.to_thread(migrations.upgrade, url)
        with psycopg.connect(**libpq_kwargs(url), autocommit=True) as conn:  # type: ignore[arg-type]
            conn.execute(
                "INSERT INTO authors (id, wallet_address, prompt_text, created_at) VALUES "
                "(gen_random_uuid(), '0x' || repeat('ab', 20), 'a prompt long enough', now())"
            )
            conn.execute(
                "INSERT INTO tokens_s0 (id, token_id, author_id, minter_address, mint_timestamp, "
                "created_at) SELECT gen_random_uuid(), g, (SELECT id FROM authors), "
                "'0x' || repeat('cd', 20), timestamp '2025-01-01' + g * interval '1 s', now() "
                "FROM generate_series(1, 40) AS g"
            )

        async def image(claim: Claim) -> str:
            await asyncio.sleep(0.05)
            return "/img.png"

        connect = ConnectOptions(url, timeout=1.0, connect_timeout=1.0)
        worker = Worker(
            IMAGE, image, connect, concurrency=1, lease_seconds=3, poll_interval=0.05, listen=False
        )
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))

        async def some_done() -> bool:
            return worker.stats.completed >= 5

        await eventually(some_done, 20, "the worker got going")
        assert server.pid is not None
        pids = _server_pids(server.pid)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:

            async def noticed() -> bool:
                return worker.stats.db_errors >= 1

            # Bounded by the statement limit (1 s), plus a retry's pause and a refused connect.
            elapsed = await eventually(noticed, 15, "the worker noticed the silent database")
            assert elapsed < 6
            assert not task.done()
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)

        async def all_done() -> bool:
            with psycopg.connect(**libpq_kwargs(url)) as conn:  # type: ignore[arg-type]
                row = conn.execute(
                    "SELECT count(*) FROM tokens_s0 WHERE image_path IS NULL"
                ).fetchone()
            return row is not None and row[0] == 0

        await eventually(all_done, 90, "the worker finished after the database came back")
        stop.set()
        await asyncio.wait_for(task, 20)
    finally:
        await asyncio.to_thread(server.stop)


async def test_fenced_writes_find_their_rows_by_claim_id_even_with_stale_statistics(
    uow_factory: UnitOfWorkFactory,
) -> None:
    # Statistics taken while nothing was 'generating'; then 20,000 tokens finish their image and
    # wait for the upload stage: the planner believes 'generating' is rare.
    await factories.seed_in_bulk(uow_factory, 20000, first_token_id=200000)
    async with uow_factory() as uow:
        await uow.session.execute(
            text("UPDATE tokens_s0 SET status = 'generating', image_path = '/img.png'")
        )
    claim_ids = [uuid.uuid4() for _ in range(10)]
    statements = {
        "complete_image": (queries.complete(IMAGE), {"results": ["/x.png"] * 10}),
        "complete_upload": (queries.complete(UPLOAD), {"results": ["bafy"] * 10}),
        "fail": (
            queries.fail(IMAGE),
            {
                "errors": ["{}"] * 10,
                "kinds": ["retry"] * 10,
                "delays": [1.0] * 10,
                "max_attempts": 3,
            },
        ),
        "heartbeat": (queries.HEARTBEAT, {"lease_seconds": 60}),
        "checkpoint": (queries.CHECKPOINT, {"checkpoint": "{}"}),
        "release": (queries.release(IMAGE), {}),
    }
    async with uow_factory() as uow:
        connection = await uow.session.connection()
        for name, (statement, params) in statements.items():
            rows = await connection.exec_driver_sql(
                "EXPLAIN " + statement, {"claim_ids": claim_ids, **params}
            )
            plan = "\n".join(row[0] for row in rows.all())
            assert "ix_tokens_s0_claim_id" in plan, (name, plan)
            assert "Seq Scan on tokens_s0" not in plan, (name, plan)
            assert "ix_tokens_s0_status_mint_timestamp" not in plan, (name, plan)
        await uow.rollback()
