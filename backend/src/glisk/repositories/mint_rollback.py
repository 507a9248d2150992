"""Undoing what orphaned mint logs recorded: the statements that find them (a reorg left them on a
block the chain no longer has, or a webhook said ``removed``), the two that lock and roll them
back, and ``roll_back``, which ``MintEventRepository.roll_back`` runs in the caller's transaction.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from glisk.core.timezone import utcnow
from glisk.models.mint_event import MAX_MINT_QUANTITY


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


# The logs recorded at blocks low < block_number <= high that the chain no longer has there:
# their (tx_hash, log_index, block_hash) is not among the canonical logs given. A log recorded
# without a block hash counts as canonical when its key is. ix_mint_events_block_number; no
# locking (the rollback locks what it acts on).
NOT_CANONICAL_IN_RANGE = text(
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
NOT_IN_WINDOW = text(
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
BY_KEY_AND_BLOCK = text(
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
HOLDERS_ABOVE = text(
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

# Locks mint logs about to be rolled back (a reorg orphaned their block, or a webhook said
# `removed`) and every token of them: the events still there, in (tx_hash, log_index) order, then
# their tokens in token_id order, the order record_mints writes them in; FOR UPDATE, held until
# the transaction ends, so no worker claims or completes one of these tokens meanwhile and the
# status read here is the one ROLL_BACK acts on. An event already gone is not returned.
LOCK_FOR_ROLLBACK = text(
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

# Rolls back the logs LOCK_FOR_ROLLBACK locked in this transaction: tokens still 'detected' are
# deleted (nothing was done for them); the others are flagged for the operator, never dropped:
# 'failed' with error_data.reason 'mint_orphaned' naming the log (a revealed token keeps its
# status and gets the same error_data), any live claim ended so a late completion is refused, the
# checkpoint kept (a reveal in flight is still reconciled); then the events are deleted. Authors
# stay (an author without tokens is harmless and may mint again).
ROLL_BACK = text(
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


async def roll_back(
    session: AsyncSession, event_ids: Sequence[UUID], *, detail: str, at: datetime | None = None
) -> RolledBack:
    """``MintEventRepository.roll_back`` (its docstring states the contract): LOCK_FOR_ROLLBACK,
    then ROLL_BACK, in ``session``'s transaction."""
    if not event_ids:
        return RolledBack()
    rows = (await session.execute(LOCK_FOR_ROLLBACK, {"ids": sorted(set(event_ids))})).all()
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
        await session.execute(
            ROLL_BACK,
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
