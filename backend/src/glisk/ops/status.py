"""What ``glisk status`` reports, read with a handful of index-backed statements.

Cost at any table size: each stage's counts walk that stage's partial claim index
(``ix_tokens_s0_claim_*``: only tokens the stage could take), never the table; the per-status
counts of unfinished and failed tokens use ``ix_tokens_s0_status_mint_timestamp``. The one count
that grows with the table's history is the number of revealed tokens: above ``estimate_above``
rows (planner statistics) it is estimated as ``reltuples`` minus every other status's exact count,
and reported as an estimate; ``exact=True`` counts it (an index-only scan of every revealed row).

All times come from the database clock (UTC, as the naive timestamp columns hold).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from functools import cache
from typing import Any

import psycopg

from glisk.models.enums import TokenStatus
from glisk.workers.predicates import CLAIM_INDEX_PREDICATES

NOW = "(now() AT TIME ZONE 'utc')"
STAGE_NAMES: tuple[str, ...] = tuple(CLAIM_INDEX_PREDICATES)

# Above this many rows (planner statistics) the revealed total is an estimate unless asked exactly.
ESTIMATE_ABOVE = 100_000

_STAGE_COUNTS = """
-- status_{stage}: the stage's tokens by lease state. Walks ix_tokens_s0_claim_{stage} (the same
-- predicate), so it reads only the stage's backlog. 'waiting' is unclaimed and past any backoff;
-- an expired lease is claimable too but counted apart (its holder died or stalled).
SELECT
    count(*) FILTER (WHERE claim_id IS NULL AND (not_before IS NULL OR not_before <= {now})),
    count(*) FILTER (WHERE claim_id IS NOT NULL AND lease_expires_at > {now}),
    count(*) FILTER (WHERE claim_id IS NOT NULL AND lease_expires_at <= {now}),
    count(*) FILTER (WHERE claim_id IS NULL AND not_before > {now}),
    extract(epoch FROM {now} - min(mint_timestamp) FILTER (
        WHERE claim_id IS NULL AND (not_before IS NULL OR not_before <= {now})))
FROM tokens_s0
WHERE {predicate}
"""

_HOLDERS = """
-- status_holders_{stage}: live leases of the stage by holder (the stage's partial index).
SELECT claimed_by, count(*) FROM tokens_s0
WHERE {predicate} AND claim_id IS NOT NULL AND lease_expires_at > {now}
GROUP BY claimed_by ORDER BY count(*) DESC, claimed_by
"""

UNFINISHED_STATUSES: tuple[str, ...] = ("detected", "generating", "uploading", "ready", "failed")

STATUS_COUNTS = """
-- status_counts: every status but 'revealed', exactly, from ix_tokens_s0_status_mint_timestamp
-- (one index range per status: the work is the number of unfinished and failed tokens).
SELECT s.status, (SELECT count(*) FROM tokens_s0 AS t WHERE t.status = s.status)
FROM unnest(CAST(ARRAY['detected', 'generating', 'uploading', 'ready', 'failed']
                 AS token_status_enum[])) AS s(status)
"""

REVEALED_EXACT = "SELECT count(*) FROM tokens_s0 WHERE status = 'revealed'"

TABLE_ROWS = """
-- the planner's row count of tokens_s0 (updated by VACUUM, ANALYZE and autovacuum); -1 or 0
-- before the table was first analyzed.
SELECT reltuples::bigint FROM pg_class WHERE oid = 'tokens_s0'::regclass
"""

FAILED_BY_REASON = """
-- status_failed: failed tokens by stage and reason (ix_tokens_s0_status_mint_timestamp).
SELECT error_data ->> 'stage', error_data ->> 'reason', count(*)
FROM tokens_s0 WHERE status = 'failed'
GROUP BY 1, 2 ORDER BY count(*) DESC, 1, 2
"""


INGEST_STATE = """
-- status_ingest: the log follower's state, four system_state rows by primary key.
SELECT key, state_value FROM system_state
WHERE key IN ('ingest_cursor', 'ingest_head', 'ingest_last_reorg', 'ingest_halted')
"""


@cache
def stage_counts(stage: str) -> str:
    return _STAGE_COUNTS.format(stage=stage, predicate=CLAIM_INDEX_PREDICATES[stage], now=NOW)


@cache
def stage_holders(stage: str) -> str:
    return _HOLDERS.format(stage=stage, predicate=CLAIM_INDEX_PREDICATES[stage], now=NOW)


@dataclass
class StageStatus:
    waiting: int
    in_flight: int
    expired: int
    backoff: int
    oldest_waiting_seconds: float | None
    holders: dict[str, int] = field(default_factory=dict[str, int])


@dataclass
class FailedGroup:
    stage: str | None
    reason: str | None
    count: int


@dataclass
class IngestStatus:
    """``glisk ingest`` as of its last step: the node's head, the last block consumed, the lag
    between them in blocks, the followers' totals, the last reorg, and the stop message of a
    reorg deeper than the window (None while running normally)."""

    cursor: int | None = None
    head: int | None = None
    lag: int | None = None
    head_at: str | None = None
    totals: dict[str, int] = field(default_factory=dict[str, int])
    last_reorg: dict[str, Any] | None = None
    halted: str | None = None


@dataclass
class PipelineStatus:
    at: datetime
    stages: dict[str, StageStatus]
    statuses: dict[str, int]
    revealed_estimated: bool
    failed: list[FailedGroup]
    # None: no follower has run against this database
    ingest: IngestStatus | None = field(default=None, kw_only=True)

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["at"] = self.at.isoformat() + "Z"
        return out


def token_counts(
    conn: psycopg.Connection[Any], *, exact: bool = False, estimate_above: int = ESTIMATE_ABOVE
) -> tuple[dict[str, int], bool]:
    """Tokens by status (every TokenStatus) and whether the revealed count is an estimate."""
    counts = {str(status): int(n) for status, n in conn.execute(STATUS_COUNTS.encode()).fetchall()}
    row = conn.execute(TABLE_ROWS.encode()).fetchone()
    rows = int(row[0]) if row else -1
    estimated = not exact and rows > estimate_above
    if estimated:
        counts["revealed"] = max(0, rows - sum(counts.values()))
    else:
        found = conn.execute(REVEALED_EXACT.encode()).fetchone()
        counts["revealed"] = int(found[0]) if found else 0
    return {s.value: counts.get(s.value, 0) for s in TokenStatus}, estimated


def ingest_status(conn: psycopg.Connection[Any]) -> IngestStatus | None:
    """The follower's state from system_state; None when no follower ever ran here."""
    found = {str(k): v for k, v in conn.execute(INGEST_STATE.encode()).fetchall()}
    if not found:
        return None
    cursor = found.get("ingest_cursor") or {}
    head = found.get("ingest_head") or {}
    block = cursor.get("block") if isinstance(cursor, dict) else None
    top = head.get("head") if isinstance(head, dict) else None
    halted = found.get("ingest_halted")
    totals = (
        {
            name: int(cursor.get(name, 0))
            for name in (
                "new",
                "duplicate",
                "conflict",
                "rolled_back",
                "flagged",
                "steps",
                "reorgs",
            )
        }
        if isinstance(cursor, dict)
        else {}
    )
    return IngestStatus(
        cursor=block,
        head=top,
        lag=max(0, top - block) if isinstance(top, int) and isinstance(block, int) else None,
        head_at=head.get("at") if isinstance(head, dict) else None,
        totals=totals,
        last_reorg=found.get("ingest_last_reorg"),
        halted=halted.get("message") if isinstance(halted, dict) else None,
    )


def collect(
    conn: psycopg.Connection[Any], *, exact: bool = False, estimate_above: int = ESTIMATE_ABOVE
) -> PipelineStatus:
    """Read the pipeline's state. Plain reads in one REPEATABLE READ snapshot: no locks taken,
    nothing written, the numbers consistent with each other."""
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        at_row = conn.execute(f"SELECT {NOW}".encode()).fetchone()
        assert at_row is not None
        stages: dict[str, StageStatus] = {}
        for name in STAGE_NAMES:
            row = conn.execute(stage_counts(name).encode()).fetchone()
            assert row is not None
            holders = {
                str(h): int(n) for h, n in conn.execute(stage_holders(name).encode()).fetchall()
            }
            stages[name] = StageStatus(
                waiting=int(row[0]),
                in_flight=int(row[1]),
                expired=int(row[2]),
                backoff=int(row[3]),
                oldest_waiting_seconds=None if row[4] is None else round(float(row[4]), 3),
                holders=holders,
            )
        statuses, estimated = token_counts(conn, exact=exact, estimate_above=estimate_above)
        failed = [
            FailedGroup(stage, reason, int(n))
            for stage, reason, n in conn.execute(FAILED_BY_REASON.encode()).fetchall()
        ]
        ingest = ingest_status(conn)
    return PipelineStatus(at_row[0], stages, statuses, estimated, failed, ingest=ingest)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    whole = int(seconds)
    if whole < 120:
        return f"{whole}s"
    if whole < 7200:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 172800:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def _ingest_table(ingest: IngestStatus) -> Any:
    from rich.table import Table

    table = Table(title="chain ingest (glisk ingest)", title_justify="left")
    for column in ("head", "cursor", "lag (blocks)", "last step", "last reorg"):
        table.add_column(column, justify="left" if column.startswith("last") else "right")
    reorg = ingest.last_reorg
    last_reorg = (
        f"block {reorg.get('block')}, depth {reorg.get('depth')}, "
        f"{reorg.get('rolled_back', 0)} log(s) rolled back, at {str(reorg.get('at'))[:19]}"
        if isinstance(reorg, dict)
        else "-"
    )
    table.add_row(
        "-" if ingest.head is None else f"{ingest.head:,}",
        "-" if ingest.cursor is None else f"{ingest.cursor:,}",
        "-" if ingest.lag is None else f"{ingest.lag:,}",
        (ingest.head_at or "-")[:19],
        last_reorg,
    )
    if ingest.halted:
        from rich.console import Group
        from rich.text import Text

        return Group(table, Text(f"STOPPED: {ingest.halted}", style="bold red"))
    return table


def render(status: PipelineStatus) -> Any:
    """A rich renderable: the stages, the failures and the totals."""
    from rich.console import Group
    from rich.table import Table

    stages = Table(
        title=f"GLISK pipeline at {status.at:%Y-%m-%d %H:%M:%S} UTC", title_justify="left"
    )
    for column in ("stage", "waiting", "in flight", "expired", "backoff", "oldest waiting"):
        stages.add_column(column, justify="left" if column == "stage" else "right")
    stages.add_column("holders (live leases)", no_wrap=True)
    for name, s in status.stages.items():
        holders = "\n".join(f"{h}: {n}" for h, n in s.holders.items()) or "-"
        stages.add_row(
            name,
            f"{s.waiting:,}",
            f"{s.in_flight:,}",
            f"{s.expired:,}",
            f"{s.backoff:,}",
            _age(s.oldest_waiting_seconds),
            holders,
        )
    failed = Table(title="failed tokens", title_justify="left")
    failed.add_column("stage")
    failed.add_column("reason")
    failed.add_column("tokens", justify="right")
    for group in status.failed:
        failed.add_row(group.stage or "-", group.reason or "-", f"{group.count:,}")
    if not status.failed:
        failed.add_row("-", "-", "0")
    totals = Table(title="tokens by status", title_justify="left")
    for name in status.statuses:
        totals.add_column(name, justify="right")
    totals.add_row(
        *(
            f"~{n:,}" if name == "revealed" and status.revealed_estimated else f"{n:,}"
            for name, n in status.statuses.items()
        )
    )
    parts: list[Any] = [stages, failed, totals]
    if status.ingest is not None:
        parts.append(_ingest_table(status.ingest))
    if status.revealed_estimated:
        parts.append("~ estimate from planner statistics (--exact to count)")
    parts.append("oldest waiting: time since the mint of the oldest claimable token")
    return Group(*parts)
