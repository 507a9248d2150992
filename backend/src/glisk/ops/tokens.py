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

from glisk.errors import InvalidStateTransition
from glisk.models import validation as v
from glisk.models.enums import TokenStatus
from glisk.models.token import Token
from glisk.ops.queries import (
    RETRY_REVEALS,
    RETRY_WRITE,
    SHOW_TOKEN,
    TOKEN_REVEALS,
    WAKE_STAGE,
    retry_select,
)
from glisk.pipeline import STAGES


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
    """The retry's selection and its parameters: one per filter given."""
    given = {
        "ids": None if selection.ids is None else list(selection.ids),
        "reason": selection.reason,
        "stage": selection.stage,
        "since": selection.since,
    }
    params = {name: value for name, value in given.items() if value is not None}
    return retry_select(tuple(params)), params


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
            cur.executemany(RETRY_WRITE.encode(), writes)
            targets = {m.target for m in outcome.moved}
            for stage in STAGES.values():  # wake the stages that claim from where tokens went
                if stage.claim_from in targets:
                    cur.execute(WAKE_STAGE.encode(), (stage.channel,))
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
    rows = cur.execute(RETRY_REVEALS.encode(), {"ids": sorted(set(pointers.values()))}).fetchall()
    found = {row["id"]: (row["tx_hash"] or "?", str(row["status"])) for row in rows}
    outcome.moved = [
        replace(m, reveal=found.get(pointers[m.token_id])) if m.token_id in pointers else m
        for m in outcome.moved
    ]


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
        row = cur.execute(SHOW_TOKEN.encode(), (token_id,)).fetchone()
    if row is None:
        return None
    now = row.pop("now")
    expires = row["lease_expires_at"]
    row["lease"] = "none" if expires is None else ("live" if expires > now else "expired")
    row["status"] = str(row["status"])
    with conn.cursor() as cur:
        reveals = cur.execute(TOKEN_REVEALS.encode(), {"id": row["id"]}).fetchall()
    row["reveals"] = [dict(zip(_REVEAL_FIELDS, reveal, strict=True)) for reveal in reveals]
    return row
