"""A webhook delivery recorded: every mint log of a payload answered on its own, in one unit of
work.

The follower is the authority below its cursor: it has read those blocks with the confirmations
and the reorg checks, and recorded every mint log they hold. So:

- a log at a block the follower consumed is never written here: ``duplicate`` when it is
  recorded (from that block), ``orphaned`` when it is not (the follower found no such log
  there, so its block lost a reorg: a late or reordered redelivery);
- a log above the cursor is recorded (``record_mints``: ``new``, ``duplicate``, ``conflict``);
  if its block later loses a reorg, the follower rolls it back when it gets there;
- a log marked ``removed`` above the cursor is rolled back if it was recorded from that block
  (``rolled_back``), else nothing is done (``removed``); below the cursor the follower decides.

The delivery holds the cursor's row shared (FOR SHARE) until it commits: deliveries run side by
side, a follower step waits for them and they for it, so "above the cursor" stays true while the
delivery writes. A duplicate, a conflict or a removed log never stops the others. Redelivering or
reordering payloads changes nothing: every write is conditioned on what is recorded.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from glisk.ingest import state
from glisk.ingest.alchemy import Payload
from glisk.ingest.state import Cursor
from glisk.models import MintLog
from glisk.repositories.mint_outcomes import DEFAULT_AUTHOR_PROMPT
from glisk.uow import UnitOfWorkFactory

Answer = Literal["new", "duplicate", "conflict", "orphaned", "rolled_back", "removed"]
ANSWERS: tuple[Answer, ...] = ("new", "duplicate", "conflict", "orphaned", "rolled_back", "removed")


@dataclass
class DeliveryReport:
    """One answer per mint log of the payload, in payload order; ``ignored``: other logs."""

    answers: list[tuple[MintLog, Answer, str | None]] = field(
        default_factory=list[tuple[MintLog, Answer, str | None]]
    )
    ignored: int = 0

    def counts(self) -> dict[str, int]:
        found = Counter(answer for _, answer, _ in self.answers)
        return {answer: found.get(answer, 0) for answer in ANSWERS} | {"ignored": self.ignored}

    def as_json(self) -> dict[str, Any]:
        return {
            "status": "ok",
            **self.counts(),
            "logs": [
                {
                    "tx_hash": log.tx_hash,
                    "log_index": log.log_index,
                    "block_number": log.block_number,
                    "answer": answer,
                    **({"detail": detail} if detail else {}),
                }
                for log, answer, detail in self.answers
            ],
        }


async def deliver(
    uow_factory: UnitOfWorkFactory,
    payload: Payload,
    *,
    new_author_prompt: str = DEFAULT_AUTHOR_PROMPT,
) -> DeliveryReport:
    """Record ``payload`` in one unit of work (see the module's docstring). Database errors
    propagate (the unit of work is rolled back: nothing of the payload was written)."""
    report = DeliveryReport(ignored=payload.ignored)
    if not payload.logs:
        return report
    answers: dict[int, tuple[Answer, str | None]] = {}
    async with uow_factory() as uow:
        # Shared with other deliveries, exclusive of a follower's step: the cursor read here
        # stays the cursor until this delivery commits, so a log decided "above" is never
        # written under a step that has just consumed its block (and missed it).
        cursor = Cursor.from_json(await uow.system_state.lock_state(state.CURSOR, share=True))
        consumed = cursor.block if cursor else -1
        removed = [(i, d.log) for i, d in enumerate(payload.logs) if d.removed]
        live = [(i, d.log) for i, d in enumerate(payload.logs) if not d.removed]

        to_undo = [(i, log) for i, log in removed if log.block_number > consumed]
        recorded = await uow.mint_events.recorded_from_block(
            [(log.tx_hash, log.log_index, log.block_hash) for _, log in to_undo]
        )
        ids = [r.id for r in recorded]
        undone = set(
            (await uow.mint_events.roll_back(ids, detail="removed by the webhook (reorg)")).logs
        )
        for i, log in removed:
            answers[i] = ("rolled_back" if log.key in undone else "removed", None)

        below = [(i, log) for i, log in live if log.block_number <= consumed]
        if below:
            there = await uow.mint_events.recorded_from_block(
                [(log.tx_hash, log.log_index, log.block_hash) for _, log in below]
            )
            keys = {(r.tx_hash, r.log_index) for r in there}
            for i, log in below:
                if log.key in keys:
                    answers[i] = ("duplicate", None)
                else:
                    answers[i] = ("orphaned", f"block {log.block_number} was read without it")

        above = [(i, log) for i, log in live if log.block_number > consumed]
        outcomes = await uow.mint_events.record_mints(
            [log for _, log in above], new_author_prompt=new_author_prompt
        )
        for (i, _), outcome in zip(above, outcomes, strict=True):
            detail = str(outcome.conflict) if outcome.conflict is not None else None
            answers[i] = (outcome.status, detail)
    report.answers = [(d.log, *answers[i]) for i, d in enumerate(payload.logs)]
    return report
