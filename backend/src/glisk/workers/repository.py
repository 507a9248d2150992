"""Leased claims inside a unit of work (``uow.leases``): the same statements the worker sends.

The transactional worker queries (TokenRepository.get_pending_*) hold row locks, and a pooled
connection, for as long as the caller's transaction runs. Stages that call slow services instead
claim: one short statement records a holder, a fencing id (claim_id) and a lease, and the caller
commits at once and works without a transaction. Every later write is conditioned on the claim_id
and a live lease, so a holder that was presumed dead and rescued cannot overwrite its successor's
work. ``glisk.workers.Worker`` drives this for you; this repository is for code that claims by
hand, and for tests.

Like every repository this one only flushes; each method is meant to be its own short unit of work.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any
from uuid import UUID

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from glisk.models import Token, TokenStatus
from glisk.models import validation as v
from glisk.pipeline import Stage
from glisk.workers import queries
from glisk.workers.claims import Claim, ClaimBatch, claim_batch


class TokenLeaseRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def _rows(self, query: str, params: dict[str, Any]) -> Sequence[Any]:
        # The statements are written for psycopg's parameter style; exec_driver_sql hands them
        # to the driver as they are, inside this session's transaction.
        connection = await self.session.connection()
        return (await connection.exec_driver_sql(query, params)).all()

    async def claim(
        self,
        stage: Stage,
        holder: str,
        *,
        batch: int,
        lease_seconds: float,
        max_attempts: int,
    ) -> ClaimBatch:
        """Claim up to ``batch`` of the oldest tokens the stage may take: fresh, released, past
        their backoff, or abandoned by a holder whose lease ran out.

        Locks: FOR UPDATE SKIP LOCKED on the candidate rows, held until the caller commits (commit
        at once: the claim itself, not a transaction, is what holds the token afterwards).
        Candidates that already used ``max_attempts`` are failed instead, with error_data giving
        the reason, attempts, last holder and last error; they count against ``batch``.
        """
        v.text_length("holder", holder, 1, 255)
        if not 1 <= batch <= stage.max_batch:
            raise v.FieldValidationError("batch", f"must be 1 to {stage.max_batch}", batch)
        if not lease_seconds > 0:
            raise v.FieldValidationError("lease_seconds", "must be > 0", lease_seconds)
        v.int_at_least("max_attempts", max_attempts, 1)
        params = {"holder": holder, "lease_seconds": lease_seconds, "max_attempts": max_attempts}
        return claim_batch(await self._rows(queries.claim(stage, batch), params))

    async def heartbeat(self, claim_ids: list[UUID], lease_seconds: float) -> set[UUID]:
        """Extend the leases of these claims that are still live; returns the claim ids kept.
        A claim missing from the result has expired (it may already belong to someone else)."""
        if not claim_ids:
            return set()
        params = {"claim_ids": list(claim_ids), "lease_seconds": lease_seconds}
        return {row[0] for row in await self._rows(queries.HEARTBEAT, params)}

    async def _held(self, claim: Claim) -> Token | None:
        """The token, locked FOR UPDATE until the caller commits, if ``claim`` is still live."""
        result = await self.session.execute(
            select(Token)
            .where(
                col(Token.id) == claim.token_uuid,
                col(Token.claim_id) == claim.claim_id,
                col(Token.lease_expires_at) > text(queries.NOW),
            )
            .with_for_update()
            .execution_options(populate_existing=True)
        )
        return result.scalar_one_or_none()

    async def complete(self, stage: Stage, claim: Claim, result: str) -> Token | None:
        """Apply the stage's transition with the handler's ``result`` and end the claim.

        Returns the token, or None when the claim is no longer live (expired or taken over): the
        late holder's result is refused and nothing changes. Raises InvalidStateTransition or
        FieldValidationError if the result or the token's state does not allow the transition.
        """
        token = await self._held(claim)
        if token is None:
            return None
        # The Token method of the stage's transition: the worker's set-based completion applies
        # the same edge, checked against the state machine when glisk.pipeline loads.
        getattr(token, stage.complete_with)(result)
        token.claim_id = None
        token.lease_expires_at = None
        token.attempts = 0  # attempts, deferrals and backoff count per stage
        token.deferrals = 0
        token.not_before = None
        token.checkpoint = None
        await self.session.flush()
        return token

    async def fail(
        self,
        stage: Stage,
        claim: Claim,
        error: dict[str, Any],
        *,
        max_attempts: int,
        permanent: bool = False,
        retry_in: float = 0.0,
        defer: bool = False,
    ) -> Token | None:
        """Record a failed attempt and end the claim. With attempts left (and not ``permanent``)
        the token waits ``retry_in`` seconds for another claim, its error_data holding
        ``last_error``; otherwise it goes to 'failed' with the reason. ``defer=True`` (a
        RetryLater) gives the attempt back and waits ``retry_in``. None when the claim is no
        longer live."""
        if not retry_in >= 0:
            raise v.FieldValidationError("retry_in", "must be >= 0", retry_in)
        kind = "permanent" if permanent else "defer" if defer else "retry"
        params = {
            "claim_ids": [claim.claim_id],
            "errors": [json.dumps(error)],
            "kinds": [kind],
            "delays": [float(retry_in)],
            "max_attempts": max_attempts,
        }
        if not await self._rows(queries.fail(stage), params):
            return None
        return await self.session.get(Token, claim.token_uuid, populate_existing=True)

    async def checkpoint(self, claims: Sequence[Claim], data: dict[str, Any]) -> bool:
        """Record ``data`` as the checkpoint of every claim in ``claims`` if all are still live,
        else of none; returns whether it was written (see glisk.workers.checkpoints)."""
        ids = sorted({c.claim_id for c in claims})
        params = {"claim_ids": ids, "checkpoint": json.dumps(data)}
        return len(await self._rows(queries.CHECKPOINT, params)) == len(ids) > 0

    async def release(self, claim_ids: list[UUID], *, stage: Stage | None = None) -> int:
        """Give back claims whose work was never started (shutdown): the attempt is not counted
        and the tokens are claimable at once (``stage``'s idle workers are woken). Returns how
        many were still held."""
        if not claim_ids:
            return 0
        return len(await self._rows(queries.release(stage), {"claim_ids": list(claim_ids)}))

    async def count_claimed(self, status: TokenStatus | None = None) -> int:
        """Tokens currently under a claim (live or expired); for monitoring and tests."""
        params = {"status": None if status is None else status.value}
        return int((await self._rows(queries.COUNT_CLAIMED, params))[0][0])
