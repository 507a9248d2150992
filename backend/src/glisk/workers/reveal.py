"""A reveal that is sent once: the contract between the reveal stage and a reveal handler.

A reveal handler that can be rescued safely does two things (see the README for an example):
1. before sending, ``record_reveal(claims, tx_hash, {"raw": signed, "nonce": n})``: a pending
   ``reveal_transactions`` row and a checkpoint on every token, fenced by the live claims;
2. a ``reconcile(pending)`` method: given a pending reveal some earlier holder recorded, say what
   became of it: ``"confirmed"`` (mined and successful), ``"failed"`` (reverted, or can never be
   mined: its nonce went to another transaction) or ``"unknown"`` (not mined yet; rebroadcasting
   the recorded signed transaction is safe, a nonce is mined at most once).

The worker, on claiming tokens whose checkpoint points at a pending reveal, reconciles first
(``Reconcile``: the reveal stage's settle step, which the executor runs before the handler):
confirmed tokens complete with that hash; failed ones are sent anew with the rest of the batch;
unknown ones wait (a deferral each time, spending no attempt) and, once ``max_deferrals`` is
used, fail (``RevealUnresolved``) for an operator to look at. A token whose last transaction may
still be mined is never put in a new one, nor forgotten: a claim takes it even past
``max_attempts`` (so the reconcile runs; failed then only if the transaction can never be mined),
a final failure keeps the checkpoint's pointer while the reveal row is pending, and the
operator's retry (``Token.retry_from_failed``) keeps it too, so the next reveal claim reconciles
before anything is sent.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable
from uuid import UUID

from glisk.workers import queries
from glisk.workers.claims import Claim
from glisk.workers.retry import Failure

if TYPE_CHECKING:
    from glisk.pipeline import Stage
    from glisk.workers.completer import Completer
    from glisk.workers.retry import RetryPolicy
    from glisk.workers.writes import Writer

RevealState = Literal["confirmed", "failed", "unknown"]


@dataclass(frozen=True)
class PendingReveal:
    """A reveal transaction an earlier holder recorded before sending (maybe never sent)."""

    id: UUID
    tx_hash: str
    data: dict[str, Any]  # what record_reveal was given: the signed transaction, its nonce ...
    claims: Sequence[Claim]  # the claims of this batch whose tokens it carries


@runtime_checkable
class Reconciler(Protocol):
    def reconcile(self, pending: PendingReveal) -> Awaitable[RevealState]: ...


def pending_reveal_of(claim: Claim) -> dict[str, Any] | None:
    """The reveal a claim's checkpoint points at, as record_reveal wrote it, if any."""
    checkpoint = claim.checkpoint or {}
    reveal = checkpoint.get("reveal")
    return reveal if isinstance(reveal, dict) else None


class Reconcile:
    """The reveal stage's settle step (glisk.workers.executor.Settle): before a batch goes to
    the handler, settle the pending reveals its claims' checkpoints point at. Confirmed tokens
    are handed to the completer with the hash that was mined, tokens of a reveal that can never
    be mined go back into the batch (or fail, past ``max_attempts``), tokens of one that may
    still be mined wait (see the module docstring). Writes go through ``writer.write_for``: it
    raises LeaseLost when the database could not be reached while the leases lived."""

    def __init__(
        self,
        handler: Reconciler,
        writer: Writer,
        completer: Completer,
        retry: RetryPolicy,
        log: Any,
    ) -> None:
        self._handler = handler
        self._writer = writer
        self._completer = completer
        self._retry = retry
        self._log = log

    @staticmethod
    def of(
        stage: Stage,
        handler: object,
        writer: Writer,
        completer: Completer,
        retry: RetryPolicy,
        log: Any,
    ) -> Reconcile | None:
        """The settle step for ``handler`` on ``stage``: a batch handler that can reconcile
        (a Reconciler) gets one; any other, none."""
        if stage.whole_batch and isinstance(handler, Reconciler):
            return Reconcile(handler, writer, completer, retry, log)
        return None

    async def __call__(self, claims: list[Claim]) -> list[Claim]:
        """The claims free to go into a new transaction; the others get a result or a failure."""
        groups: dict[UUID, list[Claim]] = {}
        fresh: list[Claim] = []
        for claim in claims:
            reveal = pending_reveal_of(claim)
            if reveal is None:
                fresh.append(claim)
            else:
                groups.setdefault(UUID(str(reveal["id"])), []).append(claim)
        if not groups:
            return fresh
        write_for = self._writer.write_for
        rows = await write_for(claims, "reveals", queries.REVEALS, {"ids": list(groups)})
        known = {row[0]: (row[1], row[2]) for row in rows}
        for reveal_id, held in groups.items():
            tx_hash, state = known.get(reveal_id, ("", "failed"))
            if state == "pending":
                recorded = pending_reveal_of(held[0]) or {}
                pending = PendingReveal(reveal_id, tx_hash, dict(recorded.get("data") or {}), held)
                try:
                    state = await self._handler.reconcile(pending)
                except Exception as exc:  # the pointer stays (see _FAIL): retried, or failed
                    self._completer.add_failures(self._retry.failure(c, exc) for c in held)
                    continue
                if state == "failed":
                    await write_for(held, "fail_reveal", queries.FAIL_REVEAL, {"id": reveal_id})
                elif state == "confirmed":  # the mined one may be a replacement: its hash
                    rows = await write_for(held, "reveals", queries.REVEALS, {"ids": [reveal_id]})
                    tx_hash = rows[0][1] if rows else tx_hash
            self._log.info("worker.reconcile", reveal=str(reveal_id), state=state, tokens=len(held))
            if state == "confirmed":
                self._completer.add_results((claim, tx_hash) for claim in held)
            elif state == "failed":
                # Claimed past max_attempts only because this reveal was pending (see the claim
                # statement): now that it can never be mined, those tokens fail for good.
                spent = [c for c in held if c.attempt > self._retry.max_attempts]
                error = {"type": "RevealFailed", "message": f"{tx_hash} can never be mined"}
                self._completer.add_failures(Failure(c, error, "retry", 0.0) for c in spent)
                fresh.extend(c for c in held if c.attempt <= self._retry.max_attempts)
            else:  # not mined yet, and may still be: never put these tokens in a new transaction
                self._completer.add_failures(self._unresolved(claim, tx_hash) for claim in held)
        return fresh

    def _unresolved(self, claim: Claim, tx_hash: str) -> Failure:
        """Wait for a reveal that is neither mined nor dropped yet, a bounded number of times."""
        return self._retry.wait(
            claim,
            {"type": "RevealPending", "message": tx_hash},
            then={
                "type": "RevealUnresolved",
                "message": f"{tx_hash} neither mined nor dropped after {claim.deferrals} checks",
            },
        )
