"""``record_mints`` as an algorithm over one session: logs of one input that repeat or overlap
are settled before any SQL, RECORD_MANY runs for the rest (again for the logs a writer in flight
took first, at most ATTEMPTS rounds), and each row it returns becomes a ``MintOutcome``.
``MintEventRepository.record_mints`` validates its arguments and calls ``record_mints`` here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any
from uuid import UUID

from sqlalchemy.ext.asyncio import AsyncSession

from glisk.core.timezone import utcnow
from glisk.errors import UniqueViolation
from glisk.models import MintConflict, MintLog
from glisk.repositories.mint_outcomes import MintOutcome, MintStatus
from glisk.repositories.mint_sql import ATTEMPTS, HOLDERS, RECORD_MANY


async def record_mints(
    session: AsyncSession, logs: Sequence[MintLog], prompt: str
) -> list[MintOutcome]:
    """One outcome per log of ``logs``, in input order; the contract is
    ``MintEventRepository.record_mints``'s. ``prompt`` is valid already."""
    outcomes: list[MintOutcome | None] = [None] * len(logs)
    first_copy: dict[tuple[str, int], int] = {}
    for position, log in enumerate(logs):
        first_copy.setdefault(log.key, position)
    distinct = sorted(first_copy.values())
    # Two different logs of one input claiming the same id: the chain never says so, a
    # forged or mixed-up payload might. The one with the lowest (first id, position) goes.
    end, holder_at = -1, -1
    for position in sorted(distinct, key=lambda i: (logs[i].start_token_id, i)):
        log = logs[position]
        if log.start_token_id < end:
            ids = [i for i in log.token_ids if i < end]
            outcomes[position] = MintOutcome(
                log,
                "conflict",
                conflict=MintConflict(
                    log.key, ids, logs[holder_at].key, "another log of the same delivery"
                ),
            )
        else:
            end, holder_at = log.token_ids.stop, position
    pending = [i for i in distinct if outcomes[i] is None]
    await session.flush()
    for _ in range(ATTEMPTS):
        if not pending:
            break
        rows = await _record_many(session, [logs[i] for i in pending], prompt)
        again: list[int] = []
        for position, row in zip(pending, rows, strict=True):
            outcome = await _outcome(session, logs[position], row)
            if outcome is None:
                again.append(position)
            outcomes[position] = outcome
        pending = again
    if pending:
        log = logs[pending[0]]
        raise RuntimeError(
            f"mint log {log.tx_hash}#{log.log_index}: no outcome after {ATTEMPTS} attempts"
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


async def holder(session: AsyncSession, log: MintLog, taken: list[int]) -> tuple[str, int] | None:
    """The key of another recorded log holding any of ``taken`` (ascending token ids of ``log``
    found minted); None when no recorded log holds them (a backfill minted them). No locking."""
    row = (
        await session.execute(
            HOLDERS,
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


async def _record_many(session: AsyncSession, logs: list[MintLog], prompt: str) -> list[Any]:
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
    for attempt in range(ATTEMPTS):
        params["now"] = utcnow()
        try:
            async with session.begin_nested():
                return list((await session.execute(RECORD_MANY, params)).all())
        except UniqueViolation as exc:
            # Another writer committed one of our token ids after our snapshot: the next
            # snapshot sees it, and that log becomes a conflict.
            if exc.constraint != "uq_tokens_s0_token_id" or attempt == ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


async def _outcome(session: AsyncSession, log: MintLog, row: Any) -> MintOutcome | None:
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
        conflict = MintConflict(log.key, taken, await holder(session, log, taken))
        return MintOutcome(log, "conflict", conflict=conflict)
    if row.event_id is not None:
        return MintOutcome(log, "new", row.event_id, row.author_id, bool(row.author_created))
    return None  # a writer in flight took the author or the log first: look again
