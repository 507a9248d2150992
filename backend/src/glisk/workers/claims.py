"""What a claim hands a handler, and how a claim statement's rows become claims."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID


@dataclass(frozen=True)
class Claim:
    """A token held by one worker until ``lease_expires_at`` (database time, naive UTC).

    Two ids, both kept: ``token_uuid`` is the token's row (``tokens_s0.id``), the key a batch
    handler's mapping of results uses and the one statements join on; ``token_id`` is its number
    on chain (the NFT's token id), the one log lines and error reports name. ``holder`` is the
    worker that holds it (``claimed_by``). ``attempt`` counts this stage's claims of the token,
    this one included; ``deferrals`` how often a handler asked to be called later (RetryLater)
    in this stage.
    """

    token_uuid: UUID
    token_id: int
    author_id: UUID
    claim_id: UUID
    holder: str
    attempt: int
    lease_expires_at: datetime
    mint_timestamp: datetime
    image_path: str | None
    metadata_cid: str | None
    rescued_from: str | None  # the previous holder whose lease expired, if this is a rescue
    deferrals: int = 0
    # The last checkpoint recorded for this token in this stage (by this holder or one before).
    checkpoint: dict[str, Any] | None = None


@dataclass(frozen=True)
class Exhausted:
    """A token failed by a claim because it had used max_attempts (error_data says why). The
    ids are a Claim's; ``last_holder`` is who held it last."""

    token_uuid: UUID
    token_id: int
    attempts: int
    last_holder: str | None


@dataclass(frozen=True)
class ClaimBatch:
    claims: list[Claim]
    exhausted: list[Exhausted]


def claim_batch(rows: Iterable[Sequence[Any]]) -> ClaimBatch:
    """Split a claim statement's rows (columns in the order the statement returns them) into
    claims, oldest first, and tokens failed for having used their attempts."""
    claims: list[Claim] = []
    exhausted: list[Exhausted] = []
    for (
        token_uuid,
        token_id,
        author_id,
        claim_id,
        holder,
        attempts,
        deferrals,
        lease_expires_at,
        mint_timestamp,
        image_path,
        metadata_cid,
        rescued_from,
        checkpoint,
        claimed,
    ) in rows:
        if claimed:
            claims.append(
                Claim(
                    token_uuid,
                    token_id,
                    author_id,
                    claim_id,
                    holder,
                    attempts,
                    lease_expires_at,
                    mint_timestamp,
                    image_path,
                    metadata_cid,
                    rescued_from,
                    deferrals,
                    checkpoint,
                )
            )
        else:
            exhausted.append(Exhausted(token_uuid, token_id, attempts, holder))
    claims.sort(key=lambda c: (c.mint_timestamp, c.token_uuid))
    return ClaimBatch(claims, exhausted)
