"""``glisk tokens retry`` and ``glisk tokens show``: one token's story, and failed tokens sent back.

A retry goes through ``Token.retry_from_failed`` for every selected row (the state machine's one
edge out of 'failed'), then writes what the method changed. Set-based in its reads and writes,
row-by-row in its rules: a token the method refuses is reported and left alone.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from glisk.core.timezone import DB_NOW as NOW
from glisk.errors import InvalidStateTransition
from glisk.models import validation as v
from glisk.models.enums import TokenStatus
from glisk.models.token import Token
from glisk.pipeline import STAGES

_COLUMNS = (
    "id, token_id, author_id, minter_address, status, mint_timestamp, image_path, image_cid, "
    "metadata_cid, reveal_tx_hash, error_data, created_at, claimed_by, claim_id, "
    "lease_expires_at, attempts, not_before, deferrals, checkpoint"
)


@dataclass(frozen=True)
class RetryFilter:
    """Which failed tokens to send back; every given filter must match (AND). At least one."""

    ids: tuple[int, ...] | None = None
    reason: str | None = None
    stage: str | None = None
    since: datetime | None = None  # minted at or after (UTC)

    @classmethod
    def parse(
        cls,
        *,
        ids: str | None = None,
        reason: str | None = None,
        stage: str | None = None,
        since: str | None = None,
    ) -> RetryFilter:
        """From the command line's strings; FieldValidationError naming the option."""
        parsed_ids: tuple[int, ...] | None = None
        if ids is not None:
            try:
                parsed_ids = tuple(int(part) for part in ids.split(",") if part.strip())
            except ValueError:
                raise v.FieldValidationError(
                    "--ids", "must be token ids separated by commas, e.g. 12,40,41", ids
                ) from None
            if not parsed_ids:
                raise v.FieldValidationError("--ids", "must name at least one token id", ids)
        if reason is not None:
            # The shell hands over bytes; a value that is not UTF-8 arrives with surrogates that
            # no database text can hold.
            try:
                reason.encode("utf-8")
            except UnicodeEncodeError:
                raise v.FieldValidationError("--reason", "must be text (UTF-8)", reason) from None
        if stage is not None and stage not in STAGES:
            raise v.FieldValidationError("--stage", f"must be one of: {', '.join(STAGES)}", stage)
        parsed_since: datetime | None = None
        if since is not None:
            try:
                parsed_since = datetime.fromisoformat(since)
            except ValueError:
                raise v.FieldValidationError(
                    "--since", "must be an ISO date or time, e.g. 2026-11-26T03:00", since
                ) from None
            if parsed_since.tzinfo is not None:  # the columns hold naive UTC
                try:
                    parsed_since = parsed_since.astimezone(UTC).replace(tzinfo=None)
                except OverflowError:  # 0001-01-01T00:00+01:00 is before year 1 in UTC
                    raise v.FieldValidationError(
                        "--since", "must be a time from year 1 to 9999 in UTC", since
                    ) from None
        if parsed_ids is None and reason is None and stage is None and parsed_since is None:
            raise v.FieldValidationError(
                "filters", "give at least one of --ids, --reason, --stage, --since", None
            )
        return cls(parsed_ids, reason, stage, parsed_since)


@dataclass(frozen=True)
class Moved:
    token_id: int
    stage: str | None  # as recorded in the failure
    reason: str | None
    target: TokenStatus
    # The reveal transaction the token's checkpoint still points at and its state ('pending':
    # it may still be mined), kept so the reveal worker reconciles it before sending anything.
    reveal: tuple[str, str] | None = None


@dataclass
class RetryOutcome:
    moved: list[Moved] = field(default_factory=list[Moved])
    refused: list[tuple[int, str]] = field(default_factory=list[tuple[int, str]])

    def by_target(self) -> dict[str, int]:
        return dict(Counter(m.target.value for m in self.moved))


def _select(selection: RetryFilter) -> tuple[str, dict[str, Any]]:
    # With --ids every named token is read whatever its status, so one that is not failed is
    # refused by the state machine (and reported) instead of silently skipped.
    where = ["status = 'failed'"] if selection.ids is None else ["token_id = ANY(%(ids)s)"]
    params: dict[str, Any] = {}
    if selection.ids is not None:
        params["ids"] = list(selection.ids)
    if selection.reason is not None:
        where.append("error_data ->> 'reason' = %(reason)s")
        params["reason"] = selection.reason
    if selection.stage is not None:
        where.append("error_data ->> 'stage' = %(stage)s")
        params["stage"] = selection.stage
    if selection.since is not None:
        where.append("mint_timestamp >= %(since)s")
        params["since"] = selection.since
    statement = (
        f"SELECT {_COLUMNS}, {NOW} AS now FROM tokens_s0 WHERE {' AND '.join(where)} "
        "ORDER BY token_id FOR UPDATE"
    )
    return statement, params


_WRITE = """
-- retry: what Token.retry_from_failed changed, for a token still failed (locked above).
UPDATE tokens_s0
SET status = CAST(%(status)s AS token_status_enum), image_path = %(image_path)s,
    metadata_cid = %(metadata_cid)s, reveal_tx_hash = %(reveal_tx_hash)s, attempts = 0,
    deferrals = 0, not_before = NULL, checkpoint = %(checkpoint)s, error_data = %(error_data)s
WHERE id = %(id)s AND status = 'failed'
"""

_REVEALS = """
-- retry_reveals: the reveal transactions retried tokens' checkpoints point at (no locks).
SELECT id::text, tx_hash, status FROM reveal_transactions WHERE id = ANY(CAST(%(ids)s AS uuid[]))
"""


def retry_failed(
    conn: psycopg.Connection[Any], selection: RetryFilter, *, dry_run: bool = False
) -> RetryOutcome:
    """Send the selected failed tokens back to their stage, in one transaction.

    Locks the selected rows (FOR UPDATE, in token_id order) so a concurrent retry waits; workers
    never claim a failed token, so they are not in the way. Each stage that receives tokens is
    NOTIFYed (``glisk_stage_<name>``, delivered at commit) so idle workers wake. A dry run reads
    and applies the rules the same way, then rolls back: nothing changes, nothing is notified.
    """
    outcome = RetryOutcome()
    statement, params = _select(selection)
    with conn.cursor(row_factory=dict_row) as cur, conn.transaction() as tx:
        rows = cur.execute(statement.encode(), params).fetchall()
        found = {int(row["token_id"]) for row in rows}
        for missing in sorted(set(selection.ids or ()) - found):
            why = (
                "no such token"
                if selection == RetryFilter(ids=selection.ids)
                else ("no such token, or it does not match the other filters")
            )
            outcome.refused.append((missing, why))
        writes: list[dict[str, Any]] = []
        for row in rows:
            now = row.pop("now")
            token = Token(**row)
            recorded = dict(row["error_data"] or {})
            try:
                target = token.retry_from_failed(at=now)
            except InvalidStateTransition as exc:
                outcome.refused.append((token.token_id, str(exc)))
                continue
            outcome.moved.append(
                Moved(token.token_id, recorded.get("stage"), recorded.get("reason"), target)
            )
            writes.append(
                {
                    "id": token.id,
                    "status": target.value,
                    "image_path": token.image_path,
                    "metadata_cid": token.metadata_cid,
                    "reveal_tx_hash": token.reveal_tx_hash,
                    "checkpoint": None if token.checkpoint is None else Jsonb(token.checkpoint),
                    "error_data": Jsonb(token.error_data),
                }
            )
        _say_which_reveals_are_reconciled(cur, outcome, writes)
        if dry_run:
            raise psycopg.Rollback(tx)  # leaves the block rolled back; not raised further
        if writes:
            cur.executemany(_WRITE.encode(), writes)
            targets = {m.target for m in outcome.moved}
            for stage in STAGES.values():  # wake the stages that claim from where tokens went
                if stage.claim_from in targets:
                    cur.execute("SELECT pg_notify(%s, '')", (stage.channel,))
    return outcome


def _say_which_reveals_are_reconciled(
    cur: psycopg.Cursor[dict[str, Any]], outcome: RetryOutcome, writes: list[dict[str, Any]]
) -> None:
    """Name, on each moved token, the reveal transaction its kept checkpoint points at."""
    pointers: dict[int, str] = {}
    for moved, write in zip(outcome.moved, writes, strict=True):
        checkpoint = write["checkpoint"].obj if write["checkpoint"] is not None else {}
        reveal_id = (checkpoint.get("reveal") or {}).get("id")
        if reveal_id:
            pointers[moved.token_id] = str(reveal_id)
    if not pointers:
        return
    rows = cur.execute(_REVEALS.encode(), {"ids": sorted(set(pointers.values()))}).fetchall()
    found = {row["id"]: (row["tx_hash"] or "?", str(row["status"])) for row in rows}
    outcome.moved = [
        replace(m, reveal=found.get(pointers[m.token_id])) if m.token_id in pointers else m
        for m in outcome.moved
    ]


_TOKEN_REVEALS = f"""
-- show_reveals: the reveal transactions that carried a token (newest first), each with its
-- signed attempts. Reads reveal_transactions whole (no index on token_ids but the partial one for
-- pending reveals): fine for one token at the operator's request.
SELECT r.id::text, r.status, r.nonce, r.sender, r.tx_hash, r.block_number, r.block_hash,
       r.idempotency_key, r.created_at,
       coalesce(jsonb_agg(jsonb_build_object(
           'tx_hash', a.tx_hash, 'kind', a.kind,
           'max_fee_gwei', round(a.max_fee_per_gas / 1e9, 9),
           'tip_gwei', round(a.max_priority_fee_per_gas / 1e9, 9),
           'broadcasts', a.broadcasts,
           'age_seconds', round(CAST(extract(epoch FROM {NOW} - a.created_at) AS numeric), 1))
           ORDER BY a.created_at) FILTER (WHERE a.id IS NOT NULL), '[]')
FROM reveal_transactions AS r LEFT JOIN reveal_attempts AS a ON a.reveal_id = r.id
WHERE %(id)s = ANY(r.token_ids)
GROUP BY r.id
ORDER BY r.created_at DESC
"""


_REVEAL_FIELDS = (
    "id",
    "status",
    "nonce",
    "sender",
    "tx_hash",
    "block_number",
    "block_hash",
    "idempotency_key",
    "created_at",
    "attempts",
)


def show_token(conn: psycopg.Connection[Any], token_id: int) -> dict[str, Any] | None:
    """One token as a dict for printing: status, lease (live/expired/none, by the database
    clock), holder, attempts, deferrals, backoff, checkpoint, error_data (with its history), and
    the reveal transactions that carried it (the keeper's: nonce, key, block, every signed
    attempt with its fees and sends)."""
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            f"SELECT {_COLUMNS}, {NOW} AS now FROM tokens_s0 WHERE token_id = %s".encode(),
            (token_id,),
        ).fetchone()
    if row is None:
        return None
    now = row.pop("now")
    expires = row["lease_expires_at"]
    row["lease"] = "none" if expires is None else ("live" if expires > now else "expired")
    row["status"] = str(row["status"])
    with conn.cursor() as cur:
        reveals = cur.execute(_TOKEN_REVEALS.encode(), {"id": row["id"]}).fetchall()
    row["reveals"] = [dict(zip(_REVEAL_FIELDS, reveal, strict=True)) for reveal in reveals]
    return row
