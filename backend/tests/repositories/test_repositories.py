"""Repository contracts that can break: ordering, case-insensitivity, index use, upserts,
locking behaviour, and refusal of nonsense arguments before any SQL runs."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from glisk.models import (
    FieldValidationError,
    ImageGenerationJob,
    ImageService,
    IPFSRecordType,
    IPFSUploadRecord,
    MintEvent,
    RevealStatus,
    RevealTransaction,
    TokenStatus,
)
from glisk.uow import UnitOfWork, UnitOfWorkFactory
from tests.support import factories
from tests.support.factories import BASE_TIME

S = TokenStatus


async def test_wallet_lookup_ignores_letter_case_and_uses_the_lower_index(
    uow_factory: UnitOfWorkFactory,
) -> None:
    mixed = "0x" + "aB" * 20
    async with uow_factory() as uow:
        created = await uow.authors.add(factories.author(wallet_address=mixed))
    async with uow_factory() as uow:
        for spelling in (mixed, mixed.lower(), "0x" + mixed[2:].upper()):
            found = await uow.authors.get_by_wallet(spelling)
            assert found is not None and found.id == created.id
        assert await uow.authors.get_by_wallet("0x" + "00" * 20) is None
        # With sequential scans priced out, the plan shows whether the query can use the index.
        await uow.session.execute(text("SET LOCAL enable_seqscan = off"))
        plan = "\n".join(
            row[0]
            for row in await uow.session.execute(
                text("EXPLAIN SELECT * FROM authors WHERE lower(wallet_address) = lower(:w)"),
                {"w": mixed},
            )
        )
        assert "uq_authors_wallet_address_lower" in plan


async def test_a_second_author_with_the_same_wallet_in_other_case_is_refused(
    uow_factory: UnitOfWorkFactory,
) -> None:
    async with uow_factory() as uow:
        await uow.authors.add(factories.author(wallet_address="0x" + "ab" * 20))
    with pytest.raises(IntegrityError, match="uq_authors_wallet_address_lower"):
        async with uow_factory() as uow:
            await uow.authors.add(factories.author(wallet_address="0x" + "AB" * 20))


async def test_list_all_is_newest_first_and_pages(uow_factory: UnitOfWorkFactory) -> None:
    async with uow_factory() as uow:
        for i in range(5):
            await uow.authors.add(factories.author(created_at=BASE_TIME + timedelta(minutes=i)))
    async with uow_factory() as uow:
        page1 = await uow.authors.list_all(limit=2)
        page2 = await uow.authors.list_all(limit=2, offset=2)
    stamps = [a.created_at for a in page1 + page2]
    assert stamps == sorted(stamps, reverse=True)
    assert len({a.id for a in page1 + page2}) == 4


async def _seed_tokens(uow: UnitOfWork, statuses: list[TokenStatus]) -> list[uuid.UUID]:
    author = await uow.authors.add(factories.author())
    ids = []
    # Inserted newest first, so ordering by mint_timestamp is not an accident of insertion order.
    for i, status in reversed(list(enumerate(statuses))):
        token = factories.token(
            author.id, status=status, mint_timestamp=BASE_TIME + timedelta(hours=i)
        )
        await uow.tokens.add(token)
        ids.append(token.id)
    return list(reversed(ids))


@pytest.mark.parametrize(
    ("method", "status"),
    [
        ("get_pending_for_generation", S.DETECTED),
        ("get_pending_for_upload", S.GENERATING),
        ("get_ready_for_reveal", S.READY),
    ],
)
async def test_worker_queries_return_only_their_status_oldest_first_up_to_limit(
    uow_factory: UnitOfWorkFactory, method: str, status: TokenStatus
) -> None:
    async with uow_factory() as uow:
        statuses = [status, S.REVEALED, status, S.FAILED, status, status]
        ids = await _seed_tokens(uow, statuses)
    wanted = [token_id for token_id, s in zip(ids, statuses, strict=True) if s == status]
    async with uow_factory() as uow:
        got = await getattr(uow.tokens, method)(limit=3)
        assert [t.id for t in got] == wanted[:3]
        assert all(t.status == status for t in got)
    async with uow_factory() as uow:
        await uow.session.execute(text("UPDATE tokens_s0 SET status = 'failed'"))
    async with uow_factory() as uow:
        assert await getattr(uow.tokens, method)(limit=3) == []


async def test_get_by_status_does_not_lock_or_wait_for_locked_rows(
    uow_factory: UnitOfWorkFactory, session_factory: async_sessionmaker[AsyncSession]
) -> None:
    async with uow_factory() as uow:
        ids = await _seed_tokens(uow, [S.DETECTED] * 3)
    async with uow_factory() as holder:
        locked = await holder.tokens.get_pending_for_generation(limit=3)
        assert len(locked) == 3
        async with uow_factory() as reader:
            await reader.session.execute(text("SET LOCAL lock_timeout = '500ms'"))
            seen = await asyncio.wait_for(reader.tokens.get_by_status("detected"), 5)
            assert [t.id for t in seen] == ids
            # The locked rows are invisible to another worker query, not waited for.
            assert await reader.tokens.get_pending_for_generation(limit=3) == []


async def test_get_by_author_is_newest_mint_first(uow_factory: UnitOfWorkFactory) -> None:
    async with uow_factory() as uow:
        ids = await _seed_tokens(uow, [S.DETECTED, S.READY, S.REVEALED])
        token = await uow.tokens.get_by_id(ids[0])
        assert token is not None
        author_id = token.author_id
    async with uow_factory() as uow:
        got = await uow.tokens.get_by_author(author_id, limit=2)
    assert [t.id for t in got] == [ids[2], ids[1]]


async def test_system_state_upsert_overwrites_and_refreshes_updated_at(
    uow_factory: UnitOfWorkFactory,
) -> None:
    async with uow_factory() as uow:
        assert await uow.system_state.get_state("last_processed_block") is None
        await uow.system_state.set_state("last_processed_block", 100)
        first = (
            await uow.session.execute(text("SELECT updated_at FROM system_state"))
        ).scalar_one()
    await asyncio.sleep(0.01)
    async with uow_factory() as uow:
        await uow.system_state.set_state("last_processed_block", 101)
        await uow.system_state.set_state("reveal_worker_enabled", False)
        await uow.system_state.set_state("image_generation_service", "replicate")
    async with uow_factory() as uow:
        assert await uow.system_state.get_state("last_processed_block") == 101
        assert await uow.system_state.get_state("reveal_worker_enabled") is False
        second = (
            await uow.session.execute(
                text("SELECT updated_at FROM system_state WHERE key = 'last_processed_block'")
            )
        ).scalar_one()
        assert second > first
        assert await uow.system_state.list_all_keys() == [
            "image_generation_service",
            "last_processed_block",
            "reveal_worker_enabled",
        ]
        assert await uow.system_state.delete_state("reveal_worker_enabled") is True
        assert await uow.system_state.delete_state("reveal_worker_enabled") is False
        assert await uow.system_state.get_state("reveal_worker_enabled") is None


async def test_concurrent_set_state_on_a_new_key_never_conflicts(
    uow_factory: UnitOfWorkFactory,
) -> None:
    async def write(value: int) -> None:
        async with uow_factory() as uow:
            await uow.system_state.set_state("last_processed_block", value)

    await asyncio.gather(*(write(i) for i in range(10)))
    async with uow_factory() as uow:
        assert await uow.system_state.get_state("last_processed_block") in range(10)


async def test_mint_events_dedupe_by_hash_in_any_case_and_range_is_inclusive_and_ordered(
    uow_factory: UnitOfWorkFactory,
) -> None:
    tx = factories.tx_hash()
    async with uow_factory() as uow:
        for block, log_index in [(12, 1), (10, 2), (11, 0), (10, 0), (13, 0)]:
            await uow.mint_events.add(
                MintEvent(
                    tx_hash=tx.upper().replace("0X", "0x") if block == 10 else factories.tx_hash(),
                    log_index=log_index,
                    block_number=block,
                    block_timestamp=BASE_TIME,
                    token_id=block * 10 + log_index,
                )
            )
    async with uow_factory() as uow:
        assert await uow.mint_events.exists(tx, 0)
        assert await uow.mint_events.exists(tx.upper().replace("0X", "0x"), 2)
        assert not await uow.mint_events.exists(tx, 5)
        events = await uow.mint_events.get_by_block_range(10, 12)
        assert [(e.block_number, e.log_index) for e in events] == [
            (10, 0),
            (10, 2),
            (11, 0),
            (12, 1),
        ]
    with pytest.raises(IntegrityError, match="uq_mint_events_tx_hash_log_index"):
        async with uow_factory() as uow:
            await uow.mint_events.add(
                MintEvent(
                    tx_hash=tx, log_index=0, block_number=10, block_timestamp=BASE_TIME, token_id=1
                )
            )


async def test_job_and_upload_history_is_newest_first_and_filterable(
    uow_factory: UnitOfWorkFactory,
) -> None:
    async with uow_factory() as uow:
        (token_id,) = await _seed_tokens(uow, [S.GENERATING])
        for i in range(3):
            await uow.image_jobs.add(
                ImageGenerationJob(
                    token_id=token_id,
                    service=ImageService.REPLICATE,
                    retry_count=i,
                    created_at=BASE_TIME + timedelta(minutes=i),
                )
            )
        await uow.ipfs_records.add(
            IPFSUploadRecord(token_id=token_id, record_type=IPFSRecordType.IMAGE)
        )
        await uow.ipfs_records.add(
            IPFSUploadRecord(token_id=token_id, record_type=IPFSRecordType.METADATA)
        )
    async with uow_factory() as uow:
        jobs = await uow.image_jobs.get_by_token(token_id)
        assert [j.retry_count for j in jobs] == [2, 1, 0]
        latest = await uow.image_jobs.get_latest_by_token(token_id)
        assert latest is not None and latest.retry_count == 2
        assert await uow.image_jobs.get_latest_by_token(uuid.uuid4()) is None
        assert len(await uow.ipfs_records.get_by_token(token_id)) == 2
        only = await uow.ipfs_records.get_by_token(token_id, record_type="metadata")
        assert [r.record_type for r in only] == ["metadata"]
        # Deleting the token removes its history (ON DELETE CASCADE).
        await uow.session.execute(text("DELETE FROM tokens_s0 WHERE id = :id"), {"id": token_id})
        assert await uow.image_jobs.get_by_token(token_id) == []


async def test_reveal_lookups_by_hash_and_pending_means_sent(
    uow_factory: UnitOfWorkFactory,
) -> None:
    tx = factories.tx_hash()
    async with uow_factory() as uow:
        sent = await uow.reveal_txs.add(
            RevealTransaction(token_ids=[uuid.uuid4()], status=RevealStatus.SENT, tx_hash=tx)
        )
        await uow.reveal_txs.add(
            RevealTransaction(token_ids=[uuid.uuid4()], status=RevealStatus.PENDING)
        )
        await uow.reveal_txs.add(
            RevealTransaction(token_ids=[uuid.uuid4()], status=RevealStatus.CONFIRMED)
        )
    async with uow_factory() as uow:
        found = await uow.reveal_txs.get_by_tx_hash(tx.upper().replace("0X", "0x"))
        assert found is not None and found.id == sent.id
        assert [r.id for r in await uow.reveal_txs.get_pending()] == [sent.id]
        assert len(await uow.reveal_txs.get_by_status("pending")) == 1


BAD_CALLS: dict[str, tuple[Callable[[UnitOfWork], Awaitable[Any]], str]] = {
    "limit 0": (lambda u: u.tokens.get_pending_for_generation(limit=0), "limit"),
    "limit 1001": (lambda u: u.tokens.get_by_status("ready", limit=1001), "limit"),
    "limit negative": (lambda u: u.authors.list_all(limit=-5), "limit"),
    "limit not int": (lambda u: u.tokens.get_ready_for_reveal(limit="10"), "limit"),  # type: ignore[arg-type]
    "offset negative": (lambda u: u.authors.list_all(offset=-1), "offset"),
    "bad wallet": (lambda u: u.authors.get_by_wallet("0xnothex"), "address"),
    "bad tx hash": (lambda u: u.mint_events.exists("0x12", 0), "tx_hash"),
    "bad log index": (lambda u: u.mint_events.exists(factories.tx_hash(), -1), "log_index"),
    "reversed range": (lambda u: u.mint_events.get_by_block_range(10, 9), "end"),
    "bad reveal hash": (lambda u: u.reveal_txs.get_by_tx_hash("nope"), "tx_hash"),
    "unknown status": (lambda u: u.tokens.get_by_status("minted"), "status"),
    "unknown reveal status": (lambda u: u.reveal_txs.get_by_status("mined"), "status"),
    "unknown record type": (
        lambda u: u.ipfs_records.get_by_token(uuid.uuid4(), "video"),
        "record_type",
    ),
    "bad state key": (lambda u: u.system_state.get_state("no spaces"), "key"),
    "unserialisable state": (lambda u: u.system_state.set_state("k", object()), "value"),
    "NaN state": (lambda u: u.system_state.set_state("k", float("nan")), "value"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
async def test_nonsense_arguments_are_refused_before_sql_naming_the_argument(
    uow_factory: UnitOfWorkFactory, case: str
) -> None:
    call, argument = BAD_CALLS[case]
    async with uow_factory() as uow:
        with pytest.raises(FieldValidationError) as info:
            await call(uow)
        assert info.value.field == argument
        assert str(info.value).startswith(f"{argument}: ")
        # Nothing reached the database: the transaction is still usable.
        assert (await uow.session.execute(text("SELECT 1"))).scalar_one() == 1
