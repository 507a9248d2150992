"""Step 4 of the follower (see ``glisk.ingest.follower``): write a step in one transaction.

The transaction locks the cursor's row first (FOR UPDATE) and stops at once (``CursorMoved``) if it
is no longer the cursor the step started from. Webhook deliveries and gap passes hold that row
shared while they write, so they and a step never interleave: a step sees every log they committed,
and they read the cursor the step left. Then: roll back what orphaned blocks recorded (logs in the
range that the chain no longer has there; logs of consumed blocks in the window whose block is not
the kept one, i.e. recorded by the webhook from a block that lost), record the range's logs with
``record_mints``, keep the block hashes, and move the cursor by compare-and-set from the value the
step started with. If another follower moved it first the whole transaction is undone
(``CursorMoved``) and the step starts over from the new cursor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import structlog

from glisk.core.timezone import utcnow
from glisk.errors import GliskError, MintConflict
from glisk.ingest import state
from glisk.ingest.node import Node
from glisk.ingest.options import FollowerOptions
from glisk.ingest.plan import StepPlan
from glisk.ingest.range_read import RangeRead
from glisk.ingest.reorg import Kept, Reorg, still_on_chain
from glisk.ingest.state import Cursor
from glisk.repositories.mint_outcomes import MintOutcome
from glisk.repositories.mint_rollback import RolledBack
from glisk.uow import UnitOfWork, UnitOfWorkFactory

log = structlog.get_logger("glisk.ingest")


class CursorMoved(GliskError):
    """Another follower committed a step from the same cursor first: this one wrote nothing."""


@dataclass
class StepReport:
    """One committed step: blocks ``first..last`` read (none when ``first > last``), the cursor
    now at ``cursor``; the logs recorded by outcome; what was rolled back."""

    first: int
    last: int
    cursor: int
    head: int
    logs: int = 0
    new: int = 0
    duplicate: int = 0
    conflicts: list[MintConflict] = field(default_factory=list[MintConflict])
    rolled_back: RolledBack = field(default_factory=RolledBack)
    reorg: Reorg | None = None


async def write_step(
    uow_factory: UnitOfWorkFactory,
    node: Node,
    options: FollowerOptions,
    plan: StepPlan,
    read: RangeRead,
) -> StepReport:
    """Write what ``read`` found for ``plan`` in one transaction (see the module docstring).
    Raises CursorMoved (nothing written) or a database error."""
    cursor, ancestor, reorg, kept = plan.cursor, plan.ancestor, plan.reorg, plan.kept
    logs = read.logs
    low = ancestor.number if ancestor else options.start_block - 1
    end = (read.last, read.last_hash)
    assert cursor is None or end[0] >= cursor.block, "a step never moves the cursor back"
    report = StepReport(read.first, read.last, end[0], plan.head)
    report.reorg = reorg
    detail = (
        f"reorg at block {reorg.block}: rolled back to block {reorg.ancestor}"
        if reorg
        else f"block {low + 1} to {end[0]} read again: not on the chain"
    )
    async with uow_factory() as uow:
        # The cursor's row first, exclusively: a webhook delivery or a gap pass in flight (they
        # hold it shared) is waited for and its rows are seen below; none starts until this
        # step commits, and then it reads the cursor this step moved.
        if Cursor.from_json(await uow.system_state.lock_state(state.CURSOR)) != cursor:
            raise CursorMoved("another follower moved the cursor first")
        orphans = await uow.mint_events.not_canonical_in_range(low, end[0], logs)
        floor = min((k.number for k in kept), default=None)
        if floor is not None and ancestor is not None:
            orphans += await uow.mint_events.not_in_window(floor, ancestor.number)
        report.rolled_back = await uow.mint_events.roll_back(orphans, detail=detail)
        outcomes = await uow.mint_events.record_mints(
            logs, new_author_prompt=options.new_author_prompt
        )
        outcomes, undone = await _settle_conflicts(uow, node, options, outcomes, end[0], detail)
        report.rolled_back += undone
        report.logs = len(logs)
        report.new = sum(o.status == "new" for o in outcomes)
        report.duplicate = sum(o.status == "duplicate" for o in outcomes)
        report.conflicts = [o.conflict for o in outcomes if o.conflict is not None]
        if reorg is not None:
            await uow.chain_blocks.forget_above(low)
        kept_now: set[tuple[int, str]] = {end}
        kept_now |= {(g.block_number, g.block_hash) for g in logs if g.block_hash is not None}
        kept_now |= {(a.number, a.hash) for a in read.anchors}
        await uow.chain_blocks.keep(sorted(kept_now))
        await uow.chain_blocks.prune(end[0] - options.reorg_window)
        base = cursor or Cursor(block=end[0], hash=end[1])
        moved = base.advanced(
            end[0],
            end[1],
            new=report.new,
            duplicate=report.duplicate,
            conflict=len(report.conflicts),
            rolled_back=len(report.rolled_back.logs),
            flagged=len(report.rolled_back.flagged),
            reorgs=1 if reorg else 0,
        )
        swap = await uow.system_state.compare_and_set(
            state.CURSOR, cursor.to_json() if cursor else None, moved.to_json()
        )
        if not swap.changed:
            raise CursorMoved("another follower moved the cursor first")
        await uow.system_state.set_state(state.HEAD, state.head_value(plan.head, plan.target))
        if reorg is not None:
            await uow.system_state.set_state(
                state.LAST_REORG, _reorg_state(reorg, report.rolled_back)
            )
        if report.rolled_back.dropped:  # ids free again: the gap pass must look at them
            checked = await uow.system_state.get_state(state.GAPS_CHECKED)
            lowest = min(report.rolled_back.dropped) - 1
            if isinstance(checked, int) and checked > lowest:
                await uow.system_state.set_state(state.GAPS_CHECKED, lowest)
    return report


async def _settle_conflicts(
    uow: UnitOfWork,
    node: Node,
    options: FollowerOptions,
    outcomes: list[MintOutcome],
    last: int,
    detail: str,
) -> tuple[list[MintOutcome], RolledBack]:
    """A canonical log refused because a log recorded above this step's range holds its ids:
    that holder came from a webhook and may be from an orphaned block. Ask the node; roll
    back the holders it no longer has and record the refused logs again (same transaction).
    Rare: only after a reorg raced a webhook. (A holder inside the range was rolled back already
    if orphaned: the step sees every webhook write, see the module's docstring.)"""
    refused = [o for o in outcomes if o.status == "conflict" and o.conflict is not None]
    if not refused:
        return outcomes, RolledBack()
    ids = sorted({i for o in refused if o.conflict for i in o.conflict.token_ids})
    orphaned = []
    for holder in await uow.mint_events.holders_above(ids, last):
        if holder.block_hash is None:
            continue
        if not await still_on_chain(node, Kept(holder.block_number, holder.block_hash)):
            orphaned.append(holder.id)
    if not orphaned:
        return outcomes, RolledBack()
    undone = await uow.mint_events.roll_back(orphaned, detail=detail)
    log.warning("ingest.orphaned_holders", logs=len(undone.logs), flagged=len(undone.flagged))
    again = await uow.mint_events.record_mints(
        [o.log for o in refused], new_author_prompt=options.new_author_prompt
    )
    retried = {id(o): a for o, a in zip(refused, again, strict=True)}
    return [retried.get(id(o), o) for o in outcomes], undone


def _reorg_state(reorg: Reorg, undone: RolledBack) -> dict[str, Any]:
    return {
        "at": utcnow().isoformat(),
        "block": reorg.block,
        "depth": reorg.depth,
        "ancestor": reorg.ancestor,
        "was": reorg.was,
        "now": reorg.now,
        "rolled_back": len(undone.logs),
        "tokens_dropped": len(undone.dropped),
        "tokens_flagged": len(undone.flagged),
    }
