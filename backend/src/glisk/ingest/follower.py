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

Each step is four calls with explicit hand-offs: the state read here, ``plan.plan_step`` (2),
``range_read.read_range`` (3), ``step_write.write_step`` (4); ``reorg`` finds the ancestor and
halts on a deep reorg. ``run`` steps in a loop, with backoff on failures and a gap pass
(``gaps.recover_gaps``) whenever caught up.

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
from dataclasses import dataclass

import structlog

from glisk.errors import DatabaseError
from glisk.ingest import state
from glisk.ingest.metrics import IngestMetrics
from glisk.ingest.node import ChainMoved, Node, NodeUnavailable
from glisk.ingest.options import FollowerOptions
from glisk.ingest.plan import plan_step
from glisk.ingest.range_read import read_range
from glisk.ingest.reorg import DeepReorg, Kept
from glisk.ingest.state import Cursor
from glisk.ingest.step_write import CursorMoved, StepReport, write_step
from glisk.uow import UnitOfWorkFactory

__all__ = ["CursorMoved", "Follower", "FollowerOptions", "FollowerStats", "StepReport"]

log = structlog.get_logger("glisk.ingest")

MAX_BACKOFF = 30.0


@dataclass
class FollowerStats:
    """What this follower did since it was built: its committed steps' outcomes, and the steps
    it lost or retried, by cause."""

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
        plan = await plan_step(
            self.node, self.uow_factory, options, cursor, kept, head, self.metrics
        )
        if plan is None:
            await self._note_head(head, head - options.confirmations)
            return None
        read = await read_range(self.node, plan, options.reorg_window)
        report = await write_step(self.uow_factory, self.node, options, plan, read)
        self._head_written = head
        self._count(report)
        return report

    async def _note_head(self, head: int, target: int) -> None:
        if head == self._head_written:
            return
        async with self.uow_factory() as uow:
            await uow.system_state.set_state(state.HEAD, state.head_value(head, target))
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


def _backoff(base: float, failures: int) -> float:
    return min(MAX_BACKOFF, base * 2 ** min(failures - 1, 10))


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
