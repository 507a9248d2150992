"""Where a reorg starts: the highest kept block the chain still has.

The follower keeps (number, hash) of blocks it consumed (``chain_blocks``). A block hash commits
to every block below it, so the kept blocks still on the chain form a run from the oldest kept
one up to some height, and the ones above it are all orphaned: a binary search over them finds
the highest survivor in about log2(kept) calls, the common ancestor as far as the window knows
(the true fork point may lie between it and the next kept block; re-reading from it is just as
correct). None: no kept block survived, the reorg is deeper than the window.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from glisk.errors import OperatorError
from glisk.ingest.node import Node


@dataclass(frozen=True)
class Kept:
    number: int
    hash: str


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
