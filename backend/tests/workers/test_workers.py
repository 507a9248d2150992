"""Leased claims (glisk.workers): claim-and-mark in one statement, leases kept alive, late holders
fenced off, abandoned work rescued, attempts bounded, clean drain on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Sequence

import psycopg
import pytest
from sqlalchemy import text

from glisk.models import Token, TokenStatus
from glisk.models.token import TRANSITIONS
from glisk.pipeline import STAGES, Stage, StageName
from glisk.testing import libpq_kwargs
from glisk.uow import UnitOfWorkFactory
from glisk.workers import PermanentError, queries, run_worker
from glisk.workers.claims import Claim, ClaimBatch
from tests.support import factories
from tests.support.database import Database
from tests.support.factories import expire_leases, seed_tokens
from tests.support.locking import never_waiting_for_a_lock
from tests.support.waiting import eventually

S = TokenStatus
IMAGE, UPLOAD, REVEAL = STAGES[StageName.IMAGE], STAGES[StageName.UPLOAD], STAGES[StageName.REVEAL]


async def _claim(
    uow_factory: UnitOfWorkFactory,
    stage: Stage = IMAGE,
    holder: str = "w1",
    batch: int = 10,
    lease: float = 60.0,
    max_attempts: int = 3,
) -> ClaimBatch:
    async with uow_factory() as uow:
        return await uow.leases.claim(
            stage,
            holder,
            batch=batch,
            lease_seconds=lease,
            max_attempts=max_attempts,
        )


async def _token(uow_factory: UnitOfWorkFactory, token_uuid: uuid.UUID) -> Token:
    async with uow_factory() as uow:
        token = await uow.tokens.get_by_id(token_uuid)
        assert token is not None
        return token


def test_every_status_change_a_stage_makes_is_an_edge_of_the_state_machine() -> None:
    for stage in STAGES.values():
        if stage.claim_from != stage.working:
            assert stage.claim_from in TRANSITIONS[stage.working]
        assert stage.working in TRANSITIONS[S.FAILED]


async def test_a_claim_marks_the_oldest_tokens_with_holder_lease_and_attempt_in_one_statement(
    uow_factory: UnitOfWorkFactory,
) -> None:
    ids = await seed_tokens(uow_factory, 5)
    batch = await _claim(uow_factory, batch=3)
    assert [c.token_uuid for c in batch.claims] == ids[:3]
    assert batch.exhausted == []
    for claim in batch.claims:
        token = await _token(uow_factory, claim.token_uuid)
        assert token.status == S.GENERATING
        assert (token.claimed_by, token.claim_id, token.attempts) == ("w1", claim.claim_id, 1)
        assert token.lease_expires_at == claim.lease_expires_at
        assert claim.rescued_from is None
    assert len({c.claim_id for c in batch.claims}) == 3


async def test_sixteen_concurrent_claimers_get_disjoint_batches(
    uow_factory: UnitOfWorkFactory,
) -> None:
    ids = await seed_tokens(uow_factory, 100)
    barrier = asyncio.Barrier(16)

    async def claimer(i: int) -> ClaimBatch:
        async with uow_factory() as uow:
            batch = await uow.leases.claim(
                IMAGE, f"w{i}", batch=5, lease_seconds=60, max_attempts=3
            )
            # Every claim's transaction (and its row locks) stays open until all 16 have theirs.
            await asyncio.wait_for(barrier.wait(), 20)
            return batch

    batches = await asyncio.gather(*(claimer(i) for i in range(16)))
    claimed = [c.token_uuid for b in batches for c in b.claims]
    assert len(claimed) == len(set(claimed)) == 80
    assert set(claimed) == set(ids[:80])


async def test_two_claimers_skip_a_locked_row_and_take_disjoint_rows_without_waiting(
    uow_factory: UnitOfWorkFactory,
) -> None:
    ids = await seed_tokens(uow_factory, 4)
    async with uow_factory() as locker:
        # Another transaction holds the oldest token's row lock (a claim or an UPDATE in flight).
        await locker.session.execute(
            text("SELECT 1 FROM tokens_s0 WHERE id = :id FOR UPDATE"), {"id": ids[0]}
        )
        # Two claimers, each transaction left open while the next one claims.
        async with uow_factory() as first, uow_factory() as second:
            taken = []
            for uow, holder in ((first, "a"), (second, "b")):
                async with never_waiting_for_a_lock(uow, f"claimer {holder}"):
                    batch = await uow.leases.claim(
                        IMAGE, holder, batch=1, lease_seconds=60, max_attempts=3
                    )
                taken.append([c.token_uuid for c in batch.claims])
    assert taken == [[ids[1]], [ids[2]]]
    # The locked token was skipped, not lost: it is the next one claimed.
    assert [c.token_uuid for c in (await _claim(uow_factory, holder="c", batch=1)).claims] == [
        ids[0]
    ]


async def test_the_transactional_worker_queries_skip_tokens_under_a_claim(
    uow_factory: UnitOfWorkFactory,
) -> None:
    ids = await seed_tokens(uow_factory, 2, S.READY)
    await _claim(uow_factory, REVEAL, batch=1)
    async with uow_factory() as uow:
        assert [t.id for t in await uow.tokens.get_ready_for_reveal(10)] == [ids[1]]


async def test_an_expired_lease_is_rescued_and_the_late_holder_is_refused(
    uow_factory: UnitOfWorkFactory,
) -> None:
    (token_uuid,) = await seed_tokens(uow_factory, 1)
    (old,) = (await _claim(uow_factory, holder="slow")).claims
    await expire_leases(uow_factory, token_uuid)

    (new,) = (await _claim(uow_factory, holder="rescuer")).claims
    assert new.token_uuid == token_uuid
    assert new.rescued_from == "slow"
    assert new.attempt == 2
    assert new.claim_id != old.claim_id

    async with uow_factory() as uow:
        assert await uow.leases.complete(IMAGE, old, "/late.png") is None
        assert await uow.leases.fail(IMAGE, old, {"e": 1}, max_attempts=3) is None
        assert await uow.leases.heartbeat([old.claim_id], 60) == set()
    assert (await _token(uow_factory, token_uuid)).image_path is None

    async with uow_factory() as uow:
        done = await uow.leases.complete(IMAGE, new, "/rescued.png")
    assert done is not None
    token = await _token(uow_factory, token_uuid)
    assert (token.status, token.image_path, token.claim_id, token.attempts) == (
        S.GENERATING,
        "/rescued.png",
        None,
        0,
    )


async def test_an_expired_lease_is_not_completed_even_if_nobody_took_over(
    uow_factory: UnitOfWorkFactory,
) -> None:
    (token_uuid,) = await seed_tokens(uow_factory, 1)
    (claim,) = (await _claim(uow_factory)).claims
    await expire_leases(uow_factory, token_uuid)
    async with uow_factory() as uow:
        assert await uow.leases.complete(IMAGE, claim, "/too-late.png") is None


async def test_a_completed_token_is_never_rescued(uow_factory: UnitOfWorkFactory) -> None:
    (token_uuid,) = await seed_tokens(uow_factory, 1)
    (claim,) = (await _claim(uow_factory)).claims
    async with uow_factory() as uow:
        await uow.leases.complete(IMAGE, claim, "/done.png")
    await expire_leases(uow_factory, token_uuid)  # no lease any more: touches nothing that matters
    assert (await _claim(uow_factory, IMAGE, holder="other")).claims == []
    # It moved on: the upload stage takes it (generating -> uploading) and then reveal.
    (upload,) = (await _claim(uow_factory, UPLOAD, holder="uploader")).claims
    assert upload.image_path == "/done.png"
    assert (await _token(uow_factory, token_uuid)).status == S.UPLOADING


async def test_heartbeats_keep_a_slow_workers_token_from_being_rescued(
    uow_factory: UnitOfWorkFactory,
) -> None:
    ids = await seed_tokens(uow_factory, 2)
    lease = 1.5  # heartbeats every half second: only a stall of a second could let a thief in
    rescues: list[list[Claim]] = []

    async def slow(claim: Claim) -> str:
        # Two handlers at once, each running for one and a half leases, while a thief tries to
        # claim every quarter of a lease: only heartbeats keep the tokens.
        for _ in range(6):
            rescues.append((await _claim(uow_factory, holder="thief", lease=lease)).claims)
            await asyncio.sleep(lease / 4)
        return f"/slow/{claim.token_id}.png"

    stats = await run_worker(
        IMAGE, slow, uow_factory, batch=2, lease_seconds=lease, exit_when_idle=True
    )
    assert len(rescues) == 12 and all(r == [] for r in rescues)
    assert (stats.completed, stats.refused) == (2, 0)
    for token_uuid in ids:
        assert (await _token(uow_factory, token_uuid)).image_path is not None


async def test_out_of_attempts_tokens_fail_with_the_reason_holder_and_last_error(
    uow_factory: UnitOfWorkFactory,
) -> None:
    (token_uuid,) = await seed_tokens(uow_factory, 1)
    for attempt in (1, 2):
        (claim,) = (await _claim(uow_factory, holder=f"w{attempt}", max_attempts=2)).claims
        async with uow_factory() as uow:
            token = await uow.leases.fail(
                IMAGE, claim, {"message": f"boom {attempt}"}, max_attempts=2
            )
        assert token is not None
    token = await _token(uow_factory, token_uuid)
    assert token.status == S.FAILED
    assert token.error_data == {
        "reason": "max_attempts_exceeded",
        "stage": "image",
        "attempts": 2,
        "last_holder": "w2",
        "last_error": {"message": "boom 2"},
    }
    assert token.claim_id is None


async def test_a_token_whose_holders_keep_dying_is_failed_by_the_next_claim(
    uow_factory: UnitOfWorkFactory,
) -> None:
    (token_uuid,) = await seed_tokens(uow_factory, 1)
    for holder in ("a", "b"):
        await _claim(uow_factory, holder=holder, max_attempts=2)
        await expire_leases(uow_factory, token_uuid)
    batch = await _claim(uow_factory, holder="c", max_attempts=2)
    assert batch.claims == []
    assert [(e.token_uuid, e.attempts, e.last_holder) for e in batch.exhausted] == [
        (token_uuid, 2, "b")
    ]
    token = await _token(uow_factory, token_uuid)
    assert token.status == S.FAILED and token.claim_id is None
    assert token.error_data is not None
    assert token.error_data["reason"] == "max_attempts_exceeded"
    assert token.error_data["last_holder"] == "b"


async def test_run_worker_retries_failures_and_fails_permanent_errors_at_once(
    uow_factory: UnitOfWorkFactory,
) -> None:
    flaky, doomed = await seed_tokens(uow_factory, 2)
    calls: dict[uuid.UUID, int] = {}

    async def handler(claim: Claim) -> str:
        calls[claim.token_uuid] = calls.get(claim.token_uuid, 0) + 1
        if claim.token_uuid == doomed:
            raise PermanentError("prompt refused by the service")
        if calls[claim.token_uuid] < 3:
            raise RuntimeError("service timeout")
        return "/third-time.png"

    stats = await run_worker(
        IMAGE, handler, uow_factory, max_attempts=3, exit_when_idle=True, backoff_base=0.05
    )
    assert calls == {flaky: 3, doomed: 1}
    assert (stats.completed, stats.failed) == (1, 3)
    assert (await _token(uow_factory, flaky)).image_path == "/third-time.png"
    failed = await _token(uow_factory, doomed)
    assert failed.status == S.FAILED
    assert failed.error_data is not None and failed.error_data["reason"] == "permanent_error"


async def test_a_result_the_state_machine_refuses_counts_as_a_failed_attempt(
    uow_factory: UnitOfWorkFactory,
) -> None:
    (token_uuid,) = await seed_tokens(uow_factory, 1, S.GENERATING, image_path="/img.png")

    async def empty_cid(c: Claim) -> str:
        return ""

    stats = await run_worker(UPLOAD, empty_cid, uow_factory, max_attempts=1, exit_when_idle=True)
    assert (stats.claimed, stats.completed, stats.failed) == (1, 0, 1)
    token = await _token(uow_factory, token_uuid)
    assert token.status == S.FAILED
    assert token.error_data is not None
    assert token.error_data["last_error"]["type"] == "FieldValidationError"


async def test_run_worker_takes_tokens_through_all_stages_and_reveals_in_batches(
    uow_factory: UnitOfWorkFactory,
) -> None:
    ids = await seed_tokens(uow_factory, 60)
    reveal_batches: list[int] = []

    async def image(c: Claim) -> str:
        return f"/img/{c.token_id}.png"

    async def upload(c: Claim) -> str:
        assert c.image_path == f"/img/{c.token_id}.png"
        return f"bafy-{c.token_id}"

    async def reveal(claims: Sequence[Claim]) -> str:
        reveal_batches.append(len(claims))
        return "0x" + f"{len(reveal_batches):064x}"

    await run_worker(IMAGE, image, uow_factory, batch=25, exit_when_idle=True)
    await run_worker(UPLOAD, upload, uow_factory, batch=25, exit_when_idle=True)
    await run_worker(REVEAL, reveal, uow_factory, exit_when_idle=True)
    assert reveal_batches == [50, 10]
    async with uow_factory() as uow:
        tokens = [await uow.tokens.get_by_id(i) for i in ids]
        assert all(t is not None and t.status == S.REVEALED for t in tokens)
        assert await uow.leases.count_claimed() == 0


async def test_an_idle_worker_polls_and_stops_when_asked(uow_factory: UnitOfWorkFactory) -> None:
    stop = asyncio.Event()

    async def never(c: Claim) -> str:
        raise AssertionError("nothing to claim")

    task = asyncio.create_task(run_worker(IMAGE, never, uow_factory, poll_interval=0.05, stop=stop))
    await asyncio.sleep(0.3)  # several empty polls
    assert not task.done()
    stop.set()
    stats = await asyncio.wait_for(task, 5)
    assert stats.claimed == 0


async def test_claim_statements_walk_their_partial_index_past_a_large_finished_history(
    uow_factory: UnitOfWorkFactory,
) -> None:
    # 20,000 revealed tokens and a backlog of 300 per stage, planner statistics up to date.
    await factories.seed_in_bulk(
        uow_factory,
        20900,
        first_token_id=100000,
        status="""CASE WHEN g <= 20000 THEN 'revealed'
                       WHEN g <= 20300 THEN 'detected'
                       WHEN g <= 20600 THEN 'generating'
                       ELSE 'ready' END""",
        image_path="CASE WHEN g > 20300 THEN '/img.png' END",
        metadata_cid="CASE WHEN g <= 20000 OR g > 20600 THEN 'bafy' END",
    )
    async with uow_factory() as uow:
        for name, stage in STAGES.items():
            # The real statement, as TokenLeaseRepository.claim sends it (sequential scans on).
            plan = "\n".join(
                row[0]
                for row in (
                    await (await uow.session.connection()).exec_driver_sql(
                        "EXPLAIN " + queries.claim(stage, 10),
                        {"holder": "w", "lease_seconds": 60, "max_attempts": 3},
                    )
                ).all()
            )
            assert f"Index Scan using ix_tokens_s0_claim_{name}" in plan, plan
            assert "Seq Scan" not in plan, plan


@pytest.mark.parametrize(
    ("statement", "constraint"),
    [
        (
            "UPDATE tokens_s0 SET claim_id = gen_random_uuid(), claimed_by = 'w'",
            "ck_tokens_s0_claim_has_lease",
        ),
        (
            "UPDATE tokens_s0 SET claim_id = gen_random_uuid(), lease_expires_at = now()",
            "ck_tokens_s0_claim_has_holder",
        ),
        (
            "UPDATE tokens_s0 SET status = 'failed', claim_id = gen_random_uuid(), claimed_by = 'w', "
            "lease_expires_at = now()",
            "ck_tokens_s0_finished_token_not_claimed",
        ),
        ("UPDATE tokens_s0 SET attempts = -1", "ck_tokens_s0_attempts_non_negative"),
    ],
)
async def test_the_database_refuses_inconsistent_claims(
    uow_factory: UnitOfWorkFactory, postgres_container: Database, statement: str, constraint: str
) -> None:
    await seed_tokens(uow_factory, 1)
    with psycopg.connect(**libpq_kwargs(postgres_container.url)) as conn:  # type: ignore[arg-type]
        with pytest.raises(psycopg.errors.CheckViolation) as info:
            conn.execute(statement)  # type: ignore[arg-type]
        assert info.value.diag.constraint_name == constraint


@pytest.mark.slow  # a worker process, SIGTERMed
async def test_sigterm_finishes_the_token_in_hand_releases_the_rest_and_exits(
    uow_factory: UnitOfWorkFactory, postgres_container: Database
) -> None:
    ids = await seed_tokens(uow_factory, 5)
    worker = subprocess.Popen(  # noqa: ASYNC220 - started once; waited for in a thread below
        [
            sys.executable,
            "-m",
            "glisk.workers.noop",
            "--stages",
            "image",
            "--batch",
            "5",
            "--sleep",
            "0.4",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "DATABASE_URL": postgres_container.url},  # not in argv: ps shows it
    )
    try:

        async def batch_claimed() -> bool:
            async with uow_factory() as uow:
                return await uow.leases.count_claimed() == 5

        await eventually(batch_claimed, 10, "the worker claimed its batch", poll=0.05)
        worker.send_signal(signal.SIGTERM)
        out, err = await asyncio.to_thread(worker.communicate, timeout=10)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert worker.returncode == 0, err
    (stats,) = [json.loads(line) for line in out.splitlines()]
    assert stats["completed"] >= 1
    assert stats["completed"] + stats["released"] == 5
    async with uow_factory() as uow:
        assert await uow.leases.count_claimed() == 0
        tokens = [await uow.tokens.get_by_id(i) for i in ids]
    done = [t for t in tokens if t is not None and t.image_path is not None]
    waiting = [t for t in tokens if t is not None and t.image_path is None]
    assert len(done) == stats["completed"]
    # Released tokens did not spend an attempt and are claimable again at once.
    assert all(t.attempts == 0 and t.status == S.GENERATING for t in waiting)
    assert len((await _claim(uow_factory, batch=10)).claims) == len(waiting)


async def test_worker_settings_feed_run_worker(uow_factory: UnitOfWorkFactory) -> None:
    from glisk.core.config import Settings

    settings = Settings(_env_file=None, worker_lease_seconds=5, worker_max_attempts=1)  # type: ignore[call-arg]
    (token_uuid,) = await seed_tokens(uow_factory, 1)
    seen: list[tuple[Claim, object]] = []

    async def boom(c: Claim) -> str:
        async with uow_factory() as uow:  # the database's clock, which set the lease
            now = (await uow.session.execute(text("SELECT now() AT TIME ZONE 'utc'"))).scalar_one()
        seen.append((c, now))
        raise RuntimeError("once is enough")

    stats = await run_worker(
        IMAGE, boom, uow_factory, exit_when_idle=True, **settings.worker_options()
    )
    assert (stats.claimed, stats.failed) == (1, 1)
    ((claim, now),) = seen
    assert 3.0 < (claim.lease_expires_at - now).total_seconds() <= 5.0  # type: ignore[operator]
    assert (await _token(uow_factory, token_uuid)).status == S.FAILED  # max_attempts=1 applied
