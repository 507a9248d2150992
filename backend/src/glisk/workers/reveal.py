"""A reveal that is sent once: the contract between the reveal stage and a reveal handler.

A reveal handler that can be rescued safely does two things (see the README for an example):
1. before sending, ``record_reveal(claims, tx_hash, {"raw": signed, "nonce": n})``: a pending
   ``reveal_transactions`` row and a checkpoint on every token, fenced by the live claims;
2. a ``reconcile(pending)`` method: given a pending reveal some earlier holder recorded, say what
   became of it: ``"confirmed"`` (mined and successful), ``"failed"`` (reverted, or can never be
   mined: its nonce went to another transaction) or ``"unknown"`` (not mined yet; rebroadcasting
   the recorded signed transaction is safe, a nonce is mined at most once).

The worker, on claiming tokens whose checkpoint points at a pending reveal, reconciles first:
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
from typing import Any, Literal, Protocol, runtime_checkable
from uuid import UUID

from glisk.workers.claims import Claim

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
