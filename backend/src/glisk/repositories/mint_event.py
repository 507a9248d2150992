from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal
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

# Records many mint logs in one statement: the same rules as _RECORD, per log. The caller
# (record_mints) sends distinct logs whose token id ranges do not overlap; each input row `n` is
# decided on its own:
# - `existing`: the log is recorded already (duplicate, or the same key with other token ids);
# - `taken`: a token id of the log exists (a conflict);
# - otherwise it proceeds: its author is found (any letter case) or created, its event and its
#   tokens (detected, minted at the block's time) inserted.
# Decisions read the statement's snapshot; the inserts lean on the unique indexes for writers in
# flight, as _RECORD does: the same log or the same new author in flight is waited for and then
# skipped (no event row comes back: the caller runs those logs again, and the next snapshot sees
# the other writer's rows); another log with one of our token ids in flight makes the token
# INSERT wait and then fail, undoing the whole statement (the caller runs it again inside a
# savepoint). Write order, in every writer: authors by lower(wallet), events by (tx_hash,
# log_index), tokens by token_id; each INSERT sorts its rows before writing any, so a statement
# finishes one table before the next and two of them cannot deadlock.
# Locks: the rows written, until the caller's transaction ends.
_RECORD_MANY = text(
    """
    WITH input AS (
        SELECT * FROM unnest(
            CAST(:tx_hashes AS varchar[]), CAST(:log_indexes AS integer[]),
            CAST(:block_numbers AS integer[]), CAST(:block_hashes AS varchar[]),
            CAST(:block_timestamps AS timestamp[]), CAST(:minters AS varchar[]),
            CAST(:authors AS varchar[]), CAST(:firsts AS integer[]), CAST(:quantities AS integer[])
        ) WITH ORDINALITY AS i(tx_hash, log_index, block_number, block_hash, block_timestamp,
                               minter, author, first, quantity, n)
    ),
    existing AS (
        -- One probe of the (tx_hash, log_index) key per input log, whatever the table's size:
        -- LIMIT keeps the planner from turning this into a hash join over the whole table.
        SELECT i.n, e.id, e.token_id, e.quantity
        FROM input i CROSS JOIN LATERAL (
            SELECT id, token_id, quantity FROM mint_events
            WHERE tx_hash = i.tx_hash AND log_index = i.log_index
            LIMIT 1
        ) AS e
    ),
    taken AS (
        SELECT i.n, array_agg(t.token_id ORDER BY t.token_id) AS ids
        FROM input i JOIN tokens_s0 t
          ON t.token_id BETWEEN i.first AND i.first + i.quantity - 1
        WHERE NOT EXISTS (SELECT FROM existing x WHERE x.n = i.n)
        GROUP BY i.n
    ),
    proceed AS (
        SELECT i.* FROM input i
        WHERE NOT EXISTS (SELECT FROM existing x WHERE x.n = i.n)
          AND NOT EXISTS (SELECT FROM taken t WHERE t.n = i.n)
    ),
    found AS (
        -- One probe of the lower(wallet_address) key per distinct author (as above).
        SELECT w.wallet, a.id
        FROM (SELECT DISTINCT lower(author) AS wallet FROM proceed) AS w
        CROSS JOIN LATERAL (
            SELECT id FROM authors WHERE lower(wallet_address) = w.wallet LIMIT 1
        ) AS a
    ),
    created AS (
        INSERT INTO authors (id, wallet_address, prompt_text, created_at)
        SELECT gen_random_uuid(), w.author, :prompt, :now
        FROM (SELECT DISTINCT ON (lower(author)) author FROM proceed
              ORDER BY lower(author), n) AS w
        WHERE lower(w.author) NOT IN (SELECT wallet FROM found)
        ORDER BY lower(w.author)
        ON CONFLICT ((lower(wallet_address))) DO NOTHING
        RETURNING lower(wallet_address) AS wallet, id
    ),
    author AS (
        SELECT wallet, id, false AS created FROM found
        UNION ALL
        SELECT wallet, id, true FROM created
    ),
    event AS (
        INSERT INTO mint_events (id, tx_hash, log_index, block_number, block_hash,
                                 block_timestamp, token_id, quantity, detected_at)
        SELECT gen_random_uuid(), p.tx_hash, p.log_index, p.block_number, p.block_hash,
               p.block_timestamp, p.first, p.quantity, :now
        FROM proceed p JOIN author a ON a.wallet = lower(p.author)
        ORDER BY p.tx_hash, p.log_index
        ON CONFLICT (tx_hash, log_index) DO NOTHING
        RETURNING id, tx_hash, log_index
    ),
    minted AS (
        INSERT INTO tokens_s0 (id, token_id, author_id, minter_address, status,
                               mint_timestamp, created_at)
        SELECT gen_random_uuid(), g.token_id, a.id, p.minter, 'detected', p.block_timestamp, :now
        FROM event e
        JOIN proceed p ON p.tx_hash = e.tx_hash AND p.log_index = e.log_index
        JOIN author a ON a.wallet = lower(p.author)
        CROSS JOIN LATERAL generate_series(p.first, p.first + p.quantity - 1) AS g(token_id)
        ORDER BY g.token_id
        RETURNING token_id
    )
    SELECT i.n, x.id AS existing_id, x.token_id AS existing_first,
           x.quantity AS existing_quantity, t.ids AS taken, e.id AS event_id,
           a.id AS author_id, a.created AS author_created,
           (SELECT count(*) FROM minted) AS minted
    FROM input i
    LEFT JOIN existing x ON x.n = i.n
    LEFT JOIN taken t ON t.n = i.n
    LEFT JOIN event e ON e.tx_hash = i.tx_hash AND e.log_index = i.log_index
    LEFT JOIN author a ON a.wallet = lower(i.author) AND e.id IS NOT NULL
    ORDER BY i.n
    """
)

# Locks mint logs about to be rolled back (a reorg orphaned their block, or a webhook said
# `removed`) and every token of them: the events still there, in (tx_hash, log_index) order, then
# their tokens in token_id order, the order record_mints writes them in; FOR UPDATE, held until
# the transaction ends, so no worker claims or completes one of these tokens meanwhile and the
# status read here is the one _ROLL_BACK acts on. An event already gone is not returned.
_LOCK_FOR_ROLLBACK = text(
    """
    WITH victim AS (
        SELECT id, tx_hash, log_index, block_number, block_hash, token_id, quantity
        FROM mint_events WHERE id = ANY(CAST(:ids AS uuid[]))
        ORDER BY tx_hash, log_index
        FOR UPDATE
    ),
    held AS (
        SELECT t.id, t.token_id, CAST(t.status AS text) AS status, v.id AS event_id
        FROM tokens_s0 t JOIN victim v
          ON t.token_id BETWEEN v.token_id AND v.token_id + v.quantity - 1
        ORDER BY t.token_id
        FOR UPDATE OF t
    )
    SELECT v.id, v.tx_hash, v.log_index, v.block_number, v.block_hash,
           h.id AS token_uuid, h.token_id, h.status
    FROM victim v LEFT JOIN held h ON h.event_id = v.id
    ORDER BY v.tx_hash, v.log_index, h.token_id
    """
)

# Rolls back the logs _LOCK_FOR_ROLLBACK locked in this transaction: tokens still 'detected' are
# deleted (nothing was done for them); the others are flagged for the operator, never dropped:
# 'failed' with error_data.reason 'mint_orphaned' naming the log (a revealed token keeps its
# status and gets the same error_data), any live claim ended so a late completion is refused, the
# checkpoint kept (a reveal in flight is still reconciled); then the events are deleted. Authors
# stay (an author without tokens is harmless and may mint again).
_ROLL_BACK = text(
    """
    WITH dropped AS (
        DELETE FROM tokens_s0
        WHERE id = ANY(CAST(:drop AS uuid[])) AND status = 'detected'
        RETURNING token_id
    ),
    flagged AS (
        UPDATE tokens_s0 AS t
        SET status = CASE WHEN t.status IN ('revealed', 'failed') THEN t.status
                          ELSE CAST('failed' AS token_status_enum) END,
            claim_id = NULL,
            lease_expires_at = NULL,
            error_data = jsonb_build_object(
                'reason', 'mint_orphaned', 'stage', NULL, 'status', CAST(t.status AS text),
                'log', f.log, 'detail', CAST(:detail AS text), 'at', CAST(:at AS text)
            ) || CASE WHEN t.error_data ? 'history'
                      THEN jsonb_build_object('history', t.error_data -> 'history')
                      ELSE CAST('{}' AS jsonb) END
        FROM unnest(CAST(:flag AS uuid[]), CAST(:flag_logs AS jsonb[])) AS f(id, log)
        WHERE t.id = f.id
        RETURNING t.token_id
    ),
    gone AS (
        DELETE FROM mint_events WHERE id = ANY(CAST(:events AS uuid[])) RETURNING id
    )
    SELECT (SELECT count(*) FROM gone) AS events,
           (SELECT array_agg(token_id ORDER BY token_id) FROM dropped) AS dropped,
           (SELECT array_agg(token_id ORDER BY token_id) FROM flagged) AS flagged
    """
)

# The logs recorded at blocks low < block_number <= high that the chain no longer has there:
# their (tx_hash, log_index, block_hash) is not among the canonical logs given. A log recorded
# without a block hash counts as canonical when its key is. ix_mint_events_block_number; no
# locking (the rollback locks what it acts on).
_NOT_CANONICAL_IN_RANGE = text(
    """
    SELECT e.id FROM mint_events e
    WHERE e.block_number > :low AND e.block_number <= :high
      AND NOT EXISTS (
          SELECT FROM unnest(CAST(:tx_hashes AS text[]), CAST(:log_indexes AS integer[]),
                             CAST(:block_hashes AS text[])) AS c(tx_hash, log_index, block_hash)
          WHERE c.tx_hash = e.tx_hash AND c.log_index = e.log_index
            AND (e.block_hash IS NULL OR e.block_hash = c.block_hash)
      )
    ORDER BY e.tx_hash, e.log_index
    """
)

# The logs recorded at blocks floor <= block_number <= ceiling whose block is not the one the
# follower kept for that number in chain_blocks (it keeps every block that held a canonical mint
# log): a webhook recorded them from a block that was orphaned. Logs without a block hash are
# left alone. ix_mint_events_block_number and chain_blocks' key; no locking.
_NOT_IN_WINDOW = text(
    """
    SELECT e.id FROM mint_events e
    WHERE e.block_number BETWEEN :floor AND :ceiling AND e.block_hash IS NOT NULL
      AND NOT EXISTS (
          SELECT FROM chain_blocks b WHERE b.number = e.block_number AND b.hash = e.block_hash
      )
    ORDER BY e.tx_hash, e.log_index
    """
)

# The recorded logs whose key is given and whose block hash is the one given (or unknown): what
# a webhook's `removed` log names. No locking.
_BY_KEY_AND_BLOCK = text(
    """
    SELECT e.id, e.tx_hash, e.log_index, e.block_number, e.block_hash FROM mint_events e
    JOIN unnest(CAST(:tx_hashes AS text[]), CAST(:log_indexes AS integer[]),
                CAST(:block_hashes AS text[])) AS r(tx_hash, log_index, block_hash)
      ON e.tx_hash = r.tx_hash AND e.log_index = r.log_index
    WHERE e.block_hash IS NULL OR r.block_hash IS NULL OR e.block_hash = r.block_hash
    ORDER BY e.tx_hash, e.log_index
    """
)

# The recorded logs above a block whose token ids meet [first, last]: the candidates a canonical
# log conflicts with when a webhook recorded a log of an orphaned block the follower has not
# reached yet. ix_mint_events_token_id (a log holds at most MAX_MINT_QUANTITY ids); no locking.
_HOLDERS_ABOVE = text(
    f"""
    SELECT e.id, e.tx_hash, e.log_index, e.block_number, e.block_hash
    FROM mint_events e
    WHERE e.token_id BETWEEN :first - {MAX_MINT_QUANTITY - 1} AND :last
      AND e.token_id + e.quantity > :first
      AND e.block_number > :above
      AND EXISTS (
          SELECT FROM unnest(CAST(:ids AS integer[])) AS x(id)
          WHERE x.id >= e.token_id AND x.id < e.token_id + e.quantity
      )
    ORDER BY e.tx_hash, e.log_index
    """
)

# The block of the recorded log holding a token id (a log holds at most MAX_MINT_QUANTITY ids
# from its token_id on: a short range scan on ix_mint_events_token_id). No locking.
_BLOCK_OF_TOKEN = text(
    f"""
    SELECT block_number FROM mint_events
    WHERE token_id BETWEEN :id - {MAX_MINT_QUANTITY - 1} AND :id AND token_id + quantity > :id
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


MintStatus = Literal["new", "duplicate", "conflict"]


@dataclass(frozen=True)
class MintOutcome:
    """What ``record_mints`` did with one log of its input (same position).

    ``new``: recorded by this call (exactly one delivery of a log gets it, however many deliver
    it at once); ``duplicate``: recorded before (or earlier in the same input); ``conflict``:
    nothing written for it, ``conflict`` says why. ``event_id`` is the log's row when it is
    recorded; ``author_created`` is True on the first log of the input whose author this call
    created (exactly one log, across every writer, for each author created).
    """

    log: MintLog
    status: MintStatus
    event_id: UUID | None = None
    author_id: UUID | None = None
    author_created: bool = False
    conflict: MintConflict | None = None

    @property
    def new(self) -> bool:
        return self.status == "new"


@dataclass(frozen=True)
class RolledBack:
    """What ``roll_back`` did: the logs deleted, the token ids deleted (they were still
    'detected'), and the token ids flagged for the operator (already in work: failed with
    reason 'mint_orphaned', or revealed and marked so)."""

    logs: list[tuple[str, int]] = field(default_factory=list[tuple[str, int]])
    dropped: list[int] = field(default_factory=list[int])
    flagged: list[int] = field(default_factory=list[int])

    def __add__(self, other: RolledBack) -> RolledBack:
        return RolledBack(
            self.logs + other.logs, self.dropped + other.dropped, self.flagged + other.flagged
        )


@dataclass(frozen=True)
class RecordedLog:
    """A recorded log's row id, key and block."""

    id: UUID
    tx_hash: str
    log_index: int
    block_number: int
    block_hash: str | None


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
        outcomes: list[MintOutcome | None] = [None] * len(logs)
        first_copy: dict[tuple[str, int], int] = {}
        for position, log in enumerate(logs):
            first_copy.setdefault(log.key, position)
        distinct = sorted(first_copy.values())
        # Two different logs of one input claiming the same id: the chain never says so, a
        # forged or mixed-up payload might. The one with the lowest (first id, position) goes.
        end, holder = -1, -1
        for position in sorted(distinct, key=lambda i: (logs[i].start_token_id, i)):
            log = logs[position]
            if log.start_token_id < end:
                ids = [i for i in log.token_ids if i < end]
                outcomes[position] = MintOutcome(
                    log,
                    "conflict",
                    conflict=MintConflict(
                        log.key, ids, logs[holder].key, "another log of the same delivery"
                    ),
                )
            else:
                end, holder = log.token_ids.stop, position
        pending = [i for i in distinct if outcomes[i] is None]
        await self.session.flush()
        for _ in range(_ATTEMPTS):
            if not pending:
                break
            rows = await self._record_many([logs[i] for i in pending], new_author_prompt)
            again: list[int] = []
            for position, row in zip(pending, rows, strict=True):
                outcome = await self._outcome(logs[position], row)
                if outcome is None:
                    again.append(position)
                outcomes[position] = outcome
            pending = again
        if pending:
            log = logs[pending[0]]
            raise RuntimeError(
                f"mint log {log.tx_hash}#{log.log_index}: no outcome after {_ATTEMPTS} attempts"
            )
        # Several logs of one call may share an author it created: the first of them says so.
        created: set[UUID] = set()
        for position, outcome in enumerate(outcomes):
            if outcome is not None and outcome.author_created and outcome.author_id is not None:
                if outcome.author_id in created:
                    outcomes[position] = dataclasses.replace(outcome, author_created=False)
                created.add(outcome.author_id)
        for position, log in enumerate(logs):
            first = outcomes[first_copy[log.key]]
            assert first is not None
            if position != first_copy[log.key]:
                status: MintStatus = "conflict" if first.status == "conflict" else "duplicate"
                outcomes[position] = MintOutcome(
                    log, status, first.event_id, first.author_id, False, first.conflict
                )
        return [o for o in outcomes if o is not None]

    async def _record_many(self, logs: list[MintLog], prompt: str) -> list[Any]:
        params = {
            "tx_hashes": [log.tx_hash for log in logs],
            "log_indexes": [log.log_index for log in logs],
            "block_numbers": [log.block_number for log in logs],
            "block_hashes": [log.block_hash for log in logs],
            "block_timestamps": [log.block_timestamp for log in logs],
            "minters": [log.minter for log in logs],
            "authors": [log.author for log in logs],
            "firsts": [log.start_token_id for log in logs],
            "quantities": [log.quantity for log in logs],
            "prompt": prompt,
        }
        for attempt in range(_ATTEMPTS):
            params["now"] = utcnow()
            try:
                async with self.session.begin_nested():
                    return list((await self.session.execute(_RECORD_MANY, params)).all())
            except UniqueViolation as exc:
                # Another writer committed one of our token ids after our snapshot: the next
                # snapshot sees it, and that log becomes a conflict.
                if exc.constraint != "uq_tokens_s0_token_id" or attempt == _ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    async def _outcome(self, log: MintLog, row: Any) -> MintOutcome | None:
        if row.existing_id is not None:
            if (row.existing_first, row.existing_quantity) != (log.start_token_id, log.quantity):
                recorded = range(row.existing_first, row.existing_first + row.existing_quantity)
                conflict = MintConflict(
                    log.key,
                    list(log.token_ids),
                    log.key,
                    f"this log was recorded before with token ids {recorded.start} to "
                    f"{recorded.stop - 1}",
                )
                return MintOutcome(log, "conflict", row.existing_id, conflict=conflict)
            return MintOutcome(log, "duplicate", row.existing_id)
        if row.taken:
            taken = list(row.taken)
            conflict = MintConflict(log.key, taken, await self._holder(log, taken))
            return MintOutcome(log, "conflict", conflict=conflict)
        if row.event_id is not None:
            return MintOutcome(log, "new", row.event_id, row.author_id, bool(row.author_created))
        return None  # a writer in flight took the author or the log first: look again

    async def not_canonical_in_range(
        self, low: int, high: int, canonical: Sequence[MintLog]
    ) -> list[UUID]:
        """Ids of the logs recorded at blocks ``low < block_number <= high`` that are not among
        ``canonical`` (same key and same block hash; a log recorded without a block hash counts
        as canonical when its key is). In (tx_hash, log_index) order. No locking."""
        rows = await self.session.execute(
            _NOT_CANONICAL_IN_RANGE,
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
        rows = await self.session.execute(_NOT_IN_WINDOW, {"floor": floor, "ceiling": ceiling})
        return list(rows.scalars())

    async def recorded_from_block(
        self, keys: Sequence[tuple[str, int, str | None]]
    ) -> list[RecordedLog]:
        """The recorded logs among ``keys`` (tx_hash, log_index, block hash or None) whose block
        is that one, or unknown on either side. In (tx_hash, log_index) order. No locking."""
        if not keys:
            return []
        rows = await self.session.execute(
            _BY_KEY_AND_BLOCK,
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
            _HOLDERS_ABOVE,
            {"first": min(ids), "last": max(ids), "above": above, "ids": sorted(set(ids))},
        )
        return [
            RecordedLog(r.id, r.tx_hash, r.log_index, r.block_number, r.block_hash) for r in rows
        ]

    async def block_of_token(self, token_id: int) -> int | None:
        """The block number of the recorded log that minted ``token_id``; None when no recorded
        log holds it. No locking."""
        v.int_at_least("token_id", token_id, 0)
        return (await self.session.execute(_BLOCK_OF_TOKEN, {"id": token_id})).scalar()

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
        if not event_ids:
            return RolledBack()
        rows = (
            await self.session.execute(_LOCK_FOR_ROLLBACK, {"ids": sorted(set(event_ids))})
        ).all()
        events: dict[UUID, Any] = {}
        drop: list[UUID] = []
        flag: list[UUID] = []
        flag_logs: list[str] = []
        for row in rows:
            events[row.id] = row
            if row.token_uuid is None:
                continue
            if row.status == "detected":
                drop.append(row.token_uuid)
            else:
                flag.append(row.token_uuid)
                flag_logs.append(
                    json.dumps(
                        {
                            "tx_hash": row.tx_hash,
                            "log_index": row.log_index,
                            "block_number": row.block_number,
                            "block_hash": row.block_hash,
                        }
                    )
                )
        if not events:
            return RolledBack()
        done = (
            await self.session.execute(
                _ROLL_BACK,
                {
                    "drop": drop,
                    "flag": flag,
                    "flag_logs": flag_logs,
                    "events": list(events),
                    "detail": detail,
                    "at": (at or utcnow()).isoformat(),
                },
            )
        ).one()
        keys = sorted((row.tx_hash, row.log_index) for row in events.values())
        return RolledBack(keys, list(done.dropped or []), list(done.flagged or []))

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
