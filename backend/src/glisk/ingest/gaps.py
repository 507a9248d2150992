"""Gap recovery: every token the contract minted up to the follower's cursor has a row, or the
log that minted it is read again from the chain and recorded.

The contract's ``nextTokenId()`` as of the cursor's block (the newest block known consumed; the
confirmed head when no follower runs) says which ids exist: 1 to nextTokenId - 1 (none when the
node has no contract code at that block: before the deployment, or a node switching chains).
``missing_token_ids`` lists those without a row, from the point up to which the last pass found
none (``ingest_gaps_checked``). Ids are minted in chain order, so the log of a missing range lies
between the block of the recorded log just below it and the block of the one just above: only
those blocks are read (``node.logs``, refused ranges split), and only logs whose ids meet the
range are recorded (``record_mints``: a log that is there already is a duplicate). Their blocks
are kept in the window, so the follower's check of consumed blocks knows them. An id no log
mints stays missing and is reported: nothing is ever invented without its log.

A pass only records from the chain the follower consumed: the cursor's block must still have the
cursor's hash before the read and after it, and each range is written with the cursor's row
locked (shared) and no reorg rolled back since the pass began (ordinary steps of another
follower may have moved it on), so a follower step that rolls a reorg back runs before the
write (and the pass skips) or after it (and sees what it recorded). Otherwise the pass checks
nothing: the next one, after the follower's step, does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from glisk.ingest import state
from glisk.ingest.node import Node
from glisk.ingest.state import Cursor
from glisk.models import MintLog
from glisk.repositories.mint_outcomes import DEFAULT_AUTHOR_PROMPT
from glisk.uow import UnitOfWork, UnitOfWorkFactory

MISSING_LIMIT = 100_000  # ids looked at per pass; the next pass goes on from there


@dataclass
class GapReport:
    """One pass: ids checked up to ``up_to`` (nextTokenId - 1 at ``block``); ``missing`` ids
    found without a row; ``recorded`` logs recorded; ``still_missing`` ids no log was found for;
    ``conflicts`` logs that could not be recorded."""

    block: int | None = None
    up_to: int = 0
    missing: int = 0
    recorded: int = 0
    still_missing: list[int] = field(default_factory=list[int])
    conflicts: list[str] = field(default_factory=list[str])

    def summary(self) -> dict[str, Any]:
        shown = self.still_missing[:10]
        return {
            "block": self.block,
            "up_to": self.up_to,
            "missing": self.missing,
            "recorded": self.recorded,
            "still_missing": len(self.still_missing),
            "first_still_missing": shown,
            "conflicts": len(self.conflicts),
        }


def ranges(ids: list[int]) -> list[tuple[int, int]]:
    """Ascending ids as runs of consecutive ids: [1, 2, 3, 7] -> [(1, 3), (7, 7)]."""
    runs: list[tuple[int, int]] = []
    for i in ids:
        if runs and i == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


async def recover_gaps(
    node: Node,
    uow_factory: UnitOfWorkFactory,
    *,
    start_block: int = 0,
    confirmations: int = 2,
    new_author_prompt: str = DEFAULT_AUTHOR_PROMPT,
) -> GapReport:
    """One pass (see the module's docstring). Each range is recorded in its own transaction.
    Raises NodeUnavailable or a database error; what was recorded before stays."""
    async with uow_factory() as uow:
        cursor = Cursor.from_json(await uow.system_state.get_state(state.CURSOR))
        checked = await uow.system_state.get_state(state.GAPS_CHECKED)
    checked = int(checked) if isinstance(checked, int) else 0
    block = cursor.block if cursor else await node.head() - confirmations
    report = GapReport(block=block)
    if block < max(start_block, 0):
        return report
    if not await _consumed_chain(node, cursor):
        return report  # a reorg below the cursor: the follower rolls it back first
    next_id = await node.next_token_id(block)
    if next_id is None:  # no contract there (yet, or for a moment): nothing to check this pass
        return report
    report.up_to = next_id - 1
    async with uow_factory() as uow:
        missing = await uow.tokens.missing_token_ids(
            report.up_to, start=checked + 1, limit=MISSING_LIMIT
        )
    report.missing = len(missing)
    for low_id, high_id in ranges(missing):
        async with uow_factory() as uow:
            below = await uow.mint_events.block_of_token(low_id - 1) if low_id > 1 else None
            above = await uow.mint_events.block_of_token(high_id + 1)
        first = below if below is not None else start_block
        last = min(above if above is not None else block, block)
        wanted: list[MintLog] = [
            log
            for log in await node.mint_logs(first, last)
            if log.start_token_id <= high_id and log.token_ids.stop - 1 >= low_id
        ]
        if not wanted:
            continue
        if not await _consumed_chain(node, cursor):
            return report  # the chain moved under the read: what it gave may be orphaned
        async with uow_factory() as uow:
            if not await _no_reorg_since(uow, cursor):
                return report  # a reorg was rolled back meanwhile: the next pass looks again
            outcomes = await uow.mint_events.record_mints(
                wanted, new_author_prompt=new_author_prompt
            )
            blocks = [(o.log.block_number, o.log.block_hash) for o in outcomes]
            await uow.chain_blocks.keep([(n, h) for n, h in blocks if h is not None])
            recorded = sum(o.new for o in outcomes)
            if recorded:
                await uow.system_state.increment(state.GAPS_RECORDED, recorded)
        report.recorded += recorded
        report.conflicts += [str(o.conflict) for o in outcomes if o.conflict is not None]
    async with uow_factory() as uow:
        report.still_missing = await uow.tokens.missing_token_ids(
            report.up_to, start=checked + 1, limit=MISSING_LIMIT
        )
        done = report.still_missing[0] - 1 if report.still_missing else report.up_to
        if done > checked:
            await uow.system_state.advance(state.GAPS_CHECKED, done)
    return report


async def _consumed_chain(node: Node, cursor: Cursor | None) -> bool:
    """Whether the node's chain is still the one the follower consumed: the cursor's block has
    the cursor's hash (a block hash commits to every block below it). True without a cursor."""
    if cursor is None:
        return True
    here = await node.block(cursor.block)
    return here is not None and here.hash == cursor.hash


async def _no_reorg_since(uow: UnitOfWork, cursor: Cursor | None) -> bool:
    """Lock the cursor's row, shared, for the rest of the transaction (a follower step waits
    for it; see ``step_write``) and say whether the follower has stayed on ``cursor``'s chain."""
    locked = Cursor.from_json(await uow.system_state.lock_state(state.CURSOR, share=True))
    return continues(cursor, locked)


def continues(before: Cursor | None, now: Cursor | None) -> bool:
    """Whether the cursor ``now`` follows on from ``before`` with no reorg handled in between:
    the same, or moved forward by ordinary steps (a second follower at work). A step that rolled
    a reorg back, or an operator's rewind, means what was read at ``before`` may be orphaned."""
    if before is None or now is None:
        return before == now
    return now.block >= before.block and now.reorgs == before.reorgs
