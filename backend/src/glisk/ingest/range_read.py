"""Step 3 of the follower (see ``glisk.ingest.follower``): read a planned range with no
transaction open, and make sure the chain did not move under the read.

The last block's hash, the logs (``node.logs``: refused ranges split), the anchors to keep, the
last block's hash again and the ancestor's: any change means the chain moved, and the step is
read again (``ChainMoved``). Block times come from the blocks (the logs' ``blockTimestamp`` where
the node gives it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from glisk.ingest.node import ChainMoved, Node
from glisk.ingest.plan import StepPlan
from glisk.ingest.reorg import Kept, still_on_chain
from glisk.models import MintLog


@dataclass(frozen=True)
class RangeRead:
    """What step 3 read: the logs of ``first..last``, the hash of ``last``, and blocks below
    it to keep as anchors of the window."""

    first: int
    last: int
    last_hash: str
    logs: list[MintLog]
    anchors: list[Kept]


def anchor_numbers(first: int, last: int, window: int, kept: Sequence[int]) -> list[int]:
    """Blocks to keep besides the step's last one, so that the kept blocks reach ``window``
    deep below ``last`` whatever the step's size: inside the range just read, those 1, 2, 4, ...
    blocks below ``last``; and the block ``window`` below it unless one at or below it is kept
    already. A long catch-up step thus costs a few more block reads (log2 of the window), a
    step of one block usually none, and a reorg of depth d re-reads at most about 2d blocks."""
    wanted: set[int] = set()
    offset = 1
    while offset < window:
        if last - offset >= first:
            wanted.add(last - offset)
        offset *= 2
    deep = last - window
    if deep >= 0 and not any(number <= deep for number in kept):
        wanted.add(deep)
    return sorted(wanted - set(kept))


async def read_range(node: Node, plan: StepPlan, window: int) -> RangeRead:
    """The logs of ``plan.first..plan.last`` and the anchors to keep (``window``: the reorg
    window). Raises ChainMoved when a block read changed or vanished meanwhile, NodeUnavailable
    from the node."""
    first, last, ancestor = plan.first, plan.last, plan.ancestor
    before = await node.block(last)
    raw = await node.logs(first, last)
    anchors: list[Kept] = []
    for number in anchor_numbers(first, last, window, [k.number for k in plan.kept]):
        found = await node.block(number)
        if found is None:
            raise ChainMoved(f"block {number} vanished while blocks {first}-{last} were read")
        anchors.append(Kept(found.number, found.hash))
    after = await node.block(last)
    if before is None or after is None or before.hash != after.hash:
        raise ChainMoved(f"block {last} changed while blocks {first}-{last} were read")
    if ancestor is not None and not await still_on_chain(node, ancestor):
        raise ChainMoved(f"block {ancestor.number} changed while blocks {first}-{last} were read")
    return RangeRead(first, last, after.hash, await node.decode(raw), anchors)
