"""Many mint logs in one call (uow.mint_events.record_mints), each answered on its own; and the
rollback of logs a reorg orphaned (uow.mint_events.roll_back), on real connections."""

from __future__ import annotations

import asyncio
import itertools
import secrets
from dataclasses import replace
from datetime import timedelta
from typing import Any

from sqlalchemy import text

from glisk.models import MintLog, TokenStatus
from glisk.repositories.mint_event import MintOutcome
from glisk.uow import UnitOfWork, UnitOfWorkFactory
from tests.support import factories
from tests.support.factories import BASE_TIME

_blocks = itertools.count(500)


def mint_log(start: int, quantity: int = 1, **overrides: Any) -> MintLog:
    block = next(_blocks)
    fields: dict[str, Any] = {
        "tx_hash": factories.tx_hash(),
        "log_index": quantity,
        "block_number": block,
        "block_hash": "0x" + secrets.token_hex(32),
        "block_timestamp": BASE_TIME + timedelta(seconds=2 * block),
        "minter": factories.wallet(),
        "author": factories.wallet(),
        "start_token_id": start,
        "quantity": quantity,
    }
    fields.update(overrides)
    return MintLog(**fields)


async def record(uow_factory: UnitOfWorkFactory, logs: list[MintLog]) -> list[MintOutcome]:
    async with uow_factory() as uow:
        return await uow.mint_events.record_mints(logs)


async def rows(uow_factory: UnitOfWorkFactory, sql: str) -> list[Any]:
    async with uow_factory() as uow:
        return list((await uow.session.execute(text(sql))).all())


async def counts(uow_factory: UnitOfWorkFactory) -> tuple[int, int, int]:
    (row,) = await rows(
        uow_factory,
        "SELECT (SELECT count(*) FROM authors), (SELECT count(*) FROM mint_events), "
        "(SELECT count(*) FROM tokens_s0)",
    )
    return (row[0], row[1], row[2])


async def open_uow(uow_factory: UnitOfWorkFactory) -> UnitOfWork:
    uow = uow_factory()
    return await uow.__aenter__()


async def blocked(tasks: list[asyncio.Task[Any]], seconds: float = 0.3) -> bool:
    """Whether every task is still waiting after ``seconds`` (i.e. on a row lock)."""
    await asyncio.sleep(seconds)
    return not any(task.done() for task in tasks)


async def test_a_payload_is_answered_log_by_log_and_a_duplicate_in_the_middle_stops_nothing(
    uow_factory: UnitOfWorkFactory,
) -> None:
    recorded = mint_log(1, quantity=2)
    await record(uow_factory, [recorded])
    a, b, c = mint_log(3, quantity=3), mint_log(6), mint_log(7, quantity=50)
    clash = mint_log(2, quantity=2)  # token 2 is the recorded log's

    outcomes = await record(uow_factory, [a, recorded, b, a, clash, c])

    assert [o.status for o in outcomes] == [
        "new",
        "duplicate",
        "new",
        "duplicate",
        "conflict",
        "new",
    ]
    assert outcomes[3].event_id == outcomes[0].event_id
    assert outcomes[4].conflict is not None
    assert outcomes[4].conflict.token_ids == [2] and outcomes[4].conflict.other == recorded.key
    assert all(o.author_created for o in (outcomes[0], outcomes[2], outcomes[5]))
    assert await counts(uow_factory) == (4, 4, 2 + 3 + 1 + 50)
    events = await rows(uow_factory, "SELECT tx_hash, block_hash, block_number FROM mint_events")
    assert {(e[0], e[1], e[2]) for e in events} == {
        (log.tx_hash, log.block_hash, log.block_number) for log in (recorded, a, b, c)
    }
    tokens = await rows(
        uow_factory,
        "SELECT t.token_id, lower(w.wallet_address), t.minter_address, t.mint_timestamp "
        "FROM tokens_s0 t JOIN authors w ON w.id = t.author_id",
    )
    expected = {t: log for log in (recorded, a, b, c) for t in log.token_ids}
    assert {row[0] for row in tokens} == set(expected)
    for token_id, author, minter, minted_at in tokens:
        log = expected[token_id]
        assert (author, minter, minted_at) == (log.author.lower(), log.minter, log.block_timestamp)


async def test_a_conflicting_log_writes_nothing_not_even_its_new_author(
    uow_factory: UnitOfWorkFactory,
) -> None:
    async with uow_factory() as uow:
        author = await uow.authors.add(factories.author())
        await uow.tokens.add(factories.token(author.id, token_id=9))
    partly_taken = mint_log(8, quantity=3)  # 9 exists without a log
    fine = mint_log(11)

    outcomes = await record(uow_factory, [partly_taken, fine])

    assert [o.status for o in outcomes] == ["conflict", "new"]
    conflict = outcomes[0].conflict
    assert conflict is not None and (conflict.token_ids, conflict.other) == ([9], None)
    assert await counts(uow_factory) == (2, 1, 2)
    async with uow_factory() as uow:
        assert await uow.authors.get_by_wallet(partly_taken.author) is None


async def test_two_logs_of_one_payload_claiming_the_same_ids_record_the_lower_one_only(
    uow_factory: UnitOfWorkFactory,
) -> None:
    later, lower = mint_log(5, quantity=3), mint_log(4, quantity=2)
    outcomes = await record(uow_factory, [later, lower])
    assert [o.status for o in outcomes] == ["conflict", "new"]
    assert outcomes[0].conflict is not None and outcomes[0].conflict.other == lower.key
    assert await counts(uow_factory) == (1, 1, 2)


async def test_a_log_recorded_before_with_other_token_ids_is_a_conflict(
    uow_factory: UnitOfWorkFactory,
) -> None:
    log = mint_log(1, quantity=2)
    await record(uow_factory, [log])
    outcomes = await record(uow_factory, [replace(log, quantity=3)])
    assert outcomes[0].status == "conflict"
    assert "recorded before with token ids 1 to 2" in str(outcomes[0].conflict)


async def test_racing_writers_of_overlapping_payloads_record_each_log_once(
    uow_factory: UnitOfWorkFactory,
) -> None:
    shared_author = factories.wallet()
    one, both, two = (mint_log(i * 10, quantity=3, author=shared_author) for i in (1, 2, 3))
    first = await open_uow(uow_factory)
    try:
        mine = await first.mint_events.record_mints([one, both])
        # The other writer's snapshot cannot see these rows: it waits on the author, then the log.
        racing = asyncio.create_task(record(uow_factory, [both, two]))
        assert await blocked([racing])
        await first.commit()
    finally:
        await first.__aexit__(None, None, None)
    theirs = await racing

    assert [o.status for o in mine] == ["new", "new"]
    assert [o.status for o in theirs] == ["duplicate", "new"]
    assert theirs[0].event_id == mine[1].event_id
    assert [o.author_created for o in mine + theirs] == [True, False, False, False]
    assert await counts(uow_factory) == (1, 3, 9)


async def test_a_rival_committing_one_of_our_token_ids_makes_that_log_alone_a_conflict(
    uow_factory: UnitOfWorkFactory,
) -> None:
    holder = mint_log(10, quantity=3)
    rival, neighbour = mint_log(12, quantity=2), mint_log(20)
    first = await open_uow(uow_factory)
    try:
        await first.mint_events.record_mints([holder])
        racing = asyncio.create_task(record(uow_factory, [rival, neighbour]))
        assert await blocked([racing])  # on token 12
        await first.commit()
    finally:
        await first.__aexit__(None, None, None)
    outcomes = await racing

    assert [o.status for o in outcomes] == ["conflict", "new"]
    assert outcomes[0].conflict is not None and outcomes[0].conflict.other == holder.key
    assert await counts(uow_factory) == (2, 2, 4)


async def test_a_rolled_back_log_deletes_detected_tokens_and_flags_those_in_work(
    uow_factory: UnitOfWorkFactory,
) -> None:
    orphan, kept = mint_log(1, quantity=4), mint_log(5)
    outcomes = await record(uow_factory, [orphan, kept])
    async with uow_factory() as uow:
        tokens = {t.token_id: t for t in await uow.tokens.get_by_status(TokenStatus.DETECTED)}
        tokens[2].mark_generating()
        tokens[3].mark_generating()
        tokens[3].mark_failed({"reason": "permanent_error", "stage": "image"})
        await uow.session.execute(
            text(
                "UPDATE tokens_s0 SET status = 'generating', claim_id = gen_random_uuid(), "
                "claimed_by = 'w1', lease_expires_at = now() + interval '1 minute' "
                "WHERE token_id = 4"
            )
        )

    async with uow_factory() as uow:
        undone = await uow.mint_events.roll_back([outcomes[0].event_id], detail="reorg at 7")  # type: ignore[list-item]

    assert undone.logs == [orphan.key]
    assert (undone.dropped, undone.flagged) == ([1], [2, 3, 4])
    left = await rows(
        uow_factory,
        "SELECT token_id, status::text, claim_id, error_data FROM tokens_s0 ORDER BY token_id",
    )
    assert [(r[0], r[1], r[2]) for r in left] == [
        (2, "failed", None),
        (3, "failed", None),
        (4, "failed", None),
        (5, "detected", None),
    ]
    for row in left[:3]:
        assert row[3]["reason"] == "mint_orphaned"
        assert row[3]["log"]["tx_hash"] == orphan.tx_hash
        assert row[3]["log"]["block_hash"] == orphan.block_hash
        assert row[3]["detail"] == "reorg at 7"
    assert [r[3]["status"] for r in left[:3]] == ["generating", "failed", "generating"]
    events = await rows(uow_factory, "SELECT tx_hash FROM mint_events")
    assert [e[0] for e in events] == [kept.tx_hash]
    async with uow_factory() as uow:  # rolling back again finds nothing
        assert (await uow.mint_events.roll_back([outcomes[0].event_id], detail="x")).logs == []  # type: ignore[list-item]


async def test_logs_not_on_the_canonical_chain_are_found_by_range_and_by_window(
    uow_factory: UnitOfWorkFactory,
) -> None:
    canonical = mint_log(1, block_number=101)
    orphan_same_block = mint_log(2, block_number=101, block_hash="0x" + "11" * 32)
    orphan_other_key = mint_log(3, block_number=102)
    older_orphan = mint_log(4, block_number=90)
    older_canonical = mint_log(5, block_number=91)
    unknown_block = mint_log(6, block_number=92, block_hash=None)
    outcomes = await record(
        uow_factory,
        [
            canonical,
            orphan_same_block,
            orphan_other_key,
            older_orphan,
            older_canonical,
            unknown_block,
        ],
    )
    ids = {o.log.key: o.event_id for o in outcomes}
    async with uow_factory() as uow:
        await uow.chain_blocks.keep(
            [(91, older_canonical.block_hash), (90, "0x" + "22" * 32)]  # type: ignore[list-item]
        )
        in_range = await uow.mint_events.not_canonical_in_range(100, 102, [canonical])
        in_window = await uow.mint_events.not_in_window(90, 99)
        removed = await uow.mint_events.recorded_from_block(
            [
                (canonical.tx_hash, canonical.log_index, "0x" + "33" * 32),  # another block
                (older_orphan.tx_hash, older_orphan.log_index, older_orphan.block_hash),
            ]
        )
        holders = await uow.mint_events.holders_above([3, 4], 95)

    assert set(in_range) == {ids[orphan_same_block.key], ids[orphan_other_key.key]}
    assert in_window == [ids[older_orphan.key]]
    assert [r.id for r in removed] == [ids[older_orphan.key]]
    assert [h.id for h in holders] == [ids[orphan_other_key.key]]
