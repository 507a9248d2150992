"""``uow.mint_events``: mint logs recorded once with their authors and tokens, the lookups a reorg
or a gap pass needs, and the rollback of orphaned logs.

Its parts live beside it: ``mint_sql`` (the recording statements), ``mint_batch``
(``record_mints``' algorithm), ``mint_rollback`` (finding and undoing orphaned logs) and
``mint_outcomes`` (what recording answers; re-exported here with ``RolledBack`` and
``RecordedLog``).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from uuid import UUID, uuid4

from sqlalchemy import exists, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from glisk.core.timezone import utcnow
from glisk.errors import UniqueViolation
from glisk.models import MintConflict, MintEvent, MintLog
from glisk.models import validation as v
from glisk.models.author import PROMPT_MAX, PROMPT_MIN
from glisk.repositories import mint_batch, mint_rollback
from glisk.repositories.mint_outcomes import (
    DEFAULT_AUTHOR_PROMPT,
    MintOutcome,
    MintRecorded,
    MintStatus,
)
from glisk.repositories.mint_rollback import (
    BY_KEY_AND_BLOCK,
    HOLDERS_ABOVE,
    NOT_CANONICAL_IN_RANGE,
    NOT_IN_WINDOW,
    RecordedLog,
    RolledBack,
)
from glisk.repositories.mint_sql import ATTEMPTS, BLOCK_OF_TOKEN, RECORD

__all__ = [
    "DEFAULT_AUTHOR_PROMPT",
    "MintEventRepository",
    "MintOutcome",
    "MintRecorded",
    "MintStatus",
    "RecordedLog",
    "RolledBack",
]


class MintEventRepository:
    """Mint logs and what they recorded; flushes, never commits."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def record_mint(
        self, log: MintLog, *, new_author_prompt: str = DEFAULT_AUTHOR_PROMPT
    ) -> MintRecorded:
        """Record a mint log once: its mint_events row, its author (found by wallet in any letter
        case, or created with ``new_author_prompt``) and its tokens (status detected, minted at
        the block's time), in one statement of the caller's transaction.

        Delivering a log that is already recorded, or in flight in another transaction, records
        nothing and returns ``new=False``; this is safe from any number of writers at once under
        READ COMMITTED (the unique indexes decide, no lock is taken up front). A delivery in flight
        elsewhere makes this call wait for that transaction to end.

        Raises MintConflict, having written nothing, when a token id of the log already exists
        (minted by another log, or by a backfill), or when the log was recorded before with other
        token ids. If the other writer committed in the same instant, the conflict surfaces as
        the database refusing the token row: the transaction is then aborted and must be rolled
        back (leave the unit of work). Raises FieldValidationError for a bad prompt.

        Locks: the rows written stay locked until the caller's transaction ends, so record one log
        per unit of work, or several in a fixed order, to keep writers from deadlocking.
        """
        v.text_length("new_author_prompt", new_author_prompt, PROMPT_MIN, PROMPT_MAX)
        ids = list(log.token_ids)
        params = {
            "tx_hash": log.tx_hash,
            "log_index": log.log_index,
            "block_number": log.block_number,
            "block_timestamp": log.block_timestamp,
            "first": ids[0],
            "last": ids[-1],
            "quantity": log.quantity,
            "author": log.author,
            "minter": log.minter,
            "prompt": new_author_prompt,
            "token_numbers": ids,
        }
        await self.session.flush()
        for _ in range(ATTEMPTS):
            params.update(
                author_id=uuid4(),
                event_id=uuid4(),
                token_uuids=[uuid4() for _ in ids],
                now=utcnow(),
            )
            try:
                row = (await self.session.execute(RECORD, params)).one()
            except UniqueViolation as exc:
                if exc.constraint != "uq_tokens_s0_token_id":
                    raise
                raise MintConflict(
                    log.key, ids, None, "another writer committed them at the same moment"
                ) from exc
            if row.existing_id is not None:
                if (row.existing_first, row.existing_quantity) != (ids[0], log.quantity):
                    recorded = range(row.existing_first, row.existing_first + row.existing_quantity)
                    raise MintConflict(
                        log.key,
                        ids,
                        log.key,
                        f"this log was recorded before with token ids {recorded.start} to "
                        f"{recorded.stop - 1}",
                    )
                return MintRecorded(False, row.existing_id, log.token_ids, row.author_id, False)
            if row.taken:
                holder = await mint_batch.holder(self.session, log, row.taken)
                raise MintConflict(log.key, list(row.taken), holder)
            if row.event_id is not None:
                return MintRecorded(
                    True, row.event_id, log.token_ids, row.author_id, bool(row.author_created)
                )
            # A writer in flight took the author or the log first and has committed: look again.
        raise RuntimeError(
            f"mint log {log.tx_hash}#{log.log_index}: no outcome after {ATTEMPTS} attempts"
        )

    async def record_mints(
        self, logs: Sequence[MintLog], *, new_author_prompt: str = DEFAULT_AUTHOR_PROMPT
    ) -> list[MintOutcome]:
        """Record many mint logs (a range the follower read, a webhook payload) in one statement
        of the caller's transaction; one outcome per input log, in input order.

        Each log is all or nothing, as with ``record_mint``: its event row, its author (found in
        any letter case, or created with ``new_author_prompt``) and all its tokens, or nothing.
        A log recorded before, or earlier in the same input, is a ``duplicate``; a log whose
        token ids exist already (minted by another log, a backfill, or another log of the same
        input: the one with the lowest first id wins) or that was recorded before with other
        token ids is a ``conflict`` (a MintConflict naming the holder when there is one) and the
        other logs go on. Safe from any number of writers at once under READ COMMITTED, like
        ``record_mint``: writers of the same logs are waited for and the statement runs again
        for the logs they took (at most three rounds); another writer committing one of our
        token ids in the same instant undoes the statement, which runs again inside a savepoint,
        so the caller's transaction is never left aborted. Raises FieldValidationError for a bad
        prompt, before any SQL.

        Locks: the rows written, until the caller's transaction ends; authors, events and tokens
        each in a fixed order, so concurrent calls cannot deadlock each other.
        """
        v.text_length("new_author_prompt", new_author_prompt, PROMPT_MIN, PROMPT_MAX)
        return await mint_batch.record_mints(self.session, logs, new_author_prompt)

    async def not_canonical_in_range(
        self, low: int, high: int, canonical: Sequence[MintLog]
    ) -> list[UUID]:
        """Ids of the logs recorded at blocks ``low < block_number <= high`` that are not among
        ``canonical`` (same key and same block hash; a log recorded without a block hash counts
        as canonical when its key is). In (tx_hash, log_index) order. No locking."""
        rows = await self.session.execute(
            NOT_CANONICAL_IN_RANGE,
            {
                "low": low,
                "high": high,
                "tx_hashes": [log.tx_hash for log in canonical],
                "log_indexes": [log.log_index for log in canonical],
                "block_hashes": [log.block_hash for log in canonical],
            },
        )
        return list(rows.scalars())

    async def not_in_window(self, floor: int, ceiling: int) -> list[UUID]:
        """Ids of the logs recorded at blocks ``floor..ceiling`` with a block hash that
        chain_blocks does not hold for that number (logs without a block hash are left alone).
        In (tx_hash, log_index) order. No locking."""
        if ceiling < floor:
            return []
        rows = await self.session.execute(NOT_IN_WINDOW, {"floor": floor, "ceiling": ceiling})
        return list(rows.scalars())

    async def recorded_from_block(
        self, keys: Sequence[tuple[str, int, str | None]]
    ) -> list[RecordedLog]:
        """The recorded logs among ``keys`` (tx_hash, log_index, block hash or None) whose block
        is that one, or unknown on either side. In (tx_hash, log_index) order. No locking."""
        if not keys:
            return []
        rows = await self.session.execute(
            BY_KEY_AND_BLOCK,
            {
                "tx_hashes": [k[0] for k in keys],
                "log_indexes": [k[1] for k in keys],
                "block_hashes": [k[2] for k in keys],
            },
        )
        return [
            RecordedLog(r.id, r.tx_hash, r.log_index, r.block_number, r.block_hash) for r in rows
        ]

    async def holders_above(self, ids: Sequence[int], above: int) -> list[RecordedLog]:
        """The recorded logs at blocks above ``above`` that hold any of the token ids ``ids``
        (one range scan over their span). No locking."""
        if not ids:
            return []
        rows = await self.session.execute(
            HOLDERS_ABOVE,
            {"first": min(ids), "last": max(ids), "above": above, "ids": sorted(set(ids))},
        )
        return [
            RecordedLog(r.id, r.tx_hash, r.log_index, r.block_number, r.block_hash) for r in rows
        ]

    async def block_of_token(self, token_id: int) -> int | None:
        """The block number of the recorded log that minted ``token_id``; None when no recorded
        log holds it. No locking."""
        v.int_at_least("token_id", token_id, 0)
        return (await self.session.execute(BLOCK_OF_TOKEN, {"id": token_id})).scalar()

    async def roll_back(
        self, event_ids: Sequence[UUID], *, detail: str, at: datetime | None = None
    ) -> RolledBack:
        """Undo what the given mint logs recorded, in two statements of the caller's
        transaction: lock the events (those still there) and all their tokens, then delete the
        tokens still 'detected', flag the others for the operator (status 'failed', or kept
        'revealed', with error_data {"reason": "mint_orphaned", "log": {...}, "detail":
        ``detail``}; any claim ended, the checkpoint kept) and delete the events. An event
        already gone is skipped.

        Locks: the events in (tx_hash, log_index) order, then their tokens in token_id order,
        FOR UPDATE until the caller's transaction ends (the order record_mints writes in).
        Waits for a worker holding one of those token rows in a transaction."""
        return await mint_rollback.roll_back(self.session, event_ids, detail=detail, at=at)

    async def add(self, event: MintEvent) -> MintEvent:
        """Flushes: a duplicate (tx_hash, log_index) raises UniqueViolation here. Writes the event
        row only; ``record_mint`` records a log with its author and tokens."""
        self.session.add(event)
        await self.session.flush()
        return event

    async def exists(self, tx_hash: str, log_index: int) -> bool:
        """Whether this log was recorded; tx_hash in any letter case. Served by the unique key."""
        normalized = v.tx_hash("tx_hash", tx_hash)
        v.int_at_least("log_index", log_index, 0)
        result = await self.session.execute(
            select(
                exists().where(
                    col(MintEvent.tx_hash) == normalized, col(MintEvent.log_index) == log_index
                )
            )
        )
        return bool(result.scalar())

    async def get_by_block_range(self, start: int, end: int) -> list[MintEvent]:
        """Events with start <= block_number <= end, ordered by block_number, log_index."""
        v.int_at_least("start", start, 1)
        v.int_at_least("end", end, 1)
        if end < start:
            raise v.FieldValidationError("end", f"must be >= start ({start})", end)
        result = await self.session.execute(
            select(MintEvent)
            .where(col(MintEvent.block_number).between(start, end))
            .order_by(col(MintEvent.block_number), col(MintEvent.log_index))
        )
        return list(result.scalars())
