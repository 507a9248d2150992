"""Step 2 of the follower (see ``glisk.ingest.follower``): from the cursor, the kept window and
the node's head, where the next step reads, or that there is nothing to read yet.

The node must still have the cursor's block with the kept hash. If not, a reorg: the highest
kept block still on the chain is the ancestor and the step reads from there, at least up to the
old cursor (the cursor never moves back); if no kept block survived, ``reorg.halt`` stops the
follower. A node that does not have the cursor's block yet (it is behind), or whose new chain
is not yet confirmed up to the old cursor, is waited for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from glisk.ingest.node import Node
from glisk.ingest.options import FollowerOptions
from glisk.ingest.reorg import Kept, Reorg, find_ancestor, halt
from glisk.ingest.state import Cursor

if TYPE_CHECKING:
    from glisk.ingest.metrics import IngestMetrics
    from glisk.uow import UnitOfWorkFactory


@dataclass(frozen=True)
class StepPlan:
    """One step to take: blocks ``first..last``, read on top of ``ancestor`` (the cursor's block,
    or a reorg's ancestor; None before the first step). ``cursor`` and ``kept`` are as the step
    read them, ``head`` and ``target`` (head minus confirmations) as the node said."""

    cursor: Cursor | None
    kept: list[Kept]
    head: int
    target: int
    ancestor: Kept | None
    reorg: Reorg | None
    first: int
    last: int


async def plan_step(
    node: Node,
    uow_factory: UnitOfWorkFactory,
    options: FollowerOptions,
    cursor: Cursor | None,
    kept: Sequence[Kept],
    head: int,
    metrics: IngestMetrics | None = None,
) -> StepPlan | None:
    """The step to take from ``cursor`` with ``kept`` and the node at ``head``; None when there
    is nothing to read yet. Raises DeepReorg (through ``halt``, which records it) when no kept
    block survived; ChainMoved or NodeUnavailable from the node."""
    target = head - options.confirmations
    reorg: Reorg | None = None
    ancestor: Kept | None = None
    if cursor is not None:
        here = await node.block(cursor.block)
        if here is None:  # the node has not reached our cursor (a lagging replica): wait
            return None
        if here.hash == cursor.hash:
            ancestor = Kept(cursor.block, cursor.hash)
        else:
            ancestor = await find_ancestor(node, [k for k in kept if k.number < cursor.block])
            if ancestor is None:
                await halt(
                    uow_factory,
                    cursor,
                    here,
                    kept,
                    window=options.reorg_window,
                    metrics=metrics,
                )
            reorg = Reorg(cursor.block, cursor.hash, here.hash, ancestor.number)
        if target < cursor.block or (reorg is None and target == cursor.block):
            # Nothing new; or a reorg whose chain has not yet reached what was consumed
            # (confirmed up to the cursor): wait for it rather than move the cursor back.
            # A node in the middle of switching chains answers like that for a moment.
            return None
    elif target < options.start_block:
        return None
    first = ancestor.number + 1 if ancestor else options.start_block
    # After a reorg, read at least up to where the cursor was: it never moves back.
    last = min(max(first + node.span - 1, cursor.block if cursor else -1), target)
    return StepPlan(cursor, list(kept), head, target, ancestor, reorg, first, last)
