"""The log follower: the GLISK contract's BatchMinted logs, read in block ranges and recorded once.

One step, from the cursor (the last block consumed, its hash) to at most ``node.span`` blocks
further and never past the head minus ``confirmations``:

1. **Read the state** (one short read transaction): the cursor, the halt flag, the kept window.
2. **Check continuity**: the node must still have the cursor's block with the kept hash. If not,
   a reorg: the highest kept block still on the chain is the ancestor (``reorg.find_ancestor``)
   and the step reads from there; if no kept block survived, the reorg is deeper than the window
   and the follower stops (``DeepReorg``: one line, a metric, ``ingest_halted`` set, nothing
   else written). A node that does not have the cursor's block yet (it is behind) is waited for.
3. **Read the range** with no transaction open: the last block's hash, the logs
   (``node.logs``: refused ranges split), the last block's hash again and the ancestor's: any
   change means the chain moved under the read, and the step is read again (``ChainMoved``).
   Block times come from the blocks (the logs' ``blockTimestamp`` where the node gives it).
4. **Write the step in one transaction**: roll back what orphaned blocks recorded (logs in the
   range that the chain no longer has there; logs of consumed blocks in the window whose block
   is not the kept one, i.e. recorded by the webhook from a block that lost), record the range's
   logs with ``record_mints``, keep the block hashes, and move the cursor by compare-and-set from
   the value the step started with. If another follower moved it first the whole transaction is
   undone (``CursorMoved``) and the step starts over from the new cursor.

After a reorg the step reads at least up to the old cursor, so the cursor never moves backwards:
when the new chain is not yet confirmed up to the old cursor (or the node answers from the
middle of its switch), the follower waits for it. Several followers (and the webhook) can run at
once: their writes are idempotent and the compare-and-set makes exactly one of two racing steps
count.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import structlog

from glisk.core.timezone import utcnow
from glisk.errors import DatabaseError, GliskError, MintConflict
from glisk.ingest import state
from glisk.ingest.metrics import IngestMetrics
from glisk.ingest.node import Block, ChainMoved, Node, NodeUnavailable
from glisk.ingest.reorg import DeepReorg, Kept, find_ancestor, still_on_chain
from glisk.ingest.state import Cursor
from glisk.models import MintLog
from glisk.repositories.mint_outcomes import DEFAULT_AUTHOR_PROMPT, MintOutcome
from glisk.repositories.mint_rollback import RolledBack
from glisk.uow import UnitOfWork, UnitOfWorkFactory

log = structlog.get_logger("glisk.ingest")

MAX_BACKOFF = 30.0


class CursorMoved(GliskError):
    """Another follower committed a step from the same cursor first: this one wrote nothing."""


@dataclass(frozen=True)
class FollowerOptions:
    """``confirmations``: blocks the follower stays behind the head; ``reorg_window``: how deep
    it keeps block hashes below its cursor (a reorg deeper than that stops it); ``start_block``:
    where it starts when there is no cursor; ``poll_interval``: seconds between looks at an
    unchanged head; ``gap_interval``: seconds between gap passes once caught up (0: never)."""

    confirmations: int = 2
    reorg_window: int = 200
    start_block: int = 0
    poll_interval: float = 2.0
    gap_interval: float = 300.0
    new_author_prompt: str = DEFAULT_AUTHOR_PROMPT

    def __post_init__(self) -> None:
        if self.confirmations < 0 or self.reorg_window < 1 or self.start_block < 0:
            raise ValueError("confirmations >= 0, reorg_window >= 1 and start_block >= 0")


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


@dataclass
class FollowerStats:
    steps: int = 0
    new: int = 0
    duplicate: int = 0
    conflicts: int = 0
    rolled_back: int = 0
    flagged: int = 0
    reorgs: int = 0
    lost_races: int = 0
    chain_moved: int = 0
    node_errors: int = 0
    db_errors: int = 0
    gap_passes: int = 0


@dataclass(frozen=True)
class _Read:
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


class Follower:
    """Follows one contract on one node into one database. Constructing it does no I/O."""

    def __init__(
        self,
        node: Node,
        uow_factory: UnitOfWorkFactory,
        options: FollowerOptions | None = None,
        *,
        metrics: IngestMetrics | None = None,
    ) -> None:
        self.node = node
        self.uow_factory = uow_factory
        self.options = options or FollowerOptions()
        self.metrics = metrics
        self.stats = FollowerStats()
        self._head_written: int | None = None
        self._splits_seen = 0

    # -- one step --------------------------------------------------------------------------------

    async def step(self) -> StepReport | None:
        """One step (see the module's docstring); None when there was nothing to read. Raises
        DeepReorg, CursorMoved, ChainMoved, NodeUnavailable, or a database error."""
        options = self.options
        async with self.uow_factory() as uow:
            cursor = Cursor.from_json(await uow.system_state.get_state(state.CURSOR))
            halted = await uow.system_state.get_state(state.HALTED)
            kept = [
                Kept(b.number, b.hash)
                for b in await uow.chain_blocks.newest(options.reorg_window + 2)
            ]
        if halted:
            raise DeepReorg(str(halted.get("message", "stopped after a deep reorg")))
        head = await self.node.head()
        target = head - options.confirmations
        reorg: Reorg | None = None
        ancestor: Kept | None = None
        if cursor is not None:
            here = await self.node.block(cursor.block)
            if here is None:  # the node has not reached our cursor (a lagging replica): wait
                await self._note_head(head, target)
                return None
            if here.hash == cursor.hash:
                ancestor = Kept(cursor.block, cursor.hash)
            else:
                ancestor = await find_ancestor(
                    self.node, [k for k in kept if k.number < cursor.block]
                )
                if ancestor is None:
                    await self._halt(cursor, here, kept)
                reorg = Reorg(cursor.block, cursor.hash, here.hash, ancestor.number)
            if target < cursor.block or (reorg is None and target == cursor.block):
                # Nothing new; or a reorg whose chain has not yet reached what was consumed
                # (confirmed up to the cursor): wait for it rather than move the cursor back.
                # A node in the middle of switching chains answers like that for a moment.
                await self._note_head(head, target)
                return None
        elif target < options.start_block:
            await self._note_head(head, target)
            return None
        first = ancestor.number + 1 if ancestor else options.start_block
        # After a reorg, read at least up to where the cursor was: it never moves back.
        last = min(max(first + self.node.span - 1, cursor.block if cursor else -1), target)
        read = await self._read(first, last, ancestor, kept)
        report = await self._write(cursor, ancestor, read, reorg, kept, head, target)
        self._count(report)
        return report

    async def _read(
        self, first: int, last: int, ancestor: Kept | None, kept: Sequence[Kept]
    ) -> _Read:
        before = await self.node.block(last)
        raw = await self.node.logs(first, last)
        anchors: list[Kept] = []
        numbers = anchor_numbers(first, last, self.options.reorg_window, [k.number for k in kept])
        for number in numbers:
            found = await self.node.block(number)
            if found is None:
                raise ChainMoved(f"block {number} vanished while blocks {first}-{last} were read")
            anchors.append(Kept(found.number, found.hash))
        after = await self.node.block(last)
        if before is None or after is None or before.hash != after.hash:
            raise ChainMoved(f"block {last} changed while blocks {first}-{last} were read")
        if ancestor is not None and not await still_on_chain(self.node, ancestor):
            raise ChainMoved(
                f"block {ancestor.number} changed while blocks {first}-{last} were read"
            )
        return _Read(first, last, after.hash, await self.node.decode(raw), anchors)

    async def _write(
        self,
        cursor: Cursor | None,
        ancestor: Kept | None,
        read: _Read,
        reorg: Reorg | None,
        kept: Sequence[Kept],
        head: int,
        target: int,
    ) -> StepReport:
        logs = read.logs
        low = ancestor.number if ancestor else self.options.start_block - 1
        end = (read.last, read.last_hash)
        assert cursor is None or end[0] >= cursor.block, "a step never moves the cursor back"
        report = StepReport(read.first, read.last, end[0], head)
        report.reorg = reorg
        detail = (
            f"reorg at block {reorg.block}: rolled back to block {reorg.ancestor}"
            if reorg
            else f"block {low + 1} to {end[0]} read again: not on the chain"
        )
        async with self.uow_factory() as uow:
            orphans = await uow.mint_events.not_canonical_in_range(low, end[0], logs)
            floor = min((k.number for k in kept), default=None)
            if floor is not None and ancestor is not None:
                orphans += await uow.mint_events.not_in_window(floor, ancestor.number)
            report.rolled_back = await uow.mint_events.roll_back(orphans, detail=detail)
            outcomes = await uow.mint_events.record_mints(
                logs, new_author_prompt=self.options.new_author_prompt
            )
            outcomes, undone = await self._settle_conflicts(uow, outcomes, end[0], detail)
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
            await uow.chain_blocks.prune(end[0] - self.options.reorg_window)
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
            await uow.system_state.set_state(state.HEAD, _head_state(head, target))
            if reorg is not None:
                await uow.system_state.set_state(
                    state.LAST_REORG, _reorg_state(reorg, report.rolled_back)
                )
            if report.rolled_back.dropped:  # ids free again: the gap pass must look at them
                checked = await uow.system_state.get_state(state.GAPS_CHECKED)
                lowest = min(report.rolled_back.dropped) - 1
                if isinstance(checked, int) and checked > lowest:
                    await uow.system_state.set_state(state.GAPS_CHECKED, lowest)
        self._head_written = head
        return report

    async def _settle_conflicts(
        self, uow: UnitOfWork, outcomes: list[MintOutcome], last: int, detail: str
    ) -> tuple[list[MintOutcome], RolledBack]:
        """A canonical log refused because a log recorded above this step's range holds its ids:
        that holder came from a webhook and may be from an orphaned block. Ask the node; roll
        back the holders it no longer has and record the refused logs again (same transaction).
        Rare: only after a reorg raced a webhook."""
        refused = [o for o in outcomes if o.status == "conflict" and o.conflict is not None]
        if not refused:
            return outcomes, RolledBack()
        ids = sorted({i for o in refused if o.conflict for i in o.conflict.token_ids})
        orphaned = []
        for holder in await uow.mint_events.holders_above(ids, last):
            if holder.block_hash is None:
                continue
            if not await still_on_chain(self.node, Kept(holder.block_number, holder.block_hash)):
                orphaned.append(holder.id)
        if not orphaned:
            return outcomes, RolledBack()
        undone = await uow.mint_events.roll_back(orphaned, detail=detail)
        log.warning("ingest.orphaned_holders", logs=len(undone.logs), flagged=len(undone.flagged))
        again = await uow.mint_events.record_mints(
            [o.log for o in refused], new_author_prompt=self.options.new_author_prompt
        )
        retried = {id(o): a for o, a in zip(refused, again, strict=True)}
        return [retried.get(id(o), o) for o in outcomes], undone

    async def _halt(self, cursor: Cursor, here: Block, kept: Sequence[Kept]) -> NoReturn:
        floor = min((k.number for k in kept), default=cursor.block)
        message = (
            f"reorg deeper than the window: block {cursor.block} is now {here.hash[:12]}… "
            f"(was {cursor.hash[:12]}…) and none of the {len(kept)} kept blocks down to block "
            f"{floor} is still on the chain (INGEST_REORG_WINDOW={self.options.reorg_window}); "
            "stopped, nothing written. Check the node, then run "
            "'glisk ingest --rewind-to BLOCK' from a block both chains share"
        )
        async with self.uow_factory() as uow:
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
        if self.metrics is not None:
            self.metrics.deep_reorgs.inc()
        raise DeepReorg(message)

    async def _note_head(self, head: int, target: int) -> None:
        if head == self._head_written:
            return
        async with self.uow_factory() as uow:
            await uow.system_state.set_state(state.HEAD, _head_state(head, target))
        self._head_written = head
        if self.metrics is not None:
            self.metrics.head.set(head)

    def _count(self, report: StepReport) -> None:
        s = self.stats
        s.steps += 1
        s.new += report.new
        s.duplicate += report.duplicate
        s.conflicts += len(report.conflicts)
        s.rolled_back += len(report.rolled_back.logs)
        s.flagged += len(report.rolled_back.flagged)
        s.reorgs += report.reorg is not None
        fields = {
            "first": report.first,
            "last": report.last,
            "head": report.head,
            "logs": report.logs,
            "new": report.new,
        }
        if report.reorg is not None:
            log.warning(
                "ingest.reorg",
                block=report.reorg.block,
                depth=report.reorg.depth,
                ancestor=report.reorg.ancestor,
                rolled_back=len(report.rolled_back.logs),
                flagged=len(report.rolled_back.flagged),
            )
        for conflict in report.conflicts:
            log.error("ingest.conflict", error=str(conflict))
        if report.cursor < report.last or (report.logs or report.rolled_back.logs):
            log.info("ingest.step", **fields, rolled_back=len(report.rolled_back.logs))
        else:
            log.debug("ingest.step", **fields)
        m = self.metrics
        if m is None:
            return
        m.steps.inc()
        m.logs.labels("new").inc(report.new)
        m.logs.labels("duplicate").inc(report.duplicate)
        m.logs.labels("conflict").inc(len(report.conflicts))
        m.logs.labels("rolled_back").inc(len(report.rolled_back.logs))
        m.flagged.inc(len(report.rolled_back.flagged))
        if report.reorg is not None:
            m.reorgs.inc()
        m.splits.inc(self.node.splits - self._splits_seen)
        self._splits_seen = self.node.splits
        m.head.set(report.head)
        m.cursor.set(report.cursor)
        m.lag.set(max(0, report.head - report.cursor))

    # -- the loop ----------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, *, once: bool = False) -> FollowerStats:
        """Step until ``stop`` is set (or, with ``once``, until caught up and one gap pass ran).
        Node and database failures are logged and retried with backoff (up to 30 s); a lost race
        or a chain that moved is retried at once. Raises DeepReorg."""
        from glisk.ingest.gaps import recover_gaps

        failures = 0
        next_gaps = time.monotonic() if self.options.gap_interval > 0 or once else float("inf")
        while not stop.is_set():
            try:
                report = await self.step()
                caught_up = report is None
                if caught_up and time.monotonic() >= next_gaps:
                    self.stats.gap_passes += 1
                    gaps = await recover_gaps(
                        self.node,
                        self.uow_factory,
                        start_block=self.options.start_block,
                        confirmations=self.options.confirmations,
                        new_author_prompt=self.options.new_author_prompt,
                    )
                    if gaps.missing or gaps.still_missing:
                        log.warning("ingest.gaps", **gaps.summary())
                    interval = self.options.gap_interval
                    next_gaps = time.monotonic() + interval if interval > 0 else float("inf")
            except DeepReorg:
                raise
            except CursorMoved:
                self.stats.lost_races += 1
                if self.metrics is not None:
                    self.metrics.lost_races.inc()
                continue
            except ChainMoved as exc:
                self.stats.chain_moved += 1
                self._error("chain_moved", exc)
                await _wait(stop, min(self.options.poll_interval, 0.5))
                continue
            except NodeUnavailable as exc:
                self.stats.node_errors += 1
                failures += 1
                self._error("node", exc)
                await _wait(stop, _backoff(self.options.poll_interval, failures))
                continue
            except (DatabaseError, OSError) as exc:
                self.stats.db_errors += 1
                failures += 1
                self._error("database", exc)
                await _wait(stop, _backoff(self.options.poll_interval, failures))
                continue
            except Exception as exc:  # SQLAlchemy errors not translated (a lost connection)
                from sqlalchemy.exc import SQLAlchemyError

                if not isinstance(exc, SQLAlchemyError):
                    raise
                self.stats.db_errors += 1
                failures += 1
                self._error("database", exc)
                await _wait(stop, _backoff(self.options.poll_interval, failures))
                continue
            failures = 0
            if caught_up:
                if once:
                    break
                await _wait(stop, self.options.poll_interval)
        return self.stats

    def _error(self, kind: str, exc: BaseException) -> None:
        from glisk.errors import first_line

        log.warning("ingest.retry", kind=kind, error=first_line(exc))
        if self.metrics is not None:
            self.metrics.errors.labels(kind).inc()


def _head_state(head: int, target: int) -> dict[str, Any]:
    return {"head": head, "target": target, "at": utcnow().isoformat()}


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


def _backoff(base: float, failures: int) -> float:
    return min(MAX_BACKOFF, base * 2 ** min(failures - 1, 10))


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
