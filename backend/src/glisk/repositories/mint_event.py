from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID, uuid4

from sqlalchemy import exists, select, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from glisk.core.timezone import utcnow
from glisk.errors import UniqueViolation
from glisk.models import MintConflict, MintEvent, MintLog
from glisk.models import validation as v
from glisk.models.author import PROMPT_MAX, PROMPT_MIN
from glisk.models.mint_event import MAX_MINT_QUANTITY

# The prompt of an author first seen in a mint log (not registered through the API yet); the
# author can replace it later. Callers with a configured default pass their own.
DEFAULT_AUTHOR_PROMPT = "An original GLISK artwork, in the style chosen by its author"

# Records one mint log in one statement, so a failure anywhere leaves nothing behind.
# Every write is conditioned on `proceed`: the log is not recorded yet and none of its token ids
# exists (both as of the statement's snapshot). The writes then lean on the unique indexes for
# what the snapshot cannot see, i.e. writers in flight:
# - the same log in flight: the mint_events insert waits on the (tx_hash, log_index) key and,
#   once the other writer commits, does nothing; no token is inserted (minted reads `event`).
# - the same new author in flight: the authors insert waits on lower(wallet_address) and does
#   nothing; `author` is then empty and so is everything after it. The caller runs the statement
#   again, and the new snapshot sees the other writer's rows.
# - another log with one of our token ids in flight: the tokens insert has no ON CONFLICT, so the
#   unique token_id index makes it wait and then fail, and the whole statement is undone.
# Row order: event key, then author, then tokens in ascending token_id, in every writer; one log
# per transaction can therefore not deadlock with another.
_RECORD = text(
    """
    WITH existing AS (
        SELECT id, token_id, quantity FROM mint_events
        WHERE tx_hash = :tx_hash AND log_index = :log_index
    ),
    taken AS (
        SELECT token_id FROM tokens_s0 WHERE token_id BETWEEN :first AND :last
    ),
    proceed AS (
        SELECT 1 AS go WHERE NOT EXISTS (SELECT FROM existing) AND NOT EXISTS (SELECT FROM taken)
    ),
    found AS (
        SELECT id FROM authors WHERE lower(wallet_address) = lower(:author)
    ),
    created AS (
        INSERT INTO authors (id, wallet_address, prompt_text, created_at)
        SELECT :author_id, :author, :prompt, :now FROM proceed
        WHERE NOT EXISTS (SELECT FROM found)
        ON CONFLICT ((lower(wallet_address))) DO NOTHING
        RETURNING id
    ),
    author AS (
        SELECT id, false AS created FROM found
        UNION ALL
        SELECT id, true FROM created
    ),
    event AS (
        INSERT INTO mint_events (id, tx_hash, log_index, block_number, block_timestamp,
                                 token_id, quantity, detected_at)
        SELECT :event_id, :tx_hash, :log_index, :block_number, :block_timestamp,
               :first, :quantity, :now
        FROM proceed, author
        ON CONFLICT (tx_hash, log_index) DO NOTHING
        RETURNING id
    ),
    minted AS (
        INSERT INTO tokens_s0 (id, token_id, author_id, minter_address, status,
                               mint_timestamp, created_at)
        SELECT t.id, t.token_id, author.id, :minter, 'detected', :block_timestamp, :now
        FROM event, author,
             unnest(CAST(:token_uuids AS uuid[]), CAST(:token_numbers AS integer[]))
                 AS t(id, token_id)
        ORDER BY t.token_id
        RETURNING token_id
    )
    SELECT (SELECT id FROM author) AS author_id,
           (SELECT created FROM author) AS author_created,
           (SELECT id FROM event) AS event_id,
           (SELECT count(*) FROM minted) AS minted,
           (SELECT id FROM existing) AS existing_id,
           (SELECT token_id FROM existing) AS existing_first,
           (SELECT quantity FROM existing) AS existing_quantity,
           (SELECT array_agg(token_id ORDER BY token_id) FROM taken) AS taken
    """
)

# The logs holding the given token ids. A log holds at most MAX_MINT_QUANTITY tokens from its
# token_id on, which bounds the range scan on ix_mint_events_token_id.
_HOLDERS = text(
    f"""
    SELECT e.tx_hash, e.log_index
    FROM mint_events e
    WHERE e.token_id BETWEEN :first - {MAX_MINT_QUANTITY - 1} AND :last
      AND e.token_id + e.quantity > :first
      AND EXISTS (
          SELECT FROM unnest(CAST(:ids AS integer[])) AS x(id)
          WHERE x.id >= e.token_id AND x.id < e.token_id + e.quantity
      )
      AND (e.tx_hash, e.log_index) <> (:tx_hash, :log_index)
    ORDER BY e.token_id
    LIMIT 1
    """
)

# A delivery runs the statement again at most twice: after waiting on a writer in flight with the
# same new author, then on one with the same log; each wait ends in a commit that the next
# snapshot sees. A third "look again" would mean rows vanishing under us.
_ATTEMPTS = 3


@dataclass(frozen=True)
class MintRecorded:
    """What ``record_mint`` did with a log.

    ``new`` is True for exactly one delivery of a log, however many deliver it at once; a
    redelivery gets False and the id of the row recorded earlier. ``author_created`` is True when
    this call created the author (its wallet had not been seen).
    """

    new: bool
    event_id: UUID
    token_ids: range
    author_id: UUID | None
    author_created: bool


class MintEventRepository:
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
        for _ in range(_ATTEMPTS):
            params.update(
                author_id=uuid4(),
                event_id=uuid4(),
                token_uuids=[uuid4() for _ in ids],
                now=utcnow(),
            )
            try:
                row = (await self.session.execute(_RECORD, params)).one()
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
                raise MintConflict(log.key, list(row.taken), await self._holder(log, row.taken))
            if row.event_id is not None:
                return MintRecorded(
                    True, row.event_id, log.token_ids, row.author_id, bool(row.author_created)
                )
            # A writer in flight took the author or the log first and has committed: look again.
        raise RuntimeError(
            f"mint log {log.tx_hash}#{log.log_index}: no outcome after {_ATTEMPTS} attempts"
        )

    async def _holder(self, log: MintLog, taken: list[int]) -> tuple[str, int] | None:
        row = (
            await self.session.execute(
                _HOLDERS,
                {
                    "first": taken[0],
                    "last": taken[-1],
                    "ids": taken,
                    "tx_hash": log.tx_hash,
                    "log_index": log.log_index,
                },
            )
        ).first()
        return None if row is None else (row.tx_hash, row.log_index)

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
