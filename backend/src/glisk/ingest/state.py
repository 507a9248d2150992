"""The follower's state in ``system_state`` (one JSON value per key).

- ``ingest_cursor``: the last block consumed and its hash, with running totals of what the
  followers' committed steps did. It only moves by compare-and-set against the value a step
  started from, in the step's own transaction: two followers never move it backwards, a step
  that lost the race writes nothing, and the totals count each committed step exactly once.
- ``ingest_head``: the node's head at the last step, the confirmed target, and when.
- ``ingest_last_reorg``: the last reorg handled (depth, ancestor, what was rolled back).
- ``ingest_halted``: set when a reorg deeper than the window stopped the follower; every follower
  refuses to run while it is set (``glisk ingest --rewind-to BLOCK`` clears it).
- ``ingest_gaps_checked``: the token id up to which the gap pass found no gap.
- ``ingest_gaps_recorded``: logs the gap passes recorded new, in total (incremented in the
  transaction that recorded them), so that every "new" answer is counted somewhere exactly once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from glisk.core.timezone import utcnow

CURSOR = "ingest_cursor"
HEAD = "ingest_head"
LAST_REORG = "ingest_last_reorg"
HALTED = "ingest_halted"
GAPS_CHECKED = "ingest_gaps_checked"
GAPS_RECORDED = "ingest_gaps_recorded"


@dataclass(frozen=True)
class Cursor:
    """The last consumed block and the followers' running totals: logs recorded new, found
    recorded already, refused as conflicts, rolled back (orphaned), tokens flagged for the
    operator, steps committed, reorgs handled."""

    block: int
    hash: str
    new: int = 0
    duplicate: int = 0
    conflict: int = 0
    rolled_back: int = 0
    flagged: int = 0
    steps: int = 0
    reorgs: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, value: Any) -> Cursor | None:
        """The stored cursor, or None when there is none. Unknown keys are ignored; a value that
        is not a cursor raises ValueError naming the key."""
        if value is None:
            return None
        if not isinstance(value, dict) or "block" not in value or "hash" not in value:
            raise ValueError(f"system_state {CURSOR!r} does not hold a cursor: {value!r}")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in value.items() if k in known})

    def advanced(self, block: int, block_hash: str, **add: int) -> Cursor:
        """This cursor at ``block``, with ``add`` added to its totals and one more step."""
        totals = {name: getattr(self, name) + n for name, n in add.items()}
        return replace(self, block=block, hash=block_hash, steps=self.steps + 1, **totals)


def head_value(head: int, target: int) -> dict[str, Any]:
    """What ``ingest_head`` holds: the node's head, the confirmed target, and now."""
    return {"head": head, "target": target, "at": utcnow().isoformat()}
