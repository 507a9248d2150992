"""A mint recorded once (uow.mint_events.record_mint), the gap query recovery needs, and the
checkpoints two pollers share (system_state advance / compare-and-set), on real connections."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import psycopg
import pytest
from psycopg import errors
from sqlalchemy import func, select, text
from sqlmodel import col

from glisk.models import (
    Author,
    FieldValidationError,
    MintConflict,
    MintLog,
    Token,
    TokenStatus,
)
from glisk.repositories import token as token_repository
from glisk.repositories.mint_event import DEFAULT_AUTHOR_PROMPT, MintRecorded
from glisk.repositories.system_state import StateChange
from glisk.testing import libpq_kwargs
from glisk.uow import UnitOfWork, UnitOfWorkFactory
from tests.support import factories
from tests.support.database import Database
from tests.support.factories import BASE_TIME

T = TypeVar("T")
_blocks = itertools.count(100)


def mint_log(start: int, quantity: int = 1, **overrides: Any) -> MintLog:
    block = next(_blocks)
    fields: dict[str, Any] = {
        "tx_hash": factories.tx_hash(),
        "log_index": quantity,  # ERC-721 Transfer logs come first, one per token
        "block_number": block,
        "block_timestamp": BASE_TIME + timedelta(seconds=2 * block),
        "minter": factories.wallet(),
        "author": factories.wallet(),
        "start_token_id": start,
        "quantity": quantity,
    }
    fields.update(overrides)
    return MintLog(**fields)


async def record(
    uow_factory: UnitOfWorkFactory, log: MintLog, new_prompt: str | None = None
) -> MintRecorded:
    """One delivery, in its own unit of work."""
    async with uow_factory() as uow:
        if new_prompt is None:
            return await uow.mint_events.record_mint(log)
        return await uow.mint_events.record_mint(log, new_author_prompt=new_prompt)


async def counts(uow_factory: UnitOfWorkFactory) -> tuple[int, int, int]:
    """(authors, mint_events, tokens)"""
    async with uow_factory() as uow:
        row = (
            await uow.session.execute(
                text(
                    "SELECT (SELECT count(*) FROM authors), (SELECT count(*) FROM mint_events), "
                    "(SELECT count(*) FROM tokens_s0)"
                )
            )
        ).one()
        return (row[0], row[1], row[2])


async def tokens_by_id(uow: UnitOfWork) -> dict[int, Token]:
    result = await uow.session.execute(select(Token).order_by(col(Token.token_id)))
    return {t.token_id: t for t in result.scalars()}


async def held_open(
    uow_factory: UnitOfWorkFactory, first: Callable[[UnitOfWork], Awaitable[T]]
) -> tuple[UnitOfWork, T]:
    """A unit of work that has run ``first`` and stays open (uncommitted) until the caller
    commits or rolls it back: a writer in flight."""
    uow = uow_factory()
    await uow.__aenter__()
    return uow, await first(uow)


async def blocked(tasks: list[asyncio.Task[Any]], seconds: float = 0.3) -> bool:
    """Whether every task is still waiting after ``seconds`` (i.e. on a row lock)."""
    await asyncio.sleep(seconds)
    return not any(task.done() for task in tasks)


# -- one call records a whole mint --------------------------------------------------------------


async def test_a_batch_mint_records_its_log_its_new_author_and_every_token_in_one_call(
    uow_factory: UnitOfWorkFactory,
) -> None:
    log = mint_log(5, quantity=3)
    result = await record(uow_factory, log)
    assert result.new and result.author_created
    assert result.token_ids == range(5, 8)

    async with uow_factory() as uow:
        author = await uow.authors.get_by_wallet(log.author)
        assert author is not None and author.id == result.author_id
        assert author.prompt_text == DEFAULT_AUTHOR_PROMPT
        events = await uow.mint_events.get_by_block_range(log.block_number, log.block_number)
        assert [(e.id, e.tx_hash, e.token_ids) for e in events] == [
            (result.event_id, log.tx_hash, range(5, 8))
        ]
        tokens = await tokens_by_id(uow)
    assert sorted(tokens) == [5, 6, 7]
    for token in tokens.values():
        assert token.author_id == author.id
        assert token.minter_address == log.minter
        assert token.status == TokenStatus.DETECTED
        assert token.mint_timestamp == log.block_timestamp
    assert len({t.id for t in tokens.values()}) == 3


async def test_redelivering_a_log_in_any_letter_case_records_nothing_and_says_it_is_not_new(
    uow_factory: UnitOfWorkFactory,
) -> None:
    log = mint_log(1, quantity=2)
    first = await record(uow_factory, log)
    shouted = replace(log, tx_hash="0x" + log.tx_hash[2:].upper())
    again = [await record(uow_factory, shouted) for _ in range(3)]

    assert [r.new for r in again] == [False, False, False]
    assert {r.event_id for r in again} == {first.event_id}
    assert {r.author_id for r in again} == {first.author_id}
    assert not any(r.author_created for r in again)
    assert await counts(uow_factory) == (1, 1, 2)


async def test_the_author_is_found_by_wallet_in_any_letter_case_and_keeps_its_own(
    uow_factory: UnitOfWorkFactory,
) -> None:
    wallet = "0x" + "aB" * 20
    async with uow_factory() as uow:
        registered = await uow.authors.add(
            factories.author(wallet_address=wallet, prompt_text="my registered prompt")
        )
    lower = await record(uow_factory, mint_log(1, author=wallet.lower()))
    upper = await record(uow_factory, mint_log(2, author="0x" + wallet[2:].upper()))
    created = await record(
        uow_factory, mint_log(3, author="0x" + "cD" * 20), new_prompt="a prompt of my own"
    )

    assert lower.author_id == upper.author_id == registered.id
    assert not lower.author_created and not upper.author_created
    assert created.author_created
    async with uow_factory() as uow:
        author = await uow.authors.get_by_id(registered.id)
        assert author is not None
        assert (author.wallet_address, author.prompt_text) == (wallet, "my registered prompt")
        new_author = await uow.authors.get_by_wallet("0x" + "cd" * 20)
        assert new_author is not None and new_author.prompt_text == "a prompt of my own"


# -- conflicts write nothing --------------------------------------------------------------------


async def test_a_log_claiming_a_minted_token_id_is_refused_with_the_other_log_and_writes_nothing(
    uow_factory: UnitOfWorkFactory,
) -> None:
    holder = mint_log(1, quantity=3)
    await record(uow_factory, holder)
    intruder = mint_log(3, quantity=3)  # 3 is taken; 4 and 5 are free; its author is new

    async with uow_factory() as uow:
        with pytest.raises(MintConflict) as info:
            await uow.mint_events.record_mint(intruder)
        # The refusal left the transaction usable and without a trace of the intruder: other
        # work in the same unit of work still commits.
        await uow.system_state.set_state("after_conflict", True)

    assert info.value.token_ids == [3]
    assert info.value.other == holder.key
    assert info.value.log == intruder.key
    assert "3" in str(info.value) and holder.tx_hash in str(info.value)
    assert await counts(uow_factory) == (1, 1, 3)
    async with uow_factory() as uow:
        assert await uow.authors.get_by_wallet(intruder.author) is None
        assert not await uow.mint_events.exists(*intruder.key)
        assert await uow.system_state.get_state("after_conflict") is True


async def test_a_log_claiming_a_token_that_exists_without_a_log_is_refused(
    uow_factory: UnitOfWorkFactory,
) -> None:
    async with uow_factory() as uow:
        author = await uow.authors.add(factories.author())
        await uow.tokens.add(factories.token(author.id, token_id=7))
    with pytest.raises(MintConflict) as info:
        await record(uow_factory, mint_log(6, quantity=2))
    assert (info.value.token_ids, info.value.other) == ([7], None)
    assert await counts(uow_factory) == (1, 0, 1)


async def test_a_log_delivered_again_with_other_token_ids_is_refused(
    uow_factory: UnitOfWorkFactory,
) -> None:
    log = mint_log(1, quantity=2)
    await record(uow_factory, log)
    altered = replace(log, quantity=3)
    with pytest.raises(MintConflict, match="recorded before with token ids 1 to 2") as info:
        await record(uow_factory, altered)
    assert info.value.other == log.key
    assert await counts(uow_factory) == (1, 1, 2)


async def test_a_log_delivered_again_with_other_free_token_ids_and_a_new_author_writes_nothing(
    uow_factory: UnitOfWorkFactory,
) -> None:
    log = mint_log(1, quantity=2)
    await record(uow_factory, log)
    # The same log key, but token ids nobody holds and an author never seen: only the recorded
    # key stops this delivery.
    altered = replace(log, start_token_id=50, author=factories.wallet())
    async with uow_factory() as uow:
        with pytest.raises(MintConflict, match="recorded before with token ids 1 to 2"):
            await uow.mint_events.record_mint(altered)
        # The caller carries on in the same unit of work, which commits.
        await uow.system_state.set_state("after_conflict", True)
    assert await counts(uow_factory) == (1, 1, 2)
    async with uow_factory() as uow:
        assert await uow.authors.get_by_wallet(altered.author) is None
        assert await uow.system_state.get_state("after_conflict") is True


async def test_a_conflicting_log_racing_the_holder_fails_whole_once_the_holder_commits(
    uow_factory: UnitOfWorkFactory,
) -> None:
    holder = mint_log(10, quantity=3)
    rival = mint_log(12, quantity=2)  # token 12 collides; its author is new as well
    uow, _ = await held_open(uow_factory, lambda u: u.mint_events.record_mint(holder))
    try:
        # The rival's snapshot cannot see the holder's rows: it gets as far as token 12 and waits.
        racing = asyncio.create_task(record(uow_factory, rival))
        assert await blocked([racing])
        await uow.commit()
    finally:
        await uow.__aexit__(None, None, None)
    with pytest.raises(MintConflict) as info:
        await racing
    assert info.value.log == rival.key and info.value.other is None
    assert await counts(uow_factory) == (1, 1, 3)
    async with uow_factory() as check:
        assert await check.authors.get_by_wallet(rival.author) is None


async def test_a_log_waiting_on_a_holder_that_rolls_back_is_recorded(
    uow_factory: UnitOfWorkFactory,
) -> None:
    holder = mint_log(10, quantity=3)
    rival = mint_log(12, quantity=2)
    uow, _ = await held_open(uow_factory, lambda u: u.mint_events.record_mint(holder))
    try:
        racing = asyncio.create_task(record(uow_factory, rival))
        assert await blocked([racing])
        await uow.rollback()
    finally:
        await uow.__aexit__(None, None, None)
    assert (await racing).new
    assert await counts(uow_factory) == (1, 1, 2)


# -- concurrent delivery of the same log --------------------------------------------------------


async def test_eight_connections_delivering_the_same_logs_at_once_record_each_once(
    uow_factory: UnitOfWorkFactory,
) -> None:
    shared_author = factories.wallet()
    # Batch and single mints; some share a new author (created by exactly one of them).
    logs = [
        mint_log(
            1 + 10 * i, quantity=1 + i % 4, author=shared_author if i % 2 else factories.wallet()
        )
        for i in range(12)
    ]
    writers = 8
    outcomes: list[MintRecorded] = []
    for log in logs:
        barrier = asyncio.Barrier(writers)

        async def deliver(log: MintLog = log, barrier: asyncio.Barrier = barrier) -> MintRecorded:
            async with uow_factory() as uow:
                await uow.session.execute(text("SELECT 1"))  # connection and transaction open
                await asyncio.wait_for(barrier.wait(), 20)
                return await uow.mint_events.record_mint(log)

        round_ = await asyncio.gather(*(deliver() for _ in range(writers)))
        assert sum(r.new for r in round_) == 1, log
        assert len({r.event_id for r in round_}) == 1
        outcomes += round_

    assert sum(r.author_created for r in outcomes) == 7  # 6 own authors + 1 shared
    async with uow_factory() as uow:
        tokens = await tokens_by_id(uow)
        authors = (await uow.session.execute(select(func.count()).select_from(Author))).scalar()
    assert sorted(tokens) == sorted(t for log in logs for t in log.token_ids)
    assert authors == 7


@pytest.mark.parametrize("author", ["new", "known"])
async def test_deliveries_in_flight_wait_for_the_first_writer_and_then_report_not_new(
    uow_factory: UnitOfWorkFactory, author: str
) -> None:
    log = mint_log(1, quantity=5)  # with a new author: the waiters queue on the author first
    if author == "known":  # the author exists: the waiters queue on the log key
        earlier = mint_log(10)
        await record(uow_factory, earlier)
        log = replace(log, author=earlier.author)
    uow, first = await held_open(uow_factory, lambda u: u.mint_events.record_mint(log))
    try:
        waiting = [asyncio.create_task(record(uow_factory, log)) for _ in range(7)]
        assert await blocked(waiting)
        await uow.commit()
    finally:
        await uow.__aexit__(None, None, None)
    later = await asyncio.gather(*waiting)
    assert first.new and not any(r.new for r in later)
    assert {r.event_id for r in later} == {first.event_id}
    assert {r.author_id for r in later} == {first.author_id}
    assert await counts(uow_factory) == ((1, 2, 6) if author == "known" else (1, 1, 5))


# -- validation, in the model and in the database -----------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"tx_hash": "0x12"}, "tx_hash"),
        ({"log_index": -1}, "log_index"),
        ({"block_number": 0}, "block_number"),
        ({"block_timestamp": "yesterday"}, "block_timestamp"),
        ({"minter": "0xnope"}, "minter"),
        ({"author": "0x" + "g" * 40}, "author"),
        ({"start_token_id": -1}, "start_token_id"),
        ({"quantity": 0}, "quantity"),
        ({"quantity": 51}, "quantity"),
    ],
)
def test_a_malformed_mint_log_is_refused_naming_the_field(
    overrides: dict[str, Any], field: str
) -> None:
    with pytest.raises(FieldValidationError) as info:
        mint_log(1, **overrides)
    assert info.value.field == field


def test_a_mint_log_normalises_its_hash_and_timestamp_and_round_trips_through_json() -> None:
    aware = datetime(2025, 1, 1, 14, 0, tzinfo=UTC).astimezone()  # the machine's zone
    log = mint_log(1, tx_hash="0x" + "AB" * 32, block_timestamp=aware)
    assert log.tx_hash == "0x" + "ab" * 32
    assert log.block_timestamp == datetime(2025, 1, 1, 14, 0)
    assert MintLog.from_json(log.to_json()) == log


@pytest.mark.parametrize(
    ("change", "field", "rule"),
    [
        ({"colour": "red"}, "colour", "is not a mint log field"),
        ({"minter": None}, "minter", "must be 0x"),
        ({"block_timestamp": "noon"}, "block_timestamp", "ISO 8601"),
    ],
)
def test_a_mint_log_from_json_names_the_bad_field(
    change: dict[str, Any], field: str, rule: str
) -> None:
    data = {**mint_log(1).to_json(), **change}
    with pytest.raises(FieldValidationError, match=rule) as info:
        MintLog.from_json(data)
    assert info.value.field == field
    missing = mint_log(1).to_json()
    del missing["author"]
    with pytest.raises(FieldValidationError, match="author: is required"):
        MintLog.from_json(missing)


async def test_a_bad_prompt_for_a_new_author_is_refused_before_any_sql(
    uow_factory: UnitOfWorkFactory,
) -> None:
    with pytest.raises(FieldValidationError, match="new_author_prompt"):
        await record(uow_factory, mint_log(1), new_prompt="short")
    assert await counts(uow_factory) == (0, 0, 0)


@pytest.mark.parametrize(
    ("token_id", "quantity", "constraint"),
    [
        (-1, 1, "ck_mint_events_token_id_non_negative"),
        (1, 0, "ck_mint_events_quantity_range"),
        (1, 51, "ck_mint_events_quantity_range"),
    ],
)
def test_the_database_refuses_a_bad_mint_event_from_raw_sql(
    postgres_container: Database, token_id: int, quantity: int, constraint: str
) -> None:
    with (
        psycopg.connect(**libpq_kwargs(postgres_container.url)) as conn,  # type: ignore[arg-type]
        pytest.raises(errors.CheckViolation) as info,
    ):
        conn.execute(
            "INSERT INTO mint_events (id, tx_hash, log_index, block_number, block_timestamp, "
            "token_id, quantity, detected_at) "
            "VALUES (gen_random_uuid(), %s, 0, 1, now(), %s, %s, now())",
            ("0x" + "ab" * 32, token_id, quantity),
        )
    assert info.value.diag.constraint_name == constraint


# -- the gap query ------------------------------------------------------------------------------


async def _seed_token_ids(uow_factory: UnitOfWorkFactory, ids: list[int]) -> None:
    async with uow_factory() as uow:
        author = await uow.authors.add(factories.author())
        uow.session.add_all(factories.token(author.id, token_id=i) for i in ids)


async def test_missing_token_ids_lists_every_hole_head_and_tail_in_order(
    uow_factory: UnitOfWorkFactory,
) -> None:
    await _seed_token_ids(uow_factory, [3, 4, 5, 8, 10, 11, 20])
    async with uow_factory() as uow:
        missing = uow.tokens.missing_token_ids
        assert await missing(12) == [1, 2, 6, 7, 9, 12]
        assert await missing(22) == [1, 2, 6, 7, 9, *range(12, 20), 21, 22]
        assert await missing(22, start=5) == [6, 7, 9, *range(12, 20), 21, 22]
        assert await missing(22, limit=4) == [1, 2, 6, 7]
        assert await missing(11, start=10) == []
        assert await missing(2, start=5) == []
        assert await missing(0, start=0) == [0]


async def test_missing_token_ids_on_an_empty_table_is_the_whole_range(
    uow_factory: UnitOfWorkFactory,
) -> None:
    async with uow_factory() as uow:
        assert await uow.tokens.missing_token_ids(5) == [1, 2, 3, 4, 5]
        with pytest.raises(FieldValidationError, match="limit"):
            await uow.tokens.missing_token_ids(5, limit=0)


async def test_missing_token_ids_walks_the_token_id_index_once_in_order(
    uow_factory: UnitOfWorkFactory,
) -> None:
    await _seed_token_ids(uow_factory, list(range(1, 2001)))
    async with uow_factory() as uow:
        await uow.session.execute(text("ANALYZE tokens_s0"))
        await uow.session.execute(text("SET LOCAL enable_seqscan = off"))  # tiny table otherwise
        explain = text("EXPLAIN " + str(token_repository._MISSING))
        params = {"start": 1, "up_to": 2000, "limit": 1000}
        plan = "\n".join((await uow.session.execute(explain, params)).scalars())
    assert "Seq Scan" not in plan, plan
    assert plan.count("uq_tokens_s0_token_id") == 2, plan  # the walk, and one probe for the tail
    assert "CTE Scan" not in plan, plan  # the ids are not copied into a tuplestore
    assert plan.count("Sort  (") == 1, plan  # only the missing ids are sorted, not the index walk


# -- checkpoints two pollers share --------------------------------------------------------------


async def test_advance_moves_a_checkpoint_forward_only(uow_factory: UnitOfWorkFactory) -> None:
    async with uow_factory() as uow:
        state = uow.system_state
        assert await state.advance("last_processed_block", 100) == StateChange(True, 100)
        assert await state.advance("last_processed_block", 99) == StateChange(False, 100)
        assert await state.advance("last_processed_block", 100) == StateChange(False, 100)
        assert await state.advance("last_processed_block", 101) == StateChange(True, 101)
        assert await state.get_state("last_processed_block") == 101


async def test_advance_refuses_a_key_that_holds_no_number_and_a_value_that_is_none(
    uow_factory: UnitOfWorkFactory,
) -> None:
    async with uow_factory() as uow:
        await uow.system_state.set_state("image_generation_service", "replicate")
        with pytest.raises(FieldValidationError, match="must hold a number"):
            await uow.system_state.advance("image_generation_service", 5)
        with pytest.raises(FieldValidationError, match="value: must be an integer"):
            await uow.system_state.advance("last_processed_block", True)  # type: ignore[arg-type]
        assert await uow.system_state.get_state("image_generation_service") == "replicate"


async def test_a_stale_poller_waiting_on_a_newer_one_cannot_move_the_checkpoint_back(
    uow_factory: UnitOfWorkFactory,
) -> None:
    async with uow_factory() as uow:
        await uow.system_state.set_state("last_processed_block", 50)
    uow, _ = await held_open(
        uow_factory, lambda u: u.system_state.advance("last_processed_block", 100)
    )
    try:

        async def stale() -> StateChange:
            async with uow_factory() as other:
                return await other.system_state.advance("last_processed_block", 90)

        waiting = asyncio.create_task(stale())
        assert await blocked([waiting])  # its snapshot still says 50, but it waits for the row
        await uow.commit()
    finally:
        await uow.__aexit__(None, None, None)
    assert await waiting == StateChange(False, 100)


async def test_eight_pollers_advancing_at_once_leave_the_highest_block(
    uow_factory: UnitOfWorkFactory,
) -> None:
    values = [17, 3, 99, 42, 98, 5, 64, 1]
    barrier = asyncio.Barrier(len(values))

    async def poll(value: int) -> StateChange:
        async with uow_factory() as uow:
            await uow.session.execute(text("SELECT 1"))
            await asyncio.wait_for(barrier.wait(), 20)
            return await uow.system_state.advance("last_processed_block", value)

    results = await asyncio.gather(*(poll(v) for v in values))
    async with uow_factory() as uow:
        assert await uow.system_state.get_state("last_processed_block") == 99
    assert results[values.index(99)].changed
    for value, result in zip(values, results, strict=True):
        # Refused only by a value at least as high; accepted values rose in commit order.
        assert result.changed or result.value > value


async def test_compare_and_set_refuses_a_stale_expected_value_and_reports_the_current_one(
    uow_factory: UnitOfWorkFactory,
) -> None:
    async with uow_factory() as uow:
        state = uow.system_state
        assert await state.compare_and_set("cursor", None, {"block": 1}) == StateChange(
            True, {"block": 1}
        )
        assert await state.compare_and_set("cursor", None, {"block": 9}) == StateChange(
            False, {"block": 1}
        )
        assert await state.compare_and_set("cursor", {"block": 1}, {"block": 2}) == StateChange(
            True, {"block": 2}
        )
        assert await state.compare_and_set("cursor", {"block": 1}, {"block": 3}) == StateChange(
            False, {"block": 2}
        )
        assert await state.get_state("cursor") == {"block": 2}
        with pytest.raises(FieldValidationError, match="expected"):
            await state.compare_and_set("cursor", {1, 2}, 3)


async def test_of_eight_writers_expecting_the_same_value_exactly_one_wins(
    uow_factory: UnitOfWorkFactory,
) -> None:
    async with uow_factory() as uow:
        await uow.system_state.set_state("last_processed_block", 10)
    barrier = asyncio.Barrier(8)

    async def swap(value: int) -> StateChange:
        async with uow_factory() as uow:
            await uow.session.execute(text("SELECT 1"))
            await asyncio.wait_for(barrier.wait(), 20)
            return await uow.system_state.compare_and_set("last_processed_block", 10, value)

    results = await asyncio.gather(*(swap(v) for v in range(20, 28)))
    winners = [r for r in results if r.changed]
    assert len(winners) == 1
    assert all(r.value == winners[0].value for r in results)
    async with uow_factory() as uow:
        assert await uow.system_state.get_state("last_processed_block") == winners[0].value
