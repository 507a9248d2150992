"""Where a reorg starts: the highest kept block the chain still has.

The follower keeps (number, hash) of blocks it consumed (``chain_blocks``). A block hash commits
to every block below it, so the kept blocks still on the chain form a run from the oldest kept
one up to some height, and the ones above it are all orphaned: a binary search over them finds
the highest survivor in about log2(kept) calls, the common ancestor as far as the window knows
(the true fork point may lie between it and the next kept block; re-reading from it is just as
correct). None: no kept block survived, the reorg is deeper than the window: ``halt`` then
stops every follower until the operator rewinds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

from glisk.core.timezone import utcnow
from glisk.errors import OperatorError
from glisk.ingest import state
from glisk.ingest.node import Block, Node
from glisk.ingest.state import Cursor

if TYPE_CHECKING:
    from glisk.ingest.metrics import IngestMetrics
    from glisk.uow import UnitOfWorkFactory


@dataclass(frozen=True)
class Kept:
    number: int
    hash: str


@dataclass(frozen=True)
class Reorg:
    """A reorg a step handled: the cursor's block ``block`` had ``was`` and now has ``now``;
    ``ancestor`` is the highest kept block still on the chain."""

    block: int
    was: str
    now: str
    ancestor: int

    @property
    def depth(self) -> int:
        return self.block - self.ancestor


class DeepReorg(OperatorError):
    """The chain changed below every block the follower kept: it stops, writes nothing, and
    waits for the operator (``glisk ingest --rewind-to BLOCK``). Exit code 2: a restart alone
    cannot cure it."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 2)


async def still_on_chain(node: Node, block: Kept) -> bool:
    found = await node.block(block.number)
    return found is not None and found.hash == block.hash


async def find_ancestor(node: Node, kept: Sequence[Kept]) -> Kept | None:
    """The highest of ``kept`` (any order) whose hash the node still has at its number; None
    when none of them survived."""
    ordered = sorted(kept, key=lambda b: b.number)  # survivors first, orphans after
    low, high = 0, len(ordered)  # ordered[:low] survive, ordered[high:] are orphaned
    while low < high:
        middle = (low + high) // 2
        if await still_on_chain(node, ordered[middle]):
            low = middle + 1
        else:
            high = middle
    return ordered[low - 1] if low > 0 else None


async def halt(
    uow_factory: UnitOfWorkFactory,
    cursor: Cursor,
    here: Block,
    kept: Sequence[Kept],
    *,
    window: int,
    metrics: IngestMetrics | None,
) -> NoReturn:
    """Stop every follower after a reorg deeper than the window: the cursor's block is ``here``
    now and none of ``kept`` survived. Sets ``ingest_halted`` (in a transaction of its own),
    counts a deep reorg, and raises DeepReorg with the one line the operator reads."""
    floor = min((k.number for k in kept), default=cursor.block)
    message = (
        f"reorg deeper than the window: block {cursor.block} is now {here.hash[:12]}… "
        f"(was {cursor.hash[:12]}…) and none of the {len(kept)} kept blocks down to block "
        f"{floor} is still on the chain (INGEST_REORG_WINDOW={window}); "
        "stopped, nothing written. Check the node, then run "
        "'glisk ingest --rewind-to BLOCK' from a block both chains share"
    )
    async with uow_factory() as uow:
        await uow.system_state.set_state(
            state.HALTED,
            {
                "at": utcnow().isoformat(),
                "block": cursor.block,
                "was": cursor.hash,
                "now": here.hash,
                "floor": floor,
                "message": message,
            },
        )
    if metrics is not None:
        metrics.deep_reorgs.inc()
    raise DeepReorg(message)
