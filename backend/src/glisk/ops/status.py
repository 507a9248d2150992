"""What ``glisk status`` reports, read with a handful of index-backed statements.

Cost at any table size: each stage's counts walk that stage's partial claim index
(``ix_tokens_s0_claim_*``: only tokens the stage could take), never the table; the per-status
counts of unfinished and failed tokens use ``ix_tokens_s0_status_mint_timestamp``. The one count
that grows with the table's history is the number of revealed tokens: above ``estimate_above``
rows (planner statistics) it is estimated as ``reltuples`` minus every other status's exact count,
and reported as an estimate; ``exact=True`` counts it (an index-only scan of every revealed row).

The statements are ``glisk.ops.queries``'s (the API's gauges send the same); all times come
from the database clock (UTC, as the naive timestamp columns hold).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import psycopg

from glisk.models.enums import TokenStatus
from glisk.ops.queries import (
    ESTIMATE_ABOVE,
    FAILED_BY_REASON,
    IN_FLIGHT,
    IN_FLIGHT_SHOWN,
    INGEST_STATE,
    KEEPER,
    REVEALED_EXACT,
    STATUS_AT,
    STATUS_COUNTS,
    TABLE_ROWS,
    stage_counts,
    stage_holders,
)
from glisk.pipeline import STAGES


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
class KeeperStatus:
    """One reveal keeper (a chain and a sender address) as the database knows it."""

    chain_id: int
    address: str
    next_nonce: int  # the allocator: what the next reveal takes
    confirmed_up_to: int | None  # the nonce after the newest confirmed reveal
    in_flight: int  # pending reveals
    oldest_in_flight_seconds: float | None
    stuck: int  # pending reveals whose newest attempt is older than stuck_after


@dataclass
class InFlight:
    """A pending reveal and its newest signed attempt."""

    nonce: int | None
    sender: str | None
    tokens: int
    age_seconds: float
    tx_hash: str
    max_fee_gwei: float
    tip_gwei: float
    attempt_age_seconds: float
    attempts: int  # the first and its replacements (or a filler)
    broadcasts: int
    stuck: bool


@dataclass
class KeeperReport:
    keepers: list[KeeperStatus]
    in_flight: list[InFlight]  # the oldest, at most IN_FLIGHT_SHOWN
    stuck_after: float
    fee_cap_gwei: float | None


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
    keeper: KeeperReport | None = None
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


def keeper_report(
    conn: psycopg.Connection[Any], *, stuck_after: float = 90.0, fee_cap_gwei: float | None = None
) -> KeeperReport:
    """The reveal keepers' allocators and pending reveals (plain reads, no locks)."""
    params = {"stuck": stuck_after, "limit": IN_FLIGHT_SHOWN}
    keepers = [
        KeeperStatus(
            int(chain_id),
            str(address),
            int(next_nonce),
            None if confirmed is None else int(confirmed),
            int(pending),
            None if oldest is None else round(float(oldest), 3),
            int(stuck),
        )
        for chain_id, address, next_nonce, confirmed, pending, oldest, stuck in conn.execute(
            KEEPER.encode(), params
        ).fetchall()
    ]
    in_flight = [
        InFlight(
            nonce=None if row[0] is None else int(row[0]),
            sender=row[1],
            tokens=int(row[2]),
            age_seconds=round(float(row[3]), 3),
            tx_hash=str(row[4]),
            max_fee_gwei=float(row[5]) / 1e9,
            tip_gwei=float(row[6]) / 1e9,
            attempt_age_seconds=round(float(row[7]), 3),
            attempts=int(row[8]),
            broadcasts=int(row[9] or 0),
            stuck=float(row[7]) > stuck_after,
        )
        for row in conn.execute(IN_FLIGHT.encode(), params).fetchall()
    ]
    return KeeperReport(keepers, in_flight, stuck_after, fee_cap_gwei)


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
    conn: psycopg.Connection[Any],
    *,
    exact: bool = False,
    estimate_above: int = ESTIMATE_ABOVE,
    stuck_after: float = 90.0,
    fee_cap_gwei: float | None = None,
) -> PipelineStatus:
    """Read the pipeline's state. Plain reads in one REPEATABLE READ snapshot: no locks taken,
    nothing written, the numbers consistent with each other. ``stuck_after`` and
    ``fee_cap_gwei`` (REVEAL_STUCK_SECONDS, REVEAL_MAX_GAS_PRICE_GWEI) shape the keeper's part."""
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        at_row = conn.execute(STATUS_AT.encode()).fetchone()
        assert at_row is not None
        stages: dict[str, StageStatus] = {}
        for name in STAGES:
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
        keeper = keeper_report(conn, stuck_after=stuck_after, fee_cap_gwei=fee_cap_gwei)
        ingest = ingest_status(conn)
    return PipelineStatus(at_row[0], stages, statuses, estimated, failed, keeper, ingest=ingest)


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
    if status.keeper is not None and status.keeper.keepers:
        parts.extend(_render_keeper(status.keeper))
    if status.ingest is not None:
        parts.append(_ingest_table(status.ingest))
    if status.revealed_estimated:
        parts.append("~ estimate from planner statistics (--exact to count)")
    parts.append("oldest waiting: time since the mint of the oldest claimable token")
    return Group(*parts)


def _render_keeper(report: KeeperReport) -> list[Any]:
    from rich.table import Table

    cap = "-" if report.fee_cap_gwei is None else f"{report.fee_cap_gwei:g} gwei"
    keepers = Table(
        title=f"reveal keeper (fee cap {cap}, stuck after {report.stuck_after:g} s)",
        title_justify="left",
    )
    for column in ("chain", "sender", "next nonce", "confirmed up to", "in flight", "stuck"):
        keepers.add_column(column, justify="left" if column == "sender" else "right")
    keepers.add_column("oldest in flight", justify="right")
    for k in report.keepers:
        keepers.add_row(
            str(k.chain_id),
            k.address,
            f"{k.next_nonce:,}",
            "-" if k.confirmed_up_to is None else f"{k.confirmed_up_to:,}",
            f"{k.in_flight:,}",
            f"{k.stuck:,}",
            _age(k.oldest_in_flight_seconds),
        )
    parts: list[Any] = [keepers]
    if report.in_flight:
        flying = Table(title="reveals in flight (oldest first)", title_justify="left")
        for column in ("nonce", "tokens", "age", "attempts", "sends", "max fee / tip (gwei)"):
            flying.add_column(column, justify="right")
        flying.add_column("newest transaction", no_wrap=True)
        for r in report.in_flight:
            flying.add_row(
                "-" if r.nonce is None else str(r.nonce),
                str(r.tokens),
                _age(r.age_seconds),
                str(r.attempts),
                str(r.broadcasts),
                f"{r.max_fee_gwei:.3f} / {r.tip_gwei:.3f}",
                f"{r.tx_hash}{'  STUCK' if r.stuck else ''}",
            )
        parts.append(flying)
    return parts
